"""Device faults that follow a sample, told apart from a broken device, across the actor restarts they cause.

A CUDA error leaves the process's device context unusable, so a scoring actor that meets one ends its process;
Ray restarts the actor and retries the same block (rows and all), without bound. What those retries learn must
outlive each process: the fault journal, kept by sample identity `(source, ordinal)` (a shard's key and the
sample's position). `FaultJournal` is the journal itself, in memory (what `BatchScorer` uses without Ray); a run
on Ray keeps one in a small named actor on the driver's node (`JournalActor`), which the scoring actors reach by
name (`RemoteJournal`).

The protocol (`pipeline.scoring.scorer.BatchScorer` follows it):
1. A micro-batch faults the device: before its process ends, the actor counts one more fault for each of the
   micro-batch's samples.
2. A sample with fewer than `FAULTS_BEFORE_NARROWING` faults is scored as usual (a transient fault passes on the
   retry). One at the bound is narrowed down on the fresh actor: a canary (a synthetic sample built with the
   processor) is scored first, then each such sample alone, then the rest of the call as usual.
3. A sample that faults the device alone, on an actor whose canary succeeded, is blamed: from then on it is given
   the error record `device: the sample faults the device on its own (<first line of the error>)`. Samples that
   scored alone are cleared. A canary that faults blames nobody: the device is broken, the block is retried until
   the job's no-progress timeout ends the run, and nothing is committed as bad data.

So one sample that faults the device costs its call `FAULTS_BEFORE_NARROWING + 1` actor restarts (each further
such sample in the call one more), and then the call completes: its healthy rows, and the shards they belong to,
are committed. (Scoring suspects alone costs at most `max_batch` small forward passes; bisecting instead would
cost up to log2(max_batch) more restarts, each a model load.)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

Key = tuple[str, int]  # (source, ordinal): the same rows come back when Ray retries a block

FAULTS_BEFORE_NARROWING = 2  # a micro-batch is tried twice as it is (once more on a fresh actor), then narrowed


class FaultJournal:
    """What device faults have shown about samples: how often each was in a faulting micro-batch, which ones fault
    the device on their own. Every method takes and returns plain values (it also serves as a Ray actor)."""

    def __init__(self):
        self._faults: dict[Key, int] = {}
        self._blamed: dict[Key, str] = {}
        self._counts: Counter = Counter()
        self._first_error: str | None = None

    def lookup(self, keys: Iterable[Key]) -> tuple[dict[Key, str], dict[Key, int]]:
        """Among `keys`: the error reasons of samples blamed, and the fault counts of suspects."""
        blamed, suspects = {}, {}
        if self._blamed or self._faults:
            for key in map(tuple, keys):
                if key in self._blamed:
                    blamed[key] = self._blamed[key]
                elif key in self._faults:
                    suspects[key] = self._faults[key]
        return blamed, suspects

    def record_fault(self, keys: Iterable[Key], detail: str, cleared: Iterable[Key] = ()) -> None:
        """A micro-batch of these samples faulted the device (`cleared`: suspects that scored alone before)."""
        self.clear(cleared)
        for key in map(tuple, keys):
            self._faults[key] = self._faults.get(key, 0) + 1
        self._counts["micro_batches"] += 1
        self._first_error = self._first_error or detail

    def blame(self, key: Key, reason: str, cleared: Iterable[Key] = ()) -> None:
        """This sample faulted the device on its own, after the canary succeeded on the same actor."""
        self.clear(cleared)
        key = tuple(key)
        self._faults.pop(key, None)
        self._blamed[key] = reason
        self._counts["micro_batches"] += 1

    def record_canary_fault(self, detail: str) -> None:
        """The canary faulted: the device is broken; no sample is blamed."""
        self._counts["canary_faults"] += 1
        self._first_error = self._first_error or detail

    def clear(self, keys: Iterable[Key]) -> None:
        for key in map(tuple, keys):
            self._faults.pop(key, None)

    def stats(self) -> dict:
        """For the summary: micro-batches that faulted, samples blamed, canary faults, the first error seen."""
        return {"micro_batches": self._counts["micro_batches"], "samples_blamed": len(self._blamed),
                "canary_faults": self._counts["canary_faults"], "first_error": self._first_error}


class RemoteJournal:
    """The run's journal as a scoring actor reaches it: the named actor, each call waited for (a fault is recorded
    before the process ends)."""

    def __init__(self, name: str):
        import ray

        self._ray, self._actor = ray, ray.get_actor(name)

    def _call(self, method: str, *args):
        return self._ray.get(getattr(self._actor, method).remote(*args))

    def lookup(self, keys):
        return self._call("lookup", list(keys))

    def record_fault(self, keys, detail, cleared=()):
        self._call("record_fault", list(keys), detail, list(cleared))

    def blame(self, key, reason, cleared=()):
        self._call("blame", key, reason, list(cleared))

    def record_canary_fault(self, detail):
        self._call("record_canary_fault", detail)

    def clear(self, keys):
        self._call("clear", list(keys))


class JournalActor:
    """The driver's handle on the run's journal: a named actor without CPUs on the driver's node (it lives and
    ends with the run, and no node loss but the driver's can take it)."""

    def __init__(self):
        import uuid

        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self._ray = ray
        self.name = f"unifilter-fault-journal-{uuid.uuid4().hex[:12]}"
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self._actor = ray.remote(FaultJournal).options(name=self.name, num_cpus=0, max_restarts=0,
                                                         scheduling_strategy=here).remote()

    def stats(self) -> dict:
        return self._ray.get(self._actor.stats.remote())

    def stop(self) -> None:
        self._ray.kill(self._actor)
