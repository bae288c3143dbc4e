"""Reading an output's committed records: the files its commit records name, and nothing an interrupted run left
behind; the output's identity checked first (one model, one set of settings), a committed file that is gone named,
and each file checked against what its commit record says it was (bytes, records, sha256): a file cut or replaced
since is named with what to do, never read as a raw Arrow error or as other rows than were committed."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.commit.identity import check_entries
from pipeline.commit.manifest import GONE, damaged_files, read_manifest
from pipeline.errors import CorruptState, OutputMismatch
from pipeline.io.uris import filesystem_for, join

_READERS = 16  # committed files read at once


def read_committed(output: str, schema: pa.Schema, folder: str | None = None) -> pa.Table:
    """All committed records of an output (uncommitted files of an interrupted run are ignored); with `folder`,
    only those in that folder of it (`selected`, not `dropped`)."""
    entries = read_manifest(output)
    check_entries(output, entries)
    damaged = damaged_files(output, entries)
    lost = {shard: [f for f, problem in files.items() if problem == GONE] for shard, files in damaged.items()}
    lost = {shard: files for shard, files in lost.items() if files}
    if lost:
        shard, gone = next(iter(lost.items()))
        raise OutputMismatch("output", f"{output}: {len(lost)} committed shards' files are gone (e.g. {gone[0]} of "
                                       f"{shard}); rerun the job that wrote the output to write them again")
    if damaged:
        shard, files = next(iter(damaged.items()))
        path, problem = next(iter(files.items()))
        raise damaged_file(output, path, shard, problem, len(damaged))
    files = [(shard, f, (e.get("file_checks") or {}).get(f)) for shard, e in entries.items() for f in e["files"]
             if folder is None or f.startswith(f"{folder}/")]
    if not files:
        return schema.empty_table()
    with ThreadPoolExecutor(_READERS) as pool:
        tables = list(pool.map(lambda item: _with_schema(read_committed_file(output, *item, columns=schema.names),
                                                         schema), files))
    return pa.concat_tables(tables)


def read_committed_file(output: str, shard: str, path: str, check: dict | None, columns: list[str] | None = None,
                        field: str = "output") -> pa.Table:
    """One committed file (`path`, relative to `output`) of `shard`, its `columns` that it has: its bytes, sha256
    and records checked against its commit record's `check` where it has one (outputs committed before checks were
    recorded are read as they are). A file that is not what was committed, or does not read, raises CorruptState
    naming it and what to do (reported as the setting `field`)."""
    fs, root = filesystem_for(output)
    try:
        with fs.open_input_file(f"{root}/{path}") as f:
            data = f.read()
    except FileNotFoundError:
        raise damaged_file(output, path, shard, GONE, field=field) from None
    problem = _differs(data, check)
    seen_by_size = bool(check) and check.get("bytes") not in (None, len(data))
    if problem is None:
        try:
            pf = pq.ParquetFile(pa.BufferReader(data))
            present = [c for c in (columns or pf.schema_arrow.names) if c in pf.schema_arrow.names]
            table = pf.read(columns=present)
        except (pa.ArrowException, ValueError, OSError) as err:
            problem = f"it does not read as Parquet ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        else:
            records = check.get("records") if check else None
            if records is not None and table.num_rows != records:
                problem = f"it holds {table.num_rows} records where {records} were committed"
    if problem is not None:
        raise damaged_file(output, path, shard, problem, field=field, seen_by_size=seen_by_size)
    return table


def _differs(data: bytes, check: dict | None) -> str | None:
    if not check:
        return None
    if check.get("bytes") is not None and len(data) != check["bytes"]:
        return f"{len(data)} bytes where {check['bytes']} were committed"
    if check.get("sha256") and hashlib.sha256(data).hexdigest() != check["sha256"]:
        return "its bytes are not those committed (another sha256)"
    return None


def damaged_file(output: str, path: str, shard: str, problem: str, shards: int = 1, field: str = "output",
                 seen_by_size: bool = True) -> CorruptState:
    """The error for a committed file that is not what its commit record says, with what to do: a rerun of the job
    that wrote the output does the shard again when the file is gone or of another size (`damaged_files`); one
    that differs in content alone must be deleted first."""
    more = f" (and {shards - 1} more committed shards' files)" if shards > 1 else ""
    what = "is gone" if problem == GONE else f"is damaged: {problem}"
    todo = (f"rerun the job that wrote {output}: it writes that shard again" if seen_by_size else
            f"delete it and rerun the job that wrote {output}: it writes that shard again")
    return CorruptState(f"{join(output, path)}, the committed file of shard {shard}, {what}{more}; {todo}", field)


def _with_schema(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Outputs of earlier versions lack newer columns (key, url): nulls where a file lacks one."""
    for i, f in enumerate(schema):
        if f.name not in table.column_names:
            table = table.add_column(i, f, pa.nulls(table.num_rows, f.type))
    return table.select(schema.names).cast(schema)
