"""Running a claimed job's stages (on Ray or in this process: `pipeline.runner.executors`): the shards still to
do, packed into calls, streamed through the stages, each shard committed as its records complete. Whatever ends
the run, what is committed stays committed, the commit records are consolidated where they can be, and the reasons
the others were not are kept."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pyarrow as pa

from pipeline.commit.committer import CommitHooks, RecordLayout, ShardCommitter
from pipeline.io.listing import Shard
from pipeline.runner.executors import LocalExecutor, RayExecutor
from pipeline.runner.job import PreparedJob, RunResult
from pipeline.runner.progress import Progress
from pipeline.runner.ray_compat import actor_death, first_cause, own_error, pass_actor_arguments_by_value
from pipeline.runner.stage import Stage


def execute(prepared: PreparedJob, stages: list[Stage], executor: RayExecutor | LocalExecutor, progress: bool = True,
            on_batch: Callable[[pa.Table], None] | None = None,
            on_records: Callable[[pa.Table], None] | None = None,
            progress_note: Callable[[], str] | None = None) -> RunResult:
    """Run the stages over the shards still to do; commit as records complete. A shard whose writes keep failing
    stays uncommitted and the run goes on."""
    spec = prepared.spec
    if executor.name == "ray":
        pass_actor_arguments_by_value()  # restartable actors need nothing from the object store (ray_compat)
    bar = Progress(spec.job, len(prepared.todo), unit=spec.unit, enabled=progress, note=progress_note)
    listed = {s.key: s for s in prepared.todo}
    layout = RecordLayout(spec.schema, spec.partition, spec.rows_per_sample, spec.key_columns)
    hooks = CommitHooks(on_records=on_records, describe=lambda key: describe_input(listed.get(key), spec.format),
                        on_commit=lambda c: bar.update(len(c.committed), c.samples, c.errors.total()))
    committer = ShardCommitter(spec.output, layout, prepared.identity, prepared.lease, prepared.entries, hooks)
    result = RunResult(committer)
    if prepared.todo:
        try:
            for batch in executor.batches(prepared.todo, stages, spec.no_progress_timeout_s):
                if on_batch is not None:
                    on_batch(batch)
                committer.add(batch)
        except Exception as err:  # a stalled or failed pipeline, a lost lease: what is committed stays committed
            result.aborted = aborted_because(err)
        except KeyboardInterrupt:  # Ctrl-C: stop reading, keep what is committed, end with the summary
            result.aborted = "interrupted (Ctrl-C); rerun the same command to go on"
            result.interrupted = True
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


def describe_input(shard: Shard | None, fmt: str | None) -> dict:
    """What a commit record says of the input file its shard was read from: its URI and format, and its size and
    modification time as listed (and checked when it was opened), so a later run can tell the same file from
    another of the same name (`pipeline.runner.prepare.match_committed`)."""
    if shard is None:
        return {"input": None, "format": fmt}
    return {"input": shard.uri, "format": fmt, "input_size": shard.size, "input_mtime_ns": shard.mtime_ns}


def aborted_because(err: BaseException) -> str:
    """One line saying why the pipeline stopped: the innermost cause, not Ray's wrapping of it."""
    text = str(err)
    cause = first_cause(text) or type(err).__name__
    if "creation task" in text or "during initialization" in text:  # actors whose constructor raised
        stage = re.search(r"MapBatches\((\w+)\)", text)
        return f"{stage.group(1) if stage else 'the stage'}'s actors failed at start-up: {cause}"
    said = own_error(text) or actor_death(err)  # a stage's own error, or Ray's bound on restarts reached
    if said:
        return said
    return cause if cause.startswith(type(err).__name__) or "Error" in cause else f"{type(err).__name__}: {cause}"
