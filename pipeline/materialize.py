"""Kept samples written back as shards in the input's own format, byte for byte: tar in (webdataset,
interleaved-wds) -> tar out with every member of each kept sample, headers and contents as they were; Parquet in
(parquet, obelics) -> Parquet out with every column of each kept row. Users feed these straight into training.

Samples are matched by the ids the readers give them (the tar key; the Parquet id column, or `<stem>:<row>` for
rows without one), so what is written is exactly what was scored.
"""

from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.sources import SourceOptions
from pipeline.sources.files import open_shard
from pipeline.sources.tar import _key
from pipeline.storage import filesystem_for, is_local

_CHUNK = 16 * 2**20


def _publish(local: Path, uri: str) -> None:
    """Move a finished local file to its destination whole: a rename locally; elsewhere one upload, which the
    object store publishes only once it completes."""
    fs, path = filesystem_for(uri)
    if is_local(uri):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        local.replace(path)
        return
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with open(local, "rb") as f, fs.open_output_stream(path) as out:
        while chunk := f.read(_CHUNK):
            out.write(chunk)


def materialize_tar(input_uri: str, keep: set[str], output_uri: str, options: SourceOptions) -> int:
    """Copy the members of kept keys, in their order and with their headers; returns the samples written."""
    written = set()
    with open_shard(input_uri, options.read_attempts, options.read_backoff_s) as src, \
            tempfile.NamedTemporaryFile(prefix="unifilter-kept-", suffix=".tar", delete=False) as tmp:
        try:
            with tarfile.open(fileobj=src, mode="r:") as tar_in, tarfile.open(fileobj=tmp, mode="w",
                                                                               format=tarfile.PAX_FORMAT) as tar_out:
                for member in tar_in:
                    if member.isfile() and _key(member.name) in keep:
                        tar_out.addfile(member, tar_in.extractfile(member))
                        written.add(_key(member.name))
            tmp.close()
            if written:
                _publish(Path(tmp.name), output_uri)
        finally:
            Path(tmp.name).unlink(missing_ok=True)
    return len(written)


def materialize_parquet(input_uri: str, keep: set[str], output_uri: str, options: SourceOptions) -> int:
    """Copy the kept rows with every column and the input's schema; returns the rows written."""
    stem = input_uri.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    with open_shard(input_uri, options.read_attempts, options.read_backoff_s) as src:
        pf = pq.ParquetFile(src)
        schema = pf.schema_arrow
        with tempfile.NamedTemporaryFile(prefix="unifilter-kept-", suffix=".parquet", delete=False) as tmp:
            pass
        written, row = 0, 0
        try:
            with pq.ParquetWriter(tmp.name, schema, compression="zstd") as writer:
                for group in range(pf.num_row_groups):
                    table = pf.read_row_group(group)
                    if options.id_column in table.column_names:
                        ids = [str(v) if v is not None else f"{stem}:{row + i}"
                               for i, v in enumerate(table.column(options.id_column).to_pylist())]
                    else:
                        ids = [f"{stem}:{row + i}" for i in range(table.num_rows)]
                    mask = pa.array([i in keep for i in ids])
                    kept = table.filter(mask)
                    if kept.num_rows:
                        writer.write_table(kept)
                        written += kept.num_rows
                    row += table.num_rows
            if written:
                _publish(Path(tmp.name), output_uri)
        finally:
            Path(tmp.name).unlink(missing_ok=True)
    return written


def materialize(fmt: str, input_uri: str, keep: set[str], output_uri: str, options: SourceOptions) -> int:
    if fmt in ("webdataset", "interleaved-wds"):
        return materialize_tar(input_uri, keep, output_uri, options)
    return materialize_parquet(input_uri, keep, output_uri, options)
