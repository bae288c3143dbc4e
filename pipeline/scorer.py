"""The model stage of scoring: encoded rows in, score records out.

`BatchScorer` is the whole of it and runs without Ray (tests and benchmarks drive it directly); `ScoringActor` is
the thin Ray adapter that loads the model once per actor. The device never waits on the host: while one
micro-batch runs, a helper thread gathers the next one from the Arrow buffers, pins it and starts its copy on a
side stream. Failures are told apart:
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
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import torch

from model.errors import Category
from model.processing import EncodedSample
from pipeline.errors import CheckpointError, UniFilterError
from pipeline.preprocess import token_budget_batches
from pipeline.sinks import SCORE_SCHEMA
from pipeline.sources import MARKERS

# Besides the score record: its position in the shard, its error's category, and the size of the micro-batch it
# was scored in (the summary reports how full the device's batches were).
ACTOR_OUTPUT_SCHEMA = SCORE_SCHEMA.append(pa.field("ordinal", pa.int64())).append(
    pa.field("error_category", pa.string())).append(pa.field("micro_batch", pa.int32()))
_PASSED = ["id", "source", "kind", "ordinal", "n_images", "n_tokens", "truncated", "error", "error_category", "key",
           "url"]
_DEVICE_ERROR = re.compile(r"CUDA error|CUBLAS_STATUS|CUDNN_STATUS|cuDNN error|device-side assert|illegal memory "
                           r"access|NCCL error|ECC error|unspecified launch failure", re.I)


class DeviceFault(UniFilterError):
    """The device failed (not the sample): the actor must end so Ray restarts it and retries the batch."""


def is_device_error(err: BaseException) -> bool:
    accelerator_error = getattr(torch, "AcceleratorError", ())
    return (accelerator_error and isinstance(err, accelerator_error)) or bool(_DEVICE_ERROR.search(str(err)))


def _binary_views(column: pa.ChunkedArray) -> list[memoryview | None]:
    """Zero-copy views of a binary column's values (no Python bytes objects for megabytes of pixels)."""
    out: list[memoryview | None] = []
    for chunk in column.chunks:
        _, offsets, data = chunk.buffers()
        offs = np.frombuffer(offsets, dtype=np.int32)[chunk.offset: chunk.offset + len(chunk) + 1]
        valid = chunk.is_valid().to_numpy(zero_copy_only=False)
        base = memoryview(data) if data is not None else memoryview(b"")
        out += [base[offs[i]:offs[i + 1]] if valid[i] else None for i in range(len(chunk))]
    return out


class BatchScorer:
    """Scores encoded rows with a loaded model: token-budget micro-batches of similar length, overlapped."""

    def __init__(self, model, processor, token_budget: int, max_batch: int, overlap: bool = True):
        self.model, self.processor = model, processor
        self.token_budget, self.max_batch = token_budget, max_batch
        self.micro_batch_sizes: list[int] = []  # what the device saw, for tests and benchmarks
        self.cuda = model.device.type == "cuda"
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prepare") if overlap else None
        self._stream = torch.cuda.Stream() if self.cuda else None

    # -- one call ----------------------------------------------------------------------------------------------
    def score_table(self, batch: pa.Table) -> pa.Table:
        columns = {name: batch.column(name).to_pylist() for name in _PASSED}
        n = batch.num_rows
        todo = [i for i in range(n) if columns["kind"][i] not in MARKERS and not columns["error"][i]]
        encoded = self._decode(batch, todo)
        results: dict[int, dict | str] = {}
        plan = list(token_budget_batches([e.n_tokens for e in encoded], self.token_budget, self.max_batch))
        pending = self._submit(encoded, plan[0]) if plan else None
        for k, micro in enumerate(plan):
            prepared = pending.result() if self._pool else pending
            pending = self._submit(encoded, plan[k + 1]) if k + 1 < len(plan) else None
            results.update(self._score_group(encoded, micro, prepared))
        _check_not_all_failed(results)
        model_id = self.model.model_id
        score, label, probs, micro_batch = [None] * n, [None] * n, [None] * n, [None] * n
        for j, result in results.items():
            i = todo[j]
            if isinstance(result, str):
                columns["error"][i], columns["error_category"][i] = result, Category.SCORE.value
            else:
                score[i], label[i], probs[i] = result["score"], result["label"], result["probs"]
                micro_batch[i] = result["micro_batch"]
        out = {**columns, "score": score, "label": label, "probs": probs, "model": [model_id] * n,
               "micro_batch": micro_batch}
        return pa.table({name: out[name] for name in ACTOR_OUTPUT_SCHEMA.names}, schema=ACTOR_OUTPUT_SCHEMA)

    def _decode(self, batch: pa.Table, rows: list[int]) -> list[EncodedSample]:
        ids = _binary_views(batch.column("input_ids"))
        pixels = _binary_views(batch.column("pixel_values"))
        n_images = batch.column("n_images").to_pylist()
        truncated = batch.column("truncated").to_pylist()
        size = self.processor.config.image_size
        return [EncodedSample(np.frombuffer(ids[i], dtype=np.int32).astype(np.int64),
                              np.frombuffer(pixels[i], dtype=np.uint8).reshape(n_images[i], 3, size, size),
                              bool(truncated[i])) for i in rows]

    # -- host side of a micro-batch: gather, pin, start the copy ------------------------------------------------
    def _submit(self, encoded, group: list[int]):
        if self._pool is None:
            return self._prepare(encoded, group)
        return self._pool.submit(self._prepare, encoded, group)

    def _prepare(self, encoded, group: list[int]) -> dict:
        try:
            batch = self.processor.collate([encoded[j] for j in group])
        except Exception as err:  # noqa: BLE001 - a sample's own fault: narrowed down by _score_group
            return {"error": err}
        if self.cuda:
            with torch.cuda.stream(self._stream):
                pixels = batch["pixel_values"].pin_memory().to(self.model.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
            batch["pixel_values"], batch["ready"] = pixels, event
        return batch

    # -- device side -------------------------------------------------------------------------------------------
    def _score_group(self, encoded, group: list[int], prepared: dict | None = None) -> dict[int, dict | str]:
        """{index: record fields or error reason} for one micro-batch, halving it on failure."""
        failure = None
        try:
            prepared = prepared if prepared is not None else self._prepare(encoded, group)
            if "error" in prepared:
                raise prepared["error"]
            results = self._forward(prepared, len(group))
        except torch.OutOfMemoryError:
            failure = "out of memory"
        except Exception as err:
            if is_device_error(err):
                raise DeviceFault(f"{type(err).__name__}: {err}") from err
            failure = f"{type(err).__name__}: {err}"
        if failure is None:
            return self._records(group, results)
        # Outside the handler: the failed forward's tensors (held by the traceback) are gone now.
        prepared = None
        release_memory(self.model.device)
        if len(group) == 1:
            n_tokens = encoded[group[0]].n_tokens
            if failure == "out of memory":
                failure = f"out of memory on this sample alone ({n_tokens} tokens)"
            return {group[0]: f"{Category.SCORE.value}: {failure}"[:500]}
        half = len(group) // 2
        return {**self._score_group(encoded, group[:half]), **self._score_group(encoded, group[half:])}

    def _forward(self, batch: dict, n: int) -> dict:
        if "ready" in batch:
            stream = torch.cuda.current_stream()
            stream.wait_event(batch["ready"])
            batch["pixel_values"].record_stream(stream)
        self.micro_batch_sizes.append(n)
        out = self.model.score(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        return {k: (None if v is None else v.float().cpu().numpy()) for k, v in out.items()}

    @staticmethod
    def _records(group: list[int], result: dict) -> dict[int, dict | str]:
        out: dict[int, dict | str] = {}
        for k, j in enumerate(group):
            score = float(result["score"][k])
            if not np.isfinite(score):  # float16 overflow, say: reproducible for this sample, never a score
                out[j] = f"{Category.SCORE.value}: non-finite score ({score}); float16 overflows, use bfloat16"
                continue
            out[j] = {"score": score, "label": int(result["label"][k]), "micro_batch": len(group),
                      "probs": None if result["probs"] is None else result["probs"][k].tolist()}
        return out


def _check_not_all_failed(results: dict[int, dict | str]) -> None:
    """Samples that fail on their own fail for their own reasons. When every sample of a call (two or more) failed
    alone with the same error, the error is the device's or the model's, not the data's (an unrecognised CUDA
    error, say): a DeviceFault, so the batch is retried and nothing is committed as an error record."""
    if len(results) < 2 or not all(isinstance(r, str) for r in results.values()):
        return
    causes = {re.sub(r"\(\d+ tokens\)", "", r) for r in results.values()}  # out of memory names each size
    if len(causes) == 1:
        raise DeviceFault(f"every one of {len(results)} samples failed alone with: {next(iter(results.values()))}")


def check_weights(model_uri: str, model_id: str, expected: str | None) -> None:
    """The weights this actor loaded are the ones the run's identity names: a checkpoint rewritten in place while
    the job runs (or between an actor's restarts) never adds another model's scores to the output."""
    from model.digest import weights_digest

    if expected is None:
        return
    found = weights_digest(model_uri, model_id.rsplit("@", 1)[-1] if "@" in model_id else None)
    if found != expected:
        raise CheckpointError(f"the weights at {model_uri} changed since the job started (digest {expected}, now "
                              f"{found}): their scores would mix with the earlier weights' in one output; score the "
                              "new weights into another output")


def release_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


class ScoringActor:
    """One model replica: loaded once per actor (a NeMo-Curator-style `setup` in `__init__`), then scores batches.
    Markers and error rows pass through. A device fault ends the process: Ray restarts the actor and retries."""

    def __init__(self, model_uri: str, dtype: str = "auto", token_budget: int | None = None, max_batch: int = 256,
                 weights: str | None = None):
        import model as unifilter

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "bfloat16" if device == "cuda" else "float32"
        self.model_uri = model_uri
        net, processor = unifilter.load(model_uri, device=device, dtype=getattr(torch, dtype))
        check_weights(model_uri, net.model_id, weights)
        self.scorer = BatchScorer(net, processor, token_budget or (32768 if device == "cuda" else 8192), max_batch)

    def __call__(self, batch: pa.Table) -> pa.Table:
        try:
            return self.scorer.score_table(batch)
        except DeviceFault as fault:
            print(f"[score] device error in a scoring actor ({fault}); ending it so Ray restarts it and retries "
                  "the batch", file=sys.stderr, flush=True)
            os._exit(3)
