"""Scoring samples with a loaded model, without Ray: sample rows in (encoded image bytes and text, as read from the
shards), score records out. The scoring stage, the public Ray Data stage, tests and the GPU benchmark all drive
`BatchScorer.score_table`: it is the scoring path production runs.

One call: each sample is laid out and tokenised (cheap: its cost in tokens is known before a pixel is decoded),
the samples are grouped into token-budget micro-batches of similar length, and each micro-batch's images are
decoded, padded and resized by a pool of decode threads (Pillow releases the GIL in decode and resize) a few
micro-batches ahead of the device, then gathered, pinned and copied on a side stream while the micro-batch before
runs (with `image_decoder: nvjpeg`, its JPEGs are decoded on the device instead: `pipeline.scoring.gpu_decode`).
Two calls may run at once on one actor (the stage sets it up so): the next call's host work overlaps the last
micro-batches of this one; the device runs one micro-batch at a time. Failures are told apart:
- a sample whose image does not decode, or that the processor rejects, is that sample's error record;
- out of memory, anywhere in a micro-batch's life (collate, pin, copy, forward): the micro-batch is split in
  halves (memory released first, outside the handler, so the failed batch's tensors are gone) until the pieces
  fit, and the actor lowers its token budget for later micro-batches (half the padded size that failed; the
  output's `budget_lowered` column tells the driver, whose summary reports it); a single sample that still does
  not fit is that sample's error;
- any other error of the device (a CUDA error, after which the process's GPU is unusable) is a DeviceFault: the
  actor ends, Ray restarts it and retries the batch, and the run's fault journal bounds those retries and narrows
  a fault that follows one sample down to that sample (`pipeline.scoring.narrowing`); what each call has in flight
  is in the journal too, so a process that is killed (out of memory, a crash) is narrowed down the same way. A CUDA
  error surfaces wherever the next call into the device happens to be: one met while preparing a micro-batch
  (pinning, nvJPEG) is that micro-batch's, unless a forward of this process has met a device error (another call's
  micro-batch, on the device as this one was prepared, or any before: a CUDA error is sticky): then it is that
  forward's, recorded by its own call, and this one is left unattributed; the process ends once the forward's fault
  is in the journal;
- a compilation that fails (`CompileFailed`) is no sample's: it ends the call, never halved into error records;
- any other error is narrowed down by halving too: only a sample that fails on its own becomes its error record.

Each actor accounts for its time (`pipeline.scoring.duty_cycle`): the device busy in forwards against its wall time,
and what it waited for otherwise; each call's first row carries the account, and the images the vision tower ran.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import torch

from model.errors import Category, SampleFailure
from model.modeling import check_image_slots
from pipeline.commit.markers import MARKERS, wire_schema
from pipeline.encoded import token_budget_batches
from pipeline.errors import CompileFailed, DeviceFault
from pipeline.scoring.device_faults import FaultJournal, RemoteJournal
from pipeline.scoring.duty_cycle import SNAPSHOT_FIELDS, DutyCycle
from pipeline.scoring.narrowing import Narrowing, is_device_error
from pipeline.scoring.records import SCORE_SCHEMA
from pipeline.scoring.results import PreparedBatch, Result, Scored, ScoreFailure

# Besides the score record, on the wire back to the driver: the size of the micro-batch it was scored in (the
# summary reports how full the device's batches were); on the first row of each call, the call's own account (the
# Arrow bytes of the rows it received and how many samples: what crossed to the model stage) and its actor's so far
# (the time it spent compiling and the graphs compiled after its warm-up; the images its micro-batches held and
# those the vision tower ran; its duty cycle), and, once an out-of-memory error made the actor lower its token
# budget, which actor and from what to what.
BUDGET_LOWERED = pa.struct([("actor", pa.string()), ("from", pa.int64()), ("to", pa.int64())])
CALL = pa.struct([("actor", pa.string()), ("bytes", pa.int64()), ("samples", pa.int64()), ("compile_s", pa.float64()),
                  ("recompiles", pa.int64()), ("images", pa.int64()), ("tower_images", pa.int64()),
                  *SNAPSHOT_FIELDS])
SCORED_SCHEMA = wire_schema(*SCORE_SCHEMA, ("micro_batch", pa.int32()), ("budget_lowered", BUDGET_LOWERED),
                            ("call", CALL))
_PASSED = ["id", "source", "kind", "ordinal", "error", "error_category", "key", "url"]
PREFETCH = 2  # micro-batches whose images are decoded ahead of the device


class BatchScorer:
    """Scores sample rows with a loaded model: token-budget micro-batches of similar length, their images decoded
    by `decode_threads` threads ahead of the device. What is in flight, device faults and process deaths go into
    `journal` (an in-memory one by default; the scoring stage's reaches the run's journal actor)."""

    def __init__(self, model, processor, token_budget: int, max_batch: int, decode_threads: int = 1,
                 journal: FaultJournal | RemoteJournal | None = None, overlap: bool = True,
                 image_decoder: str = "pillow"):
        self.model = model
        self.processor = processor
        self.token_budget = token_budget
        self.max_batch = max_batch
        self.configured_budget = token_budget  # what it started with; out-of-memory errors lower token_budget
        self.name = f"{socket.gethostname()}:{os.getpid()}"  # one process: a restart starts at the configured budget
        self.healthy = False  # a forward pass succeeded in this process: the device works
        self.cuda = model.device.type == "cuda"
        self._compiled = None  # a compiled forward (`pipeline.scoring.compiled`), once set
        self._decode = ThreadPoolExecutor(max(1, decode_threads), thread_name_prefix="decode")
        self._prepare_pool = ThreadPoolExecutor(2, thread_name_prefix="prepare") if overlap else None
        self._device = threading.Lock()  # one micro-batch on the device at a time, whichever call it belongs to
        self._stream = torch.cuda.Stream() if self.cuda else None
        self.duty = DutyCycle(self.cuda)
        self.images = self.tower_images = 0  # images of the micro-batches scored; images the vision tower ran
        self._forward_device_errors = 0  # forwards that met a device error
        self._fault_recorded = threading.Event()  # a forward's device fault is in the journal
        # with `image_decoder: nvjpeg`, what decodes a micro-batch's JPEGs on the device (`pipeline.scoring.gpu_decode`)
        self.device_images = None
        if image_decoder == "nvjpeg":
            from pipeline.scoring.gpu_decode import DeviceImageDecoder

            self.device_images = DeviceImageDecoder(processor, model.device, self._decode)
        # the run's fault journal, and samples narrowed down when they keep ending their process
        self.narrowing = Narrowing(self, journal)

    @property
    def forward(self):
        """What runs a micro-batch: the compiled forward once one is set, else the model's own `score`."""
        return self._compiled or self.model.score

    @forward.setter
    def forward(self, compiled) -> None:
        self._compiled = compiled

    # -- one call ----------------------------------------------------------------------------------------------
    def score_table(self, batch: pa.Table) -> pa.Table:
        """Sample rows (the wire columns, `key`, `url`, `texts`, `images`) -> SCORED_SCHEMA rows, one per row; marker
        rows and rows that already carry an error pass through."""
        with self.duty.call():
            columns = {name: batch.column(name).to_pylist() for name in _PASSED}
            n = batch.num_rows
            rows = [i for i in range(n) if columns["kind"][i] not in MARKERS and not columns["error"][i]]
            keys = [(columns["source"][i], columns["ordinal"][i]) for i in rows]
            try:
                planned, results = self.narrowing.score_call(batch, rows, keys)
            except DeviceFault as fault:
                self._before_the_process_ends(fault)
                raise
            return self._output(columns, n, planned, results, batch.nbytes, len(rows))

    def _before_the_process_ends(self, fault: DeviceFault) -> None:
        """A forward's fault is in the journal now (`score_call` recorded it): say so. An unattributed one waits
        (a bounded while) for the forward that met it to record its own, since the process ends with the first."""
        if not fault.unattributed:
            self._fault_recorded.set()
        elif not self._fault_recorded.wait(timeout=60):
            print("[score] a device error met while preparing a micro-batch: no forward recorded its fault in "
                  "60 s", file=sys.stderr, flush=True)

    def close(self) -> None:
        """The decode and prepare threads ended (the stage's teardown): nothing is scored after this."""
        self._decode.shutdown(cancel_futures=True)
        if self._prepare_pool is not None:
            self._prepare_pool.shutdown(cancel_futures=True)

    def plan_rows(self, batch: pa.Table, rows: list[int], planned: list) -> dict[int, SampleFailure]:
        """Each row's layout and tokens into `planned` (its images not decoded yet); the failures of those that fail.
        Each row is taken out of Arrow as it is planned, not the whole call before anything of it is in flight."""
        texts, images, kinds = (batch.column(name) for name in ("texts", "images", "kind"))
        failures: dict[int, SampleFailure] = {}
        for i in rows:
            try:
                planned[i] = self.processor.plan(texts[i].as_py(), images[i].as_py(), kinds[i].as_py())
            except Exception as err:  # noqa: BLE001 - never lose a sample to an unforeseen failure: record it
                failures[i] = SampleFailure.of(err)
        return failures

    def _output(self, columns: dict, n: int, planned: list, results: dict[int, Result], received_bytes: int,
                samples: int) -> pa.Table:
        score, label, probs, micro_batch = [None] * n, [None] * n, [None] * n, [None] * n
        n_images, n_tokens, truncated = [None] * n, [None] * n, [None] * n
        for i, result in results.items():
            if isinstance(result, SampleFailure):
                columns["error"][i], columns["error_category"][i] = result.reason, result.category.value
                continue
            score[i], label[i], probs[i], micro_batch[i] = result.score, result.label, result.probs, result.micro_batch
            n_images[i], n_tokens[i], truncated[i] = planned[i].n_images, planned[i].n_tokens, planned[i].truncated
        first = [None] * n  # per call, on its first row (the driver reads every row the actors return)
        lowered, call = list(first), list(first)
        if n:
            call[0] = {"actor": self.name, "bytes": received_bytes, "samples": samples,
                       "compile_s": getattr(self.forward, "compile_s", None),
                       "recompiles": getattr(self.forward, "recompiles", None), "images": self.images,
                       "tower_images": self.tower_images, **self.duty.snapshot()}
            if self.token_budget < self.configured_budget:
                lowered[0] = {"actor": self.name, "from": self.configured_budget, "to": self.token_budget}
        out = {**columns, "meta": first, "score": score, "label": label, "probs": probs, "n_images": n_images,
               "n_tokens": n_tokens, "truncated": truncated, "model": [self.model.model_id] * n,
               "micro_batch": micro_batch, "budget_lowered": lowered, "call": call}
        return pa.table({name: out[name] for name in SCORED_SCHEMA.names}, schema=SCORED_SCHEMA)

    # -- micro-batches -----------------------------------------------------------------------------------------
    def score_planned(self, planned: list, rows: list[int],
                      in_flight: Callable[[str, list[int]], None] | None = None) -> dict[int, Result]:
        """Micro-batches of similar length within the token budget; each micro-batch's images decoded and copied
        ahead while the ones before it run (`in_flight(phase, rows)` hears what is in flight)."""
        plan = [[rows[k] for k in micro] for micro in
                token_budget_batches([planned[j].n_tokens for j in rows], self.token_budget, self.max_batch)]
        results: dict[int, Result] = {}
        ahead: deque = deque()
        for k, micro in enumerate(plan):
            if in_flight is not None:  # this micro-batch and those decoded ahead of it
                in_flight("score", [row for group in plan[k:k + PREFETCH + 1] for row in group])
            while len(ahead) < PREFETCH + 1 and k + len(ahead) < len(plan):
                ahead.append(self._submit(planned, plan[k + len(ahead)]))
            pending = ahead.popleft()
            if self._prepare_pool:
                with self.duty.waiting_for_decode():
                    pending = pending.result()
            results.update(self.score_group(planned, micro, pending))
        return results

    def _submit(self, planned: list, group: list[int]):
        if self._prepare_pool is None:
            return self.prepare(planned, group)
        return self._prepare_pool.submit(self.prepare, planned, group)

    def prepare(self, planned: list, group: list[int]) -> PreparedBatch:
        """A micro-batch's host side: its samples' images decoded by the decode threads, or their JPEGs on the
        device (a sample that does not decode is its failure), gathered into a batch, pinned, its copy to the device
        started; device work on the side stream (`_blamed` tells whose a device error met here is)."""
        with torch.cuda.stream(self._stream) if self.cuda else contextlib.nullcontext():
            try:
                decoded = self._decoded_group([planned[j] for j in group])
            except Exception as err:  # noqa: BLE001 - the device's error decoding JPEGs: told apart below
                return PreparedBatch(list(group), error=err)
            failed = {j: d for j, d in zip(group, decoded) if isinstance(d, SampleFailure)}
            samples = {j: d for j, d in zip(group, decoded) if not isinstance(d, SampleFailure)}
            if not samples:
                return PreparedBatch([], failed)
            try:
                batch = self.processor.collate(list(samples.values()))
                check_image_slots(batch["input_ids"], batch["pixel_values"], self.model.config.tokens_per_image)
                tensors, ready = self._to_device(batch)
            except Exception as err:  # noqa: BLE001 - out of memory, the device's or a sample's: told apart below
                return PreparedBatch(list(samples), failed, error=err)
        return PreparedBatch(list(samples), failed, tensors, ready)

    def _blamed(self, prepared: PreparedBatch, group: list[int]) -> list[int] | None:
        """The micro-batch a device error met while preparing `group` belongs to: `group`, unless a forward (of
        either call) met a device error meanwhile, or before (a CUDA error is sticky: the process is ending); then
        that forward's, which its own call records (None here)."""
        with self._device:  # a forward on the device now has ended, and counted its device error
            met = self._forward_device_errors > 0
        return None if met else group

    def _decoded_group(self, samples: list) -> list:
        if self.device_images is not None:
            return self.device_images.decode(samples)
        return list(self._decode.map(_decoded, [self.processor] * len(samples), samples))

    def _to_device(self, batch: dict) -> tuple[dict, torch.cuda.Event | None]:
        """Pin the batch and start its copy on the side stream (the forward pass waits for the event returned);
        pixels decoded on the device are there already."""
        if not self.cuda:
            return batch, None
        with torch.cuda.stream(self._stream):
            moved = {k: v if v.is_cuda else v.pin_memory().to(self.model.device, non_blocking=True)
                     for k, v in batch.items()}
            event = torch.cuda.Event()
            event.record(self._stream)
        return moved, event

    def score_group(self, planned: list, group: list[int], prepared: PreparedBatch | None = None
                    ) -> dict[int, Result]:
        """{row: its result} for one micro-batch, halving it on failure."""
        if prepared is None:
            with self.duty.waiting_for_decode():
                prepared = self.prepare(planned, group)
        results: dict[int, Result] = dict(prepared.failed)
        group = prepared.group
        if not group:
            return results
        padded = len(group) * max(planned[j].n_tokens for j in group)
        if len(group) > 1 and padded > self.token_budget:  # planned before an out-of-memory error lowered it
            return {**results, **self._halves(planned, group)}
        failure = None
        unprepared = prepared.error is not None
        try:
            if unprepared:
                raise prepared.error
            out = self._forward(prepared)
        except torch.OutOfMemoryError:
            failure = "out of memory"
        except CompileFailed:
            raise
        except Exception as err:
            if is_device_error(err):
                blamed = self._blamed(prepared, group) if unprepared else group
                raise DeviceFault(f"{type(err).__name__}: {err}", samples=blamed, unattributed=blamed is None) from err
            failure = f"{type(err).__name__}: {err}"
        if failure is None:
            return {**results, **_records(group, out)}
        # Outside the handler: the failed forward's tensors (held by the traceback) are gone now.
        prepared = None
        release_memory(self.model.device)
        if len(group) == 1:
            return {**results, group[0]: _failed_alone(failure, padded)}
        if failure == "out of memory":  # later micro-batches of this size would fail first too
            self.token_budget = min(self.token_budget, max(1, padded // 2))
        return {**results, **self._halves(planned, group)}

    def _halves(self, planned: list, group: list[int]) -> dict[int, Result]:
        half = len(group) // 2
        return {**self.score_group(planned, group[:half]), **self.score_group(planned, group[half:])}

    def run_through(self, samples: list) -> None:
        """Planned samples prepared and through the model as one micro-batch, whatever fails raised as it is (no
        failure recorded, no halving): the canary (`pipeline.scoring.narrowing`), the compiled graphs' warm-up."""
        prepared = self.prepare(samples, list(range(len(samples))))
        if prepared.error is not None:
            raise prepared.error
        if prepared.failed:
            raise RuntimeError(str({j: failure.reason for j, failure in prepared.failed.items()}))
        self._forward(prepared)

    def _forward(self, prepared: PreparedBatch) -> np.ndarray:
        """One micro-batch through the model, one copy back: rows of (score, label, probs...) as float32."""
        with self._device:
            try:
                rows = self._on_device(prepared)
            except Exception as err:
                if is_device_error(err):
                    self._forward_device_errors += 1
                    self.healthy = False  # the device is not to be trusted again in this process: canary first
                raise
        images = int(prepared.tensors["pixel_values"].shape[0])
        self.images += images
        self.tower_images += getattr(self.forward, "tower_images", lambda n: n)(images)
        self.healthy = True
        return rows

    def _on_device(self, prepared: PreparedBatch) -> np.ndarray:
        batch = prepared.tensors
        with self.duty.forward():
            if prepared.ready is not None:
                stream = torch.cuda.current_stream()
                stream.wait_event(prepared.ready)
                for name in ("input_ids", "attention_mask", "pixel_values"):
                    batch[name].record_stream(stream)
            out = self.forward(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], check_slots=False)
            parts = [out["score"].float()[:, None], out["label"].float()[:, None]]
            if out["probs"] is not None:
                parts.append(out["probs"].float())
            return torch.cat(parts, dim=1).cpu().numpy()


def _decoded(processor, planned):
    """A planned sample's images decoded, or why it cannot be (runs on a decode thread)."""
    try:
        return processor.decode(planned)
    except Exception as err:  # noqa: BLE001 - never lose a sample to an unforeseen failure: record it
        return SampleFailure.of(err)


def _failed_alone(failure: str, padded: int) -> ScoreFailure:
    """A sample the model failed on alone: out of memory names its size, which its cause leaves out."""
    detail = f"out of memory on this sample alone ({padded} tokens)" if failure == "out of memory" else failure
    bounded = SampleFailure.bounded(Category.SCORE, detail)
    cause = "out of memory on this sample alone" if failure == "out of memory" else bounded.detail
    return ScoreFailure(Category.SCORE, bounded.detail, cause)


def _records(group: list[int], rows: np.ndarray) -> dict[int, Result]:
    out: dict[int, Result] = {}
    for k, j in enumerate(group):
        score = float(rows[k, 0])
        if not np.isfinite(score):  # float16 overflow, say: reproducible for this sample, never a score
            detail = f"non-finite score ({score}); float16 overflows, use bfloat16"
            out[j] = ScoreFailure(Category.SCORE, detail, detail)
            continue
        out[j] = Scored(score, int(rows[k, 1]), rows[k, 2:].tolist() if rows.shape[1] > 2 else None, len(group))
    return out


def release_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()

