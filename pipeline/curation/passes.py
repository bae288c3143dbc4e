"""The threshold passes on Ray Data (their arithmetic: `pipeline.curation.thresholds`): one task per score file
reads it, joins its shard's metadata and applies the filters (`pipeline.curation.filters.filter_shard`, exactly as
the selection stage will), and counts what passes. Pass one: counts per kind in the high 16 bits of the score key,
and what each filter removed; pass two: the low 16 bits inside the bins every asked-for threshold falls in, and
the plotting histograms. Any number of thresholds (the rule's and a sweep's) cost the same two passes.

A `min_score` rule with no report and no sweep needs neither pass: the cut is the number given.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa

from pipeline.curation.filters import Filters, filter_shard
from pipeline.curation.thresholds import (
    ALL,
    BINS,
    KINDS,
    KindCounts,
    Plot,
    Thresholds,
    cut_bin,
    dense,
    keep_count,
    kept_at,
    merge_pass_one,
    pass_one,
    pass_two,
    plot_edges,
    score_key,
    score_of_key,
    threshold_in_bin,
)
from pipeline.io.listing import Shard

_COUNTED = ["kind", "score", "error", "label"]


def _passing(row: dict, filters: Filters) -> tuple[pa.Table, dict]:
    """A score file's records that pass the filters (error records too: they are counted, never kept), and what
    the filters removed."""
    shard = filter_shard(row["uri"], row["aux"], row["fmt"], filters)
    keep = shard.passes | ~shard.scored
    stats = {"removed": shard.removed, "removed_in_all": shard.removed_in_all, "no_metadata": shard.no_metadata,
             "scored": int(shard.scored.sum())}
    return shard.table.select(_COUNTED).filter(pa.array(keep)), stats


def _pass_one(batch: pa.Table, filters: Filters) -> pa.Table:
    out = {"counts": [], "errors": [], "filters": []}
    for row in batch.to_pylist():
        table, stats = _passing(row, filters)
        one = pass_one(table).to_pylist()[0]
        out["counts"].append(one["counts"])
        out["errors"].append(one["errors"])
        out["filters"].append(json.dumps(stats))
    return pa.table(out)


def _pass_two(batch: pa.Table, filters: Filters, bins: dict[str, list[int]], edges: dict[str, list[float]]
              ) -> pa.Table:
    return pa.table({"counts": [pass_two(_passing(row, filters)[0], bins, edges).column("counts")[0].as_py()
                                for row in batch.to_pylist()]})


def _run(shards: list[Shard], executor, fn, **kwargs) -> list[dict]:
    """`fn` over every score file: a Ray Data task each on Ray, one after another in this process."""
    items = [{"uri": s.uri, "aux": s.aux, "fmt": s.aux_format, "key": s.key} for s in shards]
    if executor.name == "local":
        return [row for item in items for row in fn(pa.Table.from_pylist([item]), **kwargs).to_pylist()]
    import ray

    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 1000)))
    return ds.map_batches(fn, fn_kwargs=kwargs, batch_size=1, batch_format="pyarrow").take_all()


def _filter_totals(rows: list[dict], filters: Filters) -> dict:
    removed: Counter = Counter({term: 0 for term in filters.terms})
    totals = Counter()
    for row in rows:
        stats = json.loads(row["filters"])
        removed.update(stats["removed"])
        totals.update({k: stats[k] for k in ("removed_in_all", "no_metadata", "scored")})
    return {"terms": filters.terms, "removed": dict(removed), **dict(totals)}


def _cut(counts: KindCounts, rule: str, value: float) -> tuple[int, int] | int | None:
    """Where a rule's cut lies: (high bin, rank inside it) for a fraction, the score's key for a minimum score,
    None when nothing is kept."""
    if rule == "min_score":
        return score_key(float(np.float32(value)))
    k = keep_count(value, counts.scored)
    return cut_bin(counts, k) if k else None


def _cut_bin(cut) -> int | None:
    return None if cut is None else cut[0] if isinstance(cut, tuple) else cut >> 16


def compute_thresholds(config, shards: list[Shard], filters: Filters, executor, sweep: list[float] | None = None
                       ) -> Thresholds:
    """Two passes over the score files (on Ray Data, or in this process with the local executor): the exact thresholds of the rule (and of every value of
    `sweep`, in the rule's unit), how many records each keeps per kind, and the histograms on the way."""
    rule = "min_score" if config.min_score is not None else "keep_fraction"
    value = config.min_score if rule == "min_score" else config.keep_fraction
    groups = list(KINDS) if config.per_kind else [ALL]
    if rule == "min_score" and not config.report and sweep is None:
        cut = float(np.float32(config.min_score))
        return Thresholds({name: cut for name in groups}, {}, Counter())
    rows = _run(shards, executor, _pass_one, filters=filters)
    counts, errors = merge_pass_one(rows)
    values = list(dict.fromkeys([value, *(sweep or [])]))
    cuts = {v: {g: _cut(counts.get(g, KindCounts()), rule, v) for g in groups} for v in values}
    wanted = sorted({b for by_group in cuts.values() for c in by_group.values() if (b := _cut_bin(c)) is not None})
    edges = {kind: plot_edges(counts[kind], config.histogram_bins) for kind in KINDS
             if kind in counts and counts[kind].scored}
    low, plots = _resolve(_run(shards, executor, _pass_two, filters=filters, bins={g: wanted for g in (*KINDS, ALL)},
                               edges=edges), edges)
    resolved = {v: {g: _threshold(c, low.get(g, {})) for g, c in by_group.items()} for v, by_group in cuts.items()}
    table = [_sweep_row(v, resolved[v], counts, low, config.per_kind) for v in values]
    return Thresholds(resolved[value], counts, errors, plots, sweep=sorted(table, key=lambda r: r["value"]),
                      filters=_filter_totals(rows, filters))


def _resolve(rows: list[dict], edges: dict[str, list[float]]) -> tuple[dict[str, dict[int, np.ndarray]],
                                                                        dict[str, Plot]]:
    low: dict[str, dict[int, np.ndarray]] = {}
    plots = {kind: Plot(e, [0] * (len(e) - 1)) for kind, e in edges.items()}
    for row in rows:
        for name, entry in json.loads(row["counts"]).items():
            for b, pairs in entry["low_bins"].items():
                group = low.setdefault(name, {})
                group[int(b)] = group.get(int(b), np.zeros(BINS, dtype=np.int64)) + dense(pairs)
            if name in plots and entry.get("plot") is not None:
                hist, below, above = entry["plot"]
                p = plots[name]
                p.counts = (np.asarray(p.counts) + np.asarray(hist)).tolist()
                p.below, p.above = p.below + below, p.above + above
    return low, plots


def _threshold(cut, low: dict[int, np.ndarray]) -> float | None:
    if cut is None:
        return None
    if isinstance(cut, tuple):
        b, needed = cut
        return threshold_in_bin(b, needed, low[b])
    return score_of_key(cut)


def _sweep_row(value: float, thresholds: dict[str, float | None], counts: dict[str, KindCounts],
               low: dict[str, dict[int, np.ndarray]], per_kind: bool) -> dict:
    """One line of the sweep: the cut per group, and the records each kind keeps under it (exact)."""
    kept, scored = {}, {}
    for kind in KINDS:
        if kind not in counts or not counts[kind].scored:
            continue
        cut = thresholds.get(kind if per_kind else ALL)
        key = score_key(cut) if cut is not None else None
        kept[kind] = 0 if key is None else kept_at(counts[kind], low.get(kind, {}).get(key >> 16), key)
        scored[kind] = counts[kind].scored
    return {"value": value, "thresholds": thresholds, "kept": kept, "scored": scored}

