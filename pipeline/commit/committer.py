"""The committer: records to Parquet, one file per input shard (and partition), committed through the manifest.
It knows no job: the job says its record schema, how records are keyed and which folder each goes to.

Layout: `OUTPUT/<partition>/<shard>.parquet` (`scores/` for scoring; `train/`, `val/`, `errors/` for synthetic
pairs; `selected/` for curation), named after the shard's path relative to the input root. A shard's file names are
fixed, so a rerun after a crash overwrites any uncommitted file rather than adding a second copy: the committed
files hold every input sample exactly once. Readers go through `pipeline.commit.read_committed`, which reads
committed files only and checks that every commit belongs to the output's one identity.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.commit.manifest import (
    CONSOLIDATE_EVERY,
    PARTS_DIR,
    consolidate,
    entry_path,
    file_check,
    write_entry,
)
from pipeline.commit.markers import SHARD_END, SHARD_FAILED
from pipeline.errors import ShardFault, reason_key
from pipeline.io.listing import output_name
from pipeline.io.publish import write_bytes, write_with_retries
from pipeline.io.uris import filesystem_for, join


class ErrorCounts:
    """Error records counted by category and by reason (`reason_key`: what varies per sample taken out), with
    one example per reason (the sample's id and shard, and the reason in full), as img2dataset counts statuses."""

    EXAMPLES = 200  # reasons with an example kept (counts are kept for all)

    def __init__(self):
        self.by_category: Counter = Counter()
        self.by_reason: Counter = Counter()
        self.examples: dict[str, dict] = {}

    def add(self, reason: str, category: str | None, sample_id: str | None, shard: str | None) -> None:
        category = category or reason.split(":", 1)[0]
        key = reason_key(reason)
        self.by_category[category] += 1
        self.by_reason[key] += 1
        if key not in self.examples and len(self.examples) < self.EXAMPLES:
            self.examples[key] = {"id": sample_id, "shard": shard, "error": reason[:500]}

    def add_table(self, errors: pa.Table, shard: str) -> None:
        reasons = errors.column("error").to_pylist()
        names = errors.column_names
        categories = errors.column("error_category").to_pylist() if "error_category" in names else [None] * len(reasons)
        ids = errors.column("id").to_pylist() if "id" in names else [None] * len(reasons)
        for reason, category, sample_id in zip(reasons, categories, ids):
            self.add(reason, category, sample_id, shard)

    def total(self) -> int:
        return sum(self.by_category.values())

    def as_summary(self) -> dict:
        """`by_category`, `by_reason` (most frequent first), `examples` (one per reason)."""
        reasons = dict(self.by_reason.most_common())
        return {"by_category": dict(self.by_category.most_common()), "by_reason": reasons,
                "examples": {k: self.examples[k] for k in reasons if k in self.examples}}


@dataclass(frozen=True)
class RecordLayout:
    """What a job's records are and where they go: their schema, the folder of each (`partition`: records -> a
    folder per record, `scores`, `train`, ...), how many make one sample, and what tells a shard's records apart."""

    schema: pa.Schema
    partition: Callable[[pa.Table], list[str]]
    rows_per_sample: int = 1
    key_columns: tuple[str, ...] = ("ordinal",)


@dataclass(frozen=True)
class CommitHooks:
    """What the job hears and adds as shards commit: `on_records` each shard's committed records, `on_commit` the
    committer after each commit (progress), `describe` a shard's key -> what its commit record says of its input."""

    on_records: Callable[[pa.Table], None] | None = None
    on_commit: Callable | None = None
    describe: Callable[[str], dict] | None = None


@dataclass(frozen=True)
class WritePolicy:
    """How writes are retried (`attempts`, `backoff_s`: `pipeline.io.publish.write_with_retries`'s defaults when
    None) and how many commit records are folded into a manifest part at once."""

    attempts: int | None = None
    backoff_s: float | None = None
    consolidate_every: int = CONSOLIDATE_EVERY


class ShardCommitter:
    """Collects records as they stream in, in any order, and commits each shard once all its records are present
    (its SHARD_END marker carries the sample count; each sample yields `rows_per_sample` records, told apart by the
    `key_columns`): Parquet files first, then the commit record, written inside the lease's fence (a job that
    lost its lease raises LeaseLost and commits nothing more). A shard whose reader reported a fault (SHARD_FAILED),
    or whose files or record could not be written after `write_attempts`, is never committed; its rows are dropped
    and its reason kept for the summary, and the run goes on. Records stay in Arrow all along (a driver commits for
    hundreds of GPUs: see benchmarks/scale.py). `committed`: the output's commit records so far."""

    def __init__(self, output: str, layout: RecordLayout, identity: str, lease=None,
                 committed: dict[str, dict] | None = None, hooks: CommitHooks | None = None,
                 writes: WritePolicy | None = None):
        self.output = output
        self.fs, self.root = filesystem_for(output)
        self.identity = identity
        self.lease = lease
        self.schema = layout.schema
        self.partition = layout.partition  # records -> the folder of each
        self.rows_per_sample = layout.rows_per_sample
        self.key_columns = layout.key_columns
        hooks = hooks or CommitHooks()
        self.on_commit = hooks.on_commit
        self.on_records = hooks.on_records
        self.describe = hooks.describe  # shard -> what its commit record says about it (its input URI and format)
        writes = writes or WritePolicy()
        self.write_attempts = writes.attempts
        self.write_backoff_s = writes.backoff_s
        self.consolidate_every = writes.consolidate_every
        # file stems already taken in the output, by shard: every shard's files are named by its own path with its
        # extension (`00000.tar` -> `scores/00000.tar.parquet`), whatever else the input holds; an output written
        # before that rule may hold a stem another shard would now take
        self._names = {f.split("/", 1)[-1].removesuffix(".parquet"): key
                       for key, entry in (committed or {}).items() for f in entry.get("files", [])}
        self._parts: dict[str, list[pa.Table]] = defaultdict(list)  # shard -> its records as they arrived
        self._keys: dict[str, set] = defaultdict(set)  # shard -> row keys seen (a retried task's rows repeat)
        self._expected: dict[str, int] = {}
        self._extra: dict[str, dict] = {}  # shard -> files the stage wrote itself, and its own counts
        # per-shard commit records to fold into a manifest part: this run's, and any an earlier run left behind
        self._unconsolidated: list[dict] = [e for e in (committed or {}).values() if e.get("_path")]
        self._consolidate_at = self.consolidate_every
        self.consolidation: str | None = None  # why the last consolidation failed, if it did
        self._done: set[str] = set()  # committed in this run: a re-executed task's late rows are dropped
        self.entries: list[dict] = []  # commit records of this run
        self.committed: list[str] = []
        self.failed: dict[str, str] = {}  # shard -> why it was not committed (a read fault, a failed write)
        self.errors = ErrorCounts()
        self.samples = 0  # records committed this run
        self.first_commit: tuple[float, int] | None = None  # (time, samples then): start-up vs steady state

    def add(self, batch: pa.Table) -> None:
        kinds = batch.column("kind").to_pylist()
        markers = [i for i, k in enumerate(kinds) if k in (SHARD_END, SHARD_FAILED)]
        touched = set()
        if len(markers) < len(kinds):
            data = batch.filter(pc.invert(pc.is_in(batch.column("kind"), pa.array([SHARD_END, SHARD_FAILED]))))
            sources = data.column("source")
            keys = list(zip(*(data.column(c).to_pylist() for c in self.key_columns)))
            for shard in pc.unique(sources).to_pylist():
                if shard in self.failed or shard in self._done:
                    continue
                mask = pc.equal(sources, shard)
                self._parts[shard].append(data.filter(mask))
                self._keys[shard].update(k for k, m in zip(keys, mask.to_pylist()) if m)
                touched.add(shard)
        for row in batch.take(markers).to_pylist() if markers else []:
            shard = row["source"]
            if shard in self._done:
                continue
            if row["kind"] == SHARD_FAILED:
                self.failed[shard] = row["error"]
                for pending in (self._parts, self._keys, self._expected, self._extra):
                    pending.pop(shard, None)
            elif shard not in self.failed:
                self._expected[shard] = int(row["id"]) * self.rows_per_sample
                self._extra[shard] = json.loads(row["meta"]) if row.get("meta") else {}
                touched.add(shard)
        for shard in touched:
            if shard in self._expected and len(self._keys[shard]) == self._expected[shard]:
                self._commit(shard)

    def _records(self, shard: str) -> pa.Table:
        """The shard's records, each key once (the last to arrive), in key order."""
        parts = self._parts.pop(shard, [])
        table = pa.concat_tables(parts, promote_options="permissive") if parts else None
        self._keys.pop(shard, None)
        if table is None:
            return pa.table({name: pa.array([], type=field.type) for name, field in
                             zip(self.schema.names, self.schema)})
        keys = list(zip(*(table.column(c).to_pylist() for c in self.key_columns)))
        last = {k: i for i, k in enumerate(keys)}
        return table.take(pa.array([last[k] for k in sorted(last)], pa.int64()))

    def _commit(self, shard: str) -> None:
        if self.lease is not None:
            self.lease.check()  # in memory, before any write: a lease known to be lost or expired ends the run
        records = self._records(shard)
        expected = self._expected.pop(shard)
        extra = self._extra.pop(shard, {})
        errors = records.filter(pc.is_valid(records.column("error"))) if "error" in records.column_names else None
        model = records.column("model")[0].as_py() if "model" in records.column_names and records.num_rows else None
        try:
            files, checks = self._write_files(shard, records)
            entry = {"shard": shard, "files": files, "file_checks": checks, "records": expected,
                     "samples": expected // self.rows_per_sample,
                     "errors": errors.num_rows if errors is not None else 0, "identity": self.identity,
                     "model": model, "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "committed_ns": time.time_ns()}  # which of a shard's records is newest (`read_manifest`)
            if self.describe:
                entry.update(self.describe(shard))
            for key in ("artifacts", "stats"):  # files the stage wrote itself (curation's shards), its own counts
                if key in extra:
                    entry[key] = extra[key]
            write_with_retries(join(self.output, entry_path(shard)), partial(self._write_record, entry),
                               self.write_attempts, self.write_backoff_s)
        except ShardFault as fault:  # a write that kept failing: this shard stays uncommitted, the run goes on
            self.failed[shard] = str(fault)
            return
        self._unconsolidated.append(entry)
        self.entries.append(entry)
        if len(self._unconsolidated) >= self._consolidate_at:
            self.consolidate()
        self._count(shard, records, errors)

    def _write_files(self, shard: str, records: pa.Table) -> tuple[list[str], dict[str, dict]]:
        """The shard's Parquet files (one per partition), each write retried; their paths in the output, and what
        each is (`file_check`: bytes, records, sha256) for the commit record."""
        name = output_name(shard, keep_suffix=True)  # the shard's path with its extension: `00000.tar.parquet`
        if self._names.setdefault(name, shard) != shard:  # an older output's file of another shard, named before
            name = f"{name}-{hashlib.sha1(shard.encode()).hexdigest()[:8]}"
            self._names.setdefault(name, shard)
        partitions = self.partition(records)
        files, checks = [], {}
        for partition in sorted(set(partitions)):
            part = records.filter(pa.array([p == partition for p in partitions])) if len(set(partitions)) > 1 \
                else records
            columns = {f.name: (part.column(f.name) if f.name in part.column_names else
                                pa.nulls(part.num_rows, f.type)) for f in self.schema}
            sink = pa.BufferOutputStream()
            pq.write_table(pa.table(columns).cast(self.schema), sink, compression="zstd")
            files.append(f"{partition}/{name}.parquet")
            data = sink.getvalue().to_pybytes()
            checks[files[-1]] = file_check(data, part.num_rows)
            write_with_retries(join(self.output, files[-1]), partial(
                write_bytes, self.fs, f"{self.root}/{files[-1]}", data), self.write_attempts, self.write_backoff_s)
        return files, checks

    def _write_record(self, entry: dict) -> None:
        """The commit itself: inside the lease's fence, so a job that lost the output writes no record."""
        if self.lease is None:
            write_entry(self.output, entry)
            return
        with self.lease.fenced():
            write_entry(self.output, entry)

    def _count(self, shard: str, records: pa.Table, errors: pa.Table | None) -> None:
        self.committed.append(shard)
        self._done.add(shard)
        self.samples += records.num_rows
        if self.first_commit is None:
            self.first_commit = (time.time(), self.samples)
        if errors is not None and errors.num_rows:
            self.errors.add_table(errors, shard)
        if self.on_records:
            self.on_records(records)
        if self.on_commit:
            self.on_commit(self)

    def consolidate(self) -> None:
        """Fold the per-shard commit records into one manifest part (safe to interrupt at any point). A part that
        cannot be written (after retries) leaves the records where they are, still commits: `consolidation` says
        why, and a later consolidation (of this run or the next) tries again. A job that lost its lease leaves
        them to the job that holds it."""
        if not self._unconsolidated or (self.lease is not None and self.lease.lost):
            return
        try:
            write_with_retries(join(self.output, PARTS_DIR), partial(consolidate, self.output, self._unconsolidated),
                               self.write_attempts, self.write_backoff_s)
        except ShardFault as fault:
            self.consolidation = fault.detail
            self._consolidate_at = len(self._unconsolidated) + self.consolidate_every
            return
        self._unconsolidated, self.consolidation = [], None
        self._consolidate_at = self.consolidate_every

    @property
    def pending(self) -> dict[str, tuple[int, int | None]]:
        """Shards seen but neither committed nor failed: (records received, records expected or None)."""
        shards = set(self._keys) | set(self._expected)
        return {s: (len(self._keys.get(s, ())), self._expected.get(s)) for s in shards}

    def incomplete(self) -> dict[str, str]:
        """Every shard of this run that is not committed, with the reason."""
        out = dict(self.failed)
        for shard, (got, expected) in self.pending.items():
            out[shard] = (f"incomplete: {got} of {expected} records arrived" if expected is not None
                          else f"incomplete: {got} records arrived, the shard's end was never seen")
        return out
