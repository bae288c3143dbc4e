"""Curation: from committed score records to a curated corpus. `python -m jobs.curate` calls `prepare_curation`
(no Ray: the scores, the output), `compute_thresholds` (two exact distributed passes, `pipeline.selection`), then
`run_curation` (one shard job: per score shard, the selected records and, with `materialize`, the kept samples
as shards in the input's format, committed through the manifest) and, with `report`, `pipeline.curation_report`.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline import selection
from pipeline.errors import Category, InputError, ShardFault
from pipeline.manifest import check_entries, read_json, read_manifest
from pipeline.materialize import MISSING_IDS_SHOWN, materialize
from pipeline.runner import (
    PreparedJob,
    ShardJob,
    Stage,
    check_writable,
    common_summary,
    execute,
    prepare,
    summary_tail,
    write_summary,
)
from pipeline.sinks import SCORES_DIR, ErrorCounts
from pipeline.sources import SHARD_END, SourceOptions, shard_end, shard_failed
from pipeline.storage import (
    Shard,
    ShardListing,
    filesystem_for,
    join,
    list_shards,
    normalize_uri,
    output_name,
)

SELECTED_DIR = "selected"
SHARDS_DIR = "shards"
SELECTED_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("kind", pa.string()),
                             ("score", pa.float32()), ("label", pa.int8()), ("key", pa.string()),
                             ("url", pa.string())])
_ROW_SCHEMA = SELECTED_SCHEMA.append(pa.field("ordinal", pa.int64())).append(pa.field("meta", pa.string())).append(
    pa.field("error", pa.string()))
_SCORE_COLUMNS = ["id", "source", "kind", "score", "label", "error", "key", "url"]


class CurateConfig(BaseModel):
    """`python -m jobs.curate`: every field is a YAML key and a `--flag`."""

    model_config = ConfigDict(extra="forbid")

    scores: str = Field(description="a scoring job's output (its committed records are read)")
    output: str = Field(description="where selected/, shards/ (with materialize) and summary.json go")
    min_score: float | None = Field(None, allow_inf_nan=False, description="keep records scoring at least this")
    keep_fraction: float | None = Field(None, gt=0, le=1, description="keep this share of the best-scored records")
    per_kind: bool = Field(False, description="apply the rule within each kind (captions, documents) separately")
    input: str | None = Field(None, description="the scored corpus, if it moved since it was scored (default: the "
                                                "shards the score records name)")
    format: Literal["webdataset", "parquet", "obelics", "interleaved-wds"] | None = Field(
        None, description="the scored corpus' format")
    materialize: bool = Field(False, description="also write the kept samples as shards in the input's format")
    report: str | None = Field(None, description="write an HTML report (index.html) to this directory")
    examples: int = Field(8, ge=1, le=64, description="example records per report section")
    report_shards: int = Field(8, ge=1, description="input shards the report reads its examples from")
    histogram_bins: int = Field(50, ge=5, le=500, description="bins of the report's score histograms")
    workers: int = Field(2, ge=1, description="most selection workers (one input shard per call)")
    source: SourceOptions = Field(default_factory=SourceOptions, description="how inputs are read")
    no_progress_timeout_s: float = Field(3600.0, gt=0, description="how long the job may make no progress")

    @model_validator(mode="after")
    def _rule(self) -> CurateConfig:
        if (self.min_score is None) == (self.keep_fraction is None):
            raise ValueError("set exactly one of field 'min_score' and field 'keep_fraction'")
        if (self.input is None) != (self.format is None):
            raise ValueError("fields 'input' and 'format' go together")
        return self

    @property
    def rule(self) -> str:
        rule = f"min-score {self.min_score:g}" if self.min_score is not None else f"keep-fraction {self.keep_fraction:g}"
        return rule + (" per kind" if self.per_kind else "")


@dataclass
class Thresholds:
    """The cut per group (a kind, or `all`), and what the passes counted on the way."""

    by_group: dict[str, float | None]
    counts: dict[str, selection.KindCounts]
    errors: Counter
    plots: dict[str, tuple[list[float], list[int]]] = field(default_factory=dict)  # kind -> (edges, counts)

    def for_kind(self, kind: str, per_kind: bool) -> float | None:
        return self.by_group.get(kind if per_kind else selection.ALL)

    def as_dict(self) -> dict:
        return {k: v for k, v in sorted(self.by_group.items())}


@dataclass
class CurationPlan:
    config: CurateConfig
    listing: ShardListing  # per committed score shard: uri = its score file, key and aux = the input shard's
    scores_identity: str
    started: float


def prepare_curation(config: CurateConfig, started: float | None = None, dry_run: bool = False) -> CurationPlan:
    """Everything before Ray: the committed score records, the input (if named), the output (created unless
    `dry_run`)."""
    if normalize_uri(config.output).rstrip("/") == normalize_uri(config.scores).rstrip("/"):
        raise InputError("output", f"{config.output} is the scores' own output: curation writes its records, shards "
                                   "and summary elsewhere (choose another output)")
    entries = read_manifest(config.scores, field="scores")
    if not entries:
        raise InputError("scores", f"no committed score records at {config.scores} (a jobs.score output)")
    check_entries(config.scores, entries)
    identity = read_json(join(config.scores, "_output.json"), field="scores") or {}
    if identity and identity.get("job") != "score":
        raise InputError("scores", f"{config.scores} is the output of a '{identity.get('job')}' job, not scores")
    inputs = {}
    if config.input:  # the corpus moved: find each shard by its key under the new root
        inputs = {s.key: s.uri for s in list_shards(config.input, config.format).shards}
    shards = []
    for key, entry in sorted(entries.items()):
        source = inputs.get(key) if config.input else entry.get("input")
        fmt = config.format or entry.get("format")
        for f in (f for f in entry["files"] if f.startswith(f"{SCORES_DIR}/")):
            shards.append(Shard(join(config.scores, f), key, None, source, fmt))
    if config.materialize:
        missing = [s.key for s in shards if not (s.aux and s.aux_format)]
        if missing:
            raise InputError("input", f"the score records of {len(missing)} shards (e.g. {missing[0]}) do not name "
                                      "their input shard and format (scored before this version): set input and "
                                      "format to the scored corpus")
    check_writable(config.output, create=not dry_run)
    return CurationPlan(config, ShardListing(config.scores, shards), identity.get("identity_hash", "legacy"),
                        started or time.time())


def compute_thresholds(plan: CurationPlan) -> Thresholds:
    """Two passes of Ray Data over the score files: exact thresholds, and the histograms on the way. A fixed
    min_score with no report needs neither: no pass is made."""
    import ray

    config = plan.config
    if config.min_score is not None and not config.report:
        cut = float(np.float32(config.min_score))
        return Thresholds({name: cut for name in (selection.KINDS if config.per_kind else [selection.ALL])},
                          {}, Counter())
    fs, _ = filesystem_for(config.scores)
    paths = [filesystem_for(s.uri)[1] for s in plan.listing.shards]
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=["kind", "score", "error", "label"])
    counts, errors = selection.merge_pass_one(
        ds.map_batches(selection.pass_one, batch_size=None, batch_format="pyarrow").take_all())
    groups = list(selection.KINDS) if config.per_kind else [selection.ALL]
    by_group: dict[str, float | None] = {}
    cut_bins, needed = {}, {}
    for name in groups:
        c = counts.get(name, selection.KindCounts())
        if config.min_score is not None:
            by_group[name] = float(np.float32(config.min_score))
            continue
        k = selection.keep_count(config.keep_fraction, c.scored)
        if k == 0:
            by_group[name] = None  # nothing kept
        else:
            cut_bins[name], needed[name] = selection.cut_bin(c, k)
    edges = {kind: selection.plot_edges(counts.get(kind, selection.KindCounts()), config.histogram_bins)
             for kind in selection.KINDS if kind in counts and counts[kind].scored}
    rows = ds.map_batches(selection.pass_two, fn_kwargs={"cut_bins": cut_bins, "edges": edges}, batch_size=None,
                          batch_format="pyarrow").take_all()
    low_bins = {name: np.zeros(selection.BINS, dtype=np.int64) for name in cut_bins}
    plots = {kind: np.zeros(len(e) - 1, dtype=np.int64) for kind, e in edges.items()}
    for row in rows:
        for name, entry in json.loads(row["counts"]).items():
            if name in low_bins and "low_bins" in entry:
                low_bins[name] += selection._dense(entry["low_bins"])
            if name in plots and entry.get("plot") is not None:
                plots[name] += np.asarray(entry["plot"], dtype=np.int64)
    for name, b in cut_bins.items():
        by_group[name] = selection.threshold_in_bin(b, needed[name], low_bins[name])
    return Thresholds(by_group, counts, errors, {k: (edges[k], plots[k].tolist()) for k in plots})


class Selector:
    """A selection worker: per score shard, the records at or above the cut (never error records), their counts
    by kind and level, and with `materialize` the kept samples written as a shard in the input's format."""

    def __init__(self, config: dict, thresholds: dict, output: str):
        self.config = CurateConfig.model_validate(config)
        self.thresholds, self.output = thresholds, output

    def _cut(self, kind: str) -> float | None:
        return self.thresholds.get(kind if self.config.per_kind else selection.ALL)

    def __call__(self, batch: pa.Table):
        for shard in (Shard(**s) for group in batch.column("shards").to_pylist() for s in group):
            try:
                yield self._select(shard)
            except Exception as err:  # noqa: BLE001 - whatever it is, the shard stays uncommitted and is named
                fault = err if isinstance(err, ShardFault) else ShardFault(
                    Category.INTERNAL, f"selecting from {shard.key} failed ({type(err).__name__}: {err})")
                yield pa.Table.from_pylist([{k: v for k, v in shard_failed(shard.key, fault).items()
                                             if k in _ROW_SCHEMA.names}], schema=_ROW_SCHEMA)

    def _select(self, shard: Shard) -> pa.Table:
        fs, path = filesystem_for(shard.uri)
        try:
            with fs.open_input_file(path) as f:
                table = pq.read_table(f, columns=_SCORE_COLUMNS)
        except OSError as err:
            raise ShardFault(Category.IO, f"cannot read {shard.uri}: {err}") from None
        # A score file holds every sample of its input shard in reading order: a record's row is its position in
        # the input (what Parquet rows are matched by when materializing; their ids may repeat).
        table = table.append_column("ordinal", pa.array(np.arange(table.num_rows, dtype=np.int64)))
        cut = np.array([self._cut(k) if self._cut(k) is not None else np.inf for k in table.column("kind").to_pylist()],
                       dtype=np.float64)
        scores = table.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
        ok = table.column("error").is_null().to_numpy(zero_copy_only=False) & np.isfinite(scores)
        keep = ok & (np.nan_to_num(scores, nan=-np.inf) >= cut)
        stats = {"kept": Counter(), "dropped": Counter()}
        errors = ErrorCounts()
        for sample_id, kind, label, k, good, err in zip(
                table.column("id").to_pylist(), table.column("kind").to_pylist(), table.column("label").to_pylist(),
                keep, ok, table.column("error").to_pylist()):
            if not good:
                errors.add(err or "score: no finite score", None, sample_id, shard.key)
            else:
                stats["kept" if k else "dropped"][f"{kind}/{label}"] += 1
        kept = table.filter(pa.array(keep))
        files = []
        if self.config.materialize and kept.num_rows:
            if not shard.aux:
                raise ShardFault(Category.CONFIG, f"the input has no shard {shard.key} (set input to the scored corpus)")
            name = output_name(shard.key) + "." + shard.key.rsplit(".", 1)[-1]
            done = materialize(shard.aux_format, shard.aux, kept, join(self.output, SHARDS_DIR, name),
                               self.config.source)
            files.append(f"{SHARDS_DIR}/{name}")
            if done.missing:  # kept, but no longer whole in the input: named, the rest written
                stats["not_materializable"] = {"count": len(done.missing), "ids": done.missing[:MISSING_IDS_SHOWN]}
        rows = kept.select(SELECTED_SCHEMA.names).to_pylist()
        for i, row in enumerate(rows):
            row.update(ordinal=i, meta=None, error=None)
        marker = {**{k: None for k in _ROW_SCHEMA.names}, **{k: v for k, v in shard_end(shard.key, len(rows)).items()
                                                            if k in _ROW_SCHEMA.names}}
        marker["meta"] = json.dumps({"artifacts": files, "stats": {**{k: dict(v) for k, v in stats.items()},
                                                               **errors.as_summary()}})
        return pa.Table.from_pylist(rows + [marker], schema=_ROW_SCHEMA)


def run_curation(plan: CurationPlan, thresholds: Thresholds, progress: bool = True) -> tuple[PreparedJob, dict]:
    """Select (and materialize) every committed score shard not yet curated; returns the summary."""
    config = plan.config
    identity = {"scores": plan.scores_identity, "rule": config.rule,
                "thresholds": thresholds.as_dict() if config.keep_fraction is not None else None,
                "materialize": config.materialize}
    spec = ShardJob(job="curate", output=config.output, listing=plan.listing, identity=identity,
                    schema=SELECTED_SCHEMA, partition=lambda table: [SELECTED_DIR] * table.num_rows,
                    no_progress_timeout_s=config.no_progress_timeout_s, unit="kept")
    prepared = prepare(spec, plan.started)
    stage = Stage("select", Selector, {"config": config.model_dump(), "thresholds": thresholds.by_group,
                                       "output": config.output},
                  num_cpus=1, max_actors=config.workers)
    result = execute(prepared, [stage], progress)
    common = common_summary(prepared, result)
    entries = [*prepared.committed.values(), *result.committer.entries]
    totals = {"kept": Counter(), "dropped": Counter(), "errors_by_category": Counter(),
              "errors_by_reason": Counter()}
    error_examples: dict[str, dict] = {}
    not_materializable = 0
    for entry in entries:
        stats = dict(entry.get("stats") or {})
        not_materializable += stats.get("not_materializable", {}).get("count", 0)
        if "errors_by_reason" not in stats:  # curated before errors were counted by reason
            stats["errors_by_category"] = stats["errors_by_reason"] = stats.get("errors", {})
            stats["error_examples"] = {k: {"id": None, "shard": entry.get("shard"), "error": v}
                                       for k, v in stats.get("error_examples", {}).items()}
        for part in totals:
            totals[part].update(stats.get(part, {}))
        for reason, example in stats.get("error_examples", {}).items():
            error_examples.setdefault(reason, example)
    by_kind = {}
    for kind in selection.KINDS:
        kept = {int(k.split("/")[1]): v for k, v in totals["kept"].items() if k.startswith(kind + "/")}
        dropped = {int(k.split("/")[1]): v for k, v in totals["dropped"].items() if k.startswith(kind + "/")}
        if kept or dropped:
            by_kind[kind] = {"threshold": thresholds.for_kind(kind, config.per_kind), "kept": sum(kept.values()),
                             "dropped": sum(dropped.values()), "kept_by_level": kept, "dropped_by_level": dropped}
    kept_total = sum(totals["kept"].values())
    scored_total = kept_total + sum(totals["dropped"].values())
    summary = {
        "scores": config.scores, "output": config.output, "rule": config.rule, "thresholds": thresholds.as_dict(),
        "shards": {k: common["shards"][k] for k in ("total", "already_committed", "new", "committed_this_run",
                                                   "incomplete")},
        "incomplete_reasons": common["incomplete_reasons"],
        "kept": kept_total, "scored": scored_total,
        "kept_fraction": round(kept_total / scored_total, 6) if scored_total else 0.0,
        "errors": sum(totals["errors_by_category"].values()),
        "errors_by_category": dict(totals["errors_by_category"].most_common()),
        "errors_by_reason": dict(totals["errors_by_reason"].most_common()),
        "error_examples": {k: error_examples[k] for k in dict(totals["errors_by_reason"]) if k in error_examples},
        "by_kind": by_kind, "materialized": config.materialize, "not_materializable": not_materializable,
        "elapsed_s": common["elapsed_s"],
    }
    for key in ("aborted", "interrupted"):
        if key in common:
            summary[key] = common[key]
    write_summary(prepared, result, summary)
    return prepared, summary


def dry_run_plan(config: CurateConfig) -> str:
    """What a run would do: committed score shards and records, what is already curated. Starts nothing."""
    plan = prepare_curation(config, dry_run=True)
    entries = read_manifest(config.scores, field="scores")
    curated = read_manifest(config.output)
    keys = list(dict.fromkeys(s.key for s in plan.listing.shards))
    new = [k for k in keys if k not in curated]
    records = sum(entries[k].get("records", 0) for k in new)
    return "\n".join([
        f"UniFilter curation, dry run (nothing started, nothing written): {config.scores} -> {config.output}",
        f"  rule       {config.rule} (the threshold is computed when the job runs)",
        f"  shards     {len(keys)} scored · {len(keys) - len(new)} already curated · {len(new)} new",
        f"  records    {records:,} score records in the new shards",
        f"  writes     selected/ per shard{', the kept samples as shards in shards/' if config.materialize else ''}"
        f"{', an HTML report to ' + config.report if config.report else ''}",
    ])


def format_summary(summary: dict) -> str:
    s = summary["shards"]
    cuts = ", ".join(f"{k} {'none kept' if v is None else f'{v:.4f}'}" for k, v in summary["thresholds"].items())
    lines = [
        f"UniFilter curation: {summary['scores']} -> {summary['output']}",
        f"  rule       {summary['rule']} · threshold {cuts} (records scoring at or above it are kept)",
        f"  shards     {s['total']} total · {s['already_committed']} already curated · {s['committed_this_run']} "
        f"now · {len(s['incomplete'])} incomplete",
        f"  kept       {summary['kept']} of {summary['scored']} scored records ({100 * summary['kept_fraction']:.1f}%)"
        f" · {summary['errors']} error records never selected",
    ]
    if summary.get("not_materializable"):
        lines.append(f"  unwritten  {summary['not_materializable']} kept samples are no longer whole in the input "
                     "(their ids: each shard's commit record, stats.not_materializable)")
    for kind, k in summary["by_kind"].items():
        levels = " · ".join(f"L{lv} {k['kept_by_level'].get(lv, 0)}/{k['kept_by_level'].get(lv, 0) + k['dropped_by_level'].get(lv, 0)}"
                            for lv in range(4))
        lines.append(f"  {kind:10s} kept {k['kept']} of {k['kept'] + k['dropped']} · by predicted level {levels}")
    return "\n".join(lines + summary_tail(summary))


__all__ = ["CurateConfig", "compute_thresholds", "dry_run_plan", "format_summary", "prepare_curation", "run_curation",
           "SELECTED_SCHEMA", "SHARD_END"]
