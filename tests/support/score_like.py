"""Score-like records for the commit tests, built without any job: the commit protocol knows none, and a process
that only commits (the tests' subprocesses) need not import a job's package (scoring's pulls in torch and Ray)."""

from __future__ import annotations

import pyarrow as pa

from pipeline.commit.markers import end_marker, wire_schema

RECORDS = wire_schema(("score", pa.float32()), ("label", pa.int8()))


def scores_folder(table: pa.Table) -> list[str]:
    """Every record goes to `OUTPUT/scores/`, as scoring's do."""
    return ["scores"] * table.num_rows


def shard_rows(key: str, n: int, score: float = 1.0) -> list[dict]:
    """The `n` records of shard `key` (ids `<key>-<i>`)."""
    return [{"id": f"{key}-{i}", "source": key, "kind": "caption", "ordinal": i, "score": score, "label": 1}
            for i in range(n)]


def shard_table(key: str, n: int) -> pa.Table:
    """A whole shard on the wire: its `n` records, then its end marker."""
    return pa.Table.from_pylist([*shard_rows(key, n), end_marker(key, n)], schema=RECORDS)
