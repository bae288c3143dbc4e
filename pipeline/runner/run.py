"""Running a job, the one way every job runs: survey the output (nothing written), connect to Ray and size the
job only when there is work, claim the output (its lease held for the run, its identity recorded), the job's
hook, the stages, the summary. A dry run is the survey, said in words."""

from __future__ import annotations

import sys
import time

from pipeline.errors import Interrupted
from pipeline.runner.execute import execute
from pipeline.runner.job import Job, Plan, RunResult
from pipeline.runner.prepare import claim, survey
from pipeline.runner.summary import build_summary, write_summary


def dry_run(job: Job) -> str:
    """What a run would do, starting nothing and writing nothing."""
    return "\n".join(job.dry_run_lines(survey(job.spec())))


def run_job(job: Job, progress: bool = True, verbose: bool = False, started: float | None = None) -> dict:
    """Run `job` to its end on its executor (Ray, or this process); returns (and writes) its summary. A job with
    nothing left to do never starts Ray; a job the cluster cannot run (no GPU it can ever have) is refused before
    anything is written."""
    started = started or time.time()
    spec = job.spec()
    surveyed = survey(spec, started)
    try:
        return _run(job, surveyed, progress, verbose, started)
    except KeyboardInterrupt as err:  # during the stages it ends with the run's summary (execute); elsewhere here
        if isinstance(err, Interrupted):
            raise
        done, total = len(surveyed.committed), len(surveyed.spec.listing.shards)
        raise Interrupted(f"interrupted (Ctrl-C) while the run started or ended: nothing half-written; {done} of "
                          f"{total} shards were committed before it, {len(surveyed.todo)} were left: the same "
                          "command goes on from there") from None


def _run(job: Job, surveyed, progress: bool, verbose: bool, started: float) -> dict:
    spec = surveyed.spec
    plan = Plan()
    if job.needs_ray(surveyed):
        job.executor.connect(verbose, job.name)
        if surveyed.todo:
            plan = job.resources(job.executor.view())
    with claim(spec, started) as prepared:
        if progress:
            for line in ([job.start_line(plan)] if prepared.todo else []) + prepared.notes:
                if line:
                    print(f"[{job.name}] {line}", file=sys.stderr, flush=True)
        job.before_execute(prepared)
        result = RunResult(None)
        try:
            result = execute(prepared, job.stages(plan) if prepared.todo else [], job.executor, progress,
                             job.on_batch, job.on_records, job.progress_note)
        finally:
            job.after_execute(prepared, result)
        return write_summary(prepared, result, build_summary(job, prepared, result, plan))
