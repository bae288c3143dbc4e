"""The model stage of scoring: encoded rows in, score records out.

`BatchScorer` is the whole of it and runs without Ray (tests drive it directly); `ScoringActor` is the thin Ray
adapter that loads the model once per actor. Failures are told apart:
- out of memory: the micro-batch is split in halves (memory released first, outside the handler, so the failed
  batch's tensors are gone) until the pieces fit; a single sample that still does not fit is that sample's error;
- any other error of the device (a CUDA error, after which the process's GPU is unusable) ends the actor, so Ray
  restarts it and retries the batch: a broken GPU is never committed as bad data;
- any other error is narrowed down by halving too: only a sample that fails on its own becomes its error record.
"""

from __future__ import annotations

import os
import re
import sys

import numpy as np
import pyarrow as pa
import torch

from model.errors import Category
from pipeline.errors import UniFilterError
from pipeline.preprocess import decode_encoded, token_budget_batches
from pipeline.sinks import SCORE_SCHEMA
from pipeline.sources import MARKERS

ACTOR_OUTPUT_SCHEMA = SCORE_SCHEMA.append(pa.field("ordinal", pa.int64())).append(
    pa.field("error_category", pa.string()))
_DEVICE_ERROR = re.compile(r"CUDA error|CUBLAS_STATUS|CUDNN_STATUS|cuDNN error|device-side assert|illegal memory "
                           r"access|NCCL error|ECC error|unspecified launch failure", re.I)


class DeviceFault(UniFilterError):
    """The device failed (not the sample): the actor must end so Ray restarts it and retries the batch."""


def is_device_error(err: BaseException) -> bool:
    accelerator_error = getattr(torch, "AcceleratorError", ())
    return (accelerator_error and isinstance(err, accelerator_error)) or bool(_DEVICE_ERROR.search(str(err)))


class BatchScorer:
    """Scores encoded rows with a loaded model: token-budget micro-batches of similar length."""

    def __init__(self, model, processor, token_budget: int, max_batch: int):
        self.model, self.processor = model, processor
        self.token_budget, self.max_batch = token_budget, max_batch
        self.micro_batch_sizes: list[int] = []  # what the device saw, for tests and benchmarks

    def score_table(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        model_id = self.model.model_id
        out = [_passthrough_record(r, model_id) for r in rows]
        todo = [i for i, r in enumerate(rows) if r["kind"] not in MARKERS and not r["error"]]
        size = self.processor.config.image_size
        encoded = [decode_encoded(rows[i], size) for i in todo]
        for micro in token_budget_batches([e.n_tokens for e in encoded], self.token_budget, self.max_batch):
            for j, result in self._score_group(encoded, micro).items():
                record = out[todo[j]]
                if isinstance(result, str):
                    record.update(error=result, error_category=Category.SCORE.value)
                else:
                    record.update(result)
        return pa.Table.from_pylist(out, schema=ACTOR_OUTPUT_SCHEMA)

    def _score_group(self, encoded, group: list[int]) -> dict[int, dict | str]:
        """{index: record fields or error reason} for one micro-batch, halving it on failure."""
        failure = None
        try:
            results = self._forward([encoded[j] for j in group])
        except torch.OutOfMemoryError:
            failure = "out of memory"
        except Exception as err:
            if is_device_error(err):
                raise DeviceFault(f"{type(err).__name__}: {err}") from err
            failure = f"{type(err).__name__}: {err}"
        if failure is None:
            return self._records(group, results)
        # Outside the handler: the failed forward's tensors (held by the traceback) are gone now.
        release_memory(self.model.device)
        if len(group) == 1:
            n_tokens = encoded[group[0]].n_tokens
            if failure == "out of memory":
                failure = f"out of memory on this sample alone ({n_tokens} tokens)"
            return {group[0]: f"{Category.SCORE.value}: {failure}"[:500]}
        half = len(group) // 2
        return {**self._score_group(encoded, group[:half]), **self._score_group(encoded, group[half:])}

    def _forward(self, samples) -> dict:
        batch = self.processor.collate(samples)
        if self.model.device.type == "cuda":
            batch = {k: v.pin_memory().to(self.model.device, non_blocking=True) for k, v in batch.items()}
        self.micro_batch_sizes.append(len(samples))
        out = self.model.score(**batch)
        return {k: (None if v is None else v.float().cpu().numpy()) for k, v in out.items()}

    @staticmethod
    def _records(group: list[int], result: dict) -> dict[int, dict | str]:
        out: dict[int, dict | str] = {}
        for k, j in enumerate(group):
            score = float(result["score"][k])
            if not np.isfinite(score):  # float16 overflow, say: reproducible for this sample, never a score
                out[j] = f"{Category.SCORE.value}: non-finite score ({score}); float16 overflows, use bfloat16"
                continue
            out[j] = {"score": score, "label": int(result["label"][k]),
                      "probs": None if result["probs"] is None else result["probs"][k].tolist()}
        return out


def release_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _passthrough_record(row: dict, model_id: str) -> dict:
    return {"id": row["id"], "source": row["source"], "kind": row["kind"], "ordinal": row["ordinal"],
            "score": None, "label": None, "probs": None, "n_images": row["n_images"], "n_tokens": row["n_tokens"],
            "truncated": row["truncated"], "error": row["error"], "error_category": row.get("error_category"),
            "model": model_id, "key": row.get("key"), "url": row.get("url")}


class ScoringActor:
    """One model replica: loaded once per actor (a NeMo-Curator-style `setup` in `__init__`), then scores batches.
    Markers and error rows pass through. A device fault ends the process: Ray restarts the actor and retries."""

    def __init__(self, model_uri: str, dtype: str = "auto", token_budget: int | None = None, max_batch: int = 256):
        import model as unifilter

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "bfloat16" if device == "cuda" else "float32"
        net, processor = unifilter.load(model_uri, device=device, dtype=getattr(torch, dtype))
        self.scorer = BatchScorer(net, processor, token_budget or (32768 if device == "cuda" else 8192), max_batch)

    def __call__(self, batch: pa.Table) -> pa.Table:
        try:
            return self.scorer.score_table(batch)
        except DeviceFault as fault:
            print(f"[score] device error in a scoring actor ({fault}); ending it so Ray restarts it and retries "
                  "the batch", file=sys.stderr, flush=True)
            os._exit(3)
