"""Curation as a shard job (`pipeline.runner`): from committed score records to a curated corpus. Its shards are the
scores' committed score files; once the output's lease is held and its identity checked, two exact distributed
passes find the thresholds (`pipeline.curation.thresholds`); then per score shard the selected records and, with
`materialize`, the kept samples as shards in the input's format are committed through the manifest; with `report`,
an HTML report (`pipeline.curation.report_data`). `python -m jobs.curate` runs it; `curate` does the same for code
already connected to Ray."""

from __future__ import annotations

from collections import Counter

from pipeline.commit.identity import check_entries, read_identity
from pipeline.commit.manifest import damaged_files, read_manifest
from pipeline.commit.records import damaged_file
from pipeline.curation.config import CurateConfig
from pipeline.curation.filters import Filters, check_filters
from pipeline.curation.passes import compute_thresholds
from pipeline.curation.select import SELECTED_DIR, SELECTED_SCHEMA, SHARDS_DIR, SelectStage, selected_folder
from pipeline.curation.thresholds import ALL, KINDS, Thresholds
from pipeline.errors import InputError
from pipeline.io.listing import Shard, ShardListing, list_shards
from pipeline.io.uris import join
from pipeline.runner.job import Job, JobSpec, Plan, PreparedJob, RunResult
from pipeline.runner.prepare import check_writable, record_claim
from pipeline.runner.resources import ClusterView
from pipeline.runner.run import run_job
from pipeline.runner.stage import Resources, Stage
from pipeline.runner.summary import error_lines
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
        self.thresholds: Thresholds | None = None
        self.listing: ShardListing | None = None
        self.filters = Filters.of(config)
        self.resharded: dict | None = None

    def identity(self, scores_identity: str, thresholds: Thresholds | None) -> dict:
        c = self.config
        own = {"scores": scores_identity, "rule": c.rule,
               "thresholds": thresholds.as_dict() if thresholds and c.keep_fraction is not None else None,
               "materialize": c.materialize}
        if c.samples_per_shard is not None:
            own["samples_per_shard"] = c.samples_per_shard
        if self.filters.terms:  # only when set: outputs curated before filters existed keep their identity
            own["filters"] = self.filters.terms
        return own

    def spec(self) -> JobSpec:
        c = self.config
        self.listing, scores_identity = score_shards(c)
        self.filters = check_filters(self.filters, self.listing.shards)  # exit 2 naming `where`, nothing written
        for field, uri in written_locations(c):  # every one before the first byte, the report's too
            check_writable(uri, create=False, field=field)
        self._scores_identity = scores_identity
        later = ("thresholds",) if c.keep_fraction is not None else ()
        return JobSpec(job=self.name, output=c.output, listing=self.listing,
                       identity=self.identity(scores_identity, None), schema=SELECTED_SCHEMA,
                       partition=selected_folder, no_progress_timeout_s=c.no_progress_timeout_s, unit="kept",
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
        self.thresholds = compute_thresholds(c, prepared.shards, self.filters, self.executor, sweep=c.sweep_values)
        cuts = ", ".join(f"{k} {'none kept' if v is None else f'{v:.4f}'}" for k, v in self.thresholds.as_dict().items())
        return [
            f"UniFilter curation, dry run (no lease taken, nothing written): {c.scores} -> {c.output}",
            f"  rule       {c.rule} · threshold {cuts} (over every committed score shard)",
            *(f"  filters    {line}" for line in _filter_lines(self.thresholds.filters)),
            f"  shards     {scored} scored · {scored - len(keys)} already curated · {len(keys)} new",
            *(f"  note       {note}" for note in prepared.notes),
            f"  records    {records:,} score records in the new shards",
            f"  writes     selected/ per shard{_shards_written(c)}"
            f"{', an HTML report to ' + c.report if c.report else ''}",
            *sweep_lines(c, self.thresholds.sweep or []),
        ]

    def needs_ray(self, surveyed: PreparedJob) -> bool:
        """The threshold passes need Ray even with nothing new to select (a report, a keep-fraction's check)."""
        c = self.config
        return bool(surveyed.todo) or c.keep_fraction is not None or bool(c.report) or bool(c.samples_per_shard)

    def resources(self, view: ClusterView) -> Plan:
        return Plan({"select": Resources(num_cpus=1, max_actors=self.config.workers)},
                    {"workers": self.sources.get("workers", "default")})

    def before_execute(self, prepared: PreparedJob) -> None:
        """The threshold passes, under the lease: two jobs on one output never both make them."""
        sweep = self.config.sweep_values if self.config.report else None  # the report compares the rule with them
        self.thresholds = compute_thresholds(self.config, prepared.shards, self.filters, self.executor, sweep=sweep)
        if prepared.spec.identity_later:
            record_claim(prepared, self.identity(self._scores_identity, self.thresholds))

    def after_execute(self, prepared: PreparedJob, result: RunResult) -> None:
        """With samples_per_shard, once every score shard is committed: the kept samples resharded (exactly once,
        `pipeline.curation.reshard`); a shard it could not write is named with the incomplete ones."""
        if not self.config.samples_per_shard:
            return
        if result.incomplete or result.aborted or result.interrupted or result.lease_lost:
            self.resharded = {"waiting": "every score shard must be committed first: rerun to reshard"}
            return
        from pipeline.curation.reshard import reshard

        self.resharded = reshard(self.config, prepared.shards, self.filters, self.thresholds.by_group, self.executor)
        for name, reason in self.resharded["incomplete"].items():
            result.incomplete[f"shards/{name}"] = reason

    def stages(self, plan: Plan) -> list[Stage]:
        return [SelectStage(plan.stages["select"], self.config, self.thresholds.by_group, self.filters)]

    def summary_fields(self, prepared: PreparedJob, result: RunResult) -> dict:
        c, thresholds = self.config, self.thresholds
        entries = [*prepared.committed.values(), *(result.committer.entries if result.committer else [])]
        totals, examples, not_materializable = _totals(entries)
        filtered = _filtered(entries, self.filters.terms)
        by_kind = {}
        for kind in KINDS:
            kept = {int(k.split("/")[1]): v for k, v in totals["kept"].items() if k.startswith(kind + "/")}
            dropped = {int(k.split("/")[1]): v for k, v in totals["dropped"].items() if k.startswith(kind + "/")}
            if kept or dropped:
                by_kind[kind] = {"threshold": thresholds.for_kind(kind, c.per_kind), "kept": sum(kept.values()),
                                 "dropped": sum(dropped.values()), "kept_by_level": kept, "dropped_by_level": dropped}
        kept_total = sum(totals["kept"].values())
        scored_total = kept_total + sum(totals["dropped"].values())
        return {
            "scores": c.scores, "rule": c.rule, "thresholds": thresholds.as_dict(), "kept": kept_total,
            "scored": scored_total, "kept_fraction": round(kept_total / scored_total, 6) if scored_total else 0.0,
            "score_errors": {"by_category": dict(totals["by_category"].most_common()),
                             "by_reason": dict(totals["by_reason"].most_common()),
                             "examples": {k: examples[k] for k in dict(totals["by_reason"]) if k in examples}},
            "by_kind": by_kind, "materialized": c.materialize, "not_materializable": not_materializable,
            **({"filters": filtered} if filtered else {}),
            **({"resharded": self.resharded} if self.resharded else {}),
            "top_sources": _by_source(entries),
        }

    def every_sample_failed(self, summary: dict) -> bool:
        return False  # score errors are never selected; a curation whose every record is one fails nothing

    def summary_lines(self, summary: dict) -> list[str]:
        own = summary[self.name]
        cuts = ", ".join(f"{k} {'none kept' if v is None else f'{v:.4f}'}" for k, v in own["thresholds"].items())
        errors = sum(own["score_errors"]["by_category"].values())
        lines = [
            f"  rule       {own['rule']} · threshold {cuts} (records scoring at or above it are kept)",
            f"  kept       {own['kept']} of {own['scored']} scored records ({100 * own['kept_fraction']:.1f}%)"
            f" · {errors} error records never selected",
        ]
        if own.get("filters"):
            lines += [f"  filters    {line}" for line in _filter_lines(own["filters"])]
        if own.get("resharded"):
            r = own["resharded"]
            lines.append(f"  reshard    {r['waiting']}" if "waiting" in r else
                         f"  reshard    {', '.join(f'{n} {fmt} shards' for fmt, n in r['shards'].items())} of "
                         f"{r['samples_per_shard']} samples in shards/<format>/ · {r['written_now']} written now")
        if own.get("not_materializable"):
            lines.append(f"  unwritten  {own['not_materializable']} kept samples are no longer whole in the input "
                         "(their ids: each shard's commit record, stats.not_materializable)")
        for kind, k in own["by_kind"].items():
            levels = " · ".join(f"L{lv} {k['kept_by_level'].get(lv, 0)}/"
                                f"{k['kept_by_level'].get(lv, 0) + k['dropped_by_level'].get(lv, 0)}" for lv in range(4))
            lines.append(f"  {kind:10s} kept {k['kept']} of {k['kept'] + k['dropped']} · by predicted level {levels}")
        return lines + [line.replace("  error  ", "  scored-error", 1) for line in error_lines(own["score_errors"])]

    def write_report(self, summary: dict) -> str:
        """The HTML report of this run (`report`: its folder); returns its URI."""
        from pipeline.curation.report_data import write_curation_report

        return write_curation_report(self.config, self.listing.shards, self.thresholds, summary, self.filters,
                                     self.executor)


def _totals(entries: list[dict]) -> tuple[dict[str, Counter], dict[str, dict], int]:
    """Kept and dropped per kind and level, score errors by category and reason, over every shard's commit
    record (this run's and earlier ones')."""
    totals = {"kept": Counter(), "dropped": Counter(), "by_category": Counter(), "by_reason": Counter()}
    examples: dict[str, dict] = {}
    not_materializable = 0
    for entry in entries:
        stats = dict(entry.get("stats") or {})
        not_materializable += stats.get("not_materializable", {}).get("count", 0)
        if "errors_by_reason" in stats:  # curated before the summary shell: keys as they were
            stats["by_category"], stats["by_reason"] = stats["errors_by_category"], stats["errors_by_reason"]
            stats["examples"] = stats.get("error_examples", {})
        elif "by_reason" not in stats:  # curated before errors were counted by reason
            stats["by_category"] = stats["by_reason"] = stats.get("errors", {})
            stats["examples"] = {k: {"id": None, "shard": entry.get("shard"), "error": v}
                                 for k, v in stats.get("error_examples", {}).items()}
        for part in totals:
            totals[part].update(stats.get(part, {}))
        for reason, example in stats.get("examples", {}).items():
            examples.setdefault(reason, example)
    return totals, examples, not_materializable


def _by_source(entries: list[dict], shown: int = 20) -> list[dict]:
    """The input shards with the most scored records: scored, kept, and scored records per predicted level."""
    out = []
    for entry in entries:
        stats = entry.get("stats") or {}
        levels: Counter = Counter()
        for part in ("kept", "dropped"):
            for key, n in (stats.get(part) or {}).items():
                levels[key.rsplit("/", 1)[-1]] += n
        out.append({"source": entry.get("shard"), "scored": sum(levels.values()),
                    "kept": sum((stats.get("kept") or {}).values()), "levels": dict(levels)})
    return sorted(out, key=lambda s: (-s["scored"], str(s["source"])))[:shown]


def written_locations(c: CurateConfig) -> list[tuple[str, str]]:
    """Every folder a run writes, with the setting that names it: the output, its selected/ and shards/ (a file
    there would fail the first commit) and the report's folder (written last, after everything is committed)."""
    locations = [("output", c.output), ("output", join(c.output, SELECTED_DIR))]
    if c.materialize or c.samples_per_shard:
        locations.append(("output", join(c.output, SHARDS_DIR)))
    if c.report:
        locations.append(("report", c.report))
    return locations


def _shards_written(c: CurateConfig) -> str:
    if c.samples_per_shard:
        return f", the kept samples as shards of {c.samples_per_shard} in shards/<format>/ with sidecars"
    return ", the kept samples as shards in shards/" if c.materialize else ""


def _filter_lines(filters: dict) -> list[str]:
    """What the filters removed (of how many scored records, where known), and the metadata they found absent or
    of another type than the first shard's (treated as absent: such records fail every term on it)."""
    if not filters.get("terms"):
        return []
    each = " · ".join(f"{term!r} {n}" for term, n in filters["removed"].items())
    of = f" of {filters['scored']}" if "scored" in filters else ""
    lines = [f"{filters['removed_in_all']}{of} scored records removed before the rule · each term: {each}"
             + (f" · {filters['no_metadata']} without metadata" if filters["no_metadata"] else "")]
    if filters.get("mistyped"):
        lines.append("metadata of another type than the first shard's, treated as absent: " + " · ".join(
            f"{column} for {n} records" for column, n in filters["mistyped"].items()))
    return lines


def sweep_lines(config: CurateConfig, rows: list[dict]) -> list[str]:
    """The sweep as a table: per value of the rule, the threshold per group and the records kept per kind (the
    rule's own row marked)."""
    if not rows:
        return []
    unit = "fraction" if config.keep_fraction is not None else "min-score"
    own = config.keep_fraction if config.keep_fraction is not None else config.min_score
    groups = list(rows[0]["thresholds"])
    kinds = [k for k in KINDS if any(k in r["scored"] for r in rows)]
    head = "  ".join([f"{unit:>11s}", *(f"{'threshold ' + g:>21s}" for g in groups),
                      *(f"{'kept ' + k:>28s}" for k in kinds)])
    lines = [f"  sweep      {unit} -> threshold -> kept per kind (* the rule)", "  " + head]
    for row in rows:
        cuts = [f"{_cut_text(row['thresholds'][g]):>21s}" for g in groups]
        kept = [f"{_kept_text(row['kept'][k], row['scored'][k]):>28s}" for k in kinds]
        lines.append("  ".join([f"  {'*' if row['value'] == own else ' '} {row['value']:>9g}", *cuts, *kept]))
    return lines


def _cut_text(cut: float | None) -> str:
    return "none kept" if cut is None else f"{cut:.4f}"


def _kept_text(kept: int, scored: int) -> str:
    return f"{kept:,} of {scored:,} ({100 * kept / scored:.1f}%)"


def _filtered(entries: list[dict], terms: list[str]) -> dict | None:
    """What the filters removed, over every shard's commit record (before the rule: whatever the score)."""
    if not terms:
        return None
    removed, totals, mistyped = Counter({t: 0 for t in terms}), Counter(), Counter()
    for entry in entries:
        stats = (entry.get("stats") or {}).get("filtered") or {}
        removed.update(stats.get("removed", {}))
        mistyped.update(stats.get("mistyped", {}))
        totals.update({k: stats.get(k, 0) for k in ("removed_in_all", "no_metadata")})
    return {"terms": terms, "removed": {t: removed[t] for t in terms}, "removed_in_all": totals["removed_in_all"],
            "no_metadata": totals["no_metadata"], "mistyped": dict(mistyped)}


def curate(config: CurateConfig, progress: bool = True) -> tuple[CurationJob, dict]:
    """Select (and materialize) every committed score shard not yet curated; returns the job (for its report) and
    the summary."""
    job = CurationJob(config)
    return job, run_job(job, progress)


__all__ = ["ALL", "CurationJob", "curate"]
