"""A look at the first samples of a job's first shard before anything starts: a wrong `--format` turns every
sample into an error record of the same structural kind (a webdataset tar read as `interleaved-wds` has no
document JSON; an interleaved-wds tar read as `webdataset` has no image), which is a configuration mistake, not
bad data. Only the head of the shard is read (a ranged read of `SNIFF_BYTES`), whatever the shard's size."""

from __future__ import annotations

import io

from pipeline.errors import Category, InputError, SampleError
from pipeline.io.listing import Shard
from pipeline.io.parquet import check_columns
from pipeline.io.tar import interleaved_row, tar_samples, webdataset_row
from pipeline.io.uris import filesystem_for

SNIFF_BYTES = 8 * 2**20
SNIFF_SAMPLES = 32
# What a wrong format makes of every sample: structure missing or wrong, never a bad image or text
_FORMAT_ERRORS = (Category.EMPTY, Category.MALFORMED)
_OTHER = {"webdataset": "interleaved-wds", "interleaved-wds": "webdataset"}


def _head(shard: Shard) -> bytes | None:
    fs, path = filesystem_for(shard.uri)
    try:
        with fs.open_input_file(path) as f:
            return f.read_at(min(SNIFF_BYTES, f.size()), 0)
    except (OSError, ValueError):  # unreadable now: the run reads it with retries and reports it
        return None


def _reasons(head: bytes, stem: str, fmt: str) -> list[SampleError | None]:
    """One entry per whole sample in the head: its error (None when it reads as `fmt`)."""
    build = webdataset_row if fmt == "webdataset" else interleaved_row
    out: list[SampleError | None] = []
    for key, files, _ in tar_samples(io.BytesIO(head), stem):
        if files is None:  # the cut at the end of the head, or a shard that is no tar at all
            if "unreadable" in key and not out:
                return []
            continue
        try:
            build(key, files)
            out.append(None)
        except SampleError as err:
            out.append(err)
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as err:
            out.append(SampleError(Category.MALFORMED, f"{type(err).__name__}: {err}"))
        if len(out) == SNIFF_SAMPLES:
            break
    return out


def format_problem(shard: Shard, fmt: str) -> str | None:
    """Why the first shard does not look like `fmt` (every whole sample in its head is a structural error), or
    None. Parquet formats are checked by their columns instead (`check_columns`)."""
    if fmt not in _OTHER:
        return None
    head = _head(shard)
    if not head:
        return None
    stem = shard.key.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    reasons = _reasons(head, stem, fmt)
    if not reasons or any(r is None or r.category not in _FORMAT_ERRORS for r in reasons):
        return None
    other = _OTHER[fmt]
    hint = f" it reads as {other}: set format: {other}" if all(r is None for r in _reasons(head, stem, other)) \
        else " check the format"
    return (f"the first {len(reasons)} samples of {shard.key} read as {fmt} are all errors "
            f"({reasons[0].reason}):{hint}")


def check_first_shard(listing, fmt: str, options) -> None:
    """A column the settings name but the first shard lacks, or a first shard whose samples all fail the way a
    wrong format makes them fail, stops the job before anything is written (`InputError` naming the field)."""
    if not listing.shards:
        return
    if fmt in ("parquet", "obelics"):
        problem = check_columns(listing.shards[0].uri, fmt, options)
        if problem:
            raise InputError(*problem)
    problem = format_problem(listing.shards[0], fmt)
    if problem:
        raise InputError("format", problem)
