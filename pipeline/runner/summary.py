"""The summary every job ends with: one versioned shell that the runner fills (shards, records, errors by reason,
timing, resources and why, what went wrong at the run's level), with the job's own fields under its name
(`summary["score"]`, `summary["synth"]`, `summary["curate"]`), written to `OUTPUT/summary.json` and printed as
one screen.

Version 2 (this one): `summary_version`, `job`, `input`, `output`, `shards` {total, already_committed, new,
committed_this_run, incomplete, duplicates_in_input, duplicate_spellings, and when there are any left_out (files
under the input root not listed as shards, by why: count and examples)}, `incomplete_reasons`, `records`
{this_run, errors, committed_total}, `errors` {by_category, by_reason, examples}, `timing` {elapsed_s,
records_per_s, startup_s, startup_records, steady_records_per_s}, `resources` {stage: {num_cpus, num_gpus,
min_actors, max_actors, batch_size}}, `resources_why`, `notes`, and when they happen `aborted`, `interrupted`,
`every_sample_failed`, `consolidation_failed`, `summary_not_written`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict

from pipeline.commit.committer import ErrorCounts
from pipeline.errors import ShardFault
from pipeline.io.publish import write_json, write_with_retries
from pipeline.io.uris import join
from pipeline.runner.job import Job, Plan, PreparedJob, RunResult

SUMMARY_VERSION = 2


def build_summary(job: Job, prepared: PreparedJob, result: RunResult, plan: Plan) -> dict:
    c = result.committer
    spec, listing = prepared.spec, prepared.spec.listing
    records = c.samples if c else 0
    summary = {
        "summary_version": SUMMARY_VERSION, "job": job.name, "input": spec.input, "output": spec.output,
        "shards": {"total": len(listing.shards), "already_committed": len(listing.shards) - len(prepared.todo),
                   "new": len(prepared.todo), "committed_this_run": len(c.committed) if c else 0,
                   "incomplete": sorted(result.incomplete), "duplicates_in_input": listing.duplicates,
                   "duplicate_spellings": dict(list(listing.spellings.items())[:3])},
        "incomplete_reasons": dict(sorted(result.incomplete.items())),
        "records": {"this_run": records, "errors": c.errors.total() if c else 0,
                    "committed_total": sum(e.get("records", 0) for e in prepared.committed.values()) + records},
        "errors": (c.errors if c else ErrorCounts()).as_summary(),
        "timing": _timing(prepared, result),
        "resources": {name: asdict(r) for name, r in plan.stages.items()},
        "resources_why": dict(plan.why),
        "notes": list(prepared.notes),
    }
    if listing.left_out:  # files under the input root the listing did not read: named, never skipped silently
        summary["shards"]["left_out"] = listing.left_out_summary()
    for key, value in (("aborted", result.aborted), ("interrupted", result.interrupted),
                       ("consolidation_failed", result.consolidation)):
        if value:
            summary[key] = value
    summary[job.name] = job.summary_fields(prepared, result)
    if job.every_sample_failed(summary):
        summary["every_sample_failed"] = True
    return summary


def _timing(prepared: PreparedJob, result: RunResult) -> dict:
    c = result.committer
    elapsed = result.ended - prepared.started
    records = c.samples if c else 0
    timing = {"elapsed_s": round(elapsed, 3),
              "records_per_s": round(records / elapsed, 2) if elapsed > 0 and records else 0.0}
    if c and c.first_commit:
        first_time, first_records = c.first_commit
        timing["startup_s"] = round(first_time - prepared.started, 3)
        timing["startup_records"] = first_records  # what the first commit held
        window = result.ended - first_time
        # a steady rate only over a window worth the name: 10 s and a few commits after the first one
        if window >= 10 and len(c.committed) >= 4 and records > first_records:
            timing["steady_records_per_s"] = round((records - first_records) / window, 2)
    return timing


RUNS_DIR = "_runs"  # every run's own summary, beside the latest in summary.json


def write_summary(prepared: PreparedJob, result: RunResult, summary: dict) -> dict:
    """Write `OUTPUT/summary.json`, the latest run's, and the same as `OUTPUT/_runs/<UTC time>-<id>.json`, so a run
    into an output that another run wrote to (the demo's two scoring runs, a rerun) keeps the earlier ones' (retried
    like every output write). A run that lost the output's lease writes nothing (the output belongs to another job
    now); a summary that cannot be written is said on the terminal."""
    uri = join(prepared.spec.output, "summary.json")
    if result.lease_lost:
        summary["summary_not_written"] = f"{uri}: this run lost the output's lease ({result.lease_lost})"
        return summary
    own = join(prepared.spec.output, RUNS_DIR, f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-"
                                                f"{uuid.uuid4().hex[:8]}.json")
    try:
        for target in (uri, own):
            write_with_retries(target, lambda target=target: write_json(target, summary))
    except ShardFault as fault:
        summary["summary_not_written"] = fault.detail
    return summary


def format_summary(job: Job, summary: dict) -> str:
    """The one screen a job prints at its end: the shell's head, the job's own lines, the shell's tail."""
    s = summary["shards"]
    head = [f"UniFilter {job.name}: {summary['input']} -> {summary['output']}" if summary.get("input") else
            f"UniFilter {job.name}: {summary['output']}",
            f"  shards     {s['total']} total · {s['already_committed']} already committed (skipped) · "
            f"{s['new']} new · {s['committed_this_run']} committed now · {len(s['incomplete'])} incomplete"]
    head += [f"  note       {note}" for note in summary.get("notes", [])]
    if summary["shards"].get("duplicates_in_input"):
        head.append(f"  note       {s['duplicates_in_input']} input entries named a shard already listed (each shard "
                    "is read once)")
        for key, spelled in s.get("duplicate_spellings", {}).items():
            head.append(f"             {key} was named as {', '.join(map(repr, spelled))}")
    return "\n".join(head + job.summary_lines(summary) + summary_tail(summary))


def error_lines(errors: dict, shown: int = 8) -> list[str]:
    """Error records by reason (`ErrorCounts.as_summary()`), most frequent first, each with an example sample."""
    reasons = list(errors.get("by_reason", {}).items())
    lines = []
    for reason, n in reasons[:shown]:
        example = errors.get("examples", {}).get(reason) or {}
        where = f" (e.g. {example.get('id')} in {example.get('shard')})" if example.get("id") else ""
        lines.append(f"  error      {n:6d} × {reason[:100]}{where[:80]}")
    if len(reasons) > shown:
        lines.append(f"             ... and {len(reasons) - shown} more reasons ({sum(n for _, n in reasons[shown:])} "
                     "records): see summary.json")
    return lines


def summary_tail(summary: dict) -> list[str]:
    """The closing lines every job's summary shares: errors by reason, shards left uncommitted (and why), an
    aborted run, a run whose every sample failed, what could not be saved."""
    lines = error_lines(summary.get("errors", {}))
    incomplete = summary["shards"]["incomplete"]
    if incomplete:
        then = ("once the cause below is fixed, rerun the same command to finish them" if summary.get("aborted")
                else "rerun the same command to finish them")
        lines.append(f"  INCOMPLETE {len(incomplete)} shards were not committed; {then}:")
        lines += [f"             {shard}: {reason[:100]}"
                  for shard, reason in list(summary["incomplete_reasons"].items())[:5]]
    if summary.get("aborted"):
        lines.append(f"  ABORTED    {summary['aborted'][:300]}")
    if summary.get("every_sample_failed"):
        lines.append("  FAILED     every sample of this run is an error record: almost always a configuration mistake "
                     "(the format, a column); see the reasons above")
    if summary.get("consolidation_failed"):
        lines.append("  NOTE       the commit records could not be consolidated (they stay committed; the next run "
                     f"tries again): {summary['consolidation_failed'][:150]}")
    if summary.get("summary_not_written"):
        lines.append(f"  NOT SAVED  summary.json was not written: {summary['summary_not_written'][:150]}")
    return lines


def exit_status(summary: dict) -> int:
    """0 when every shard is committed; 130 after Ctrl-C; 1 when some shards are not committed (the summary names
    them), the run was aborted, its summary could not be written, or every sample it read is an error record."""
    if summary.get("interrupted"):
        return 130  # as a shell reports a command ended by SIGINT
    failed = (summary["shards"]["incomplete"] or summary.get("aborted") or summary.get("summary_not_written")
              or summary.get("every_sample_failed"))
    return 1 if failed else 0
