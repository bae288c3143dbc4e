"""Kept samples written back as shards in the input's own format: tar in (webdataset,
interleaved-wds) -> tar out with every member of each kept sample, headers and contents as they were; Parquet in
(parquet, obelics) -> Parquet out with every column of each kept row. Users feed these straight into training.

Samples are matched the way the readers named them: a tar sample by its key, a Parquet row by its position in the
file (the record's `ordinal`; ids may repeat). Nothing is published unless every kept sample was found, so a
shard file in the output is always complete.
"""

from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from model.errors import Category
from pipeline.errors import ShardFault
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


def _check_count(input_uri: str, written: int, expected: int) -> None:
    if written != expected:
        raise ShardFault(Category.CONFIG, f"{input_uri} holds {written} of the {expected} kept samples (is this the "
                                          "corpus that was scored?)")


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
            _check_count(input_uri, len(written), len(keep))
            if written:
                _publish(Path(tmp.name), output_uri)
        finally:
            Path(tmp.name).unlink(missing_ok=True)
    return len(written)


def materialize_parquet(input_uri: str, keep: set[int], output_uri: str, options: SourceOptions) -> int:
    """Copy the rows at the kept positions with every column and the input's schema; returns the rows written."""
    with open_shard(input_uri, options.read_attempts, options.read_backoff_s) as src:
        pf = pq.ParquetFile(src)
        with tempfile.NamedTemporaryFile(prefix="unifilter-kept-", suffix=".parquet", delete=False) as tmp:
            pass
        written, row = 0, 0
        try:
            with pq.ParquetWriter(tmp.name, pf.schema_arrow, compression="zstd") as writer:
                for group in range(pf.num_row_groups):
                    n = pf.metadata.row_group(group).num_rows
                    wanted = [i for i in range(n) if row + i in keep]
                    if wanted:
                        kept = pf.read_row_group(group).take(pa.array(wanted, pa.int64()))
                        writer.write_table(kept)
                        written += kept.num_rows
                    row += n
            _check_count(input_uri, written, len(keep))
            if written:
                _publish(Path(tmp.name), output_uri)
        finally:
            Path(tmp.name).unlink(missing_ok=True)
    return written


def materialize(fmt: str, input_uri: str, kept: pa.Table, output_uri: str, options: SourceOptions) -> int:
    """Write the kept score records' samples (`kept`: their `id` and `ordinal` columns) from the input shard;
    raises ShardFault, publishing nothing, when the shard does not hold all of them."""
    if fmt in ("webdataset", "interleaved-wds"):
        return materialize_tar(input_uri, set(kept.column("id").to_pylist()), output_uri, options)
    return materialize_parquet(input_uri, set(kept.column("ordinal").to_pylist()), output_uri, options)
