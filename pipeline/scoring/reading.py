"""Scoring's first stage: read whole shards on CPU actors (any node) and hand their samples on as they were read:
encoded image bytes and text, never decoded pixels (decoded, a caption's image is 27x its JPEG). Decoding,
resizing and tokenising happen beside the GPU, in the scoring actor's own threads (`pipeline.scoring.scorer`).
Samples go on in small blocks as the shard is read, so the scoring actors start on its first samples at once. A
document's images the model can never see (past `max_images`) stay behind (`model.limits.drop_unseen_images`)."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from model.limits import drop_unseen_images
from pipeline.commit.markers import wire_schema
from pipeline.io.listing import Shard
from pipeline.io.samples import SAMPLE_SCHEMA, SourceOptions, read_samples
from pipeline.runner.stage import Resources, ShardStage

# On the wire to the scoring actors: the sample schema (its metadata sidecar left behind: the records carry the
# join keys `key` and `url` taken from it).
SAMPLE_WIRE = wire_schema(*(SAMPLE_SCHEMA.field(name) for name in ("key", "url", "texts", "images")))


class ReadStage(ShardStage):
    name = "read"
    schema = SAMPLE_WIRE

    def __init__(self, resources: Resources, fmt: str, options: SourceOptions, rows_per_block: int = 64,
                 images_seen: int | None = None):
        super().__init__(resources)
        self.fmt = fmt
        self.options = options
        self.rows_per_block = rows_per_block
        self.images_seen = images_seen  # the most images the model sees of a sample (`model.limits.images_seen`)

    def process_shard(self, shard: Shard) -> Iterator[list[dict]]:
        rows = []
        for sample in read_samples(shard, self.fmt, self.options):
            sample["meta"] = None
            if self.images_seen is not None:
                sample["texts"], sample["images"] = drop_unseen_images(sample["texts"], sample["images"],
                                                                       sample["kind"], self.images_seen)
            rows.append(sample)
            if len(rows) == self.rows_per_block:
                yield rows
                rows = []
        if rows:
            yield rows


def sample_rows(samples: list[dict]) -> pa.Table:
    """Samples (dicts of the sample schema) as the scoring actors receive them."""
    return pa.Table.from_pylist([{name: s.get(name) for name in SAMPLE_WIRE.names} for s in samples],
                                schema=SAMPLE_WIRE)
