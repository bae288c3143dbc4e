"""Scoring's first stage, on CPU actors: read whole shards, decode (guarded), resize and tokenize each sample with
the model's processor, and hand the encoded rows on in small blocks as it goes, so the model actors start on a
shard's first samples while the rest is still being decoded. A sample that fails becomes an error row."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from pipeline.commit.markers import wire_schema
from pipeline.encoded import ENCODED_FIELDS, encode_row
from pipeline.io.listing import Shard
from pipeline.io.samples import SourceOptions, read_samples
from pipeline.runner.stage import Resources, ShardStage

# On the wire to the model stage: the sample's join keys, then the encoded sample (ids as int32 bytes, images as
# uint8 at model resolution: a quarter of float32).
ENCODED_SCHEMA = wire_schema(("key", pa.string()), ("url", pa.string()), *ENCODED_FIELDS)


class EncodeStage(ShardStage):
    """Loads the model's processor (config and tokenizer, no weights) once per actor."""

    name = "encode"
    schema = ENCODED_SCHEMA

    def __init__(self, resources: Resources, model_uri: str, fmt: str, options: SourceOptions,
                 max_image_pixels: int, jpeg_draft: bool = False, rows_per_block: int = 16):
        super().__init__(resources)
        self.model_uri, self.fmt, self.options = model_uri, fmt, options
        self.max_image_pixels, self.jpeg_draft, self.rows_per_block = max_image_pixels, jpeg_draft, rows_per_block

    def setup(self) -> None:
        from model.checkpoint import load_processor

        self.processor, _ = load_processor(self.model_uri)
        self.processor.max_image_pixels = self.max_image_pixels
        self.processor.jpeg_draft = self.jpeg_draft

    def process_shard(self, shard: Shard) -> Iterator[list[dict]]:
        rows = []
        for sample in read_samples(shard, self.fmt, self.options):
            rows.append(encode_row(sample, self.processor))
            if len(rows) == self.rows_per_block:
                yield rows
                rows = []
        if rows:
            yield rows
