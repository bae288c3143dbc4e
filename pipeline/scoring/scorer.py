"""Scoring encoded rows with a loaded model: encoded rows in, score records out, without Ray (the scoring stage,
the public Ray Data stage, tests and benchmarks all drive `BatchScorer`). The device never waits on the host: while one
micro-batch runs, a helper thread gathers the next one from the Arrow buffers, pins it and starts its copy on a
side stream. Failures are told apart:
- out of memory, anywhere in a micro-batch's life (collate, pin, copy, forward): the micro-batch is split in
  halves (memory released first, outside the handler, so the failed batch's tensors are gone) until the pieces
  fit, and the actor lowers its token budget for later micro-batches (half the padded size that failed; the
  output's `budget_lowered` column tells the driver, whose summary reports it); a single sample that still does
  not fit is that sample's error;
- any other error of the device (a CUDA error, after which the process's GPU is unusable) ends the actor, so Ray
  restarts it and retries the batch: a broken GPU is never committed as bad data. Before the process ends the
  micro-batch's samples go into the run's fault journal, which bounds the retries and narrows a fault that
  follows one sample down to that sample (`pipeline.scoring.device_faults`);
- any other error is narrowed down by halving too: only a sample that fails on its own becomes its error record.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import torch

from model.errors import Category
from model.processing import EncodedSample
from pipeline.commit.markers import MARKERS, wire_schema
from pipeline.encoded import token_budget_batches
from pipeline.errors import CheckpointError, DeviceFault
from pipeline.scoring.device_faults import FAULTS_BEFORE_NARROWING, FaultJournal, Key, RemoteJournal
from pipeline.scoring.records import SCORE_SCHEMA

# Besides the score record, on the wire: the size of the micro-batch it was scored in (the summary reports how
# full the device's batches were), and, once an out-of-memory error made the actor lower its token budget, which
# actor and from what to what (on the first row of each call; null otherwise).
BUDGET_LOWERED = pa.struct([("actor", pa.string()), ("from", pa.int64()), ("to", pa.int64())])
SCORED_SCHEMA = wire_schema(*SCORE_SCHEMA, ("micro_batch", pa.int32()), ("budget_lowered", BUDGET_LOWERED))
_PASSED = ["id", "source", "kind", "ordinal", "n_images", "n_tokens", "truncated", "error", "error_category", "key",
           "url"]
_DEVICE_ERROR = re.compile(r"CUDA error|CUBLAS_STATUS|CUDNN_STATUS|cuDNN error|device-side assert|illegal memory "
                           r"access|NCCL error|ECC error|unspecified launch failure", re.I)


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
    """Scores encoded rows with a loaded model: token-budget micro-batches of similar length, overlapped. Device
    faults go into `journal` (`pipeline.device_faults`; an in-memory one by default)."""

    def __init__(self, model, processor, token_budget: int, max_batch: int, overlap: bool = True,
                 journal: FaultJournal | RemoteJournal | None = None):
        self.model, self.processor = model, processor
        self.token_budget, self.max_batch = token_budget, max_batch
        self.configured_budget = token_budget  # what it started with; out-of-memory errors lower token_budget
        self.journal = journal if journal is not None else FaultJournal()
        self.name = f"{socket.gethostname()}:{os.getpid()}"  # one process: a restart starts at the configured budget
        self.healthy = False  # a forward pass succeeded in this process: the device works
        self.micro_batch_sizes: list[int] = []  # what the device saw, for tests and benchmarks
        self.cuda = model.device.type == "cuda"
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prepare") if overlap else None
        self._stream = torch.cuda.Stream() if self.cuda else None

    # -- one call ----------------------------------------------------------------------------------------------
    def score_table(self, batch: pa.Table) -> pa.Table:
        columns = {name: batch.column(name).to_pylist() for name in _PASSED}
        n = batch.num_rows
        todo = [i for i in range(n) if columns["kind"][i] not in MARKERS and not columns["error"][i]]
        keys = [(columns["source"][i], columns["ordinal"][i]) for i in todo]
        blamed, suspects = self.journal.lookup(keys) if keys else ({}, {})
        encoded = self._decode(batch, todo)
        narrowed = {key for key, faults in suspects.items() if faults >= FAULTS_BEFORE_NARROWING}
        alone = [j for j, key in enumerate(keys) if key in narrowed]
        rest = [j for j, key in enumerate(keys) if key not in narrowed and key not in blamed]
        results: dict[int, dict | str] = {}
        cleared: list[Key] = []  # suspects that scored alone in this call
        try:
            results.update(self._score_alone(encoded, alone, keys, cleared))
            results.update(self._score_planned(encoded, rest))
        except DeviceFault as fault:
            try:
                self._record(fault, keys, alone, cleared)
            except Exception as err:  # noqa: BLE001 - the fault is handled (the process ends) all the same
                print(f"[score] the device fault could not be recorded in the fault journal: {err}",
                      file=sys.stderr, flush=True)
            raise
        _check_not_all_failed(results)
        if suspects:  # the call completes: its suspects are cleared
            self.journal.clear([key for key in keys if key in suspects])
        results.update({j: blamed[key] for j, key in enumerate(keys) if key in blamed})
        return self._output(columns, n, todo, results)

    def _output(self, columns: dict, n: int, todo: list[int], results: dict[int, dict | str]) -> pa.Table:
        score, label, probs, micro_batch = [None] * n, [None] * n, [None] * n, [None] * n
        for j, result in results.items():
            i = todo[j]
            if isinstance(result, str):  # "<category>: <detail>"
                columns["error"][i], columns["error_category"][i] = result, result.split(":", 1)[0]
            else:
                score[i], label[i], probs[i] = result["score"], result["label"], result["probs"]
                micro_batch[i] = result["micro_batch"]
        lowered = [None] * n  # one row per call tells the driver (it reads every row the actors return)
        if self.token_budget < self.configured_budget and n:
            lowered[0] = {"actor": self.name, "from": self.configured_budget, "to": self.token_budget}
        columns["meta"] = [None] * n
        out = {**columns, "score": score, "label": label, "probs": probs, "model": [self.model.model_id] * n,
               "micro_batch": micro_batch, "budget_lowered": lowered}
        return pa.table({name: out[name] for name in SCORED_SCHEMA.names}, schema=SCORED_SCHEMA)

    def _decode(self, batch: pa.Table, rows: list[int]) -> list[EncodedSample]:
        ids = _binary_views(batch.column("input_ids"))
        pixels = _binary_views(batch.column("pixel_values"))
        n_images = batch.column("n_images").to_pylist()
        truncated = batch.column("truncated").to_pylist()
        size = self.processor.config.image_size
        return [EncodedSample(np.frombuffer(ids[i], dtype=np.int32).astype(np.int64),
                              np.frombuffer(pixels[i], dtype=np.uint8).reshape(n_images[i], 3, size, size),
                              bool(truncated[i])) for i in rows]

    def _score_planned(self, encoded, rows: list[int]) -> dict[int, dict | str]:
        """Micro-batches of similar length within the token budget, each prepared while the one before runs."""
        plan = [[rows[k] for k in micro] for micro in
                token_budget_batches([encoded[j].n_tokens for j in rows], self.token_budget, self.max_batch)]
        results: dict[int, dict | str] = {}
        pending = self._submit(encoded, plan[0]) if plan else None
        for k, micro in enumerate(plan):
            prepared = pending.result() if self._pool else pending
            pending = self._submit(encoded, plan[k + 1]) if k + 1 < len(plan) else None
            results.update(self._score_group(encoded, micro, prepared))
        return results

    # -- narrowing a device fault down (pipeline.device_faults) -------------------------------------------------
    def _score_alone(self, encoded, rows: list[int], keys: list[Key], cleared: list[Key]) -> dict[int, dict | str]:
        """Suspects at the bound, each on its own, once the canary has shown that the device works."""
        if not rows:
            return {}
        self._canary()
        results: dict[int, dict | str] = {}
        for j in rows:
            results.update(self._score_group(encoded, [j]))
            cleared.append(keys[j])
        return results

    def _canary(self) -> None:
        """A synthetic caption (a grey square) through the whole path: a fault here is the device's own."""
        if self.healthy:
            return
        size = self.processor.config.image_size
        sample = self.processor.encode([None, "a grey square"], [np.full((3, size, size), 127, np.uint8), None],
                                       "caption")
        try:
            prepared = self._prepare([sample], [0])
            if "error" in prepared:
                raise prepared["error"]
            self._forward(prepared, 1)
        except Exception as err:
            raise DeviceFault(f"the canary sample failed: {type(err).__name__}: {err}", canary=True) from err

    def _record(self, fault: DeviceFault, keys: list[Key], alone: list[int], cleared: list[Key]) -> None:
        """Into the journal before the process ends: a sample that faulted alone after the canary is blamed, a
        micro-batch that faulted gets one more fault, a canary fault blames nobody."""
        if fault.canary:
            self.journal.record_canary_fault(fault.first_line)
        elif fault.samples is not None and len(fault.samples) == 1 and fault.samples[0] in alone:
            reason = f"{Category.DEVICE.value}: the sample faults the device on its own ({fault.first_line})"
            self.journal.blame(keys[fault.samples[0]], reason[:500], cleared)
        elif fault.samples is not None:
            self.journal.record_fault([keys[j] for j in fault.samples], fault.first_line, cleared)

    # -- host side of a micro-batch: gather, pin, start the copy ------------------------------------------------
    def _submit(self, encoded, group: list[int]):
        if self._pool is None:
            return self._prepare(encoded, group)
        return self._pool.submit(self._prepare, encoded, group)

    def _prepare(self, encoded, group: list[int]) -> dict:
        try:
            return self._to_device(self.processor.collate([encoded[j] for j in group]))
        except Exception as err:  # noqa: BLE001 - out of memory, the device's or a sample's: told apart by _score_group
            return {"error": err}

    def _to_device(self, batch: dict) -> dict:
        """Pin the pixels and start their copy on the side stream (the forward pass waits for its event)."""
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
        padded = len(group) * max(encoded[j].n_tokens for j in group)
        if len(group) > 1 and padded > self.token_budget:  # planned before an out-of-memory error lowered it
            return self._halves(encoded, group)
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
                raise DeviceFault(f"{type(err).__name__}: {err}", samples=group) from err
            failure = f"{type(err).__name__}: {err}"
        if failure is None:
            return self._records(group, results)
        # Outside the handler: the failed forward's tensors (held by the traceback) are gone now.
        prepared = None
        release_memory(self.model.device)
        if len(group) == 1:
            if failure == "out of memory":
                failure = f"out of memory on this sample alone ({padded} tokens)"
            return {group[0]: f"{Category.SCORE.value}: {failure}"[:500]}
        if failure == "out of memory":  # later micro-batches of this size would fail first too
            self.token_budget = min(self.token_budget, max(1, padded // 2))
        return self._halves(encoded, group)

    def _halves(self, encoded, group: list[int]) -> dict[int, dict | str]:
        half = len(group) // 2
        return {**self._score_group(encoded, group[:half]), **self._score_group(encoded, group[half:])}

    def _forward(self, batch: dict, n: int) -> dict:
        if "ready" in batch:
            stream = torch.cuda.current_stream()
            stream.wait_event(batch["ready"])
            batch["pixel_values"].record_stream(stream)
        self.micro_batch_sizes.append(n)
        out = self.model.score(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        out = {k: (None if v is None else v.float().cpu().numpy()) for k, v in out.items()}
        self.healthy = True
        return out

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
