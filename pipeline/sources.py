"""Readers: every supported input format -> the one sample schema (DESIGN.md), one shard at a time.

Formats: `webdataset` (img2dataset tar layout), `parquet` (caption tables), `obelics` (interleaved Parquet) and
`interleaved-wds` (tar shards whose KEY.json holds `texts` and `image_info[].image_base64`). A reader never
raises on bad data: an unreadable sample, or the part of a shard that cannot be read, becomes a row with its
`error` set, so every input sample is accounted for. After a shard's samples comes one `SHARD_END` marker row
whose `id` is the number of samples the shard yielded; the sink commits a shard once it has them all.
"""

from __future__ import annotations

import base64
import binascii
import json
import tarfile
from collections.abc import Iterator
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from pipeline.storage import filesystem_for

Format = Literal["webdataset", "parquet", "obelics", "interleaved-wds"]
SHARD_END = "_shard_end"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")

# The sample schema, plus the reader's own `error` and the sample's position in its shard (`ordinal`).
SAMPLE_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("source", pa.string()),
    ("kind", pa.string()),
    ("texts", pa.list_(pa.string())),
    ("images", pa.list_(pa.binary())),
    ("meta", pa.string()),
    ("error", pa.string()),
    ("ordinal", pa.int64()),
])


class SourceOptions(BaseModel):
    """How to read Parquet inputs (tar layouts are fixed)."""

    model_config = ConfigDict(extra="forbid")

    image_column: str = "image"  # binary, or a struct with a `bytes` field (Hugging Face Image feature)
    text_column: str = "caption"
    id_column: str = "id"  # falls back to `<shard>:<row>` when the file has no such column
    texts_column: str = "texts"  # obelics
    images_column: str = "images"  # obelics
    rows_per_batch: int = 256


def sample_kind(fmt: str) -> str:
    return "caption" if fmt in ("webdataset", "parquet") else "interleaved"


def read_shard(shard: str, fmt: str, options: SourceOptions | None = None) -> Iterator[dict]:
    """Rows of one shard (sample schema + `error`, `ordinal`), then the SHARD_END marker."""
    options = options or SourceOptions()
    readers = {"webdataset": _read_webdataset, "interleaved-wds": _read_interleaved_wds,
               "parquet": _read_caption_parquet, "obelics": _read_obelics}
    count = 0
    for row in readers[fmt](shard, options):
        row.setdefault("meta", None)
        row.setdefault("error", None)
        row["source"] = shard
        row["kind"] = sample_kind(fmt)
        row["ordinal"] = count
        count += 1
        yield row
    yield {"id": str(count), "source": shard, "kind": SHARD_END, "texts": None, "images": None, "meta": None,
           "error": None, "ordinal": -1}


def _shard_stem(shard: str) -> str:
    return shard.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]


def _error_row(sample_id: str, reason: str) -> dict:
    return {"id": sample_id, "texts": None, "images": None, "error": reason}


# -- tar layouts -------------------------------------------------------------------------------------------------
def _tar_groups(shard: str) -> Iterator[tuple[str, dict[str, bytes], str | None]]:
    """(key, {extension: bytes}, error) per sample of a tar shard, in order. Members of one key are contiguous
    (the webdataset convention). A broken tar ends with its partial sample, or a shard-level row, as an error."""
    fs, path = filesystem_for(shard)
    key, group = None, {}
    n_complete = 0
    try:
        with fs.open_input_stream(path) as raw, tarfile.open(fileobj=(stream := _CountingReader(raw)), mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                directory, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot or stem.startswith("_"):
                    continue
                member_key = f"{directory}/{stem}" if directory else stem
                if member_key != key:
                    if key is not None:
                        yield key, group, None
                        n_complete += 1
                    key, group = member_key, {}
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} is cut short")
                group[ext.lower()] = data
            # tarfile stops silently when a shard is cut at a header: demand the end-of-archive block.
            if stream.count < tar.offset + tarfile.BLOCKSIZE:
                raise tarfile.ReadError("shard ends without an end-of-archive marker")
    except (tarfile.TarError, OSError, EOFError) as err:
        reason = f"decode: truncated or corrupt tar shard after {n_complete} samples ({type(err).__name__}: {err})"
        yield (key if key is not None else f"{_shard_stem(shard)}:unreadable"), {}, reason
        return
    if key is not None:
        yield key, group, None


class _CountingReader:
    """A file-like wrapper that counts the bytes read through it."""

    def __init__(self, raw):
        self.raw, self.count = raw, 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.count += len(data)
        return data


def _read_webdataset(shard: str, options: SourceOptions) -> Iterator[dict]:
    for key, files, error in _tar_groups(shard):
        if error:
            yield _error_row(key, error)
            continue
        meta = files.get("json")
        meta = meta.decode("utf-8", errors="replace") if meta is not None else None
        image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
        if image is None:
            row = _error_row(key, f"empty: sample has no image file (found {sorted(files) or 'nothing'})")
        elif "txt" not in files:
            row = _error_row(key, "empty: sample has no caption (.txt) file")
        else:
            try:
                caption = files["txt"].decode("utf-8")
                row = {"id": key, "texts": [None, caption], "images": [image, None]}
            except UnicodeDecodeError as err:
                row = _error_row(key, f"decode: caption is not valid UTF-8 ({err.reason} at byte {err.start})")
        row["meta"] = meta
        yield row


def _read_interleaved_wds(shard: str, options: SourceOptions) -> Iterator[dict]:
    for key, files, error in _tar_groups(shard):
        if error:
            yield _error_row(key, error)
            continue
        if "json" not in files:
            yield _error_row(key, f"empty: sample has no .json document (found {sorted(files)})")
            continue
        try:
            doc = json.loads(files["json"].decode("utf-8"))
            yield {"id": key, **_interleaved_from_json(doc), "meta": _doc_meta(doc)}
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            yield _error_row(key, f"decode: document JSON does not parse ({err})")
        except _MalformedDocument as err:
            yield _error_row(key, f"malformed: {err}")


class _MalformedDocument(ValueError):
    pass


def _interleaved_from_json(doc: dict) -> dict:
    """`texts` plus parallel `image_info` (image_base64 at image positions) -> parallel texts/images lists.
    Positions with neither (an image that failed to download) are skipped, as the original scripts do."""
    texts = doc.get("texts")
    infos = doc.get("image_info") or []
    if not isinstance(texts, list):
        raise _MalformedDocument("document has no `texts` list")
    if len(infos) not in (0, len(texts)):
        raise _MalformedDocument(f"`image_info` has {len(infos)} entries for {len(texts)} positions")
    out_texts, out_images = [], []
    for i, text in enumerate(texts):
        info = infos[i] if infos else None
        if text is not None:
            if not isinstance(text, str):
                raise _MalformedDocument(f"text at position {i} is {type(text).__name__}, not a string")
            out_texts.append(text)
            out_images.append(None)
        elif isinstance(info, dict) and info.get("image_base64"):
            try:
                out_images.append(base64.b64decode(info["image_base64"], validate=True))
            except (binascii.Error, ValueError, TypeError):
                raise _MalformedDocument(f"image at position {i} is not valid base64") from None
            out_texts.append(None)
    return {"texts": out_texts, "images": out_images}


def _doc_meta(doc: dict) -> str | None:
    meta = {k: v for k, v in doc.items() if k not in ("texts", "image_info", "images")}
    return json.dumps(meta) if meta else None


# -- Parquet layouts ---------------------------------------------------------------------------------------------
def _parquet_batches(shard: str, columns_wanted, options: SourceOptions):
    """(first_row_index, pyarrow RecordBatch | None, error) over a Parquet shard. A corrupt row group yields
    one error per row it holds; an unreadable file yields one shard-level error."""
    fs, path = filesystem_for(shard)
    try:
        handle = fs.open_input_file(path)
        pf = pq.ParquetFile(handle)
    except Exception as err:  # a truncated or non-Parquet file: no footer, so the row count is unknown
        yield 0, None, f"decode: unreadable Parquet shard ({type(err).__name__}: {err})"
        return
    names = set(pf.schema_arrow.names)
    columns = [c for c in columns_wanted if c in names]
    row = 0
    with handle:
        for group in range(pf.num_row_groups):
            n = pf.metadata.row_group(group).num_rows
            try:
                table = pf.read_row_group(group, columns=columns)
            except Exception as err:
                yield row, n, f"decode: corrupt Parquet row group {group} ({type(err).__name__}: {err})"
                row += n
                continue
            for batch in table.to_batches(max_chunksize=options.rows_per_batch):
                yield row, batch, None
                row += batch.num_rows


def _binary_value(value) -> bytes | None:
    if isinstance(value, dict):  # Hugging Face Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes")
    if isinstance(value, str):
        raise TypeError("image column holds strings, not bytes")
    return value


def _parquet_rows(shard: str, wanted: list[str], options: SourceOptions, build) -> Iterator[dict]:
    stem = _shard_stem(shard)
    for first, batch, error in _parquet_batches(shard, wanted, options):
        if error and batch is None:
            yield _error_row(f"{stem}:unreadable", error)
            continue
        if error:  # a corrupt row group of `batch` rows
            for i in range(batch):
                yield _error_row(f"{stem}:{first + i}", error)
            continue
        columns = batch.schema.names
        ids = batch.column(options.id_column).to_pylist() if options.id_column in columns else None
        rows = batch.to_pylist()
        for i, record in enumerate(rows):
            sample_id = str(ids[i]) if ids is not None and ids[i] is not None else f"{stem}:{first + i}"
            try:
                row = build(record, columns)
            except (TypeError, ValueError) as err:
                row = _error_row(sample_id, f"malformed: {err}")
            row["id"] = sample_id
            yield row


def _read_caption_parquet(shard: str, options: SourceOptions) -> Iterator[dict]:
    image_col, text_col = options.image_column, options.text_column

    def build(record: dict, columns: list[str]) -> dict:
        for col in (image_col, text_col):
            if col not in columns:
                raise ValueError(f"shard has no column {col!r} (columns: {columns}); set the source options")
        image, caption = _binary_value(record[image_col]), record[text_col]
        if isinstance(caption, bytes):
            try:
                caption = caption.decode("utf-8")
            except UnicodeDecodeError as err:
                return _error_row("", f"decode: caption is not valid UTF-8 ({err.reason} at byte {err.start})")
        if image is None:
            return _error_row("", "empty: sample has no image bytes")
        if caption is None:
            return _error_row("", "empty: caption has no text")
        meta = {k: v for k, v in record.items() if k not in (image_col, text_col) and _jsonable(v)}
        return {"texts": [None, caption], "images": [image, None], "meta": json.dumps(meta) if meta else None}

    return _parquet_rows(shard, [image_col, text_col, options.id_column, "url", "width", "height"], options, build)


def _read_obelics(shard: str, options: SourceOptions) -> Iterator[dict]:
    texts_col, images_col = options.texts_column, options.images_column

    def build(record: dict, columns: list[str]) -> dict:
        for col in (texts_col, images_col):
            if col not in columns:
                raise ValueError(f"shard has no column {col!r} (columns: {columns}); set the source options")
        texts, images = record[texts_col] or [], record[images_col] or []
        if len(texts) != len(images):
            raise ValueError(f"{len(texts)} texts but {len(images)} images (they must be parallel lists)")
        out_texts, out_images = [], []
        for text, image in zip(texts, images):
            image = _binary_value(image)
            if text is None and image is None:
                continue  # an image that failed to download
            out_texts.append(text)
            out_images.append(image)
        meta = {k: v for k, v in record.items() if k not in (texts_col, images_col) and _jsonable(v)}
        return {"texts": out_texts, "images": out_images, "meta": json.dumps(meta) if meta else None}

    return _parquet_rows(shard, [texts_col, images_col, options.id_column, "general_metadata", "url"],
                         options, build)


def _jsonable(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))
