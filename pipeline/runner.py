"""The one shape of every shard job (scoring, synthetic pairs, curation): shards -> a CPU stage -> a model or
generator stage -> per-shard commit -> summary.

`prepare` does everything that needs no Ray (list the shards, take the output's lease, check the output's
identity, read the manifest, decide what is left to do), so a bad output or model fails before Ray starts and a
dry run never starts it. `execute` streams the shards still to do through the job's stages on Ray Data and
commits each shard as its records complete. A job is a spec, two `Stage`s and a summary formatter.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from pipeline.errors import InputError
from pipeline.lease import Lease
from pipeline.manifest import claim_output, identity_hash, match_legacy, read_manifest
from pipeline.progress import Progress
from pipeline.ray_compat import pass_actor_arguments_by_value
from pipeline.sinks import ShardCommitter
from pipeline.storage import Shard, ShardListing, filesystem_for, storage_env

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


@dataclass
class PreparedJob:
    spec: ShardJob
    committed: dict[str, dict]  # commit records of the listed shards, by shard key
    entries: dict[str, dict]  # every commit record of the output (other corpora scored into it too)
    todo: list[Shard]
    lease: Lease | None
    started: float
    identity: str = ""

    @property
    def shards(self) -> list[Shard]:
        return self.spec.listing.shards


@dataclass
class RunResult:
    committer: ShardCommitter | None
    incomplete: dict[str, str] = field(default_factory=dict)  # shard key -> reason
    aborted: str | None = None
    ended: float = 0.0


def check_writable(output: str) -> None:
    """The output can be created and written (a file where a folder should be, a read-only mount: fail now)."""
    fs, path = filesystem_for(output)
    import pyarrow.fs as pafs

    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise InputError("output", f"{output} is a file, not a folder or prefix")
    try:
        fs.create_dir(path, recursive=True)
    except OSError as err:
        raise InputError("output", f"cannot create {output}: {err}") from None


def prepare(spec: ShardJob, started: float | None = None, dry_run: bool = False) -> PreparedJob:
    """Lease, identity and manifest: everything before Ray. With `dry_run` nothing is written or held."""
    started = started or time.time()
    lease = None
    if not dry_run:
        check_writable(spec.output)
        lease = Lease(spec.output, spec.job, ttl_s=spec.lease_ttl_s)
        try:
            lease.acquire()
        except PermissionError as err:
            raise InputError("output", f"cannot write to {spec.output}: {err}") from None
        except OSError as err:
            raise InputError("output", f"cannot write to {spec.output}: {err}") from None
    try:
        entries = read_manifest(spec.output)
        claim_output(spec.output, spec.job, spec.identity, entries, record=not dry_run)
        committed = match_legacy(entries, [s.key for s in spec.listing.shards])
    except BaseException:
        if lease is not None:
            lease.release()
        raise
    todo = [s for s in spec.listing.shards if s.key not in committed]
    return PreparedJob(spec, committed, entries, todo, lease, started, identity_hash(spec.identity))


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
    """Run the stages over the shards still to do; commit as records complete. Releases the lease at the end."""
    import ray

    spec = prepared.spec
    pass_actor_arguments_by_value()  # restartable actors need nothing from the object store (pipeline.ray_compat)
    bar = Progress(spec.job, len(prepared.todo), unit=spec.unit, enabled=progress)
    uris = {s.key: s.uri for s in prepared.todo}
    committer = ShardCommitter(
        spec.output, spec.schema, prepared.identity, lease=prepared.lease, rows_per_sample=spec.rows_per_sample,
        key_columns=spec.key_columns, partition=spec.partition, on_records=on_records,
        describe=lambda key: {"input": uris.get(key), "format": spec.format}, committed=prepared.entries,
        on_commit=lambda c: bar.update(len(c.committed), c.samples, sum(c.errors_by_category.values())))
    result = RunResult(committer)
    try:
        if prepared.todo:
            ctx = ray.data.DataContext.get_current()
            ctx.execution_options.preserve_order = False
            ctx.execution_no_progress_timeout_s = spec.no_progress_timeout_s
            try:
                for batch in _dataset(prepared, stages).iter_batches(batch_format="pyarrow", batch_size=None):
                    if on_batch is not None:
                        on_batch(batch)
                    committer.add(batch)
            except Exception as err:  # a stalled or failed pipeline: what is committed stays committed
                result.aborted = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            finally:
                committer.consolidate()
                bar.close(len(committer.committed), committer.samples, sum(committer.errors_by_category.values()))
    finally:
        if prepared.lease is not None:
            prepared.lease.release()
    done = set(committer.committed)
    reasons = committer.incomplete()
    for shard in prepared.todo:
        if shard.key not in done:
            result.incomplete[shard.key] = reasons.get(shard.key) or (
                f"not reached: the run ended ({result.aborted})" if result.aborted else "not reached")
    result.ended = time.time()
    return result


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
        "errors_by_reason": dict(c.errors_by_category) if c else {},
        "error_examples": dict(c.error_examples) if c else {},
        "elapsed_s": round(elapsed, 3),
        "samples_per_s": round(samples / elapsed, 2) if elapsed > 0 and samples else 0.0,
    }
    if result.aborted:
        summary["aborted"] = result.aborted
    if c and c.first_commit:
        first_time, first_samples = c.first_commit
        summary["startup_s"] = round(first_time - prepared.started, 3)
        summary["startup_samples"] = first_samples  # what the first commit held
        window = result.ended - first_time
        # a steady rate only over a window worth the name: 10 s and a few commits after the first one
        if window >= 10 and len(c.committed) >= 4 and samples > first_samples:
            summary["steady_samples_per_s"] = round((samples - first_samples) / window, 2)
    return summary


def summary_tail(summary: dict) -> list[str]:
    """The closing lines every job's summary shares: errors by reason, shards left uncommitted (and why), an
    aborted run."""
    lines = [f"  error      {n:6d} × {summary['error_examples'].get(reason, reason)[:90]}"
             for reason, n in sorted(summary["errors_by_reason"].items(), key=lambda kv: -kv[1])]
    incomplete = summary["shards"]["incomplete"]
    if incomplete:
        lines.append(f"  INCOMPLETE {len(incomplete)} shards were not committed; rerun the same command to finish "
                     "them:")
        lines += [f"             {shard}: {reason[:100]}"
                  for shard, reason in list(summary["incomplete_reasons"].items())[:5]]
    if summary.get("aborted"):
        lines.append(f"  ABORTED    {summary['aborted'][:150]}")
    return lines
