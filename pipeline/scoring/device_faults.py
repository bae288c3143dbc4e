"""Faults that follow a sample, told apart from a broken worker, across the process deaths they cause.

A scoring actor's process can end in the middle of its work in two ways. A CUDA error leaves the device context
unusable: the actor records which micro-batch met it and ends its own process. A kill gives it no such chance: the
node ran out of memory (the kernel's or Ray's memory monitor), a native library segfaulted, someone sent SIGKILL.
Either way Ray restarts the actor and retries the same block (rows and all). What those retries learn must outlive
each process: the fault journal, kept by sample identity `(source, ordinal)` (a shard's key and the sample's
position). `FaultJournal` is the journal itself, in memory (what `BatchScorer` uses without Ray); a run on Ray keeps
one in a small named actor on the driver's node (`JournalActor`), which the scoring actors reach by name
(`RemoteJournal`).

What is in flight. Before a scoring process works on samples it says which and how far (`pipeline.scoring
.narrowing` does it for each call): the call's rows while they are planned (laid out and tokenised), then at each
micro-batch the rows being decoded ahead and scored, and the call's end. A process tells the journal when it
starts on its worker slot (a Ray actor keeps its id across restarts): whatever an earlier process of the same slot
left in flight died with it.

The protocol (`pipeline.scoring.narrowing` follows it):
1. A micro-batch faults the device: before its process ends, the actor counts one more fault for each of its samples.
   A process dies: each sample it had in flight counts one more fault, with the phase it was in (planning, or being
   decoded and scored).
2. A sample with fewer than `FAULTS_BEFORE_NARROWING` faults is scored as usual (a transient fault passes on the
   retry). One at the bound is narrowed down on the next process, with nothing else of that process in flight: a
   canary (a synthetic sample built with the processor) is scored first, then each such sample alone: planned
   alone and, when its faults came later than planning, decoded and scored alone; then the rest of the call.
3. A sample that faults the device alone, on a process whose canary succeeded, is blamed: from then on it gets the
   error record `device: the sample faults the device on its own (<first line of the error>)`. One whose process dies
   while it is the only sample in flight, `KILLS_ALONE_BEFORE_BLAME` times (a kill has no canary to vouch for the
   node: memory pressure from elsewhere may have picked that moment once), gets `killed: the sample kills its worker
   on its own (while <phase>; <what Ray saw>)`. Samples that pass alone are cleared, and so is every sample of a call
   that completes.
4. A canary that faults, or whose process dies, blames nobody. After `CANARY_FAILURES_BEFORE_GIVING_UP` of them in a
   run the workers are broken whatever the data: every later call raises `BrokenWorker` and the run ends naming the
   first error (nothing is committed as bad data, nothing retried forever).

So one sample that faults the device costs its call `FAULTS_BEFORE_NARROWING + 1` process restarts, one that kills
its worker `FAULTS_BEFORE_NARROWING + KILLS_ALONE_BEFORE_BLAME` (`DEATHS_PER_CULPRIT`), and then the call
completes: its healthy rows, and the shards they belong to, are committed. (Trying suspects alone costs at most a
call's rows in small steps; bisecting instead would cost up to log2(rows) more restarts, each a model load.)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import NamedTuple

from model.errors import Category, SampleFailure
from pipeline.runner.deaths import RunActor

Key = tuple[str, int]  # (source, ordinal): the same rows come back when Ray retries a block

FAULTS_BEFORE_NARROWING = 2  # a sample is tried twice in its batch (once more on a fresh process), then alone
KILLS_ALONE_BEFORE_BLAME = 2  # deaths with a sample alone in flight before it is blamed for them
DEATHS_PER_CULPRIT = FAULTS_BEFORE_NARROWING + KILLS_ALONE_BEFORE_BLAME  # process restarts one culprit costs, at most
CANARY_FAILURES_BEFORE_GIVING_UP = 3  # canary faults or deaths in a run: the workers are broken, the run ends
# culprits one call (and the call beside it on its actor) may hold before Ray's bound ends the run
CULPRITS_PER_CALL = 5

# How far a sample in flight is, in the words of an error record: a call's rows are planned, then decoded and
# scored a few micro-batches at a time; a sample tried alone is planned, decoded, then on the device.
PHASES = {"plan": "being tokenised", "score": "being decoded or scored", "decode": "its images were being decoded",
          "forward": "on the device"}
ALONE = "alone:"  # a phase's prefix for the one sample a process tries with nothing else in flight


class Worker(NamedTuple):
    """Who reports: `slot`, the Ray actor (its id survives restarts; `local` without Ray); `process`, this process
    (Ray's worker id, by which Ray says how it ended; a restart is another process)."""

    slot: str
    process: str


class FaultJournal:
    """What faults and process deaths have shown about samples: how often each was in flight when one happened,
    which ones fault the device or kill their worker on their own (their `SampleFailure`s). Every method takes and
    returns plain values (it also serves as a Ray actor); `exit_causes`: ask Ray how a dead process ended (on a
    cluster)."""

    def __init__(self, exit_causes: bool = False):
        self._faults: dict[Key, int] = {}
        self._phase: dict[Key, str] = {}
        self._blamed: dict[Key, SampleFailure] = {}
        self._alone_deaths: dict[Key, int] = {}  # deaths with the sample alone in flight, before it is blamed
        self._in_flight: dict[Worker, dict[str, dict]] = {}  # per process: its calls, each {"keys", "state"}
        self._counts: Counter = Counter()
        self._first_error: str | None = None
        self._last_death: str | None = None
        self._exit_causes = exit_causes

    # -- a process's life ----------------------------------------------------------------------------------------
    def started(self, worker: Worker) -> None:
        """A process starts work on its slot: an earlier process of the same slot that left work in flight died."""
        worker = Worker(*worker)
        for earlier in [w for w in self._in_flight if w.slot == worker.slot and w.process != worker.process]:
            self._died(earlier)
        self._in_flight[worker] = {}

    def begin(self, worker: Worker, call: str, keys: list[Key]
              ) -> tuple[dict[int, SampleFailure], dict[int, str], str | None]:
        """A call of these samples starts: the failures of those blamed, the phase of those to narrow down (by
        position in `keys`), and why the workers are broken, if they are."""
        self._in_flight.setdefault(Worker(*worker), {})[call] = {"keys": [tuple(k) for k in keys], "state": None}
        blamed, narrowed = {}, {}
        if self._blamed or self._faults:
            for j, key in enumerate(map(tuple, keys)):
                if key in self._blamed:
                    blamed[j] = self._blamed[key]
                elif self._faults.get(key, 0) >= FAULTS_BEFORE_NARROWING:
                    narrowed[j] = self._phase.get(key, "score")
        broken = None
        if self._counts["canary_failures"] >= CANARY_FAILURES_BEFORE_GIVING_UP:
            broken = (f"the scoring workers fail on a synthetic sample ({self._counts['canary_failures']} times: the "
                      f"device or the node is broken, not the data); the first error: {self._first_error}")
        return blamed, narrowed, broken

    def in_flight(self, worker: Worker, call: str, phase: str, rows: list[int]) -> None:
        """What of the call is in flight now: `rows` (positions in its keys) in `phase` (`plan`, `score`; the one row
        tried alone: `alone:plan`, `alone:decode`, `alone:forward`; the canary: `canary`, no row)."""
        entry = self._in_flight.get(Worker(*worker), {}).get(call)
        if entry is not None:
            entry["state"] = (phase, list(rows))

    def end(self, worker: Worker, call: str) -> None:
        """The call completed: nothing of it is in flight, and its samples are cleared."""
        entry = self._in_flight.get(Worker(*worker), {}).pop(call, None)
        if entry is not None and self._faults:
            self.clear(entry["keys"])

    # -- what a process records before it ends ---------------------------------------------------------------------
    def record_fault(self, worker: Worker, keys: Iterable[Key], detail: str, cleared: Iterable[Key] = ()) -> None:
        """A micro-batch of these samples faulted the device (`cleared`: suspects that scored alone before); the
        process ends now, with nothing else to count."""
        self._in_flight.pop(Worker(*worker), None)
        self.clear(cleared)
        self._count_faults(keys, "score")
        self._counts["micro_batches"] += 1
        self._first_error = self._first_error or detail

    def blame(self, worker: Worker, key: Key, failure: SampleFailure, cleared: Iterable[Key] = ()) -> None:
        """This sample faulted the device on its own, after the canary succeeded on the same process."""
        self._in_flight.pop(Worker(*worker), None)
        self.clear(cleared)
        self._blame(tuple(key), failure)
        self._counts["micro_batches"] += 1

    def record_canary_failure(self, worker: Worker, detail: str) -> None:
        """The canary faulted: the device is broken; no sample is blamed."""
        self._in_flight.pop(Worker(*worker), None)
        self._counts["canary_failures"] += 1
        self._first_error = self._first_error or detail

    def clear(self, keys: Iterable[Key]) -> None:
        for key in map(tuple, keys):
            self._faults.pop(key, None)
            self._phase.pop(key, None)
            self._alone_deaths.pop(key, None)

    def suspects(self, keys: Iterable[Key]) -> list[Key]:
        """Those of `keys` that were in flight when a fault or a death happened, neither blamed nor cleared since."""
        return [key for key in map(tuple, keys) if key in self._faults]

    def stats(self) -> dict:
        """For the summary: micro-batches that faulted the device, process deaths with samples in flight, samples
        blamed (by category), canary failures, the first error and the last death."""
        by_category = Counter(failure.category.value for failure in self._blamed.values())
        return {"micro_batches": self._counts["micro_batches"], "deaths": self._counts["deaths"],
                "samples_blamed": len(self._blamed), "blamed_by_category": dict(by_category),
                "canary_faults": self._counts["canary_failures"], "first_error": self._first_error,
                "last_death": self._last_death}

    # -- inside ----------------------------------------------------------------------------------------------------
    def _died(self, worker: Worker) -> None:
        """`worker`'s process died: what it had in flight counts, or blames the one sample it tried alone."""
        flying = [(c["keys"], *c["state"]) for c in self._in_flight.pop(worker).values()
                  if c["state"] is not None and (c["state"][0] == "canary" or c["state"][1])]
        if not flying:
            return
        self._counts["deaths"] += 1
        cause = self._exit_cause(worker)
        n = sum(len(rows) for _, _, rows in flying)
        phases = ", ".join(sorted({phase for _, phase, _ in flying}))
        self._last_death = f"a scoring process died with {n} samples in flight ({phases}): {cause}"
        if any(phase == "canary" for _, phase, _ in flying):
            self._counts["canary_failures"] += 1
            self._first_error = self._first_error or f"the process died on the canary sample: {cause}"
        elif len(flying) == 1 and flying[0][1].startswith(ALONE):
            keys, phase, rows = flying[0]
            key = tuple(keys[rows[0]])
            self._alone_deaths[key] = self._alone_deaths.get(key, 0) + 1
            if self._alone_deaths[key] >= KILLS_ALONE_BEFORE_BLAME:  # else tried alone again on the next process
                self._blame(key, SampleFailure.bounded(Category.KILLED, (
                    f"the sample kills its worker on its own (while {PHASES[phase.removeprefix(ALONE)]}; {cause})")))
        else:
            for keys, phase, rows in flying:
                self._count_faults([keys[j] for j in rows], phase.removeprefix(ALONE))

    def _count_faults(self, keys: Iterable[Key], phase: str) -> None:
        for key in map(tuple, keys):
            self._faults[key] = self._faults.get(key, 0) + 1
            self._phase[key] = phase

    def _blame(self, key: Key, failure: SampleFailure) -> None:
        self._faults.pop(key, None)
        self._phase.pop(key, None)
        self._alone_deaths.pop(key, None)
        self._blamed[key] = failure

    def _exit_cause(self, worker: Worker) -> str:
        if self._exit_causes:
            from pipeline.runner.ray_compat import worker_exit

            said = worker_exit(worker.process)
            if said:
                return said
        return "the process ended without a word (killed: out of memory, a crash, SIGKILL)"


class RemoteJournal:
    """The run's journal as a scoring actor reaches it: the named actor, each call waited for (what is in flight is
    recorded before the work starts; a fault before the process ends)."""

    def __init__(self, name: str):
        import ray

        self._ray = ray
        self._actor = ray.get_actor(name)
        context = ray.get_runtime_context()
        self.worker = Worker(context.get_actor_id() or "driver", context.get_worker_id())

    def _call(self, method: str, *args):
        return self._ray.get(getattr(self._actor, method).remote(*args))

    def started(self, worker):
        self._call("started", worker)

    def begin(self, worker, call, keys):
        return self._call("begin", worker, call, list(keys))

    def in_flight(self, worker, call, phase, rows):
        self._call("in_flight", worker, call, phase, list(rows))

    def end(self, worker, call):
        self._call("end", worker, call)

    def record_fault(self, worker, keys, detail, cleared=()):
        self._call("record_fault", worker, list(keys), detail, list(cleared))

    def blame(self, worker, key, failure, cleared=()):
        self._call("blame", worker, key, failure, list(cleared))

    def record_canary_failure(self, worker, detail):
        self._call("record_canary_failure", worker, detail)


class JournalActor(RunActor):
    """The driver's handle on the run's journal: a named actor beside the driver (`pipeline.runner.deaths`)."""

    def __init__(self):
        super().__init__(FaultJournal, "fault-journal", exit_causes=True)

    def stats(self) -> dict:
        return self.call("stats")
