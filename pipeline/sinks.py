"""Records to Parquet, one file per input shard (and partition), committed through the manifest
(`pipeline.manifest`).

Layout: `OUTPUT/<partition>/<shard>.parquet` (`scores/` for scoring; `train/`, `val/`, `errors/` for synthetic
pairs; `selected/` for curation), named after the shard's path relative to the input root. A shard's file names are
fixed, so a rerun after a crash overwrites any uncommitted file rather than adding a second copy: the committed
files hold every input sample exactly once. Readers go through `read_committed` / `read_scores`, which read
committed files only, and check that every commit belongs to the output's one model and settings.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.manifest import (
    CONSOLIDATE_EVERY,
    check_entries,
    consolidate,
    read_json,
    read_manifest,
    write_bytes,
    write_entry,
    write_json,
)
from pipeline.sources import SHARD_END, SHARD_FAILED
from pipeline.storage import filesystem_for, output_name

__all__ = ["SCORES_DIR", "SCORE_SCHEMA", "ShardCommitter", "read_committed", "read_json", "read_scores", "write_json"]

SCORE_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("source", pa.string()),
    ("kind", pa.string()),
    ("score", pa.float32()),
    ("label", pa.int8()),
    ("probs", pa.list_(pa.float32())),
    ("n_images", pa.int32()),
    ("n_tokens", pa.int32()),
    ("truncated", pa.bool_()),
    ("error", pa.string()),
    ("model", pa.string()),
    ("key", pa.string()),
    ("url", pa.string()),
])
SCORES_DIR = "scores"


def read_committed(output: str, schema: pa.Schema) -> pa.Table:
    """All committed records of an output (uncommitted files of an interrupted run are ignored)."""
    entries = read_manifest(output)
    check_entries(output, entries)
    fs, root = filesystem_for(output)
    files = [f"{root}/{f}" for e in entries.values() for f in e["files"]]
    if not files:
        return schema.empty_table()
    dataset = pads.dataset(files, filesystem=fs, format="parquet")
    # Outputs of earlier versions lack newer columns (key, url): read what is there, fill the rest with nulls.
    present = [n for n in schema.names if n in dataset.schema.names]
    table = dataset.to_table(columns=present)
    for i, field in enumerate(schema):
        if field.name not in present:
            table = table.add_column(i, field, pa.nulls(table.num_rows, field.type))
    return table.select(schema.names).cast(schema)


def read_scores(output: str) -> pa.Table:
    """All committed score records of a scoring output."""
    return read_committed(output, SCORE_SCHEMA)


class ShardCommitter:
    """Collects records as they stream in, in any order, and commits each shard once all its records are present
    (its SHARD_END marker carries the sample count; each sample yields `rows_per_sample` records, told apart by
    `row_key`): Parquet files first, then the commit record. A shard whose reader reported a fault (SHARD_FAILED)
    is never committed; its rows are dropped and its reason kept for the summary."""

    def __init__(self, output: str, schema: pa.Schema, identity: str, lease=None, on_commit: Callable | None = None,
                 rows_per_sample: int = 1, row_key: Callable = lambda row: row["ordinal"],
                 partition: Callable = lambda row: SCORES_DIR, consolidate_every: int = CONSOLIDATE_EVERY,
                 on_records: Callable[[list[dict]], None] | None = None,
                 describe: Callable[[str], dict] | None = None, committed: dict[str, dict] | None = None):
        self.output = output
        self.fs, self.root = filesystem_for(output)
        self.schema, self.identity, self.lease = schema, identity, lease
        self.rows_per_sample, self.row_key, self.partition = rows_per_sample, row_key, partition
        self.on_commit, self.on_records, self.consolidate_every = on_commit, on_records, consolidate_every
        self.describe = describe  # shard -> what its commit record says about it (its input URI and format)
        # file stems already taken in the output, by shard: a second corpus' `00000.parquet` beside the first's
        # `00000.tar` gets `00000.parquet.parquet`, never the other's file
        self._names = {f.split("/", 1)[-1].removesuffix(".parquet"): key
                       for key, entry in (committed or {}).items() for f in entry.get("files", [])}
        self._rows: dict[str, dict[object, dict]] = defaultdict(dict)  # shard -> row key -> record
        self._expected: dict[str, int] = {}
        self._extra: dict[str, dict] = {}  # shard -> files the stage wrote itself, and its own counts
        self._unconsolidated: list[dict] = []
        self.entries: list[dict] = []  # commit records of this run
        self.committed: list[str] = []
        self.failed: dict[str, str] = {}  # shard -> why it could not be read as configured
        self.errors_by_category: Counter = Counter()
        self.error_examples: dict[str, str] = {}
        self.samples = self.scored = self.truncated = 0
        self.first_commit: tuple[float, int] | None = None  # (time, samples then): start-up vs steady state

    def add(self, batch: pa.Table) -> None:
        touched = set()
        for row in batch.to_pylist():
            shard = row["source"]
            if shard in self.failed:
                continue
            if row["kind"] == SHARD_FAILED:
                self.failed[shard] = row["error"]
                self._rows.pop(shard, None)
                self._expected.pop(shard, None)
                self._extra.pop(shard, None)
                continue
            if row["kind"] == SHARD_END:
                self._expected[shard] = int(row["id"]) * self.rows_per_sample
                self._extra[shard] = json.loads(row["meta"]) if row.get("meta") else {}
            else:
                self._rows[shard][self.row_key(row)] = row  # a retried task's duplicate replaces, never adds
            touched.add(shard)
        for shard in touched:
            if shard in self._expected and len(self._rows[shard]) == self._expected[shard]:
                self._commit(shard)

    def _commit(self, shard: str) -> None:
        if self.lease is not None:
            self.lease.check()  # never commit into an output another job holds
        rows = self._rows.pop(shard)
        expected = self._expected.pop(shard)
        records = [rows[k] for k in sorted(rows)]
        name = output_name(shard)
        if self._names.setdefault(name, shard) != shard:
            name = output_name(shard, keep_suffix=True)
        by_partition: dict[str, list[dict]] = defaultdict(list)
        for r in records:
            by_partition[self.partition(r)].append(r)
        files = []
        for partition, part in sorted(by_partition.items()):
            table = pa.Table.from_pylist([{k: r.get(k) for k in self.schema.names} for r in part], schema=self.schema)
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink, compression="zstd")
            files.append(f"{partition}/{name}.parquet")
            write_bytes(self.fs, f"{self.root}/{files[-1]}", sink.getvalue().to_pybytes())
        errors = [r for r in records if r.get("error")]
        extra = self._extra.pop(shard, {})
        entry = {"shard": shard, "files": files, "records": expected, "errors": len(errors),
                 "identity": self.identity, "model": records[0].get("model") if records else None,
                 "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if self.describe:
            entry.update(self.describe(shard))
        for key in ("artifacts", "stats"):  # files the stage wrote itself (curation's shards), its own counts
            if key in extra:
                entry[key] = extra[key]
        write_entry(self.output, entry)
        self._unconsolidated.append(entry)
        self.entries.append(entry)
        if len(self._unconsolidated) >= self.consolidate_every:
            self.consolidate()

        self.committed.append(shard)
        self.samples += len(records)
        self.scored += len(records) - len(errors)
        self.truncated += sum(1 for r in records if r.get("truncated"))
        if self.first_commit is None:
            self.first_commit = (time.time(), self.samples)
        for r in errors:
            category = r.get("error_category") or r["error"].split(":", 1)[0]
            self.errors_by_category[category] += 1
            self.error_examples.setdefault(category, r["error"])
        if self.on_records:
            self.on_records(records)
        if self.on_commit:
            self.on_commit(self)

    def consolidate(self) -> None:
        """Fold this run's per-shard commit records into one manifest part (safe to interrupt at any point)."""
        consolidate(self.output, self._unconsolidated)
        self._unconsolidated = []

    @property
    def pending(self) -> dict[str, tuple[int, int | None]]:
        """Shards seen but neither committed nor failed: (records received, records expected or None)."""
        shards = set(self._rows) | set(self._expected)
        return {s: (len(self._rows.get(s, {})), self._expected.get(s)) for s in shards}

    def incomplete(self) -> dict[str, str]:
        """Every shard of this run that is not committed, with the reason."""
        out = dict(self.failed)
        for shard, (got, expected) in self.pending.items():
            out[shard] = (f"incomplete: {got} of {expected} records arrived" if expected is not None
                          else f"incomplete: {got} records arrived, the shard's end was never seen")
        return out
