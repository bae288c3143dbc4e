"""The data behind a curation run's HTML report (`pipeline.curation.report_html` draws it): histograms and counts
from the curation's own passes and commits, and example records with their images and text read back from a few
input shards (chosen evenly across the corpus, so the report never reads the whole of it).

Sections: for each predicted level, and for each kind just above and just below its threshold, `examples`
records; within a section, records are picked deterministically (by a hash of their id), so a rerun shows the
same ones.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pyarrow as pa

from pipeline.curation.config import CurateConfig
from pipeline.curation.filters import Filters
from pipeline.curation.rank import RANK_VALUE
from pipeline.curation.report_html import (
    MAX_IMAGES,
    Example,
    KindStats,
    ReportData,
    make_thumbnail,
    write_report,
)
from pipeline.curation.report_sections import Extras
from pipeline.curation.select import dropped_by, kept_records
from pipeline.curation.thresholds import KINDS, Thresholds, kept_curve
from pipeline.io.listing import Shard
from pipeline.io.samples import SourceOptions, read_samples
from pipeline.runner.executors import executor_named

EXCERPT_CHARS = 600
_COLUMNS = ["id", "source", "kind", "score", "label", "truncated", "n_images"]


def _stable(sample_id: str) -> str:
    return hashlib.sha1(sample_id.encode()).hexdigest()


def _candidates(config: CurateConfig, shards: list[Shard], filters: Filters, thresholds: Thresholds
                ) -> list[dict]:
    """Scored records of `report_shards` score shards spread evenly over the corpus, each marked `kept` as the
    selection decided it (filters and cut)."""
    n = min(config.report_shards, len(shards))
    picked = [shards[int(i)] for i in np.linspace(0, len(shards) - 1, n).round().astype(int)] if n else []
    rows = []
    for shard in dict.fromkeys(picked):
        filtered, keep = kept_records(shard, filters, thresholds.by_group, config.per_kind)
        columns = [*_COLUMNS, *([RANK_VALUE] if RANK_VALUE in filtered.table.column_names else [])]
        table = filtered.table.select(columns).append_column("kept", pa.array(keep))
        table = table.append_column("dropped_by", pa.array(dropped_by(filtered, keep), pa.string()))
        rows += [r for r, ok in zip(table.to_pylist(), filtered.scored) if ok]
    return rows


_DROPPED_BY = {"threshold": "below the threshold", "where": "removed by --where",
               "min_images": "fewer images than --min-images", "truncated": "truncated (--drop-truncated)",
               "balance": "over its group's cap (--balance-by)"}


def decision(row: dict) -> str:
    """What the selection did with a record, and the rule that decided: 'kept', or 'dropped: <why>'."""
    if row["kept"]:
        return "kept"
    rule = row.get("dropped_by") or "threshold"
    if rule.startswith("exclude:"):
        return f"dropped: on the exclusion list {rule.removeprefix('exclude:')}"
    return f"dropped: {_DROPPED_BY.get(rule, rule)}"


def _ranked(row: dict) -> float:
    """What a record is ranked by: its fused value with --rank-by (none: below every cut), else its score."""
    if RANK_VALUE not in row:
        return row["score"]
    value = row[RANK_VALUE]
    return -np.inf if value is None or np.isnan(value) else value


def _sections(config: CurateConfig, thresholds: Thresholds, rows: list[dict]) -> list[tuple[str, list[dict]]]:
    n = config.examples
    sections = []
    for level in (3, 2, 1, 0):
        at_level = sorted((r for r in rows if r["label"] == level), key=lambda r: _stable(r["id"]))[:n]
        sections.append((f"Predicted level {level}", sorted(at_level, key=lambda r: -r["score"])))
    for kind in KINDS:
        cut = thresholds.for_kind(kind, config.per_kind)
        of_kind = [r for r in rows if r["kind"] == kind]
        if cut is None or not of_kind:
            continue
        above = sorted((r for r in of_kind if r["kept"]), key=_ranked)[:n]
        below = sorted((r for r in of_kind if not r["kept"] and _ranked(r) < cut), key=lambda r: -_ranked(r))[:n]
        name = "captions" if kind == "caption" else "documents"
        sections.append((f"Just above the threshold ({name}, {cut:.4f}): kept", above))
        sections.append((f"Just below the threshold ({name}): dropped", below))
    for kept, name in ((True, "kept"), (False, "dropped")):  # beside the grids: what the rule does at random
        picked = sorted((r for r in rows if r["kept"] == kept), key=lambda r: _stable(r["id"]))[:n]
        sections.append((f"A random sample of the {name} records", picked))
    return sections


def _extras(config: CurateConfig, thresholds: Thresholds, own: dict) -> Extras:
    """The sections for choosing a rule, from the passes' counts and the summary."""
    rule = config.rule
    extras = Extras(sweep=thresholds.sweep or [], rule_value=rule.value, filters=own.get("filters"),
                    sources=own.get("top_sources", []), sweep_unit=rule.unit)
    for kind in KINDS:
        counts = thresholds.counts.get(kind)
        if counts is None or not counts.scored:
            continue
        extras.curves[kind] = kept_curve(counts)
        kept = own["by_kind"].get(kind, {}).get("kept", 0)
        extras.chosen[kind] = (thresholds.for_kind(kind, config.per_kind), kept / counts.scored)
        plot = thresholds.plots.get(kind)
        extras.outliers[kind] = {"low": counts.low, "high": counts.high, "below0": counts.below,
                                 "above3": counts.above, "left_out": plot.below + plot.above if plot else 0}
    return extras


def fetch_examples(shard: dict, fmt: str, ids: list[str], options: dict) -> dict[str, dict]:
    """Texts and image thumbnails of the wanted samples of one input shard. Thumbnails are made here, in the
    task that read the images: the driver never decodes a full image."""
    wanted, found = set(ids), {}
    for row in read_samples(Shard(**shard), fmt, SourceOptions.model_validate(options)):
        if row["id"] not in wanted or row["error"]:
            continue
        texts = [t for t in row["texts"] or [] if t]
        images = [i for i in row["images"] or [] if i is not None][:MAX_IMAGES]
        found[row["id"]] = {"text": "\n\n".join(texts)[:EXCERPT_CHARS],
                            "images": [make_thumbnail(i) for i in images]}
    return found


def build_report_data(config: CurateConfig, shards: list[Shard], thresholds: Thresholds, own: dict,
                      filters: Filters | None = None, executor=None) -> ReportData:
    """The report's data, from the passes' counts, the summary's `curate` part (`own`) and examples read back."""
    rows = _candidates(config, shards, filters or Filters(), thresholds)
    sections = _sections(config, thresholds, rows)
    needed: dict[str, set[str]] = {}
    for _, records in sections:
        for r in records:
            needed.setdefault(r["source"], set()).add(r["id"])
    inputs = {s.key: s for s in shards}
    calls = {key: ({"uri": inputs[key].aux, "key": key}, inputs[key].aux_format, sorted(ids),
                   config.source.model_dump())
             for key, ids in needed.items() if key in inputs and inputs[key].aux and inputs[key].aux_format}
    content: dict[tuple[str, str], dict] = {}
    for key, outcome in zip(calls, (executor or executor_named(config.executor)).tasks(fetch_examples, calls.values())):
        if outcome.error is not None:  # an input shard the report cannot read shows as such, nothing more
            continue
        for sample_id, data in outcome.value.items():
            content[(key, sample_id)] = data
    kinds = []
    for kind in KINDS:
        if kind not in thresholds.plots:
            continue
        plot = thresholds.plots[kind]
        k = own["by_kind"].get(kind, {})
        kinds.append(KindStats(kind, plot.edges, plot.counts, thresholds.for_kind(kind, config.per_kind),
                               k.get("kept", 0), k.get("dropped", 0), k.get("kept_by_level", {}),
                               k.get("dropped_by_level", {}), plot.below + plot.above))
    examples = []
    for heading, records in sections:
        shown = []
        for r in records:
            data = content.get((r["source"], r["id"]), {"text": "(the input shard could not be read for this report)",
                                                       "images": []})
            shown.append(Example(r["id"], r["source"], r["kind"], float(r["score"]), r["label"], data["text"],
                                 data["images"], r["truncated"], r["n_images"], decision(r)))
        examples.append((heading, shown))
    rule = config.rule.label
    return ReportData(
        title=f"UniFilter curation: {rule}", scores_uri=config.scores, rule=rule, kinds=kinds,
        errors_by_reason=own["score_errors"]["by_reason"],
        error_examples=own["score_errors"]["examples"], sections=examples,
        generated_at=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), extras=_extras(config, thresholds, own))


def write_curation_report(config: CurateConfig, shards: list[Shard], thresholds: Thresholds, own: dict,
                          filters: Filters | None = None, executor=None) -> str:
    """Write the report to `config.report` (`index.html`); returns its URI."""
    return write_report(config.report, build_report_data(config, shards, thresholds, own, filters, executor))
