"""Parquet layouts: `parquet` (caption tables: an image-bytes column and a text column) and `obelics`
(interleaved documents: parallel `texts` and `images` list columns).

A file whose footer cannot be read is one error record; a corrupt row group is one error record per row it holds
(those not read before the damage). A column the job's settings name but the file lacks, or holds with the wrong
type, is no data error: the shard is a `ShardFault(config)` and stays uncommitted (`check_columns` makes the same
check up front on the first shard).

Memory is bounded by the shard's own bytes, not by what they decompress to (a 33 KB shard of 100 rows of 10 MB of
zeros once took the reader 4.2 GB): a row group whose columns decompress to more than `EXPANSION_LIMIT` times their
stored bytes (and past `SLICE_BYTES`) is a decompression bomb, each of its rows an error record, found from the
footer before anything is read; the others are read in slices of about `SLICE_BYTES` of values, repeated values
(dictionary pages) kept once, and converted to Python a span of rows at a time; an image or text over
`source.max_member_bytes` is its sample's error record. One Parquet page is decompressed whole: what a slice costs
beyond its values is its largest page.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import Category, SampleError, ShardFault
from pipeline.io.ids import UniqueIds, arrow_text

SLICE_BYTES = 64 * 2**20  # values of a row group decoded, and converted to Python, at a time
EXPANSION_LIMIT = 100  # decompressed / stored bytes of a column chunk past which (and past SLICE_BYTES) it is a bomb


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
        return {options.image_column: ("source_image_column", "binary image bytes", _is_binary),
                options.text_column: ("source_text_column", "string", _is_text)}
    return {options.texts_column: ("source_texts_column", "list<string>", lambda t: _is_list_of(t, _is_text)),
            options.images_column: ("source_images_column", "list<binary>", lambda t: _is_list_of(t, _is_binary))}


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
    values = list(required_columns(fmt, options))  # the images and texts
    wanted = [*values, options.id_column, "key", "url", "width", "height", "general_metadata"]
    columns = [c for c in dict.fromkeys(wanted) if c in pf.schema_arrow.names]
    leaves = _leaves(pf, columns)
    # Byte-array values read as dictionaries: a value a column repeats is held once, not once per row.
    pf = pq.ParquetFile(file, read_dictionary=[p for p, byte_array in leaves.values() if byte_array])
    build = _caption_row if fmt == "parquet" else _document_row
    ids, shared = row_ids(pf, stem, options.id_column)
    row = 0
    for group in range(pf.num_row_groups):
        meta = pf.metadata.row_group(group)
        n, done = meta.num_rows, 0
        try:
            _refuse_bomb(meta, group, leaves)
        except SampleError as err:
            yield from (_error_row(ids[row + i], err) for i in range(n))
            row += n
            continue
        batches = pf.iter_batches(batch_size=_slice_rows(meta, leaves, options.rows_per_batch), row_groups=[group],
                                  columns=columns, use_threads=False)
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowException, OSError, ValueError) as err:  # the rows not read yet: one error record each
                error = SampleError(Category.DECODE, f"corrupt Parquet row group {group} ({type(err).__name__}: {err})")
                yield from (_error_row(ids[row + i], error) for i in range(done, n))
                break
            if batch is None:
                break
            totals, largest = _value_bytes(batch, values)
            for start, stop in _spans(totals, SLICE_BYTES, alone=largest > options.max_member_bytes):
                span = _Span(batch.slice(start, stop - start), largest[start:stop], values, ids, shared, row + done)
                for out in span.rows(build, options):
                    yield out
                    done += 1
        row += n


@dataclass
class _Span:
    """Rows of a slice converted to Python together: `largest` is each row's largest value (an image or a text),
    `values` the columns holding them, `ids` every row's id in the shard (`row_ids`) and `shared` the rows whose id
    another row has too, `first` the first row's position in the shard."""

    part: pa.RecordBatch
    largest: np.ndarray
    values: list[str]
    ids: list[str]
    shared: dict[int, str]
    first: int

    def rows(self, build, options) -> Iterator[dict]:
        """Each row as a sample row; one holding a value over the limit is its error record, its values never
        converted."""
        limit = options.max_member_bytes
        over = self.largest > limit  # such a row is a span of its own (`_spans`)
        part = self.part.drop_columns(self.values) if over.any() else self.part
        records = part.cast(_plain_schema(part.schema)).to_pylist()  # the span's values expanded: within budget
        for i, record in enumerate(records):
            at = self.first + i
            sample_id = self.ids[at]
            meta = _meta(record, options)
            if over[i]:
                out = _error_row(sample_id, SampleError(Category.DECODE, f"a value of {int(self.largest[i])} bytes, "
                                                                         f"over the limit of {limit} "
                                                                         "(source.max_member_bytes)"))
            else:
                try:
                    if at in self.shared:
                        raise SampleError(Category.DUPLICATE, self.shared[at])
                    out = build(record, options)
                except SampleError as err:
                    out = _error_row(sample_id, err)
                except (TypeError, ValueError) as err:
                    out = _error_row(sample_id, SampleError(Category.MALFORMED, str(err)))
            out.update(id=sample_id, meta=meta)
            yield out


# -- bounds ------------------------------------------------------------------------------------------------------
def _leaves(pf: pq.ParquetFile, columns: list[str]) -> dict[int, tuple[str, bool]]:
    """Leaf column index -> (its path, whether it holds byte arrays) for the leaves of `columns`."""
    out = {}
    for i in range(pf.metadata.num_columns):
        leaf = pf.schema.column(i)
        if leaf.path.split(".", 1)[0] in columns:
            out[i] = (leaf.path, leaf.physical_type == "BYTE_ARRAY")
    return out


def _refuse_bomb(meta, group: int, leaves: dict[int, tuple[str, bool]]) -> None:
    """A row group whose column decompresses to far more than it stores, from the footer alone."""
    for i, (path, _) in leaves.items():
        chunk = meta.column(i)
        stored, expanded = chunk.total_compressed_size, chunk.total_uncompressed_size
        if expanded > SLICE_BYTES and expanded > EXPANSION_LIMIT * max(stored, 1):
            raise SampleError(Category.DECODE, f"Parquet row group {group}: column {path!r} expands from {stored} "
                                               f"to {expanded} bytes (a decompression bomb: over {EXPANSION_LIMIT}x)")


def _slice_rows(meta, leaves: dict[int, tuple[str, bool]], most: int) -> int:
    """Rows per slice: about `SLICE_BYTES` of the row group's decompressed columns, at most `most`."""
    per_row = sum(meta.column(i).total_uncompressed_size for i in leaves) / max(meta.num_rows, 1)
    return int(min(most, max(1, SLICE_BYTES // max(per_row, 1))))


def _spans(totals: np.ndarray, budget: int, alone: np.ndarray) -> Iterator[tuple[int, int]]:
    """Consecutive rows holding at most `budget` bytes of values together; a larger row, or one marked `alone`, is
    a span of its own."""
    start, held = 0, 0
    for i, (size, single) in enumerate(zip(totals.tolist(), alone.tolist())):
        if i > start and (single or held + size > budget):
            yield start, i
            start, held = i, 0
        held += size
        if single:
            yield i, i + 1
            start, held = i + 1, 0
    if start < len(totals):
        yield start, len(totals)


def _value_bytes(batch: pa.RecordBatch, columns: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the bytes of its images and texts together, and of the largest of them."""
    totals = np.zeros(batch.num_rows, dtype=np.int64)
    largest = np.zeros(batch.num_rows, dtype=np.int64)
    for name in columns:
        column = batch.column(name)
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            sizes = _sizes(pc.list_flatten(column))
            parents = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
            totals += np.bincount(parents, weights=sizes, minlength=batch.num_rows).astype(np.int64)
            np.maximum.at(largest, parents, sizes)
        else:
            sizes = _sizes(column)
            totals += sizes
            np.maximum(largest, sizes, out=largest)
    return totals, largest


def _plain_schema(schema: pa.Schema) -> pa.Schema:
    """`schema` with every dictionary type (at any depth) replaced by its value type."""
    return pa.schema([pa.field(f.name, _plain(f.type), f.nullable) for f in schema])


def _plain(t: pa.DataType) -> pa.DataType:
    if pa.types.is_dictionary(t):
        return t.value_type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        make = pa.list_ if pa.types.is_list(t) else pa.large_list
        return make(pa.field(t.value_field.name, _plain(t.value_type), t.value_field.nullable))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _plain(f.type), f.nullable) for f in t])
    return t


def _sizes(values: pa.Array) -> np.ndarray:
    """The byte length of each value (0 for null) of a binary or string array, dictionary-encoded or not, or of a
    struct's `bytes` field (Hugging Face's Image feature)."""
    if pa.types.is_struct(values.type):
        values = pc.struct_field(values, "bytes")
    if pa.types.is_dictionary(values.type):
        lengths = pc.take(pc.binary_length(values.dictionary), values.indices)
    else:
        lengths = pc.binary_length(values)
    return np.nan_to_num(lengths.to_numpy(zero_copy_only=False), nan=0).astype(np.int64)  # null: NaN -> 0


def row_ids(pf: pq.ParquetFile, stem: str, id_column: str) -> tuple[list[str], dict[int, str]]:
    """Each row's id (`pipeline.io.ids`: its `id_column` value as text, else `<stem>:<row>`), and the rows whose
    id another row has too, with why (those are duplicate error records, each under an id of its own). Reads the
    id column alone; a row group where it does not read names its rows by position."""
    names, row = [], 0
    id_leaves = _leaves(pf, [id_column])
    for group in range(pf.num_row_groups):
        n = pf.metadata.row_group(group).num_rows
        values = [None] * n
        if id_column in pf.schema_arrow.names:
            try:
                _refuse_bomb(pf.metadata.row_group(group), group, id_leaves)
                values = pf.read_row_group(group, columns=[id_column]).column(0).to_pylist()
            except (SampleError, pa.ArrowException, OSError, ValueError):
                pass  # a corrupt row group, or a bomb: its rows are error records (`parquet_rows`)
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
        raise SampleError(Category.MALFORMED,
                          f"{len(texts)} texts but {len(images)} images (they must be parallel lists)")
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
