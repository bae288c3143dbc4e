"""Reading an output's committed records: the files its commit records name, and nothing an interrupted run left
behind; the output's identity checked first (one model, one set of settings), and a committed file that is gone
named."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as pads

from pipeline.commit.identity import check_entries
from pipeline.commit.manifest import missing_files, read_manifest
from pipeline.errors import OutputMismatch
from pipeline.io.uris import filesystem_for


def read_committed(output: str, schema: pa.Schema) -> pa.Table:
    """All committed records of an output (uncommitted files of an interrupted run are ignored)."""
    entries = read_manifest(output)
    check_entries(output, entries)
    lost = missing_files(output, entries)
    if lost:
        shard, gone = next(iter(lost.items()))
        raise OutputMismatch("output", f"{output}: {len(lost)} committed shards' files are gone (e.g. {gone[0]} of "
                                       f"{shard}); rerun the job that wrote the output to write them again")
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
