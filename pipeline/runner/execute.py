"""Running a claimed job's stages on Ray Data: the shards still to do, packed into calls, streamed through the
stages, each shard committed as its records complete. Whatever ends the run, what is committed stays committed,
the commit records are consolidated where they can be, and the reasons the others were not are kept."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pyarrow as pa

from pipeline.commit.committer import ShardCommitter
from pipeline.io.listing import Shard
from pipeline.io.uris import storage_env
from pipeline.runner.job import PreparedJob, RunResult
from pipeline.runner.progress import Progress
from pipeline.runner.ray_compat import first_cause, pass_actor_arguments_by_value
from pipeline.runner.stage import Stage, StageActor, shard_rows

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
        ds = ds.map_batches(
            actor_class(stage), fn_constructor_kwargs={"stage": stage}, batch_format="pyarrow",
            batch_size=r.batch_size if stage is not stages[0] else 1,
            compute=ray.data.ActorPoolStrategy(
                min_size=r.min_actors, max_size=r.max_actors, max_concurrent_calls_per_actor=r.concurrent_calls,
                enable_true_multi_threading=r.concurrent_calls > 1),
            num_cpus=r.num_cpus, num_gpus=r.num_gpus or None, **placement, **extra,
        )
    return ds


def execute(prepared: PreparedJob, stages: list[Stage], progress: bool = True,
            on_batch: Callable[[pa.Table], None] | None = None,
            on_records: Callable[[pa.Table], None] | None = None,
            progress_note: Callable[[], str] | None = None) -> RunResult:
    """Run the stages over the shards still to do; commit as records complete. A shard whose writes keep failing
    stays uncommitted and the run goes on."""
    spec = prepared.spec
    pass_actor_arguments_by_value()  # restartable actors need nothing from the object store (ray_compat)
    bar = Progress(spec.job, len(prepared.todo), unit=spec.unit, enabled=progress, note=progress_note)
    uris = {s.key: s.uri for s in prepared.todo}
    committer = ShardCommitter(
        spec.output, spec.schema, prepared.identity, spec.partition, lease=prepared.lease,
        rows_per_sample=spec.rows_per_sample, key_columns=spec.key_columns, on_records=on_records,
        describe=lambda key: {"input": uris.get(key), "format": spec.format}, committed=prepared.entries,
        on_commit=lambda c: bar.update(len(c.committed), c.samples, c.errors.total()))
    result = RunResult(committer)
    if prepared.todo:
        try:
            _stream(prepared, stages, committer, on_batch)
        except Exception as err:  # a stalled or failed pipeline, a lost lease: what is committed stays committed
            result.aborted = aborted_because(err)
        except KeyboardInterrupt:  # Ctrl-C: stop reading, keep what is committed, end with the summary
            result.aborted, result.interrupted = "interrupted (Ctrl-C); rerun the same command to go on", True
        finally:
            bar.close(len(committer.committed), committer.samples, committer.errors.total())
    try:  # this run's records, and any an earlier run left unconsolidated
        committer.consolidate()
        result.consolidation = committer.consolidation
    except Exception as err:  # never raised over the run's result: the records stay commits as they are
        result.consolidation = f"{type(err).__name__}: {first_cause(str(err))}"
    if prepared.lease is not None:
        result.lease_lost = prepared.lease.lost
    reasons, done = committer.incomplete(), set(committer.committed)
    for shard in prepared.todo:
        if shard.key not in done:
            result.incomplete[shard.key] = reasons.get(shard.key) or (
                f"not reached: the run ended ({result.aborted})" if result.aborted else "not reached")
    result.ended = time.time()
    return result


def _stream(prepared: PreparedJob, stages: list[Stage], committer: ShardCommitter,
            on_batch: Callable[[pa.Table], None] | None) -> None:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = False
    ctx.execution_no_progress_timeout_s = prepared.spec.no_progress_timeout_s
    for batch in dataset(prepared.todo, stages).iter_batches(batch_format="pyarrow", batch_size=None):
        if on_batch is not None:
            on_batch(batch)
        committer.add(batch)


def aborted_because(err: BaseException) -> str:
    """One line saying why the pipeline stopped: the innermost cause, not Ray's wrapping of it."""
    text = str(err)
    cause = first_cause(text) or type(err).__name__
    if "creation task" in text or "during initialization" in text:  # actors whose constructor raised
        stage = re.search(r"MapBatches\((\w+)\)", text)
        return f"{stage.group(1) if stage else 'the stage'}'s actors failed at start-up: {cause}"
    return cause if cause.startswith(type(err).__name__) or "Error" in cause else f"{type(err).__name__}: {cause}"
