"""Parquet layouts: `parquet` (caption tables: an image-bytes column and a text column) and `obelics`
(interleaved documents: parallel `texts` and `images` list columns).

A file whose footer cannot be read is one error record; a corrupt row group is one error record per row it holds.
A column the job's settings name but the file lacks, or holds with the wrong type, is no data error: the shard is
a `ShardFault(config)` and stays uncommitted (`check_columns` makes the same check up front on the first shard).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import Category, SampleError, ShardFault
from pipeline.io.ids import UniqueIds, arrow_text


def _is_binary(t: pa.DataType) -> bool:
    if pa.types.is_struct(t):  # Hugging Face Image feature: {"bytes": ..., "path": ...}
        return t.get_field_index("bytes") >= 0 and _is_binary(t.field("bytes").type)
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)


def _is_text(t: pa.DataType) -> bool:
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
            or _is_binary(t))


def _is_list_of(t: pa.DataType, check) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and check(t.value_type)


def required_columns(fmt: str, options) -> dict[str, tuple[str, str, object]]:
    """{column: (config field, expected type in words, type check)} for a Parquet format."""
    if fmt == "parquet":
        return {options.image_column: ("source.image_column", "binary image bytes", _is_binary),
                options.text_column: ("source.text_column", "string", _is_text)}
    return {options.texts_column: ("source.texts_column", "list<string>", lambda t: _is_list_of(t, _is_text)),
            options.images_column: ("source.images_column", "list<binary>", lambda t: _is_list_of(t, _is_binary))}


def schema_problem(schema: pa.Schema, fmt: str, options) -> tuple[str, str] | None:
    """(config field, problem) when the file's columns do not fit the job's settings."""
    for column, (field, expected, check) in required_columns(fmt, options).items():
        if column not in schema.names:
            return field, (f"the shard has no column {column!r} (its columns: {schema.names}); set {field}")
        if not check(schema.field(column).type):
            return field, (f"column {column!r} holds {schema.field(column).type}, not {expected}; set {field}")
    return None


def parquet_rows(file, stem: str, fmt: str, options) -> Iterator[dict]:
    """Sample rows (or error rows) of one Parquet shard, in file order."""
    try:
        pf = pq.ParquetFile(file)
    except (pa.ArrowException, OSError, ValueError) as err:  # no footer: the row count is unknown
        yield _error_row(f"{stem}:unreadable", SampleError(
            Category.DECODE, f"unreadable Parquet shard ({type(err).__name__}: {err})"))
        return
    problem = schema_problem(pf.schema_arrow, fmt, options)
    if problem:
        raise ShardFault(Category.CONFIG, problem[1])
    wanted = [*required_columns(fmt, options), options.id_column, "key", "url", "width", "height", "general_metadata"]
    columns = [c for c in dict.fromkeys(wanted) if c in pf.schema_arrow.names]
    build = _caption_row if fmt == "parquet" else _document_row
    ids, shared = row_ids(pf, stem, options.id_column)
    row = 0
    for group in range(pf.num_row_groups):
        n = pf.metadata.row_group(group).num_rows
        try:
            table = pf.read_row_group(group, columns=columns)
        except (pa.ArrowException, OSError, ValueError) as err:
            error = SampleError(Category.DECODE, f"corrupt Parquet row group {group} ({type(err).__name__}: {err})")
            for i in range(n):
                yield _error_row(ids[row + i], error)
            row += n
            continue
        for batch in table.to_batches(max_chunksize=options.rows_per_batch):
            for i, record in enumerate(batch.to_pylist()):
                sample_id = ids[row + i]
                meta = _meta(record, options)
                try:
                    if row + i in shared:
                        raise SampleError(Category.DUPLICATE, shared[row + i])
                    out = build(record, options)
                except SampleError as err:
                    out = _error_row(sample_id, err)
                except (TypeError, ValueError) as err:
                    out = _error_row(sample_id, SampleError(Category.MALFORMED, str(err)))
                out.update(id=sample_id, meta=meta)
                yield out
            row += batch.num_rows


def row_ids(pf: pq.ParquetFile, stem: str, id_column: str) -> tuple[list[str], dict[int, str]]:
    """Each row's id (`pipeline.io.ids`: its `id_column` value as text, else `<stem>:<row>`), and the rows whose
    id another row has too, with why (those are duplicate error records, each under an id of its own). Reads the
    id column alone; a row group where it does not read names its rows by position."""
    names, row = [], 0
    for group in range(pf.num_row_groups):
        n = pf.metadata.row_group(group).num_rows
        values = [None] * n
        if id_column in pf.schema_arrow.names:
            try:
                values = pf.read_row_group(group, columns=[id_column]).column(0).to_pylist()
            except (pa.ArrowException, OSError, ValueError):
                pass  # the row group is corrupt: its rows are error records (`parquet_rows`)
        names += [str(v) if v is not None else f"{stem}:{row + i}" for i, v in enumerate(values)]
        row += n
    unique = UniqueIds(names)
    rows_of = Counter(arrow_text(name) for name in names)
    shared = {i: f"id {arrow_text(name)!r} is on {rows_of[arrow_text(name)]} rows of the shard"
              for i, name in enumerate(names) if unique.shared(name)}
    return [unique.claim(name) for name in names], shared


def _error_row(sample_id: str, err: SampleError) -> dict:
    return {"id": sample_id, "texts": None, "images": None, "error": err.reason, "error_category": err.category.value}


def _binary_value(value) -> bytes | None:
    if isinstance(value, dict):
        value = value.get("bytes")
    return value


def _meta(record: dict, options) -> str | None:
    skip = {options.image_column, options.text_column, options.texts_column, options.images_column}
    meta = {k: v for k, v in record.items() if k not in skip and _jsonable(v)}
    return json.dumps(meta) if meta else None


def _caption_row(record: dict, options) -> dict:
    image, caption = _binary_value(record[options.image_column]), record[options.text_column]
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError as err:
            raise SampleError(Category.DECODE,
                              f"caption is not valid UTF-8 ({err.reason} at byte {err.start})") from None
    if image is None:
        raise SampleError(Category.EMPTY, "sample has no image bytes")
    if caption is None:
        raise SampleError(Category.EMPTY, "caption has no text")
    return {"texts": [None, caption], "images": [image, None]}


def _document_row(record: dict, options) -> dict:
    texts, images = record[options.texts_column] or [], record[options.images_column] or []
    if len(texts) != len(images):
        raise SampleError(Category.MALFORMED, f"{len(texts)} texts but {len(images)} images (they must be parallel lists)")
    out_texts, out_images = [], []
    for text, image in zip(texts, images):
        image = _binary_value(image)
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        if text is None and image is None:
            continue  # an image that failed to download
        out_texts.append(text)
        out_images.append(image)
    return {"texts": out_texts, "images": out_images}


def _jsonable(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def check_columns(uri: str, fmt: str, options, field_prefix: str = "") -> tuple[str, str] | None:
    """The first shard's columns against the settings, from its footer alone: (field, problem) or None. A shard
    that cannot be opened here is left to the job (a fault or a data error, as any other)."""
    from pipeline.io.uris import filesystem_for

    fs, path = filesystem_for(uri)
    try:
        with fs.open_input_file(path) as f:
            schema = pq.read_schema(f)
    except (pa.ArrowException, OSError, ValueError):
        return None
    return schema_problem(schema, fmt, options)
