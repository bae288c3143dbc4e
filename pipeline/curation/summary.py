"""Curation's own part of the run summary (`summary["curate"]`) and its text: totals over every shard's commit record
(this run's and earlier ones', stats of older layouts read as they were written), the lines of the end-of-run
screen and of a dry run, and the sweep table."""

from __future__ import annotations

from collections import Counter

from pipeline.curation.config import CurateConfig
from pipeline.curation.rule import Rule
from pipeline.curation.thresholds import ALL, KINDS, Thresholds
from pipeline.runner.summary import error_lines


def curation_fields(config: CurateConfig, thresholds: Thresholds, entries: list[dict], terms: list[str],
                    resharded: dict | None) -> dict:
    """The summary's `curate` part, over the commit records `entries` of every curated shard; `terms`: the filters'
    conditions; `resharded`: what resharding did (None without `samples_per_shard`)."""
    rule = config.rule
    totals, examples, not_materializable = _totals(entries)
    filtered = _filtered(entries, terms)
    by_kind = {}
    for kind in KINDS:
        kept = {int(k.split("/")[1]): v for k, v in totals["kept"].items() if k.startswith(kind + "/")}
        dropped = {int(k.split("/")[1]): v for k, v in totals["dropped"].items() if k.startswith(kind + "/")}
        if kept or dropped:
            by_kind[kind] = {"threshold": thresholds.for_kind(kind, rule.per_kind), "kept": sum(kept.values()),
                             "dropped": sum(dropped.values()), "kept_by_level": kept, "dropped_by_level": dropped}
    kept_total = sum(totals["kept"].values())
    scored_total = kept_total + sum(totals["dropped"].values())
    return {
        "scores": config.scores, "rule": rule.label, "thresholds": thresholds.as_dict(), "kept": kept_total,
        "scored": scored_total, "kept_fraction": round(kept_total / scored_total, 6) if scored_total else 0.0,
        "score_errors": {"by_category": dict(totals["by_category"].most_common()),
                         "by_reason": dict(totals["by_reason"].most_common()),
                         "examples": {k: examples[k] for k in dict(totals["by_reason"]) if k in examples}},
        "by_kind": by_kind, "materialized": config.materialize, "not_materializable": not_materializable,
        **({"filters": filtered} if filtered else {}),
        **({"resharded": resharded} if resharded else {}),
        "top_sources": _by_source(entries),
    }


def curation_lines(own: dict) -> list[str]:
    """The end-of-run screen's curation lines, from the summary's `curate` part."""
    errors = sum(own["score_errors"]["by_category"].values())
    cuts = cuts_text(own["thresholds"])
    lines = [
        f"  rule       {own['rule']} · threshold {cuts} (records scoring at or above it are kept)",
        f"  kept       {own['kept']} of {own['scored']} scored records ({100 * own['kept_fraction']:.1f}%)"
        f" · {errors} error records never selected",
    ]
    if own.get("filters"):
        lines += [f"  filters    {line}" for line in filter_lines(own["filters"])]
    if own.get("resharded"):
        r = own["resharded"]
        lines.append(f"  reshard    {r['waiting']}" if "waiting" in r else
                     f"  reshard    {', '.join(f'{n} {fmt} shards' for fmt, n in r['shards'].items())} of "
                     f"{r['samples_per_shard']} samples in shards/<format>/ · {r['written_now']} written now")
    if own.get("balance"):
        lines.append(f"  balance    {balance_line(own['balance'])}")
    if own.get("exported"):
        e = own["exported"]
        lines.append(f"  exported   {e['waiting']}" if "waiting" in e else
                     f"  exported   {e['kept']} kept ids to {e['kept_ids']}" +
                     (f" · {e['uids']} uids to {e['uids_npy']} ({e['without_uid']} kept records without one)"
                      if "uids_npy" in e else " · no uid column in the metadata: no uids.npy"))
    if own.get("not_materializable"):
        lines.append(f"  unwritten  {own['not_materializable']} kept samples are no longer whole in the input "
                     "(their ids: each shard's commit record, stats.not_materializable)")
    for kind, k in own["by_kind"].items():
        levels = " · ".join(f"L{lv} {k['kept_by_level'].get(lv, 0)}/"
                            f"{k['kept_by_level'].get(lv, 0) + k['dropped_by_level'].get(lv, 0)}" for lv in range(4))
        lines.append(f"  {kind:10s} kept {k['kept']} of {k['kept'] + k['dropped']} · by predicted level {levels}")
    return lines + [line.replace("  error  ", "  scored-error", 1) for line in error_lines(own["score_errors"])]


def cuts_text(by_group: dict[str, float | None]) -> str:
    """The cut per group, e.g. `caption 1.2500, interleaved none kept`."""
    return ", ".join(f"{group} {_cut_text(cut)}" for group, cut in by_group.items())


def shards_written(config: CurateConfig) -> str:
    """What a run writes besides selected/, as the dry run says it."""
    if config.samples_per_shard:
        return f", the kept samples as shards of {config.samples_per_shard} in shards/<format>/ with sidecars"
    return ", the kept samples as shards in shards/" if config.materialize else ""


def balance_fields(balance, entries: list[dict] | None) -> dict:
    """The summary's `balance`: the cap, the groups over it and the records it dropped (counted in the shards'
    commit records, `entries`; or, for a dry run, as the caps say they would be)."""
    removed = balance.removed if entries is None else sum((e.get("stats") or {}).get("balanced", 0) for e in entries)
    return {"column": balance.column, "max_per_group": balance.most, "groups_capped": len(balance.caps),
            "removed": removed}


def balance_line(b: dict) -> str:
    return (f"at most {b['max_per_group']} kept per {b['column']} · {b['groups_capped']} groups over it · "
            f"{b['removed']} records kept by the rule dropped by the cap")


def dropped_written(config: CurateConfig) -> str:
    return ", the dropped records with the rule that removed each in dropped/" if config.write_dropped else ""


def exports_written(config: CurateConfig) -> str:
    return (", kept_ids.parquet (and uids.npy where the metadata has DataComp's uid) once every shard is committed"
            if config.export_ids else "")


def filter_lines(filters: dict) -> list[str]:
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


def sweep_lines(rule: Rule, rows: list[dict]) -> list[str]:
    """The sweep as a table: per value of the rule, the threshold per group and the records kept per kind (the
    rule's own row marked)."""
    if not rows:
        return []
    groups = [g for g in rows[0]["thresholds"] if g == ALL or any(r["scored"].get(g) for r in rows)]  # kinds there
    kinds = [k for k in KINDS if any(r["scored"].get(k) for r in rows)]
    head = "  ".join([f"{rule.unit:>11s}", *(f"{'threshold ' + g:>21s}" for g in groups),
                      *(f"{'kept ' + k:>28s}" for k in kinds)])
    lines = [f"  sweep      {rule.unit} -> threshold -> kept per kind (* the rule)", "  " + head]
    for row in rows:
        cuts = [f"{_cut_text(row['thresholds'][g]):>21s}" for g in groups]
        kept = [f"{_kept_text(row['kept'][k], row['scored'][k]):>28s}" for k in kinds]
        lines.append("  ".join([f"  {'*' if row['value'] == rule.value else ' '} {row['value']:>9g}", *cuts, *kept]))
    return lines


def _cut_text(cut: float | None) -> str:
    return "none kept" if cut is None else f"{cut:.4f}"


def _kept_text(kept: int, scored: int) -> str:
    return f"{kept:,} of {scored:,} ({100 * kept / scored:.1f}%)"


def _totals(entries: list[dict]) -> tuple[dict[str, Counter], dict[str, dict], int]:
    """Kept and dropped per kind and level, score errors by category and reason, over every shard's commit
    record (this run's and earlier ones')."""
    totals = {"kept": Counter(), "dropped": Counter(), "by_category": Counter(), "by_reason": Counter()}
    examples: dict[str, dict] = {}
    not_materializable = 0
    for entry in entries:
        stats = _current_layout(entry)
        not_materializable += stats.get("not_materializable", {}).get("count", 0)
        for part in totals:
            totals[part].update(stats.get(part, {}))
        for reason, example in stats.get("examples", {}).items():
            examples.setdefault(reason, example)
    return totals, examples, not_materializable


def _current_layout(entry: dict) -> dict:
    """A commit record's stats with the score errors under today's keys, whichever version curated the shard."""
    stats = dict(entry.get("stats") or {})
    if "errors_by_reason" in stats:  # curated before the summary shell: keys as they were
        stats["by_category"], stats["by_reason"] = stats["errors_by_category"], stats["errors_by_reason"]
        stats["examples"] = stats.get("error_examples", {})
    elif "by_reason" not in stats:  # curated before errors were counted by reason
        stats["by_category"] = stats["by_reason"] = stats.get("errors", {})
        stats["examples"] = {k: {"id": None, "shard": entry.get("shard"), "error": v}
                             for k, v in stats.get("error_examples", {}).items()}
    return stats


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
