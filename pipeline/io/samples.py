"""Readers: every supported input format -> the one sample schema (docs/ARCHITECTURE.md), one shard at a time.

Formats: `webdataset` (img2dataset tar layout), `parquet` (caption tables), `obelics` (interleaved Parquet) and
`interleaved-wds` (tar shards whose KEY.json holds `texts` and `image_info[].image_base64`). A sample whose bytes
are bad becomes a row with its `error` set, so every input sample is accounted for. A shard that cannot be read as
configured (an I/O failure after retries, a missing column, a reader bug) raises `ShardFault`: it is no sample's
fault, and the stage reading it leaves it uncommitted (`pipeline.runner.ShardStage`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import Category, SampleError, ShardFault
from pipeline.io.files import open_shard
from pipeline.io.ids import arrow_text
from pipeline.io.listing import Shard
from pipeline.io.parquet import parquet_rows, row_ids
from pipeline.io.tar import (
    MAX_MEMBER_BYTES,
    TarSample,
    interleaved_row,
    tar_members,
    tar_samples,
    webdataset_meta,
    webdataset_row,
)
from pipeline.io.uris import normalize_uri

Format = Literal["webdataset", "parquet", "obelics", "interleaved-wds"]

# The sample schema, plus the reader's own `error` (and its category), the sample's position in its shard
# (`ordinal`) and the join keys from its metadata (`key`, `url`).
SAMPLE_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("source", pa.string()),
    ("kind", pa.string()),
    ("texts", pa.list_(pa.string())),
    ("images", pa.list_(pa.binary())),
    ("meta", pa.string()),
    ("error", pa.string()),
    ("error_category", pa.string()),
    ("ordinal", pa.int64()),
    ("key", pa.string()),
    ("url", pa.string()),
])


class SourceOptions(BaseModel):
    """How to read the inputs: Parquet column names, and how hard to try when a read fails."""

    model_config = ConfigDict(extra="forbid")

    image_column: str = Field("image", description="parquet: image bytes (binary, or a struct with a `bytes` field)")
    text_column: str = Field("caption", description="parquet: the caption")
    id_column: str = Field("id", description="parquet/obelics: sample id; rows without one are `<shard>:<row>`")
    texts_column: str = Field("texts", description="obelics: the list of text segments")
    images_column: str = Field("images", description="obelics: the parallel list of image bytes")
    rows_per_batch: int = Field(256, ge=1, description="Parquet rows decoded at a time")
    read_attempts: int = Field(5, ge=1, description="tries per shard when reading fails (network, throttling)")
    read_backoff_s: float = Field(1.0, ge=0, description="first pause between tries; doubles, with jitter")
    max_member_bytes: int = Field(MAX_MEMBER_BYTES, ge=1, description="a tar member declaring, or a Parquet image "
                                                                       "or text holding, more bytes is its sample's "
                                                                       "error record")


def sample_kind(fmt: str) -> str:
    return "caption" if fmt in ("webdataset", "parquet") else "interleaved"


def _stem(key: str) -> str:
    return key.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]


def read_samples(shard: Shard | str, fmt: str, options: SourceOptions | None = None) -> Iterator[dict]:
    """The rows of one shard (sample schema), each with its position in the shard (`ordinal`). A fault raises
    `ShardFault`, a bug of the reader's included (as `internal`: never blamed on a sample)."""
    options = options or SourceOptions()
    if isinstance(shard, str):  # one shard on its own: its key is its file name, as if listed from its folder
        shard = Shard(normalize_uri(shard), normalize_uri(shard).rsplit("/", 1)[-1])
    count = 0
    try:
        with open_shard(shard.uri, options.read_attempts, options.read_backoff_s, shard.size,
                        shard.mtime_ns) as file:
            for row in _rows(file, _stem(shard.key), fmt, options):
                row.setdefault("meta", None)
                row.setdefault("error", None)
                row.setdefault("error_category", None)
                row.update(source=shard.key, kind=sample_kind(fmt), ordinal=count, **_join_keys(row["meta"]))
                count += 1
                yield _valid_text(row)
            file.check_unchanged()  # a local shard cut or rewritten while it was read is never committed
    except ShardFault:
        raise
    except Exception as err:  # a reader bug, never a sample's fault: the shard stays uncommitted and is named
        raise ShardFault(Category.INTERNAL, f"reading {shard.key} failed after {count} samples "
                                            f"({type(err).__name__}: {err})") from err


def _valid_text(row: dict) -> dict:
    """Ids, keys and metadata are cleaned; a text that is not valid Unicode makes the sample a decode error."""
    for name in ("id", "meta", "key", "url"):
        row[name] = arrow_text(row[name])
    texts = row.get("texts")
    if texts and any(t is not None and arrow_text(t) is not t for t in texts):
        row.update(texts=None, images=None, error="decode: a text holds invalid Unicode (a lone surrogate)",
                   error_category=Category.DECODE.value)
    return row


def _rows(file, stem: str, fmt: str, options: SourceOptions) -> Iterator[dict]:
    if fmt in ("parquet", "obelics"):
        yield from parquet_rows(file, stem, fmt, options)
        return
    build = webdataset_row if fmt == "webdataset" else interleaved_row
    for key, files, error in tar_samples(file, stem, options.max_member_bytes):
        if error is None:
            try:
                yield build(key, files)
                continue
            except SampleError as err:
                error = err
            except (ValueError, TypeError, KeyError, AttributeError, IndexError) as err:  # a document's odd shape
                error = SampleError(Category.MALFORMED, f"document does not have the expected structure "
                                                        f"({type(err).__name__}: {err})")
        meta = webdataset_meta(files) if fmt == "webdataset" else None
        yield {"id": key, "texts": None, "images": None, "meta": meta, "error": error.reason,
               "error_category": error.category.value}


def tar_samples_by_id(file, key: str, options: SourceOptions) -> Iterator[tuple[str, TarSample]]:
    """The samples of tar shard `key` under the ids its records carry: the scorer's own reader and id rule, for
    whoever reads the shard again (`pipeline.curation.materialize`)."""
    for sample in tar_members(file, _stem(key), options.max_member_bytes):
        yield sample.key, sample


def parquet_ids(pf, key: str, id_column: str) -> tuple[list[str], dict[int, str]]:
    """The ids of Parquet shard `key`'s rows (`id_column`'s values, else `<stem>:<row>`), and its rows whose id
    another row has too (duplicate error records): the scorer's own id rule, for whoever reads the shard again
    (`pipeline.curation.materialize`, the filters' join)."""
    return row_ids(pf, _stem(key), id_column)


def _join_keys(meta: str | None) -> dict:
    """The sample's `key` and `url` from its metadata (img2dataset's json, a Parquet row, OBELICS's
    general_metadata), to join scores back to the corpus."""
    out = {"key": None, "url": None}
    if not meta:
        return out
    try:
        data = json.loads(meta)
        if isinstance(data, dict) and isinstance(data.get("general_metadata"), str):
            data = {**json.loads(data["general_metadata"]), **{k: v for k, v in data.items() if k in ("key", "url")}}
    except (ValueError, TypeError):
        return out
    if isinstance(data, dict):
        for name in out:
            value = data.get(name)
            out[name] = None if value is None else str(value)
    return out
