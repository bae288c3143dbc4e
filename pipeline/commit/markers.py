"""The contract between the stages and the committer: what a row on the wire between them is, and the marker row
that closes each shard.

Every row a stage hands on carries the wire columns (`WIRE`): the sample's `id`, its shard (`source`: the shard's
key), its `kind`, its position in the shard (`ordinal`), its error if any, and `meta`. A stage's own schema adds
its columns (`wire_schema`). After a shard's rows comes one marker row: `SHARD_END`, whose `id` is the number of
samples the shard yielded (the committer commits the shard once it has every record) and whose `meta` may carry
the stage's own counts and the files it wrote, or `SHARD_FAILED`, whose `error` says why the shard could not be
read or written as configured: such a shard is never committed, and a rerun does it again.
"""

from __future__ import annotations

import json

import pyarrow as pa

from pipeline.errors import ShardFault

SHARD_END = "_shard_end"
SHARD_FAILED = "_shard_failed"
MARKERS = (SHARD_END, SHARD_FAILED)

WIRE = pa.schema([
    ("id", pa.string()),
    ("source", pa.string()),
    ("kind", pa.string()),
    ("ordinal", pa.int64()),
    ("error", pa.string()),
    ("error_category", pa.string()),
    ("meta", pa.string()),
])


def wire_schema(*fields: pa.Field | tuple) -> pa.Schema:
    """The wire columns plus a stage's own (a field already on the wire keeps its place)."""
    schema = WIRE
    for field in fields:
        field = field if isinstance(field, pa.Field) else pa.field(*field)
        if field.name not in schema.names:
            schema = schema.append(field)
    return schema


def end_marker(source: str, count: int, stats: dict | None = None) -> dict:
    """The row that closes a shard: `count` samples (each yields the job's `rows_per_sample` records), and what
    the stage wants recorded with its commit (`artifacts`: files it wrote itself; `stats`: its own counts)."""
    return {"id": str(count), "source": source, "kind": SHARD_END, "ordinal": -1,
            "meta": json.dumps(stats) if stats else None}


def failed_marker(source: str, fault: ShardFault) -> dict:
    return {"source": source, "kind": SHARD_FAILED, "ordinal": -1, "error": str(fault),
            "error_category": fault.category.value}


def marker_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Marker rows as a table of a stage's schema (every column the marker does not set is null)."""
    return pa.Table.from_pylist([{name: row.get(name) for name in schema.names} for row in rows], schema=schema)


def is_marker(kinds: pa.ChunkedArray | pa.Array) -> pa.Array:
    import pyarrow.compute as pc

    return pc.is_in(kinds, pa.array(MARKERS))
