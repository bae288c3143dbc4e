"""UniFilter as a stage of your own Ray Data pipeline: the job's model code, micro-batching and error records,
on a dataset you already have.

```python
import ray
from pipeline.scoring import UniFilterScorer, checked_num_gpus

# raw bytes (jpg, txt, json columns) of the tars alone, not img2dataset's .parquet and _stats.json beside them
ds = ray.data.read_webdataset("s3://bucket/laion/", decoder=None, file_extensions=["tar"])
scored = ds.map_batches(UniFilterScorer, fn_constructor_kwargs={"model": "s3://bucket/models/unifilter-1.5b"},
                        num_gpus=checked_num_gpus(1), concurrency=4, batch_size=1024, batch_format="pyarrow")
```

`model` is a checkpoint URI, or the scoring settings whole (`pipeline.scoring.ScoringSettings(model=...,
jpeg_draft=True, decode_threads=6)`: precision, token budget, decoding, compiling; what is unset decided for the
actor's device).

Rows come in as captions (image bytes and a text: `image_columns`, the first of which a row has, webdataset's
`jpg`, `jpeg`, `png`, `webp` by default, and `text_column`, `txt`) or in the sample schema (`texts`, `images`,
`kind` list columns, as `pipeline.io` reads them). They go out with every input column kept and `score`, `label`,
`probs`, `n_images`, `n_tokens`, `truncated`, `error` and `model` added: a sample that cannot be scored keeps its
row, with `error` saying why (no row is ever dropped). A device fault ends the actor, which Ray restarts and whose
batch it retries (the job's fault journal, which narrows such a fault down to the sample, is the job's:
`python -m jobs.score`).
`checked_num_gpus(n)` refuses at once a GPU count the cluster can never give (Ray would wait forever).
"""

from __future__ import annotations

import os
import sys

import pyarrow as pa

from model.errors import Category, SampleFailure
from pipeline.errors import DeviceFault
from pipeline.scoring.settings import ScoringSettings

ADDED = ("score", "label", "probs", "n_images", "n_tokens", "truncated", "error", "model")


def _text(value) -> str | None:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8")
    return value


class UniFilterScorer:
    """A callable class for `Dataset.map_batches` (`batch_format="pyarrow"`): the model loads once per actor."""

    def __init__(self, model: str | ScoringSettings, image_columns: tuple[str, ...] = ("jpg", "jpeg", "png", "webp"),
                 text_column: str = "txt", id_column: str = "__key__"):
        from pipeline.scoring.stage import load_scorer

        self.image_columns = tuple(image_columns)
        self.text_column = text_column
        self.id_column = id_column
        # a checkpoint URI alone: the defaults, with 4 decode threads per actor
        settings = model if isinstance(model, ScoringSettings) else ScoringSettings(model=model, decode_threads=4)
        self.scorer = load_scorer(settings)

    def __del__(self):
        # Ray Data drops a callable class's instance as its actor exits gracefully: the scorer's threads end with it
        scorer = getattr(self, "scorer", None)
        if scorer is not None:
            scorer.close()

    def _samples(self, batch: pa.Table) -> list[dict]:
        n, names = batch.num_rows, batch.column_names
        ids = batch.column(self.id_column).to_pylist() if self.id_column in names else [None] * n
        if "texts" in names and "images" in names:
            kinds = batch.column("kind").to_pylist() if "kind" in names else ["interleaved"] * n
            return [{"id": i, "texts": t, "images": m, "kind": k} for i, t, m, k in
                    zip(ids, batch.column("texts").to_pylist(), batch.column("images").to_pylist(), kinds)]
        columns = [batch.column(c).to_pylist() for c in self.image_columns if c in names]
        images = [next((col[k] for col in columns if col[k] is not None), None) for k in range(n)]
        texts = batch.column(self.text_column).to_pylist() if self.text_column in names else [None] * n
        rows = []
        for i, image, text in zip(ids, images, texts):
            row = {"id": i, "kind": "caption", "texts": [None, None], "images": [image, None]}
            failure = None
            try:
                row["texts"][1] = _text(text)
            except UnicodeDecodeError as err:
                failure = SampleFailure(Category.DECODE,
                                        f"caption is not valid UTF-8 ({err.reason} at byte {err.start})")
            if failure is None and (image is None or row["texts"][1] is None):
                failure = SampleFailure(Category.EMPTY,
                                        "sample has no image" if image is None else "sample has no caption")
            if failure is not None:
                row["error"], row["error_category"] = failure.reason, failure.category.value
            rows.append(row)
        return rows

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipeline.scoring.reading import sample_rows

        samples = [{**sample, "source": "", "ordinal": k} for k, sample in enumerate(self._samples(batch))]
        try:
            scored = self.scorer.score_table(sample_rows(samples))
        except DeviceFault as fault:
            print(f"[UniFilterScorer] device error ({fault.first_line}); ending the actor so Ray restarts it and "
                  "retries the batch", file=sys.stderr, flush=True)
            os._exit(3)
        kept = batch.drop_columns([name for name in ADDED if name in batch.column_names])
        for name in ADDED:
            kept = kept.append_column(scored.schema.field(name), scored.column(name))
        return kept


def checked_num_gpus(num_gpus: float) -> float:
    """`num_gpus` for `map_batches(UniFilterScorer, num_gpus=...)`, refused at once (`InputError` naming `num_gpus`)
    on a Ray cluster that has no GPU and can start none, as `jobs.score` refuses such a cluster, instead of the
    pipeline waiting forever for actors that cannot be placed. Connects to Ray as Ray Data would."""
    import ray

    from pipeline.runner.resources import current_view, gpus_the_cluster_can_give

    if not ray.is_initialized():
        ray.init()
    return gpus_the_cluster_can_give(num_gpus, "num_gpus", current_view())
