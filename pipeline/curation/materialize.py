"""Kept samples written back as shards in the input's own format: tar in (webdataset,
interleaved-wds) -> tar out with every member of each kept sample, headers and contents as they were; Parquet in
(parquet, obelics) -> Parquet out with every column of each kept row. Users feed these straight into training.

Samples are matched by the id the scorer gave them, never by position: a tar sample read with the scorer's own
reader (`pipeline.io.samples.tar_samples_by_id`: the same grouping, tolerance of cuts and id rule), a Parquet row by
the scorer's id rule (`pipeline.io.samples.parquet_ids`: its id column, else `<stem>:<row>`; ids are unique in a
shard by construction, `pipeline.io.ids`), so a shard rewritten with its rows in another order is still matched.
A kept sample the input no longer holds whole (the shard was cut or rewritten since it was scored) is reported as
not materializable and the rest is written; a shard that lacks most of its kept samples is not the scored corpus,
and a fault. A shard file in the output is always whole: it is published only once written.
"""

from __future__ import annotations

import io
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from model.errors import Category
from pipeline.errors import ShardFault
from pipeline.io.files import open_shard
from pipeline.io.publish import publish_file
from pipeline.io.samples import SourceOptions, parquet_ids, tar_samples_by_id

_CHUNK = 16 * 2**20
MISSING_IDS_SHOWN = 20  # ids of samples not materializable, recorded per shard


@dataclass
class Materialized:
    """What one shard's materialization wrote: samples written, and the kept samples it could not write."""

    written: int
    missing: list[str] = field(default_factory=list)  # ids, sorted


def _check_found(input_uri: str, found: int, expected: int) -> None:
    """Some kept samples missing: reported, the rest written. Most of them missing: not the scored corpus."""
    if expected and 2 * found < expected:
        raise ShardFault(Category.CONFIG, f"{input_uri} holds {found} of the {expected} kept samples (is this the "
                                          "corpus that was scored?)")


def materialize_tar(input_uri: str, keep: set[str], output_uri: str, options: SourceOptions) -> Materialized:
    """Copy the members of each kept sample with their headers, samples in the order their keys first appear."""
    found: set[str] = set()
    # Written in a private folder, not as a NamedTemporaryFile: that file is created 0600, and the shard keeps the
    # mode it was written with, so a reader running as another user could not open it.
    with open_shard(input_uri, options.read_attempts, options.read_backoff_s) as src, \
            tempfile.TemporaryDirectory(prefix="unifilter-kept-") as tmp:
        local = Path(tmp) / "kept.tar"
        with tarfile.open(local, mode="w", format=tarfile.PAX_FORMAT) as tar_out:
            for sample_id, sample in tar_samples_by_id(src, input_uri, options):
                if sample_id in keep and sample.members is not None and sample_id not in found:
                    for member, data in sample.members:
                        tar_out.addfile(member, io.BytesIO(data))
                    found.add(sample_id)
        src.check_unchanged()
        _check_found(input_uri, len(found), len(keep))
        if found:
            publish_file(local, output_uri)
    return Materialized(len(found), sorted(keep - found))


def materialize_parquet(input_uri: str, keep: set[str], output_uri: str, options: SourceOptions) -> Materialized:
    """Copy the rows of the kept ids with every column and the input's schema, a row group at a time."""
    found: list[str] = []
    with open_shard(input_uri, options.read_attempts, options.read_backoff_s) as src:
        pf = pq.ParquetFile(src)
        with tempfile.TemporaryDirectory(prefix="unifilter-kept-") as tmp:  # the process's umask, as above
            local = Path(tmp) / "kept.parquet"
            with pq.ParquetWriter(local, pf.schema_arrow, compression="zstd") as writer:
                for rows, ids in kept_rows(pf, input_uri, keep, options):
                    writer.write_table(rows)
                    found += ids
            src.check_unchanged()
            _check_found(input_uri, len(found), len(keep))
            if found:
                publish_file(local, output_uri)
    return Materialized(len(found), sorted(keep - set(found)))


def kept_rows(pf: pq.ParquetFile, key: str, keep: set[str], options: SourceOptions
              ) -> Iterator[tuple[pa.Table, list[str]]]:
    """The rows of Parquet shard `key` whose ids are kept, a row group at a time in file order, with every column
    (reading only the row groups that hold them), and their ids. A kept id the shard does not hold (or holds on
    more than one row: no sample of the scorer's has it), or whose row group no longer reads, is not among them."""
    ids, shared = parquet_ids(pf, key, options.id_column)
    start = 0
    for group in range(pf.num_row_groups):
        n = pf.metadata.row_group(group).num_rows
        inside = [r for r in range(start, start + n) if ids[r] in keep and r not in shared]
        if inside and (part := _read_rows(pf, group, [r - start for r in inside])) is not None:
            yield part, [ids[r] for r in inside]
        start += n


def _read_rows(pf: pq.ParquetFile, group: int, rows: list[int]) -> pa.Table | None:
    """The rows of a row group, or None where the group no longer reads (its rows are not materializable)."""
    try:
        return pf.read_row_group(group).take(pa.array(rows, pa.int64()))
    except (pa.ArrowException, OSError, ValueError):
        return None


def materialize(fmt: str, input_uri: str, kept: pa.Table, output_uri: str, options: SourceOptions) -> Materialized:
    """Write the kept score records' samples (`kept`: their `id` column) from the input shard; `missing` names (by
    id) those the shard no longer holds whole. Raises ShardFault, publishing nothing, when the shard holds fewer
    than half of them."""
    keep = set(kept.column("id").to_pylist())
    if fmt in ("webdataset", "interleaved-wds"):
        return materialize_tar(input_uri, keep, output_uri, options)
    return materialize_parquet(input_uri, keep, output_uri, options)
