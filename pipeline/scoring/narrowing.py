"""A scoring process's dealings with the run's fault journal (`Narrowing`; `pipeline.scoring.device_faults` has the
protocol), driving the scorer through the few steps it offers (`Scorer`): what each call has in flight is told to the
journal before the work starts, so a process that dies leaves a record of it;
samples the journal already blames get their error record without being planned; samples at the bound are tried
alone after a canary, with nothing else of the process in flight (`ExclusiveGate`); a DeviceFault is recorded before
the process ends; a call whose every sample fails alone the same way is the device's or the model's fault, never the
data's.

The cost on ordinary data: one round trip to the journal to begin a call, one as its planning starts, one per
micro-batch and one at its end (M + 3 for a call of M micro-batches; with Ray, a call to a local actor).
"""

from __future__ import annotations

import re
import sys
import threading
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from typing import Protocol

import numpy as np
import pyarrow as pa
import torch

from model.errors import Category, SampleFailure
from pipeline.errors import BrokenWorker, DeviceFault
from pipeline.scoring.device_faults import ALONE, FaultJournal, Key, RemoteJournal, Worker
from pipeline.scoring.results import PreparedBatch, Result, ScoreFailure

_DEVICE_ERROR = re.compile(r"CUDA error|CUBLAS_STATUS|CUDNN_STATUS|cuDNN error|device-side assert|illegal memory "
                           r"access|NCCL error|ECC error|unspecified launch failure", re.I)


def is_device_error(err: BaseException) -> bool:
    accelerator_error = getattr(torch, "AcceleratorError", ())
    return (accelerator_error and isinstance(err, accelerator_error)) or bool(_DEVICE_ERROR.search(str(err)))


class ExclusiveGate:
    """Ordinary calls share it; a call trying samples alone holds it alone (and goes first once it waits), so while
    one sample is tried alone nothing else of the process is in flight, and a death then is that sample's."""

    def __init__(self):
        self._cond = threading.Condition()
        self._sharing = 0
        self._exclusive = False
        self._waiting = 0

    @contextmanager
    def shared(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive and not self._waiting)
            self._sharing += 1
        try:
            yield
        finally:
            with self._cond:
                self._sharing -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self):
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._exclusive and not self._sharing)
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class CallInFlight:
    """One call as the journal sees it: begun with its samples' keys (the journal answers which are blamed and which
    to narrow down), then what is in flight at each step, then its end. Rows are the call's batch rows."""

    def __init__(self, journal, worker, rows: list[int], keys: list[Key]):
        self.journal = journal
        self.worker = worker
        self.id = uuid.uuid4().hex
        self.rows = rows
        self._position = {row: j for j, row in enumerate(rows)}
        self.keys = dict(zip(rows, keys))
        self.alone: int | None = None  # the row being tried alone
        blamed, narrowed, self.broken = journal.begin(worker, self.id, keys) if keys else ({}, {}, None)
        self.blamed = {rows[j]: failure for j, failure in blamed.items()}
        self.narrowed = {rows[j]: phase for j, phase in narrowed.items()}

    def now(self, phase: str, rows: list[int]) -> None:
        """What is in flight from here on: `rows` in `phase` (see `FaultJournal.in_flight`)."""
        self.alone = rows[0] if phase.startswith(ALONE) else None
        if self.rows:  # a call of marker rows and errors only has nothing to tell
            self.journal.in_flight(self.worker, self.id, phase, [self._position[row] for row in rows])

    def end(self) -> None:
        if self.rows:
            self.journal.end(self.worker, self.id)


class Scorer(Protocol):
    """What narrowing asks of the scorer it serves (`pipeline.scoring.scorer.BatchScorer`)."""

    processor: object  # builds the canary sample
    healthy: bool  # a forward pass succeeded in this process: the device works

    def plan_rows(self, batch: pa.Table, rows: list[int], planned: list) -> dict[int, SampleFailure]: ...

    def score_planned(self, planned: list, rows: list[int],
                      in_flight: Callable[[str, list[int]], None] | None = None) -> dict[int, Result]: ...

    def prepare(self, planned: list, group: list[int]) -> PreparedBatch: ...

    def score_group(self, planned: list, group: list[int], prepared: PreparedBatch | None = None
                    ) -> dict[int, Result]: ...

    def run_through(self, samples: list) -> None: ...


class Narrowing:
    """One scoring process's calls as the run's fault journal sees them: each begun, its samples the journal blames
    given their failure, those at the bound tried alone (after a canary, holding the process's `gate` alone), the
    rest planned and scored by `scorer`, a DeviceFault recorded before the process ends."""

    def __init__(self, scorer: Scorer, journal: FaultJournal | RemoteJournal | None = None):
        self.scorer = scorer
        self.journal = journal if journal is not None else FaultJournal()
        self.worker = getattr(self.journal, "worker", None) or Worker("local", uuid.uuid4().hex)
        self.gate = ExclusiveGate()  # samples tried alone have the process to themselves
        self.journal.started(self.worker)  # what an earlier process of this worker left in flight died with it

    def score_call(self, batch: pa.Table, rows: list[int], keys: list[Key]) -> tuple[list, dict[int, Result]]:
        """The planned samples (by batch row) and {row: its result} for the rows of one call."""
        scorer = self.scorer
        planned: list = [None] * batch.num_rows
        call = CallInFlight(self.journal, self.worker, rows, keys)
        cleared: list[Key] = []  # suspects that passed alone in this call
        try:
            if call.broken:
                raise BrokenWorker(call.broken)
            results: dict[int, Result] = {}
            rest = [row for row in rows if row not in call.blamed and row not in call.narrowed]
            if call.narrowed:
                with self.gate.exclusive():
                    rest += self._narrow(call, batch, planned, results, cleared)
            with self.gate.shared():
                todo = [row for row in rest if planned[row] is None]
                call.now("plan", todo)
                results.update(scorer.plan_rows(batch, todo, planned))
                results.update(scorer.score_planned(planned, [row for row in rest if planned[row] is not None],
                                                    call.now))
                _check_not_all_failed({row: result for row, result in results.items() if planned[row] is not None})
                call.end()  # before the gate opens: nothing of this call is in flight any more
        except DeviceFault as fault:
            self._record(call, fault, cleared)
            raise
        except Exception:
            call.end()
            raise
        results.update(call.blamed)
        return planned, results

    def _narrow(self, call: CallInFlight, batch: pa.Table, planned: list, results: dict,
                cleared: list[Key]) -> list[int]:
        """Suspects at the bound, each alone once the canary has shown that the worker works: planned alone and,
        when their faults came after planning, decoded and scored alone. Returns the rows that only needed planning
        alone (the rest of the call scores them)."""
        scorer = self.scorer
        self._canary(call)
        back = []
        for row, phase in call.narrowed.items():
            call.now(ALONE + "plan", [row])
            results.update(scorer.plan_rows(batch, [row], planned))
            if planned[row] is not None and phase == "plan":
                back.append(row)
                continue
            if planned[row] is not None:
                call.now(ALONE + "decode", [row])
                prepared = scorer.prepare(planned, [row])
                call.now(ALONE + "forward", [row])
                results.update(scorer.score_group(planned, [row], prepared))
            cleared.append(call.keys[row])
        call.now("plan", [])
        return back

    def _canary(self, call: CallInFlight) -> None:
        """A synthetic caption (a grey square) through the whole path: a fault here is the worker's own."""
        scorer = self.scorer
        if scorer.healthy:
            return
        call.now("canary", [])
        size = scorer.processor.config.image_size
        sample = scorer.processor.plan([None, "a grey square"], [np.full((3, size, size), 127, np.uint8), None],
                                       "caption")
        try:
            scorer.run_through([sample])
        except Exception as err:
            raise DeviceFault(f"the canary sample failed: {type(err).__name__}: {err}", canary=True) from err

    def _record(self, call: CallInFlight, fault: DeviceFault, cleared: list[Key]) -> None:
        """Into the journal before the process ends: a sample that faulted alone after the canary is blamed, a
        micro-batch that faulted gets one more fault, a canary fault (or one no sample explains) blames nobody."""
        journal, worker = self.journal, self.worker
        if fault.unattributed:  # the forward that met the device error first records it (`BatchScorer._blamed`)
            return
        try:
            if fault.canary or fault.samples is None:
                journal.record_canary_failure(worker, fault.first_line)
            elif fault.samples == [call.alone]:
                failure = SampleFailure.bounded(
                    Category.DEVICE, f"the sample faults the device on its own ({fault.first_line})")
                journal.blame(worker, call.keys[call.alone], failure, cleared)
            else:
                journal.record_fault(worker, [call.keys[row] for row in fault.samples], fault.first_line, cleared)
        except Exception as err:  # noqa: BLE001 - the fault is handled (the process ends) all the same
            print(f"[score] the device fault could not be recorded in the fault journal: {err}", file=sys.stderr,
                  flush=True)


def _check_not_all_failed(results: dict[int, Result]) -> None:
    """Samples that fail on their own fail for their own reasons. When every sample of a call (two or more) failed
    alone with the same error, the error is the device's or the model's, not the data's (an unrecognised CUDA
    error, say): a DeviceFault, so the batch is retried and nothing is committed as an error record."""
    failed = [r for r in results.values() if isinstance(r, ScoreFailure)]
    if len(results) < 2 or len(failed) < len(results):
        return
    if len({r.cause for r in failed}) == 1:  # out of memory names each size: its cause does not
        raise DeviceFault(f"every one of {len(results)} samples failed alone with: {failed[0].reason}")
