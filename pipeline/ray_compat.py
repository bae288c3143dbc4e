"""One adjustment to Ray Data 2.60, for restartable actors.

Ray Data creates each actor of an actor pool with its data context and UDF as object references
(`ray.put`). Ray restarts a crashed actor by re-running its creation task, and an argument held in the object
store must still be there at that moment: Ray cannot rebuild it by lineage (ray-project/ray#53727), and says so
on every run with a `core_worker.cc ... the actor restart will fail` error line. Passing the two arguments by
value instead puts them in the creation task itself (they are small: a few KB), so a restart needs nothing from
the object store and Ray has nothing to warn about. `tests/pipeline/test_scoring.py` kills a scoring actor and
checks that the job completes with every record.

The patch wraps one private method; it checks the method exists and does nothing otherwise (a Ray upgrade that
changes it leaves Ray's own behaviour, and the warning, in place).
"""

from __future__ import annotations

import functools

import ray

_APPLIED = False


class _InlineArgs:
    """Stands in for an actor class: `.options(...)` as usual, `.remote(...)` with object references resolved."""

    def __init__(self, actor_cls):
        self._actor_cls = actor_cls

    def options(self, **options):
        return _InlineArgs(self._actor_cls.options(**options))

    def remote(self, *args, **kwargs):
        args = [ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in args]
        kwargs = {k: ray.get(v) if isinstance(v, ray.ObjectRef) else v for k, v in kwargs.items()}
        return self._actor_cls.remote(*args, **kwargs)


def pass_actor_arguments_by_value() -> bool:
    """Install the adjustment (once per process); returns whether it is in place."""
    global _APPLIED
    if _APPLIED:
        return True
    try:
        from ray.data._internal.execution.operators.actor_pool_map_operator import ActorPoolMapOperator
    except ImportError:
        return False
    original = getattr(ActorPoolMapOperator, "_start_actor", None)
    if original is None:
        return False

    @functools.wraps(original)
    def _start_actor(self, *args, **kwargs):
        actor_cls = self._actor_cls
        self._actor_cls = _InlineArgs(actor_cls)
        try:
            return original(self, *args, **kwargs)
        finally:
            self._actor_cls = actor_cls

    ActorPoolMapOperator._start_actor = _start_actor
    _APPLIED = True
    return True
