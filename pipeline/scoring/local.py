"""Scoring without Ray, on one machine: shards read by the read stage's own code, scored by the scoring actor's own
`BatchScorer.score_table`, records out. It needs torch, transformers, pyarrow, numpy, Pillow and pydantic, not Ray
(nor s3fs or boto3 for local shards): `benchmarks/gpu.py` measures production's scoring path with it on a bare GPU
machine, and it is how you score a handful of shards in a notebook.

    settings = ScoringSettings(model="path/to/checkpoint", decode_threads=4)
    for records in score_shards("shards/", "webdataset", settings):
        ...  # one table of score records (`SCORE_SCHEMA`) per shard, in listing order

Nothing is committed and there is no lease: `python -m jobs.score` is the exactly-once job."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.commit.markers import SHARD_FAILED, is_marker
from pipeline.errors import ShardFault
from pipeline.io.listing import list_shards
from pipeline.io.samples import SourceOptions
from pipeline.runner.stage import Resources, shard_rows
from pipeline.scoring.reading import ReadStage
from pipeline.scoring.records import SCORE_SCHEMA
from pipeline.scoring.settings import ScoringSettings

if TYPE_CHECKING:
    from pipeline.scoring.scorer import BatchScorer


def score_shards(input_uri: str, fmt: str, scorer: BatchScorer | ScoringSettings | str,
                 options: SourceOptions | None = None, rows_per_call: int | None = None) -> Iterator[pa.Table]:
    """Each shard of `input_uri` (a folder, glob, brace range or list file, as the job takes it) scored by
    `scorer` (a loaded `BatchScorer`, or the settings to load one with, or a checkpoint URI: loaded here and closed
    at the end) in calls of `rows_per_call` rows (default 4 x its max_batch, as the job hands its actors): one
    table of score records per shard, every sample of it exactly once. A shard that cannot be read raises
    `ShardFault` (a fault, never error records)."""
    if isinstance(scorer, (ScoringSettings, str)):
        from pipeline.scoring.stage import load_scorer

        loaded = load_scorer(scorer)
        try:
            yield from score_shards(input_uri, fmt, loaded, options, rows_per_call)
        finally:
            loaded.close()
        return
    reader = ReadStage(Resources(), fmt, options or SourceOptions(), images_seen=scorer.processor.images_seen)
    per_call = rows_per_call or 4 * scorer.max_batch
    for shard in list_shards(input_uri, fmt).shards:
        read = pa.concat_tables(reader(pa.Table.from_pylist(shard_rows([[shard]]))))
        failed = read.filter(pc.equal(read.column("kind"), SHARD_FAILED))
        if failed.num_rows:
            marker = failed.to_pylist()[0]  # its error is "<category>: <detail>"
            raise ShardFault(marker["error_category"], marker["error"].split(": ", 1)[1])
        samples = read.filter(pc.invert(is_marker(read.column("kind"))))
        calls = [scorer.score_table(samples.slice(start, per_call)) for start in range(0, samples.num_rows, per_call)]
        scored = pa.concat_tables(calls) if calls else SCORE_SCHEMA.empty_table()
        yield scored.select(SCORE_SCHEMA.names).cast(SCORE_SCHEMA)
