"""The one job interface that scoring, synthetic pairs and curation implement, and the plain data the runner passes
around (`JobSpec`, `PreparedJob`, `RunResult`).

A job says what it is without Ray (`spec`: its shards, output, identity and record schema), which stages it runs
(`stages`, built on the driver from its typed config, sized by `resources`), what it counts while it runs
(`on_batch`, `on_records`), what it adds to the summary (`summary_fields`, `summary_lines`) and what a dry run
says (`dry_run_lines`). `before_execute` runs once the output's lease is held and its identity checked (curation
computes its thresholds there, so two jobs on one output never both make those passes). The runner owns the rest:
the lease, the identity, the commit, the summary shell (`pipeline.runner.run`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa

from pipeline.commit.identity import Claim
from pipeline.commit.lease import Lease
from pipeline.io.listing import Shard, ShardListing
from pipeline.runner.executors import executor_named
from pipeline.runner.resources import ClusterView
from pipeline.runner.stage import Resources, Stage


@dataclass
class JobSpec:
    """What a shard job is: its name, its shards, where it writes, what the output belongs to, and how its records
    are committed."""

    job: str
    output: str
    listing: ShardListing
    identity: dict
    schema: pa.Schema
    partition: Callable[[pa.Table], list[str]]  # records -> the folder of each (`scores`, `train`, ...)
    rows_per_sample: int = 1
    key_columns: tuple[str, ...] = ("ordinal",)  # what tells a shard's records apart
    lease_ttl_s: float = 60.0
    no_progress_timeout_s: float = 3600.0
    unit: str = "samples"
    input: str | None = None  # the input as the user gave it (for the summary)
    format: str | None = None  # the input's format, recorded with each commit
    moved_from: str | None = None  # the input root the committed shards were read from, when the corpus moved
    identity_later: tuple[str, ...] = ()  # identity fields known only after `before_execute` (curation's cuts)


@dataclass
class PreparedJob:
    spec: JobSpec
    committed: dict[str, dict]  # commit records of the listed shards, by shard key
    entries: dict[str, dict]  # every commit record of the output (other corpora scored into it too)
    todo: list[Shard]
    started: float
    claim: Claim
    lease: Lease | None = None
    notes: list[str] = field(default_factory=list)  # what the user should know (a re-claim, lost files)

    @property
    def shards(self) -> list[Shard]:
        return self.spec.listing.shards

    @property
    def identity(self) -> str:
        return self.claim.hash


@dataclass
class RunResult:
    committer: object | None  # pipeline.commit.committer.ShardCommitter
    incomplete: dict[str, str] = field(default_factory=dict)  # shard key -> reason
    aborted: str | None = None
    ended: float = 0.0
    consolidation: str | None = None  # why the commit records could not be consolidated (they stay commits)
    lease_lost: str | None = None  # why this run no longer holds the output, if it lost it
    interrupted: bool = False  # stopped by Ctrl-C (SIGINT): what was committed stays, the summary says so


@dataclass
class Plan:
    """What a job asks of the cluster: each stage's resources, and why each sized setting has its value
    (`default: ...`, `flag`, `config file`)."""

    stages: dict[str, Resources] = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)


class Job:
    """A shard job: subclasses set `name` and `config_class` and implement `spec` and `stages`."""

    name = "job"
    config_class: type = object

    def __init__(self, config, sources: dict[str, str] | None = None):
        self.config = config
        self.sources = sources or {}  # where each setting came from: "flag", "config file" (else default)
        # Ray, or this process (`pipeline.runner.executors`); a job whose config has no `executor` runs on Ray
        self.executor = executor_named(getattr(config, "executor", "ray"))

    # -- before Ray --------------------------------------------------------------------------------------------
    def spec(self) -> JobSpec:
        raise NotImplementedError

    def dry_run_lines(self, prepared: PreparedJob) -> list[str]:
        return []

    def needs_ray(self, surveyed: PreparedJob) -> bool:
        """Whether the run needs its executor at all (a rerun with nothing new does not even start Ray)."""
        return bool(surveyed.todo)

    # -- sizing and stages (Ray connected) ---------------------------------------------------------------------
    def resources(self, view: ClusterView) -> Plan:
        return Plan()

    def stages(self, plan: Plan) -> list[Stage]:
        raise NotImplementedError

    def start_line(self, plan: Plan) -> str | None:
        """One line printed before the run starts (what the job asks of the cluster)."""
        return None

    # -- the run -----------------------------------------------------------------------------------------------
    def before_execute(self, prepared: PreparedJob) -> None:
        """Runs with the output's lease held and its identity checked, before any shard is read."""

    def after_execute(self, prepared: PreparedJob, result: RunResult) -> None:
        """Runs after the stages ended, whatever ended them."""

    def on_batch(self, batch: pa.Table) -> None:
        """Every batch the stages hand back, committed or not (what was spent)."""

    def on_records(self, records: pa.Table) -> None:
        """Every shard's records once they are committed."""

    def progress_note(self) -> str:
        """A few words the progress line adds (scoring: how busy the devices are), or nothing."""
        return ""

    # -- the summary -------------------------------------------------------------------------------------------
    def summary_fields(self, prepared: PreparedJob, result: RunResult) -> dict:
        """The job's own summary fields (under its name in `summary.json`)."""
        return {}

    def summary_lines(self, summary: dict) -> list[str]:
        """The job's lines of the terminal summary (between the shell's head and tail)."""
        return []

    def every_sample_failed(self, summary: dict) -> bool:
        records = summary["records"]
        return bool(records["this_run"]) and records["errors"] == records["this_run"]
