"""Curation as a shard job (`pipeline.runner`): from committed score records to a curated corpus. Its shards are the
scores' committed score files; once the output's lease is held and its identity checked, two exact distributed
passes find the thresholds (`pipeline.curation.thresholds`); then per score shard the selected records and, with
`materialize`, the kept samples as shards in the input's format are committed through the manifest; with `report`,
an HTML report (`pipeline.curation.report_data`), written by the run itself. Its summary and the lines it prints are
`pipeline.curation.summary`'s. `python -m jobs.curate` runs it; `curate` does the same for code already connected
to Ray."""

from __future__ import annotations

from pipeline.commit.identity import check_entries, read_identity
from pipeline.commit.manifest import damaged_files, read_manifest
from pipeline.commit.records import damaged_file
from pipeline.curation.config import CurateConfig
from pipeline.curation.filters import Filters, check_filters
from pipeline.curation.passes import balance_caps, compute_thresholds, rank_distributions
from pipeline.curation.select import (
    DROPPED_DIR,
    SELECTED_DIR,
    SHARDS_DIR,
    SelectStage,
    record_schema,
    selected_folder,
    selected_or_dropped,
)
from pipeline.curation.summary import (
    balance_fields,
    balance_line,
    curation_fields,
    curation_lines,
    cuts_text,
    dropped_written,
    exports_written,
    filter_lines,
    shards_written,
    sweep_lines,
)
from pipeline.curation.thresholds import ALL, Thresholds
from pipeline.errors import InputError
from pipeline.io.listing import Shard, ShardListing, list_shards
from pipeline.io.uris import join
from pipeline.runner.job import Job, JobSpec, Plan, PreparedJob, RunResult
from pipeline.runner.prepare import check_writable, record_claim
from pipeline.runner.resources import ClusterView
from pipeline.runner.run import run_job
from pipeline.runner.stage import Resources, Stage
from pipeline.scoring.records import SCORES_DIR


def score_shards(config: CurateConfig) -> tuple[ShardListing, str]:
    """The committed score files (one shard each: `uri` the score file, `key` its input shard's, `aux` that input
    shard and `aux_format` its format) and the scores' identity hash."""
    entries = read_manifest(config.scores, field="scores")
    if not entries:
        raise InputError("scores", f"no committed score records at {config.scores} (a jobs.score output)")
    check_entries(config.scores, entries, field="scores")
    identity = read_identity(config.scores, field="scores") or {}
    if identity and identity.get("job") != "score":
        raise InputError("scores", f"{config.scores} is the output of a '{identity.get('job')}' job, not scores")
    inputs = {}
    if config.input:  # the corpus moved: find each shard by its key under the new root
        inputs = {s.key: s.uri for s in list_shards(config.input, config.format).shards}
    damaged = damaged_files(config.scores, entries)
    if damaged:  # cut, replaced or gone since it was committed: named, before anything is written
        shard, files = next(iter(damaged.items()))
        path, problem = next(iter(files.items()))
        raise damaged_file(config.scores, path, shard, problem, len(damaged), field="scores")
    shards = []
    for key, entry in sorted(entries.items()):
        source = inputs.get(key) if config.input else entry.get("input")
        fmt = config.format or entry.get("format")
        for f in (f for f in entry["files"] if f.startswith(f"{SCORES_DIR}/")):
            check = (entry.get("file_checks") or {}).get(f) or {}
            shards.append(Shard(join(config.scores, f), key, check.get("bytes"), source, fmt,
                                records=check.get("records"), sha256=check.get("sha256")))
    if config.materialize or config.samples_per_shard:
        missing = [s.key for s in shards if not (s.aux and s.aux_format)]
        if missing:
            raise InputError("input", f"the score records of {len(missing)} shards (e.g. {missing[0]}) do not name "
                                      "their input shard and format (scored before this version): set input and "
                                      "format to the scored corpus")
    return ShardListing(config.scores, shards), identity.get("identity_hash", "legacy")


class CurationJob(Job):
    name = "curate"
    config_class = CurateConfig

    def __init__(self, config: CurateConfig, sources: dict[str, str] | None = None):
        super().__init__(config, sources)
        self.rule = config.rule
        self.thresholds: Thresholds | None = None
        self.listing: ShardListing | None = None
        self.filters = Filters.of(config)
        self.resharded: dict | None = None
        self.exported: dict | None = None  # what `export_ids` wrote (or why not yet)
        self.report_uri: str | None = None  # where this run's report went (with `report`)

    def identity(self, scores_identity: str, thresholds: Thresholds | None) -> dict:
        c = self.config
        from_corpus = thresholds and self.rule.fixed_cut is None  # a given cut is in the rule already
        own = {"scores": scores_identity, "rule": self.rule.label,
               "thresholds": thresholds.as_dict() if from_corpus else None, "materialize": c.materialize}
        if c.samples_per_shard is not None:
            own["samples_per_shard"] = c.samples_per_shard
        if self.filters.terms:  # only when set: outputs curated before filters existed keep their identity
            own["filters"] = self.filters.terms
        if self.filters.exclusions:  # by content: a list changed under the same name is another curation
            own["exclude"] = self.filters.exclusions
        if c.write_dropped:
            own["write_dropped"] = True
        if self.filters.balance:  # the caps, once counted under the lease (as the thresholds are)
            b = self.filters.balance
            own["balance"] = {"column": b.column, "max_per_group": b.most, "caps": b.digest if b.counted else None}
        return own

    def spec(self) -> JobSpec:
        c = self.config
        self.listing, scores_identity = score_shards(c)
        self.filters = check_filters(self.filters, self.listing.shards)  # exit 2 naming `where`, nothing written
        for field, uri in written_locations(c):  # every one before the first byte, the report's too
            check_writable(uri, create=False, field=field)
        self._scores_identity = scores_identity
        later = (("thresholds",) if self.rule.fixed_cut is None else ()) + (("balance",) if c.balance_by else ())
        return JobSpec(job=self.name, output=c.output, listing=self.listing,
                       identity=self.identity(scores_identity, None),
                       schema=record_schema(c),
                       partition=selected_or_dropped if c.write_dropped else selected_folder,
                       no_progress_timeout_s=c.no_progress_timeout_s,
                       unit="records" if c.write_dropped else "kept",  # with the dropped ones, not all are kept
                       input=c.scores, identity_later=later)

    def dry_run_lines(self, prepared: PreparedJob) -> list[str]:
        """What a run would do, with the exact thresholds of the rule and of the sweep: Ray runs the two counting
        passes; no lease is taken and nothing is written."""
        c = self.config
        keys = list(dict.fromkeys(s.key for s in prepared.todo))
        entries = read_manifest(c.scores, field="scores")
        records = sum(entries[k].get("records", 0) for k in keys if k in entries)
        scored = len(dict.fromkeys(s.key for s in prepared.shards))
        self.executor.connect(False, self.name)
        self.filters = rank_distributions(prepared.shards, self.filters, self.executor)
        self.thresholds = compute_thresholds(c, prepared.shards, self.filters, self.executor,
                                             sweep=self.rule.sweep_values(c.sweep))
        self.filters = balance_caps(prepared.shards, self.filters, self.thresholds, c.per_kind, self.executor)
        return [
            f"UniFilter curation, dry run (no lease taken, nothing written): {c.scores} -> {c.output}",
            f"  rule       {self.rule.label} · threshold {cuts_text(self.thresholds.as_dict())} (over every "
            "committed score shard)",
            *([f"  balance    {balance_line(balance_fields(self.filters.balance, None))}"]
              if self.filters.balance else []),
            *(f"  filters    {line}" for line in filter_lines(self.thresholds.filters)),
            f"  shards     {scored} scored · {scored - len(keys)} already curated · {len(keys)} new",
            *(f"  note       {note}" for note in prepared.notes),
            f"  records    {records:,} score records in the new shards",
            f"  writes     selected/ per shard{dropped_written(c)}{shards_written(c)}{exports_written(c)}"
            f"{', an HTML report to ' + c.report if c.report else ''}",
            *sweep_lines(self.rule, self.thresholds.sweep or []),
        ]

    def needs_ray(self, surveyed: PreparedJob) -> bool:
        """The threshold passes need Ray even with nothing new to select (a report, a keep-fraction's check, the
        balance's caps)."""
        c = self.config
        return (bool(surveyed.todo) or self.rule.fixed_cut is None or bool(c.report)
                or bool(c.samples_per_shard) or bool(c.balance_by))

    def resources(self, view: ClusterView) -> Plan:
        return Plan({"select": Resources(num_cpus=1, max_actors=self.config.workers)},
                    {"workers": self.sources.get("workers", "default")})

    def before_execute(self, prepared: PreparedJob) -> None:
        """The threshold passes, under the lease: two jobs on one output never both make them."""
        c = self.config
        sweep = self.rule.sweep_values(c.sweep) if c.report else None  # the report compares the rule with them
        self.filters = rank_distributions(prepared.shards, self.filters, self.executor)  # with pct(column)
        self.thresholds = compute_thresholds(c, prepared.shards, self.filters, self.executor, sweep=sweep)
        self.filters = balance_caps(prepared.shards, self.filters, self.thresholds, c.per_kind, self.executor)
        if prepared.spec.identity_later:
            record_claim(prepared, self.identity(self._scores_identity, self.thresholds))

    def after_execute(self, prepared: PreparedJob, result: RunResult) -> None:
        """With samples_per_shard, once every score shard is committed: the kept samples resharded (exactly once,
        `pipeline.curation.reshard`); a shard it could not write is named with the incomplete ones."""
        unfinished = result.incomplete or result.aborted or result.interrupted or result.lease_lost
        if self.config.export_ids:
            self.exported = ({"waiting": "every score shard must be committed first: rerun to export"} if unfinished
                             else self._export(prepared, result))
        if not self.config.samples_per_shard:
            return
        if unfinished:
            self.resharded = {"waiting": "every score shard must be committed first: rerun to reshard"}
            return
        from pipeline.curation.reshard import reshard

        self.resharded = reshard(self.config, prepared.shards, self.filters, self.thresholds.by_group, self.executor)
        for name, reason in self.resharded["incomplete"].items():
            result.incomplete[f"shards/{name}"] = reason

    def _export(self, prepared: PreparedJob, result: RunResult) -> dict:
        from pipeline.curation.exports import export_ids

        entries = [*prepared.committed.values(), *(result.committer.entries if result.committer else [])]
        return export_ids(self.config.output, entries, prepared.shards, self.config.source.id_column,
                          ranked=bool(self.config.rank_by))

    def stages(self, plan: Plan) -> list[Stage]:
        return [SelectStage(plan.stages["select"], self.config, self.thresholds.by_group, self.filters)]

    def summary_fields(self, prepared: PreparedJob, result: RunResult) -> dict:
        """The summary's `curate` part, over every curated shard (`pipeline.curation.summary`); with `report`, the
        run's last step, under the lease: the HTML report drawn from it."""
        entries = [*prepared.committed.values(), *(result.committer.entries if result.committer else [])]
        own = curation_fields(self.config, self.thresholds, entries, self.filters.terms, self.resharded)
        if self.exported:
            own["exported"] = self.exported
        if self.filters.balance:
            own["balance"] = balance_fields(self.filters.balance, entries)
        if self.config.report:
            self.report_uri = self.write_report(own)
        return own

    def every_sample_failed(self, summary: dict) -> bool:
        return False  # score errors are never selected; a curation whose every record is one fails nothing

    def summary_lines(self, summary: dict) -> list[str]:
        return curation_lines(summary[self.name])

    def write_report(self, own: dict) -> str:
        """The HTML report of this run (`report`: its folder), from the summary's `curate` part; returns its URI."""
        from pipeline.curation.report_data import write_curation_report

        return write_curation_report(self.config, self.listing.shards, self.thresholds, own, self.filters,
                                     self.executor)


def written_locations(c: CurateConfig) -> list[tuple[str, str]]:
    """Every folder a run writes, with the setting that names it: the output, its selected/ and shards/ (a file
    there would fail the first commit) and the report's folder (written last, after everything is committed)."""
    locations = [("output", c.output), ("output", join(c.output, SELECTED_DIR))]
    if c.write_dropped:
        locations.append(("output", join(c.output, DROPPED_DIR)))
    if c.materialize or c.samples_per_shard:
        locations.append(("output", join(c.output, SHARDS_DIR)))
    if c.report:
        locations.append(("report", c.report))
    return locations


def curate(config: CurateConfig, progress: bool = True) -> dict:
    """Select (and materialize) every committed score shard not yet curated, and with `report` write the report;
    returns the summary (as `pipeline.scoring.score_dataset` does)."""
    return run_job(CurationJob(config), progress)


__all__ = ["ALL", "CurationJob", "curate"]
