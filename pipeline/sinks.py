"""Records to Parquet, one file per input shard (and partition), with a commit manifest that makes resume exact.

Layout: `OUTPUT/<partition>/<shard>.parquet` (`scores/` for scoring; `train/` and `val/` for synthetic pairs),
`OUTPUT/_manifest/<shard>.json` (the shard's commit record, written only after its Parquet files are durable),
`OUTPUT/summary.json`. A shard's file names are fixed, so a rerun after a crash overwrites any uncommitted file
rather than adding a second copy: the committed files hold every input sample exactly once. Readers go through
`read_committed` / `read_scores`, which read committed files only.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter, defaultdict

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.sources import SHARD_END
from pipeline.storage import filesystem_for, join, shard_id

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
])
MANIFEST_DIR = "_manifest"
SCORES_DIR = "scores"


def committed_shards(output: str) -> dict[str, dict]:
    """Commit records by shard URI, read from the manifest."""
    fs, root = filesystem_for(output)
    selector = pafs.FileSelector(f"{root}/{MANIFEST_DIR}", allow_not_found=True)
    entries = {}
    for info in fs.get_file_info(selector):
        if info.type == pafs.FileType.File and info.path.endswith(".json"):
            with fs.open_input_stream(info.path) as f:
                entry = json.loads(f.read())
            entries[entry["shard"]] = entry
    return entries


def read_committed(output: str, schema: pa.Schema) -> pa.Table:
    """All committed records of an output (uncommitted files from an interrupted run are ignored)."""
    fs, root = filesystem_for(output)
    files = [f"{root}/{f}" for e in committed_shards(output).values() for f in e["files"]]
    if not files:
        return schema.empty_table()
    return pads.dataset(files, schema=schema, filesystem=fs, format="parquet").to_table()


def read_scores(output: str) -> pa.Table:
    """All committed score records of a scoring output."""
    return read_committed(output, SCORE_SCHEMA)


def write_json(uri: str, payload: dict) -> None:
    fs, path = filesystem_for(uri)
    _write_atomically(fs, path, lambda f: f.write(json.dumps(payload, indent=2, sort_keys=True).encode()))


def _write_atomically(fs: pafs.FileSystem, path: str, write) -> None:
    """Object stores publish an upload only when it completes; a local file is written aside, then renamed."""
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(tmp) as f:
            write(f)
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            write(f)


class ShardCommitter:
    """Collects records as they stream in, in any order, and commits each shard once all its records are
    present (its SHARD_END marker carries the sample count; each sample yields `rows_per_sample` records, told
    apart by `row_key`): Parquet files first, then the manifest entry."""

    def __init__(self, output: str, schema: pa.Schema = SCORE_SCHEMA, on_commit=None, rows_per_sample: int = 1,
                 row_key=lambda row: row["ordinal"], partition=lambda row: SCORES_DIR):
        self.output = output
        self.fs, self.root = filesystem_for(output)
        self.schema = schema
        self.rows_per_sample, self.row_key, self.partition = rows_per_sample, row_key, partition
        self._rows: dict[str, dict[object, dict]] = defaultdict(dict)  # shard -> row key -> record
        self._expected: dict[str, int] = {}
        self.committed: list[str] = []
        self.errors_by_reason: Counter = Counter()
        self.error_examples: dict[str, str] = {}
        self.samples = self.scored = self.truncated = 0
        self.on_commit = on_commit
        self.started = time.time()
        self.first_commit: tuple[float, int] | None = None  # (time, samples then): start-up vs steady state

    def add(self, batch: pa.Table) -> None:
        touched = set()
        for row in batch.to_pylist():
            shard = row["source"]
            if row["kind"] == SHARD_END:
                self._expected[shard] = int(row["id"]) * self.rows_per_sample
            else:
                self._rows[shard][self.row_key(row)] = row  # a retried task's duplicate replaces, never adds
            touched.add(shard)
        for shard in touched:
            if shard in self._expected and len(self._rows[shard]) == self._expected[shard]:
                self._commit(shard)

    def _commit(self, shard: str) -> None:
        rows = self._rows.pop(shard)
        expected = self._expected.pop(shard)
        records = [rows[k] for k in sorted(rows)]
        name = shard_id(shard)
        by_partition: dict[str, list[dict]] = defaultdict(list)
        for r in records:
            by_partition[self.partition(r)].append(r)
        files = []
        for partition, part in sorted(by_partition.items()):
            table = pa.Table.from_pylist([{k: r.get(k) for k in self.schema.names} for r in part], schema=self.schema)
            files.append(f"{partition}/{name}.parquet")
            _write_atomically(self.fs, f"{self.root}/{files[-1]}",
                              lambda f, t=table: pq.write_table(t, f, compression="zstd"))
        errors = [r["error"] for r in records if r.get("error")]
        entry = {"shard": shard, "files": files, "records": expected, "errors": len(errors),
                 "model": records[0].get("model") if records else None,
                 "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_json(join(self.output, MANIFEST_DIR, f"{name}.json"), entry)

        self.committed.append(shard)
        self.samples += len(records)
        self.scored += len(records) - len(errors)
        self.truncated += sum(1 for r in records if r.get("truncated"))
        if self.first_commit is None:
            self.first_commit = (time.time(), self.samples)
        for reason in errors:
            category = reason.split(":", 1)[0]
            self.errors_by_reason[category] += 1
            self.error_examples.setdefault(category, reason)
        if self.on_commit:
            self.on_commit(self)

    @property
    def pending(self) -> dict[str, tuple[int, int | None]]:
        """Shards seen but not committed: (records received, records expected or None)."""
        shards = set(self._rows) | set(self._expected)
        return {s: (len(self._rows.get(s, {})), self._expected.get(s)) for s in shards}
