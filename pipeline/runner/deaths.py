"""Work whose worker dies: Ray retries it a bounded number of times (Ray Data's own default for tasks is without
end), and a run-scoped ledger tells which piece of work it was, so the run that gives up can name it.

A worker says what it starts (`begin`) and what it finished (`end`). Ray retries a task only after its worker died,
so a piece begun again while still in hand was in the hands of a worker that died. `WorkLedger` keeps that in a
small named actor beside the driver (`RunActor`, which scoring's fault journal lives in too); the workers reach it
by name. Curation's threshold passes name the score file that keeps killing their worker with it.
"""

from __future__ import annotations

from collections import Counter

TASK_RETRIES = 3  # Ray Data tasks (not actors) whose worker dies: tried again this many times, then the run ends
SHARD_DEATHS = 2  # a shard whose reader's process died this often is left uncommitted, named, not read again


class WorkInHand:
    """Pieces of work in hand, and how many workers died holding each (plain values: it serves as a Ray actor)."""

    def __init__(self):
        self._in_hand: set[str] = set()
        self._deaths: Counter = Counter()

    def begin(self, key: str) -> int:
        """A worker starts on `key`; how many workers died holding it before."""
        if key in self._in_hand:
            self._deaths[key] += 1
        self._in_hand.add(key)
        return self._deaths[key]

    def end(self, key: str) -> None:
        self._in_hand.discard(key)

    def dying(self) -> dict[str, int]:
        """The pieces still in hand whose workers died, most deaths first, counting the last worker too (when the run
        gives up on a piece, that worker died as well). A piece that recovered is not among them; an error is never
        a death (the piece left the worker's hand)."""
        deaths = Counter({key: n + 1 for key, n in self._deaths.items() if key in self._in_hand})
        return dict(deaths.most_common())


class RunActor:
    """A named actor without CPUs on the driver's node, living as long as the run that starts it (no node loss but
    the driver's can take it); workers reach it by `name`."""

    def __init__(self, cls: type, prefix: str, **kwargs):
        import uuid

        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self._ray = ray
        self.name = f"unifilter-{prefix}-{uuid.uuid4().hex[:12]}"
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.actor = ray.remote(cls).options(name=self.name, num_cpus=0, max_restarts=0,
                                             scheduling_strategy=here).remote(**kwargs)

    def call(self, method: str, *args):
        return self._ray.get(getattr(self.actor, method).remote(*args))

    def stop(self) -> None:
        self._ray.kill(self.actor)


class WorkLedger(RunActor):
    """The driver's handle on a run's `WorkInHand`."""

    def __init__(self):
        super().__init__(WorkInHand, "work-ledger")

    def dying(self) -> dict[str, int]:
        return self.call("dying")


def in_hand(name: str, key: str):
    """In a worker: a context holding `key` in the ledger called `name` while the work on it runs."""
    import contextlib

    import ray

    ledger = ray.get_actor(name)

    @contextlib.contextmanager
    def held():
        ray.get(ledger.begin.remote(key))
        try:
            yield
        finally:  # an error is not a death: the work is out of hand
            ray.get(ledger.end.remote(key))

    return held()


_LEDGERS: dict = {}  # a worker's handles on the ledgers it reached, by name


def _ledger(name: str):
    import ray

    if name not in _LEDGERS:
        _LEDGERS[name] = ray.get_actor(name)
    return _LEDGERS[name]


def begin(name: str, key: str) -> int:
    """In a worker: `key` is in hand (in the ledger called `name`); how many workers died holding it before."""
    import ray

    return ray.get(_ledger(name).begin.remote(key))


def end(name: str, key: str) -> None:
    import ray

    ray.get(_ledger(name).end.remote(key))
