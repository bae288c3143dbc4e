"""Where a job's stages run: on Ray (`RayExecutor`, the default: Ray Data actor pools on the cluster in RAY_ADDRESS
or a local instance), or in this process (`LocalExecutor`: each stage set up once, the shards streamed through the
stages in order, each stage torn down at the end, nothing started; for a handful of shards, debugging, and the
tests). Both run the same stage objects and hand the driver the same batches: the runner commits them alike.

An executor also runs a job's independent tasks (curation's counting passes, resharding's writes, the report's
thumbnails): `tasks(fn, calls)` calls `fn(*call)` for each call and yields each outcome in order, a value or the
exception it raised.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa

from pipeline.errors import BrokenWorker
from pipeline.io.listing import Shard
from pipeline.io.uris import storage_env
from pipeline.runner.deaths import TASK_RETRIES
from pipeline.runner.ray_compat import retry_bounds_allowed
from pipeline.runner.resources import ClusterView
from pipeline.runner.stage import ShardStage, Stage, StageActor, shard_rows

ExecutorName = Literal["ray", "local"]

# Shards are handed to the first stage in calls of about this many bytes (small shards share a call; the fixed
# cost of a call is paid once per group), and never more than this many shards per call.
CALL_BYTES = 256 * 2**20
CALL_SHARDS = 64


def shard_groups(shards: list[Shard], workers: int = 1) -> list[list[Shard]]:
    """Shards packed into first-stage calls by size (small shards share a call and its fixed cost), yet at least
    four calls per worker where there are enough shards, so every worker has work. Unknown sizes count as full."""
    known = [s.size for s in shards if s.size is not None]
    spread = (sum(known) // max(1, 4 * workers)) if known and len(known) == len(shards) else CALL_BYTES
    target = max(1, min(CALL_BYTES, spread))
    groups, current, size = [], [], 0
    for s in shards:
        weight = s.size if s.size is not None else CALL_BYTES
        if current and (size + weight > target or len(current) >= CALL_SHARDS):
            groups.append(current)
            current, size = [], 0
        current.append(s)
        size += weight
    if current:
        groups.append(current)
    return groups


@dataclass(frozen=True)
class Outcome:
    """What one task gave: its value, or the exception it raised."""

    value: Any = None
    error: BaseException | None = None


class RayExecutor:
    """Stages as Ray Data actor pools (one adapter, `StageActor`, per stage), tasks as Ray tasks."""

    name: ExecutorName = "ray"

    def connect(self, verbose: bool, job: str) -> None:
        from pipeline.runner.cluster import connect

        connect(verbose, job)

    def view(self) -> ClusterView:
        from pipeline.runner.resources import current_view

        return current_view()

    def batches(self, shards: list[Shard], stages: list[Stage], no_progress_timeout_s: float) -> Iterator[pa.Table]:
        import ray

        from pipeline.runner.deaths import WorkLedger

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = False
        ctx.execution_no_progress_timeout_s = no_progress_timeout_s
        readers = [stage for stage in stages if isinstance(stage, ShardStage)]
        ledger = WorkLedger() if readers else None  # which shard a reader that died was reading
        for stage in readers:
            stage.ledger = ledger.name
        try:
            yield from dataset(shards, stages).iter_batches(batch_format="pyarrow", batch_size=None)
        finally:
            if ledger is not None:
                ledger.stop()

    def tasks(self, fn: Callable, calls: Iterable[tuple], num_cpus: float = 1.0) -> Iterator[Outcome]:
        """A task whose worker dies (killed for memory, a crash) is tried again `TASK_RETRIES` times; then its
        outcome is a `BrokenWorker` saying so (the caller names the input)."""
        import ray

        remote = ray.remote(num_cpus=num_cpus, max_retries=TASK_RETRIES)(fn)
        for ref in [remote.remote(*call) for call in calls]:
            try:
                yield Outcome(ray.get(ref))
            except (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError) as err:
                yield Outcome(error=BrokenWorker(f"its worker died {TASK_RETRIES + 1} times (killed for memory or "
                                                 f"crashed) and Ray's retries are spent ({type(err).__name__})"))
            except Exception as err:  # noqa: BLE001 - the caller decides what a failed task means
                yield Outcome(error=getattr(err, "cause", None) or err)


class LocalExecutor:
    """Stages in this process, in order: each set up once (as one actor would be), the shards' groups fed to the
    first stage one call at a time, and each later stage's input re-batched at its `batch_size` across shards
    and marker rows, as Ray Data batches it. Streams: a shard's records reach the driver while later shards are
    still unread. A failure that would end an actor's process on Ray ends the run here."""

    name: ExecutorName = "local"

    def connect(self, verbose: bool, job: str) -> None:
        """Nothing to connect to."""

    def view(self) -> ClusterView:
        import torch

        gpus = float(torch.cuda.device_count()) if torch.cuda.is_available() else 0.0
        return ClusterView(remote=False, cpus=float(os.cpu_count() or 1), gpus=gpus, max_gpus=gpus)

    def batches(self, shards: list[Shard], stages: list[Stage], no_progress_timeout_s: float) -> Iterator[pa.Table]:
        """The stages' output batches; each stage torn down at the end, however the run ends (its batches read, an
        error, the reader stopping early)."""
        ready: list[Stage] = []
        try:
            for stage in stages:
                stage.setup()
                ready.append(stage)
            groups = shard_groups(shards, stages[0].resources.max_actors)
            flow: Iterator[pa.Table] = (pa.Table.from_pylist(shard_rows([group])) for group in groups)
            for k, stage in enumerate(stages):
                flow = _called(stage, flow if k == 0 else rebatched(flow, stage.resources.batch_size))
            yield from flow
        finally:
            for stage in reversed(ready):
                stage.teardown()

    def tasks(self, fn: Callable, calls: Iterable[tuple], num_cpus: float = 1.0) -> Iterator[Outcome]:
        for call in calls:
            try:
                yield Outcome(fn(*call))
            except Exception as err:  # noqa: BLE001 - the caller decides what a failed task means
                yield Outcome(error=err)


def _called(stage: Stage, batches: Iterator[pa.Table]) -> Iterator[pa.Table]:
    for batch in batches:
        out = stage(batch)
        for table in [out] if isinstance(out, pa.Table) else out:
            if table.num_rows:
                yield table


def rebatched(tables: Iterable[pa.Table], size: int | None) -> Iterator[pa.Table]:
    """Tables cut and joined into batches of exactly `size` rows (the last one shorter), in order; `None`: each
    table as it comes."""
    if size is None:
        yield from tables
        return
    held: list[pa.Table] = []
    rows = 0
    for table in tables:
        held.append(table)
        rows += table.num_rows
        while rows >= size:
            joined = pa.concat_tables(held)
            yield joined.slice(0, size)
            rest = joined.slice(size)
            held, rows = [rest], rest.num_rows
    if rows:
        yield pa.concat_tables(held)


def actor_class(stage: Stage) -> type:
    """The Ray Data actor class of a stage, named after it (Ray's process titles and errors then say
    `MapBatches(ScoreStage)`)."""
    return type(type(stage).__name__, (StageActor,), {"__module__": StageActor.__module__})


def dataset(shards: list[Shard], stages: list[Stage]):
    """The Ray Dataset of `stages` over `shards` (the first stage reads them)."""
    import ray

    groups = shard_groups(shards, stages[0].resources.max_actors)
    ds = ray.data.from_items(shard_rows(groups), override_num_blocks=len(groups))
    env = storage_env()  # workers read and write object storage too
    extra = {"runtime_env": {"env_vars": env}} if env else {}
    for stage in stages:
        r = stage.resources
        placement = {k: v for k, v in (("accelerator_type", r.accelerator_type), ("resources", r.custom)) if v}
        with retry_bounds_allowed():
            ds = ds.map_batches(
                actor_class(stage), fn_constructor_kwargs={"stage": stage}, batch_format="pyarrow",
                batch_size=r.batch_size if stage is not stages[0] else 1,
                compute=ray.data.ActorPoolStrategy(
                    min_size=r.min_actors, max_size=r.max_actors, max_concurrent_calls_per_actor=r.concurrent_calls,
                    enable_true_multi_threading=r.concurrent_calls > 1),
                num_cpus=r.num_cpus, num_gpus=r.num_gpus or None, **placement, **extra,
                max_restarts=stage.restarts, max_task_retries=stage.call_retries,  # never Ray Data's endless default
            )
    return ds


EXECUTORS = {"ray": RayExecutor, "local": LocalExecutor}


def executor_named(name: ExecutorName) -> RayExecutor | LocalExecutor:
    return EXECUTORS[name]()


def executor_field():
    """The `executor` setting every shard job's configuration has (a pydantic field)."""
    from pydantic import Field

    return Field("ray", description="where the stages run: ray (the cluster in RAY_ADDRESS, else a local Ray "
                                    "instance) or local (this process, one stage after another, nothing started: "
                                    "for a few shards and for debugging)")
