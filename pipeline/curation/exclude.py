"""`--exclude FILE` (repeatable): lists of ids, keys, URLs or image sha256 values whose samples a curation drops
whatever their score (safety hash lists, benchmark decontamination lists, takedown requests). Each list is read
once, at the edge, into a `where.NotIn` term of the filters (`pipeline.curation.filters`): the column it matches is
named by the list's header (a Parquet file's only column, a text file's first line) or by `--exclude-column` (then a
text file has no header: every line is a value). A column of the corpus' metadata (img2dataset's `sha256`) is
joined as `--where` joins it. A list joins the output's identity by its content (`identity`)."""

from __future__ import annotations

import hashlib
import re

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.curation.where import NotIn
from pipeline.errors import InputError
from pipeline.io.uris import filesystem_for

FIELD = "exclude"
MAX_LIST_BYTES = 2 * 2**30  # a list's text or its column's decoded Parquet size: a list, not a corpus
_COLUMN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def read_exclude_list(uri: str, column: str | None) -> NotIn:
    """The list at `uri` as a filter term (`exclude:<uri>`), its column from its header or `column`; an InputError
    naming `exclude` (or `exclude_column`) for a list that cannot be read or used."""
    fs, path = filesystem_for(uri)
    try:
        with fs.open_input_file(path) as f:
            if f.size() > MAX_LIST_BYTES:
                raise InputError(FIELD, f"{uri} is {f.size():,} bytes, over the limit of {MAX_LIST_BYTES:,} for a "
                                        "list: split it or filter the scores first")
            data = f.read()
    except FileNotFoundError:
        raise InputError(FIELD, f"no list at {uri} (a Parquet or text file of ids, keys, URLs or sha256 values)") \
            from None
    except (OSError, pa.ArrowException) as err:
        raise InputError(FIELD, f"cannot read {uri}: {str(err).strip().splitlines()[0][:200]}") from None
    name, values = _parquet_list(uri, data, column) if data[:4] == b"PAR1" else _text_list(uri, data, column)
    return NotIn(name, tuple(sorted(set(values))), f"exclude:{uri}", hashlib.sha256(data).hexdigest())


def _parquet_list(uri: str, data: bytes, column: str | None) -> tuple[str, list[str]]:
    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as err:
        raise InputError(FIELD, f"{uri} does not read as Parquet ({str(err).splitlines()[0][:200]})") from None
    names = pf.schema_arrow.names
    if column is None and len(names) != 1:
        raise InputError("exclude_column", f"{uri} has the columns {', '.join(names)}: name the one to match with "
                                           "--exclude-column")
    name = column or names[0]
    if name not in names:
        raise InputError("exclude_column", f"{uri} has no column {name!r} (its columns: {', '.join(names)})")
    index = names.index(name)
    decoded = sum(pf.metadata.row_group(g).column(index).total_uncompressed_size
                  for g in range(pf.metadata.num_row_groups))
    if decoded > MAX_LIST_BYTES:  # a small file that decodes to a huge column is refused before it is decoded
        raise InputError(FIELD, f"{uri}'s column {name!r} decodes to {decoded:,} bytes, over the limit of "
                                f"{MAX_LIST_BYTES:,}")
    values = pf.read(columns=[name]).column(name)
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        raise InputError(FIELD, f"{uri}'s column {name!r} holds {values.type}, not strings (ids, keys, URLs or "
                                "sha256 hex digests)")
    return name, [v for v in values.to_pylist() if v]


def _text_list(uri: str, data: bytes, column: str | None) -> tuple[str, list[str]]:
    try:
        lines = [line.strip() for line in data.decode("utf-8-sig").splitlines()]  # a BOM is no header
    except UnicodeDecodeError:
        raise InputError(FIELD, f"{uri} is neither Parquet nor UTF-8 text") from None
    lines = [line for line in lines if line]
    if column is not None:
        return column, lines
    if not lines or not _COLUMN_NAME.fullmatch(lines[0]):
        first = repr(lines[0][:60]) if lines else "nothing"
        raise InputError(FIELD, f"{uri} begins with {first}, not the name of the column its values match (a first "
                                "line such as sha256, id, key or url): add that header, or give --exclude-column")
    return lines[0], lines[1:]
