"""The one shape of every shard job (scoring, synthetic pairs, curation): shards -> a CPU stage -> a model or
generator stage -> per-shard commit -> summary.

`prepare` does everything that needs no Ray (list the shards, take the output's lease, check the output's
identity, read the manifest, decide what is left to do), so a bad output or model fails before Ray starts and a
dry run never starts it. `execute` streams the shards still to do through the job's stages on Ray Data and
commits each shard as its records complete. A job is a spec, two `Stage`s and a summary formatter.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from pipeline.errors import InputError, ShardFault
from pipeline.lease import Lease
from pipeline.manifest import (
    Claim,
    check_identity,
    match_legacy,
    missing_files,
    read_manifest,
    record_identity,
)
from pipeline.progress import Progress
from pipeline.ray_compat import first_cause, pass_actor_arguments_by_value
from pipeline.sinks import ErrorCounts, ShardCommitter
from pipeline.storage import Shard, ShardListing, filesystem_for, is_remote, join, normalize_uri, storage_env

# Shards are handed to the CPU stage in calls of about this many bytes (small shards share a call; the fixed
# cost of a call is paid once per group), and never more than this many shards per call.
CALL_BYTES = 256 * 2**20
CALL_SHARDS = 64


@dataclass
class Stage:
    """A Ray Data stage: a callable class (built once per actor, then called with batches), its constructor
    arguments and the resources each actor holds."""

    name: str
    cls: type
    kwargs: dict
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    min_actors: int = 1
    max_actors: int = 1
    batch_size: int | None = None  # rows per call; None: each block as it comes


@dataclass
class ShardJob:
    """What a shard job is: its name, its shards, where it writes, what the output belongs to, and how its
    records are committed."""

    job: str
    output: str
    listing: ShardListing
    identity: dict
    schema: pa.Schema
    rows_per_sample: int = 1
    key_columns: tuple[str, ...] = ("ordinal",)  # what tells a shard's records apart
    partition: Callable[[pa.Table], list[str]] | None = None  # records -> the folder of each
    lease_ttl_s: float = 60.0
    no_progress_timeout_s: float = 3600.0
    unit: str = "samples"
    format: str | None = None  # the input's format, recorded with each commit
    moved_from: str | None = None  # the input root the committed shards were read from, when the corpus moved


@dataclass
class PreparedJob:
    spec: ShardJob
    committed: dict[str, dict]  # commit records of the listed shards, by shard key
    entries: dict[str, dict]  # every commit record of the output (other corpora scored into it too)
    todo: list[Shard]
    lease: Lease | None
    started: float
    identity: str = ""
    notes: list[str] = field(default_factory=list)  # what the user should know before the run (a re-claim)
    claim: Claim | None = None  # how the run stands with the output's identity

    @property
    def shards(self) -> list[Shard]:
        return self.spec.listing.shards


@dataclass
class RunResult:
    committer: ShardCommitter | None
    incomplete: dict[str, str] = field(default_factory=dict)  # shard key -> reason
    aborted: str | None = None
    ended: float = 0.0
    consolidation: str | None = None  # why the commit records could not be consolidated (they stay commits)
    lease_lost: str | None = None  # why this run no longer holds the output, if it lost it
    interrupted: bool = False  # stopped by Ctrl-C (SIGINT): what was committed stays, the summary says so


def check_writable(output: str, create: bool = True) -> None:
    """The output can be created and written (a file where a folder should be, a read-only mount, a missing
    bucket: fail now). Without `create` nothing is written: only what can be seen without writing is checked."""
    import pyarrow.fs as pafs

    fs, path = filesystem_for(output)
    try:
        info = fs.get_file_info(path)
    except OSError as err:
        raise InputError("output", f"cannot reach {output}: {err}") from None
    if info.type == pafs.FileType.File:
        raise InputError("output", f"{output} is a file, not a folder or prefix")
    if not create:
        if isinstance(fs, pafs.LocalFileSystem):
            existing = os.path.abspath(path)
            while not os.path.exists(existing):
                existing = os.path.dirname(existing)
            if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
                raise InputError("output", f"cannot create {output}: {existing} is not a writable folder")
        elif is_remote(output):
            bucket = path.split("/", 1)[0]
            try:
                missing = fs.get_file_info(bucket).type == pafs.FileType.NotFound
            except OSError as err:
                raise InputError("output", f"cannot reach {output}: {err}") from None
            if missing:
                raise InputError("output", f"bucket {bucket!r} of {output} does not exist")
        return
    try:
        fs.create_dir(path, recursive=True)
    except OSError as err:
        raise InputError("output", f"cannot create {output}: {err}") from None


def survey(spec: ShardJob, started: float | None = None) -> PreparedJob:
    """What a run would do, reading only: the output's identity (checked, not written), its commit records, the
    shards left to do. A dry run is a survey; a run surveys again under the lease (`claim`)."""
    check_writable(spec.output, create=False)
    entries = read_manifest(spec.output)
    claim = check_identity(spec.output, spec.job, spec.identity, entries)
    committed = match_committed(spec, entries)
    notes = [claim.note] if claim.note else []
    lost = missing_files(spec.output, committed)
    if lost:  # committed, then deleted: scored again (their commit records are rewritten)
        example = next(iter(lost.values()))[0]
        notes.append(f"{len(lost)} committed shards lost their files since (e.g. {example}): they are done again")
        committed = {k: v for k, v in committed.items() if k not in lost}
    todo = [s for s in spec.listing.shards if s.key not in committed]
    return PreparedJob(spec, committed, entries, todo, None, started or time.time(), claim.hash, notes, claim)


def claim(spec: ShardJob, started: float | None = None) -> PreparedJob:
    """Take the output's lease, survey again under it (another job may have committed since), and record the
    output's identity: the first write a run makes, after every check has passed."""
    survey(spec, started)  # every refusal before anything is written
    check_writable(spec.output)
    lease = Lease(spec.output, spec.job, ttl_s=spec.lease_ttl_s)
    try:
        lease.acquire()
    except OSError as err:
        raise InputError("output", f"cannot write to {spec.output}: {err}") from None
    try:
        prepared = survey(spec, started)
        record_identity(spec.output, spec.job, prepared.claim)
    except BaseException:
        lease.release()
        raise
    prepared.lease = lease
    return prepared


def prepare(spec: ShardJob, started: float | None = None, dry_run: bool = False) -> PreparedJob:
    """`survey` for a dry run (nothing written or held), else `claim`."""
    return survey(spec, started) if dry_run else claim(spec, started)


def match_committed(spec: ShardJob, entries: dict[str, dict]) -> dict[str, dict]:
    """The commit records of the listed shards, by shard key. A key committed from another file (another corpus
    whose shards share names with this one) or in another format is refused, naming the field and what to do; a
    listed file committed under another key (the listing's root moved) counts as committed."""
    committed = match_legacy(entries, [s.key for s in spec.listing.shards])
    by_input = {e["input"]: e for e in entries.values() if e.get("input")}
    for shard in spec.listing.shards:
        entry = committed.get(shard.key)
        if entry is None and shard.uri in by_input:
            entry = committed[shard.key] = by_input[shard.uri]
        if entry is not None:
            _check_same_input(spec, shard, entry)
    return committed


def _check_same_input(spec: ShardJob, shard: Shard, entry: dict) -> None:
    read_from, output = entry.get("input"), spec.output
    if read_from and read_from != shard.uri:
        moved = spec.moved_from and read_from == join(normalize_uri(spec.moved_from), entry.get("shard", shard.key))
        if not moved:
            old_root = read_from[: -len(shard.key)].rstrip("/") if read_from.endswith(shard.key) else read_from
            raise InputError("input", f"{output} already holds shard {shard.key!r} read from {read_from}; this run's "
                                      f"{shard.uri} has the same key. Score another corpus into its own output; if "
                                      f"this is the same corpus moved, set moved_from: {old_root}")
    if entry.get("format") and spec.format and entry["format"] != spec.format:
        raise InputError("format", f"{output} holds shard {shard.key!r} committed as {entry['format']} records; this "
                                   f"run reads it as {spec.format}. Choose another output (or delete this one to "
                                   "score the corpus again)")


def shard_groups(shards: list[Shard], workers: int = 1) -> list[list[dict]]:
    """Shards packed into CPU-stage calls by size (small shards share a call and its fixed cost), yet at least
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
        current.append(asdict(s))  # rebuilt in the stages with Shard(**fields)
        size += weight
    if current:
        groups.append(current)
    return groups


def _dataset(prepared: PreparedJob, stages: list[Stage]):
    import ray

    groups = shard_groups(prepared.todo, stages[0].max_actors)
    ds = ray.data.from_items([{"shards": g} for g in groups], override_num_blocks=len(groups))
    env = storage_env()  # workers read and write object storage too
    extra = {"runtime_env": {"env_vars": env}} if env else {}
    for stage in stages:
        ds = ds.map_batches(
            stage.cls, fn_constructor_kwargs=stage.kwargs, batch_format="pyarrow",
            batch_size=stage.batch_size if stage is not stages[0] else 1,
            compute=ray.data.ActorPoolStrategy(min_size=stage.min_actors, max_size=stage.max_actors),
            num_cpus=stage.num_cpus, num_gpus=stage.num_gpus or None, **extra,
        )
    return ds


def execute(prepared: PreparedJob, stages: list[Stage], progress: bool = True,
            on_batch: Callable[[pa.Table], None] | None = None,
            on_records: Callable[[pa.Table], None] | None = None) -> RunResult:
    """Run the stages over the shards still to do; commit as records complete. A shard whose writes keep failing
    stays uncommitted and the run goes on; whatever ends the run, what is committed stays committed, the records
    are consolidated where they can be, and the lease is released."""
    spec = prepared.spec
    pass_actor_arguments_by_value()  # restartable actors need nothing from the object store (pipeline.ray_compat)
    bar = Progress(spec.job, len(prepared.todo), unit=spec.unit, enabled=progress)
    uris = {s.key: s.uri for s in prepared.todo}
    committer = ShardCommitter(
        spec.output, spec.schema, prepared.identity, lease=prepared.lease, rows_per_sample=spec.rows_per_sample,
        key_columns=spec.key_columns, partition=spec.partition, on_records=on_records,
        describe=lambda key: {"input": uris.get(key), "format": spec.format}, committed=prepared.entries,
        on_commit=lambda c: bar.update(len(c.committed), c.samples, c.errors.total()))
    result = RunResult(committer)
    try:
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
            result.consolidation = f"{type(err).__name__}: {_first_line(err)}"
    finally:
        if prepared.lease is not None:
            prepared.lease.release()
            result.lease_lost = prepared.lease.lost
    done = set(committer.committed)
    reasons = committer.incomplete()
    for shard in prepared.todo:
        if shard.key not in done:
            result.incomplete[shard.key] = reasons.get(shard.key) or (
                f"not reached: the run ended ({result.aborted})" if result.aborted else "not reached")
    result.ended = time.time()
    return result


def aborted_because(err: BaseException) -> str:
    """One line saying why the pipeline stopped: the innermost cause, not Ray's wrapping of it."""
    text = str(err)
    cause = first_cause(text) or type(err).__name__
    if "creation task" in text or "during initialization" in text:  # actors whose constructor raised
        stage = re.search(r"MapBatches\((\w+)\)", text)
        return f"{stage.group(1) if stage else 'the stage'}'s actors failed at start-up: {cause}"
    return cause if cause.startswith(type(err).__name__) or "Error" in cause else f"{type(err).__name__}: {cause}"
def _stream(prepared: PreparedJob, stages: list[Stage], committer: ShardCommitter,
            on_batch: Callable[[pa.Table], None] | None) -> None:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = False
    ctx.execution_no_progress_timeout_s = prepared.spec.no_progress_timeout_s
    for batch in _dataset(prepared, stages).iter_batches(batch_format="pyarrow", batch_size=None):
        if on_batch is not None:
            on_batch(batch)
        committer.add(batch)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def write_summary(prepared: PreparedJob, result: RunResult, summary: dict) -> dict:
    """Write `OUTPUT/summary.json` (retried like every output write), with what went wrong at the run's level
    added to `summary`: records that could not be consolidated, a lease this run lost (whose output then belongs
    to another job: nothing is written), a summary that could not be written. The caller prints `summary`."""
    from pipeline.manifest import write_json
    from pipeline.sinks import write_with_retries
    from pipeline.storage import join

    if result.consolidation:
        summary["consolidation_failed"] = result.consolidation
    uri = join(prepared.spec.output, "summary.json")
    if result.lease_lost:
        summary["summary_not_written"] = f"{uri}: this run lost the output's lease ({result.lease_lost})"
        return summary
    try:
        write_with_retries(uri, lambda: write_json(uri, summary))
    except ShardFault as fault:
        summary["summary_not_written"] = fault.detail
    return summary


def common_summary(prepared: PreparedJob, result: RunResult) -> dict:
    """The parts every job's summary shares: shards, samples, errors by reason, timing."""
    c = result.committer
    listing = prepared.spec.listing
    elapsed = result.ended - prepared.started
    samples = c.samples if c else 0
    summary = {
        "shards": {"total": len(listing.shards), "already_committed": len(listing.shards) - len(prepared.todo),
                   "new": len(prepared.todo), "committed_this_run": len(c.committed) if c else 0,
                   "incomplete": sorted(result.incomplete),
                   "duplicates_in_input": listing.duplicates,
                   "duplicate_spellings": dict(list(listing.spellings.items())[:3])},
        "incomplete_reasons": dict(sorted(result.incomplete.items())),
        **(c.errors.as_summary() if c else ErrorCounts().as_summary()),
        "elapsed_s": round(elapsed, 3),
        "samples_per_s": round(samples / elapsed, 2) if elapsed > 0 and samples else 0.0,
    }
    if result.aborted:
        summary["aborted"] = result.aborted
    if result.interrupted:
        summary["interrupted"] = True
    if c and c.first_commit:
        first_time, first_samples = c.first_commit
        summary["startup_s"] = round(first_time - prepared.started, 3)
        summary["startup_samples"] = first_samples  # what the first commit held
        window = result.ended - first_time
        # a steady rate only over a window worth the name: 10 s and a few commits after the first one
        if window >= 10 and len(c.committed) >= 4 and samples > first_samples:
            summary["steady_samples_per_s"] = round((samples - first_samples) / window, 2)
    return summary


def error_lines(summary: dict, shown: int = 8) -> list[str]:
    """Error records by reason, most frequent first, each with an example sample."""
    reasons = list(summary.get("errors_by_reason", {}).items())
    lines = []
    for reason, n in reasons[:shown]:
        example = summary.get("error_examples", {}).get(reason) or {}
        where = f" (e.g. {example.get('id')} in {example.get('shard')})" if example.get("id") else ""
        lines.append(f"  error      {n:6d} × {reason[:100]}{where[:80]}")
    if len(reasons) > shown:
        lines.append(f"             ... and {len(reasons) - shown} more reasons ({sum(n for _, n in reasons[shown:])} "
                     "records): see summary.json")
    return lines


def summary_tail(summary: dict) -> list[str]:
    """The closing lines every job's summary shares: errors by reason, shards left uncommitted (and why), an
    aborted run, a run whose every sample failed."""
    lines = error_lines(summary)
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
