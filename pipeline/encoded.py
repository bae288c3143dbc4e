"""The encoded-sample format, shared by scoring and training: a sample as the model takes it, in Arrow columns.

`encode_row` runs the model's processor on a sample row (decode, pad, resize, tokenize) and adds the columns in
`ENCODED_FIELDS`: token ids as int32 bytes, images as uint8 bytes at model resolution (normalised later, on the
device), and what the model saw (`n_images`, `n_tokens`, `truncated`). A sample the processor rejects keeps its
reason in `error`. `decode_encoded` turns such a row back into the processor's `EncodedSample` without copying.
`token_budget_batches` groups encoded samples into micro-batches that fit a token budget.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from model.errors import Category, SampleError

if TYPE_CHECKING:  # torch loads with the processor, never for a job's configuration
    from model.processing import EncodedSample, UniFilterProcessor

ENCODED_FIELDS = [
    pa.field("truncated", pa.bool_()),
    pa.field("n_images", pa.int32()),
    pa.field("n_tokens", pa.int32()),
    pa.field("input_ids", pa.binary()),
    pa.field("pixel_values", pa.binary()),
]


def encode_row(row: dict, processor: UniFilterProcessor) -> dict:
    """The row with `ENCODED_FIELDS` added (null where the row already carries an error, or gets one)."""
    out = {**row, "truncated": None, "n_images": None, "n_tokens": None, "input_ids": None, "pixel_values": None}
    if out.get("error"):
        return out
    try:
        enc = processor.encode(row["texts"], row["images"], row["kind"])
    except SampleError as err:
        out.update(error=err.reason, error_category=err.category.value)
        return out
    except Exception as err:  # noqa: BLE001 - never lose a sample to an unforeseen failure: record it
        out.update(error=f"preprocess: {type(err).__name__}: {err}", error_category=Category.PREPROCESS.value)
        return out
    out.update(truncated=enc.truncated, n_images=enc.n_images, n_tokens=enc.n_tokens,
               input_ids=enc.input_ids.astype(np.int32).tobytes(), pixel_values=enc.pixel_values.tobytes())
    return out


def decode_encoded(row: dict, image_size: int) -> EncodedSample:
    """An encoded row back to the processor's EncodedSample (zero-copy views over the row's bytes)."""
    from model.processing import EncodedSample

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
