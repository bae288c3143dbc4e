"""UniFilter as a stage of your own Ray Data pipeline: the job's model code, micro-batching and error records,
on a dataset you already have.

```python
import ray
from pipeline.scoring import UniFilterScorer

ds = ray.data.read_webdataset("s3://bucket/laion/", decoder=None)      # raw bytes: jpg, txt, json columns
scored = ds.map_batches(UniFilterScorer, fn_constructor_kwargs={"model": "s3://bucket/models/unifilter-1.5b"},
                        num_gpus=1, concurrency=4, batch_size=1024, batch_format="pyarrow")
```

Rows come in as captions (an image-bytes column and a text column: `image_column`, `text_column`, webdataset's
`jpg` and `txt` by default) or in the sample schema (`texts`, `images`, `kind` list columns, as `pipeline.io`
reads them). They go out with every input column kept and `score`, `label`, `probs`, `n_images`, `n_tokens`,
`truncated`, `error` and `model` added: a sample that cannot be scored keeps its row, with `error` saying why (no
row is ever dropped). A device fault ends the actor, which Ray restarts and whose batch it retries (the job's
fault journal, which narrows such a fault down to the sample, is the job's: `python -m jobs.score`).
"""

from __future__ import annotations

import os
import sys

import pyarrow as pa

from model.limits import DEFAULT_MAX_IMAGE_PIXELS
from pipeline.errors import DeviceFault

ADDED = ("score", "label", "probs", "n_images", "n_tokens", "truncated", "error", "model")


def _text(value) -> str | None:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8")
    return value


class UniFilterScorer:
    """A callable class for `Dataset.map_batches` (`batch_format="pyarrow"`): the model loads once per actor."""

    def __init__(self, model: str, image_column: str = "jpg", text_column: str = "txt", id_column: str = "__key__",
                 dtype: str = "auto", token_budget: int | None = None, max_batch: int = 256,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, jpeg_draft: bool = False):
        from pipeline.scoring.stage import load_scorer

        self.image_column, self.text_column, self.id_column = image_column, text_column, id_column
        self.scorer = load_scorer(model, dtype, token_budget, max_batch)
        self.scorer.processor.max_image_pixels = max_image_pixels
        self.scorer.processor.jpeg_draft = jpeg_draft

    def _samples(self, batch: pa.Table) -> list[dict]:
        n, names = batch.num_rows, batch.column_names
        ids = batch.column(self.id_column).to_pylist() if self.id_column in names else [None] * n
        if "texts" in names and "images" in names:
            kinds = batch.column("kind").to_pylist() if "kind" in names else ["interleaved"] * n
            return [{"id": i, "texts": t, "images": m, "kind": k} for i, t, m, k in
                    zip(ids, batch.column("texts").to_pylist(), batch.column("images").to_pylist(), kinds)]
        images, texts = batch.column(self.image_column).to_pylist(), batch.column(self.text_column).to_pylist()
        rows = []
        for i, image, text in zip(ids, images, texts):
            row = {"id": i, "kind": "caption", "texts": [None, None], "images": [image, None]}
            try:
                row["texts"][1] = _text(text)
            except UnicodeDecodeError as err:
                row["error"] = f"decode: caption is not valid UTF-8 ({err.reason} at byte {err.start})"
            if image is None or row["texts"][1] is None:
                row["error"] = row.get("error") or ("empty: sample has no image" if image is None else
                                                    "empty: sample has no caption")
            rows.append(row)
        return rows

    def __call__(self, batch: pa.Table) -> pa.Table:
        # here, not at the top: encode_row brings torch, and every job's command line imports `pipeline.scoring`
        from pipeline.encoded import encode_row
        from pipeline.scoring.reading import ENCODED_SCHEMA

        rows = [encode_row({**s, "source": "", "ordinal": k, "error": s.get("error"),
                            "error_category": s["error"].split(":", 1)[0] if s.get("error") else None},
                           self.scorer.processor) for k, s in enumerate(self._samples(batch))]
        encoded = pa.Table.from_pylist([{name: r.get(name) for name in ENCODED_SCHEMA.names} for r in rows],
                                       schema=ENCODED_SCHEMA)
        try:
            scored = self.scorer.score_table(encoded)
        except DeviceFault as fault:
            print(f"[UniFilterScorer] device error ({fault.first_line}); ending the actor so Ray restarts it and "
                  "retries the batch", file=sys.stderr, flush=True)
            os._exit(3)
        kept = batch.drop_columns([name for name in ADDED if name in batch.column_names])
        for name in ADDED:
            kept = kept.append_column(scored.schema.field(name), scored.column(name))
        return kept
