"""The CPU stage: decode (guarded), resize and tokenize with the model's processor, so the GPU never waits on JPEG
decoding; and the token-budget batching the scoring stage uses. A sample that fails becomes an error row."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa

from model.errors import Category, SampleError
from model.processing import EncodedSample, UniFilterProcessor
from pipeline.sources import MARKERS, SourceOptions, read_shard
from pipeline.storage import Shard

# Between the stages images travel as uint8 at model resolution (4x smaller than float32); ids as int32.
ENCODED_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("source", pa.string()),
    ("kind", pa.string()),
    ("ordinal", pa.int64()),
    ("error", pa.string()),
    ("error_category", pa.string()),
    ("key", pa.string()),
    ("url", pa.string()),
    ("truncated", pa.bool_()),
    ("n_images", pa.int32()),
    ("n_tokens", pa.int32()),
    ("input_ids", pa.binary()),
    ("pixel_values", pa.binary()),
])


def encode_row(row: dict, processor: UniFilterProcessor) -> dict:
    out = {k: row.get(k) for k in ("id", "source", "kind", "ordinal", "error", "error_category", "key", "url")}
    out.update(truncated=None, n_images=None, n_tokens=None, input_ids=None, pixel_values=None)
    if row["kind"] in MARKERS or out["error"]:
        return out
    try:
        enc = processor.encode(row["texts"], row["images"], row["kind"])
    except SampleError as err:
        out.update(error=err.reason, error_category=err.category.value)
        return out
    except Exception as err:  # never lose a sample to an unforeseen failure: record it
        out.update(error=f"preprocess: {type(err).__name__}: {err}", error_category=Category.PREPROCESS.value)
        return out
    out.update(truncated=enc.truncated, n_images=enc.n_images, n_tokens=enc.n_tokens,
               input_ids=enc.input_ids.astype(np.int32).tobytes(), pixel_values=enc.pixel_values.tobytes())
    return out


class ShardEncoder:
    """A CPU worker of the read + decode + tokenize stage: loads the model's processor (config and tokenizer, no
    weights) once; each call reads whole shards and yields their encoded rows in small blocks as it goes, so
    the model actors start on a shard's first samples while the rest is still being decoded."""

    def __init__(self, model_uri: str, fmt: str, options: SourceOptions, max_image_pixels: int | None = None,
                 jpeg_draft: bool = False, rows_per_block: int = 16):
        from model.checkpoint import load_processor

        self.processor, _ = load_processor(model_uri)
        if max_image_pixels:
            self.processor.max_image_pixels = max_image_pixels
        self.processor.jpeg_draft = jpeg_draft
        self.fmt, self.options, self.rows_per_block = fmt, options, rows_per_block

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        for shard in (Shard(**s) for group in batch.column("shards").to_pylist() for s in group):
            rows = []
            for sample in read_shard(shard, self.fmt, self.options):
                rows.append(encode_row(sample, self.processor))
                if len(rows) == self.rows_per_block:
                    yield pa.Table.from_pylist(rows, schema=ENCODED_SCHEMA)
                    rows = []
            if rows:
                yield pa.Table.from_pylist(rows, schema=ENCODED_SCHEMA)


def decode_encoded(row: dict, image_size: int) -> EncodedSample:
    """An encoded row back to the processor's EncodedSample (zero-copy views over the row's bytes)."""
    ids = np.frombuffer(row["input_ids"], dtype=np.int32).astype(np.int64)
    pixels = np.frombuffer(row["pixel_values"], dtype=np.uint8).reshape(row["n_images"], 3, image_size, image_size)
    return EncodedSample(ids, pixels, bool(row["truncated"]))


def token_budget_batches(lengths: Sequence[int], token_budget: int, max_batch: int) -> Iterator[list[int]]:
    """Indices of samples (given by their token counts) grouped into micro-batches whose padded size (rows x
    longest) fits `token_budget`, by length so similar lengths share a batch: interleaved documents are batched
    together, not one at a time. A sample longer than the budget gets a batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batch: list[int] = []
    longest = 0
    for i in order:
        n = lengths[i]
        if batch and (max(longest, n) * (len(batch) + 1) > token_budget or len(batch) >= max_batch):
            yield batch
            batch, longest = [], 0
        batch.append(i)
        longest = max(longest, n)
    if batch:
        yield batch
