"""Every use of Ray's private APIs, in one place (a Ray upgrade that changes one of them is checked here).

- `pass_actor_arguments_by_value`: restartable actors (below).
- `quiet_worker_errors`: one line per failing worker's cause instead of its whole traceback.
- `loopback_only`: a local instance that binds and advertises 127.0.0.1 only.
- `autoscaler_max_resources`: what the cluster's autoscaler can start.
- `retry_bounds_allowed`: Ray Data's retries bounded without a deprecation warning on every run.
- `own_error`: the project's error a stage raised, from under Ray's wrappings.
- `calls_bounded_in_bytes`, `calls_unbounded`: Ray Data's calls bounded in bytes as well as rows.
- `worker_exit`, `actor_death`: how Ray saw a dead worker process end; one line for an actor Ray gave up on.

Restartable actors. Ray Data creates each actor of an actor pool with its data context and UDF as object references
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

import contextlib
import functools
import re
import sys
import warnings

_APPLIED = False


class _InlineArgs:
    """Stands in for an actor class: `.options(...)` as usual, `.remote(...)` with object references resolved."""

    def __init__(self, actor_cls):
        self._actor_cls = actor_cls

    def options(self, **options):
        return _InlineArgs(self._actor_cls.options(**options))

    def remote(self, *args, **kwargs):
        import ray

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


_ERROR_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(Error|Exception|Fault|Interrupt)): (.*)$")


def first_cause(text: str) -> str:
    """The innermost `SomeError: message` line of a Ray error's text (its traceback), else its first line."""
    lines = [line for line in str(text).splitlines() if line.strip()]
    causes = [m for m in map(_ERROR_LINE.match, lines) if m]
    if causes:
        m = causes[-1]
        return f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(3).strip()}"
    return lines[0].strip() if lines else ""


def quiet_worker_errors(prefix: str) -> bool:
    """Ray prints every failed worker task's whole traceback on the driver's terminal (its error listener does
    not heed `log_to_driver`): a job whose actors all fail at start-up prints hundreds of lines. Instead, one line
    per distinct cause, with `prefix`; the full text stays in the session's logs (and `--verbose` keeps Ray's own
    printing). Returns whether the adjustment is in place."""
    import sys

    from ray._private import worker

    original = getattr(worker, "print_to_stdstream", None)
    if original is None:
        return False
    seen: set[str] = set()

    def print_to_stdstream(data, ignore_prefix: bool):
        if data.get("pid") != "raylet":
            return original(data, ignore_prefix)
        for line in data.get("lines", []):
            cause = first_cause(line)
            if cause and cause not in seen:
                seen.add(cause)
                print(f"{prefix} a worker failed: {cause[:300]}", file=sys.stderr, flush=True)
        return None

    worker.print_to_stdstream = print_to_stdstream
    return True


def loopback_only() -> None:
    """Ray resolves 127.0.0.1 to the host's network address (so that other nodes could join); a job's own local
    instance is this machine's alone: with cluster mode off, it and every process it starts bind to loopback."""
    import os

    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read by the processes it starts
    ray_constants.ENABLE_RAY_CLUSTER = False  # read by this one, already imported


def autoscaler_max_resources() -> dict | None:
    """The resources the cluster's autoscaler can provide at most, or None where there is no autoscaler config
    (a plain `ray start`)."""
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - no autoscaler state: nothing to add
        return None


_VANISHED = "Worker unexpectedly exits with a connection error code"
_VANISHED_WORDS = "the process vanished (the kernel's out-of-memory killer, a crash such as SIGSEGV, or SIGKILL)"


def worker_exit(worker_id: str) -> str | None:
    """How Ray saw a dead worker process end (`worker_id` in hex), in one line; None when Ray cannot say."""
    try:
        from ray._private.state import state
        from ray._raylet import WorkerID
        from ray.core.generated import common_pb2, gcs_pb2

        raw = state._connect_and_get_accessor().get_worker_info(WorkerID.from_hex(worker_id))
        if not raw:
            return None
        info = gcs_pb2.WorkerTableData.FromString(raw)
    except Exception:  # noqa: BLE001 - a Ray without this table, or an id that is not Ray's: nothing to add
        return None
    if info.is_alive:
        return None
    how = common_pb2.WorkerExitType.Name(info.exit_type)
    detail = " ".join(info.exit_detail.split())
    if detail.startswith(_VANISHED):  # SIGKILL (the kernel's OOM killer), SIGSEGV, os._exit: Ray cannot tell them
        detail = _VANISHED_WORDS
    else:
        detail = ". ".join(detail.split(". ")[:2])[:240]
    memory = f"; {info.memory_used_bytes_at_death / 2**20:,.0f} MiB in use" if info.memory_used_bytes_at_death else ""
    return f"Ray: {how}, {detail}{memory}"


_OWN_ERROR_LINE = re.compile(r"^\s*(?:pipeline|model)\.errors\.(\w+): (.*)$", re.M)


def own_error(text: str) -> str | None:
    """The line of one of the project's own errors raised in a worker (`BrokenWorker: ...`), from the text of Ray's
    wrapping of it (Ray Data's `UserCodeException` keeps the original only as text); None when there is none."""
    found = _OWN_ERROR_LINE.findall(str(text))
    return f"{found[-1][0]}: {found[-1][1].strip()}" if found else None


def actor_death(err: BaseException) -> str | None:
    """One line for an actor that Ray gave up on (its restarts or a call's retries spent), naming its stage (Ray Data
    names the actor class `MapWorker(MapBatches(<stage>))`) and how its last process ended; None for other errors."""
    import ray.exceptions as rex

    cause = err
    while cause is not None and not isinstance(cause, (rex.ActorDiedError, rex.ActorUnavailableError)):
        cause = getattr(cause, "cause", None) or cause.__cause__
    if cause is None:
        return None
    text = str(cause)
    stage = re.search(r"MapBatches\((\w+)\)", text)
    actor = re.search(r"\b[0-9a-f]{32}\b", text)
    if stage is None and actor is not None:
        try:
            from ray._private.state import state

            stage = re.search(r"MapBatches\((\w+)\)", state.actor_table(actor.group(0)).get("ActorClassName", ""))
        except Exception:  # noqa: BLE001 - an actor Ray no longer knows: the line says less
            stage = None
    who = f"{stage.group(1)}'s worker" if stage else "a worker"
    spent = "its restarts" if isinstance(cause, rex.ActorDiedError) else "the retries of the call it was on"
    how = re.search(r"Worker exit detail: ([^.]*)\.", text)
    how = how and (_VANISHED_WORDS if how.group(1).startswith(_VANISHED) else how.group(1))
    return (f"{who} kept dying and Ray's bound on {spent} was reached (the run stops rather than retrying "
            f"forever){': ' + how if how else ''}")


@contextlib.contextmanager
def retry_bounds_allowed():
    """Ray 2.60 deprecates `map_batches(**ray_remote_args)` (its removal is announced for 2.64) yet names no
    parameter for `max_restarts`, `max_task_retries` or `max_retries`, whose defaults there are without end: the
    bounds still go that way, without a warning on every run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated")
        yield


_CALL_BYTES: dict = {"bound": None, "blocks": None}  # the bound in place, and the block size it replaced


def calls_bounded_in_bytes(max_bytes: int) -> None:
    """Bound each call of this process's Ray Data stages in bytes as well as rows, until `calls_unbounded()`.

    Ray Data gathers a stage's input blocks into one task until they hold `batch_size` rows, whatever their bytes
    (1,024 documents of 2 MB make a call of 2 GB), and the blocks a stage hands on are up to
    `DataContext.target_max_block_size` (128 MiB). Here a task's blocks are gathered only until they hold
    `max_bytes` (or the rows), and blocks are cut at `max_bytes` where that is less: a call of big rows has fewer of
    them, and rows of ordinary size fill `batch_size` as before. The gathering is decided on the driver, by Ray
    Data's `EstimateSize` rebundling strategy: its one method is wrapped (once; inert while no bound is set)."""
    from ray.data import DataContext

    try:
        from ray.data._internal.execution.bundle_queue.bundler import EstimateSize
    except ImportError:  # another Ray than the pinned one: calls bounded in rows only, as Ray Data bounds them
        print("[ray_compat] this Ray has no EstimateSize bundler: calls to the stages are bounded in rows only",
              file=sys.stderr, flush=True)
        return
    original = EstimateSize.can_build_ready_bundle
    if not hasattr(original, "unbounded"):
        @functools.wraps(original)
        def can_build_ready_bundle(self, state):
            bound = _CALL_BYTES["bound"]
            full = bound is not None and self._min_rows_per_bundle is not None and state.size_bytes >= bound
            return original(self, state) or (state.num_rows > 0 and full)

        can_build_ready_bundle.unbounded = original
        EstimateSize.can_build_ready_bundle = can_build_ready_bundle
    ctx = DataContext.get_current()
    if _CALL_BYTES["bound"] is None:
        _CALL_BYTES["blocks"] = ctx.target_max_block_size
    _CALL_BYTES["bound"] = max_bytes
    ctx.target_max_block_size = min(_CALL_BYTES["blocks"] or max_bytes, max_bytes)


def calls_unbounded() -> None:
    """Ray Data's own gathering and block size again."""
    from ray.data import DataContext

    if _CALL_BYTES["bound"] is not None:
        DataContext.get_current().target_max_block_size = _CALL_BYTES["blocks"]
        _CALL_BYTES["bound"] = None
