"""The threshold passes on Ray Data (their arithmetic: `pipeline.curation.thresholds`): one task per score file
reads it, joins its shard's metadata and applies the filters (`pipeline.curation.filters.filter_shard`, exactly as
the selection stage will), and counts what passes. Pass one: counts per kind in the high 16 bits of the score key,
and what each filter removed; pass two: the low 16 bits inside the bins every asked-for threshold falls in, and
the plotting histograms. Any number of thresholds (the rule's and a sweep's) cost the same two passes.

A rule whose cut is the number given (a minimum score: `Rule.fixed_cut`) with no report and no sweep needs neither
pass.

A shard that cannot be evaluated fails its pass by name, never with a traceback nor with Ray's retries: a score
file that is not what was committed (`CorruptState` naming it and what to do: exit 2), metadata that is not
Parquet (exit 2 naming `input`), metadata that cannot be read for I/O (`ShardFault`: exit 1, rerun), or any other
failure of the filters on it (exit 2 naming `where` and the shard). A task whose worker dies (out of memory, a
crash in evaluation) is tried again `TASK_RETRIES` times, then the run ends naming the score file it kept dying on
(`pipeline.runner.deaths`).
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from dataclasses import asdict, replace

import numpy as np
import pyarrow as pa

from pipeline.curation.balance import group_tops, merge_caps
from pipeline.curation.filters import Filters, filter_shard, metadata_uri
from pipeline.curation.rank import distribution_counts, merge_distributions
from pipeline.curation.select import kept_records
from pipeline.curation.thresholds import (
    ALL,
    BINS,
    KINDS,
    KindCounts,
    Plot,
    Thresholds,
    dense,
    kept_at,
    merge_pass_one,
    pass_one,
    pass_two,
    plot_edges,
    score_key,
    score_of_key,
    threshold_in_bin,
)
from pipeline.errors import BrokenWorker, Category, ConfigFieldError, CorruptState, InputError, ShardFault
from pipeline.io.listing import Shard
from pipeline.runner.deaths import TASK_RETRIES, WorkLedger, in_hand
from pipeline.runner.ray_compat import retry_bounds_allowed

_COUNTED = ["kind", "score", "error", "label"]


def _passing(shard: Shard, filters: Filters) -> tuple[pa.Table, dict]:
    """A score file's records that pass the filters (error records too: they are counted, never kept), and what
    the filters removed."""
    filtered = filter_shard(shard, filters)
    keep = filtered.passes | ~filtered.scored
    stats = {"removed": filtered.removed, "removed_in_all": filtered.removed_in_all,
             "no_metadata": filtered.no_metadata, "scored": int(filtered.scored.sum()), "mistyped": filtered.mistyped}
    counted = filtered.table.select(_COUNTED)
    if filters.ranking:  # the cut is found over the fused value: counted as a score is (NaN: not ranked)
        counted = counted.set_column(_COUNTED.index("score"), "score", pa.array(filtered.ranked_by, pa.float32()))
    return counted.filter(pa.array(keep)), stats


def _failure(shard: Shard, err: Exception, filters: Filters) -> str:
    """Why a shard's pass failed, as the driver raises it again (`_raise_failures`). Only a failure of the filters'
    own terms is the user's to look at (`where`); memory, the ledger, or any failure without a term to blame is
    ours: a fault, exit 1."""
    out = {"shard": shard.key, "input": shard.aux, "format": shard.aux_format}
    ours = isinstance(err, (MemoryError, pa.ArrowMemoryError)) or type(err).__module__.startswith("ray.")
    if isinstance(err, ConfigFieldError):  # a damaged score file, unreadable metadata: named with what to do
        out.update(kind="corrupt" if isinstance(err, CorruptState) else "refused", field=err.field,
                   message=err.problem)
    elif isinstance(err, ShardFault):
        out.update(kind="fault", category=err.category.value, message=err.detail)
    elif ours or not filters.conditions:
        out.update(kind="fault", category=Category.INTERNAL.value,
                   message=f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}")
    else:
        out.update(kind="evaluation", message=f"{type(err).__name__}: "
                                              f"{(str(err).strip().splitlines() or [''])[0][:300]}")
    return json.dumps(out)


def _held(ledger: str | None, key: str):
    """On Ray, the shard held in the run's work ledger while its worker evaluates it (`pipeline.runner.deaths`)."""
    return in_hand(ledger, key) if ledger else contextlib.nullcontext()


def _pass_one(batch: pa.Table, filters: Filters, ledger: str | None = None) -> pa.Table:
    out = {"counts": [], "errors": [], "filters": [], "failed": []}
    for row in batch.to_pylist():
        shard = Shard(**row)
        try:
            with _held(ledger, shard.key):
                table, stats = _passing(shard, filters)
        except Exception as err:  # noqa: BLE001 - named by the driver, never a traceback nor a retry
            out["counts"].append(None)
            out["errors"].append(None)
            out["filters"].append(None)
            out["failed"].append(_failure(shard, err, filters))
            continue
        one = pass_one(table).to_pylist()[0]
        out["counts"].append(one["counts"])
        out["errors"].append(one["errors"])
        out["filters"].append(json.dumps(stats))
        out["failed"].append(None)
    return pa.table(out, schema=pa.schema([(k, pa.string()) for k in out]))


def _pass_two(batch: pa.Table, filters: Filters, bins: dict[str, list[int]], edges: dict[str, list[float]],
              ledger: str | None = None) -> pa.Table:
    counts, failed = [], []
    for row in batch.to_pylist():
        shard = Shard(**row)
        try:
            with _held(ledger, shard.key):
                counts.append(pass_two(_passing(shard, filters)[0], bins, edges).column("counts")[0].as_py())
            failed.append(None)
        except Exception as err:  # noqa: BLE001 - named by the driver, never a traceback nor a retry
            counts.append(None)
            failed.append(_failure(shard, err, filters))
    return pa.table({"counts": pa.array(counts, pa.string()), "failed": pa.array(failed, pa.string())})


def _pass_distributions(batch: pa.Table, filters: Filters, ledger: str | None = None) -> pa.Table:
    parts, failed = [], []
    for row in batch.to_pylist():
        shard = Shard(**row)
        try:
            with _held(ledger, shard.key):
                filtered = filter_shard(shard, filters)
                counts = distribution_counts(filtered.table, filtered.scored, filters.ranking.pct_columns())
            parts.append(json.dumps(counts))
            failed.append(None)
        except Exception as err:  # noqa: BLE001 - named by the driver, never a traceback nor a retry
            parts.append(None)
            failed.append(_failure(shard, err))
    return pa.table({"counts": pa.array(parts, pa.string()), "failed": pa.array(failed, pa.string())})


def rank_distributions(shards: list[Shard], filters: Filters, executor) -> Filters:
    """With `--rank-by` using pct(column): one more pass over every score file counts each such column's values
    per kind, exactly; returns the filters whose ranking knows them (what every later pass and stage is given)."""
    if not filters.ranking or filters.ranking.ready:
        return filters
    rows = _run(shards, executor, _pass_distributions, filters=filters)
    counted = merge_distributions([json.loads(r["counts"]) for r in rows])
    return replace(filters, ranking=filters.ranking.with_distributions(counted))


def _pass_balance(batch: pa.Table, filters: Filters, thresholds: dict, per_kind: bool, ledger: str | None = None
                  ) -> pa.Table:
    parts, failed = [], []
    for row in batch.to_pylist():
        shard = Shard(**row)
        try:
            with _held(ledger, shard.key):
                filtered, keep = kept_records(shard, filters, thresholds, per_kind)
                parts.append(json.dumps(group_tops(filtered.table, keep, filtered.ranked_by, filters.balance.column,
                                                   filters.balance.most)))
            failed.append(None)
        except Exception as err:  # noqa: BLE001 - named by the driver, never a traceback nor a retry
            parts.append(None)
            failed.append(_failure(shard, err))
    return pa.table({"tops": pa.array(parts, pa.string()), "failed": pa.array(failed, pa.string())})


def balance_caps(shards: list[Shard], filters: Filters, thresholds: Thresholds, per_kind: bool, executor) -> Filters:
    """With `--balance-by`: one pass over every score file after the thresholds finds each group's cap (exact);
    returns the filters whose balance knows them (what the selection stage and the resharder are given)."""
    if not filters.balance or filters.balance.counted:
        return filters
    rows = _run(shards, executor, _pass_balance, filters=filters, thresholds=thresholds.by_group, per_kind=per_kind)
    caps, removed = merge_caps([json.loads(r["tops"]) for r in rows], filters.balance.most)
    return replace(filters, balance=filters.balance.with_caps(caps, removed))


def _run(shards: list[Shard], executor, fn, **kwargs) -> list[dict]:
    """`fn` over every score file: a Ray Data task each on Ray, one after another in this process; a shard that
    failed is named (`_raise_failures`)."""
    items = [asdict(s) for s in shards]
    if executor.name == "local":
        rows = [row for item in items for row in fn(pa.Table.from_pylist([item]), **kwargs).to_pylist()]
    else:
        import ray

        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 1000)))
        ledger = WorkLedger()
        try:
            with retry_bounds_allowed():
                ds = ds.map_batches(fn, fn_kwargs={**kwargs, "ledger": ledger.name}, batch_size=1,
                                    batch_format="pyarrow", max_retries=TASK_RETRIES)
            rows = ds.take_all()
        except Exception as err:
            dying = ledger.dying()
            if not dying:
                raise
            key, deaths = next(iter(dying.items()))
            raise BrokenWorker(f"curation's threshold pass: its worker died {deaths} times on the score file {key} "
                               f"(killed for memory or crashed) and Ray's retries are spent ({type(err).__name__})"
                               ) from None
        finally:
            ledger.stop()
    _raise_failures([json.loads(r["failed"]) for r in rows if r["failed"]])
    return rows


def _raise_failures(failed: list[dict]) -> None:
    """The first failure of a pass, named (what the user must act on first: a damaged score file, a refused
    input, then a fault a rerun may clear, then a failure of the filters themselves)."""
    if not failed:
        return
    order = ("corrupt", "refused", "fault", "evaluation")
    first = next(f for kind in order for f in failed if f["kind"] == kind)
    more = f" ({len(failed) - 1} more shards failed too)" if len(failed) > 1 else ""
    if first["kind"] == "corrupt":
        raise CorruptState(first["message"] + more, first["field"])
    if first["kind"] == "refused":
        raise InputError(first["field"], first["message"] + more)
    if first["kind"] == "fault" and first["category"] == Category.INTERNAL.value:
        raise ShardFault(first["category"], f"the threshold passes failed on shard {first['shard']}: "
                                            f"{first['message']}{more} (not the data's nor the filters' fault)")
    if first["kind"] == "fault":
        raise ShardFault(first["category"], f"the threshold passes could not read what shard {first['shard']} "
                                            f"needs: {first['message']}{more}; rerun when it can be read")
    metadata = metadata_uri(first["input"], first["format"]) if first["input"] and first["format"] else None
    raise InputError("where", f"the filters could not be evaluated on shard {first['shard']} ({first['message']})"
                              f"{more}: check its metadata{f' ({metadata})' if metadata else ''} against the first "
                              "shard's, or leave out the term that reads it")


def _filter_totals(rows: list[dict], filters: Filters) -> dict:
    removed: Counter = Counter({term: 0 for term in filters.terms})
    totals, mistyped = Counter(), Counter()
    for row in rows:
        stats = json.loads(row["filters"])
        removed.update(stats["removed"])
        mistyped.update(stats.get("mistyped", {}))
        totals.update({k: stats[k] for k in ("removed_in_all", "no_metadata", "scored")})
    return {"terms": filters.terms, "removed": dict(removed), **dict(totals), "mistyped": dict(mistyped)}


def _cut_bin(cut) -> int | None:
    return None if cut is None else cut[0] if isinstance(cut, tuple) else cut >> 16


def compute_thresholds(config, shards: list[Shard], filters: Filters, executor, sweep: list[float] | None = None
                       ) -> Thresholds:
    """Two passes over the score files (on Ray Data, or in this process with the local executor): the exact
    thresholds of the rule (and of every value of `sweep`, in the rule's unit), how many records each keeps per kind,
    and the histograms on the way."""
    rule = config.rule
    if rule.fixed_cut is not None and not config.report and sweep is None:
        return Thresholds({name: rule.fixed_cut for name in rule.groups}, {}, Counter())
    rows = _run(shards, executor, _pass_one, filters=filters)
    counts, errors = merge_pass_one(rows)
    values = list(dict.fromkeys([rule.value, *(sweep or [])]))
    cuts = {v: {g: rule.cut(counts.get(g, KindCounts()), v) for g in rule.groups} for v in values}
    wanted = sorted({b for by_group in cuts.values() for c in by_group.values() if (b := _cut_bin(c)) is not None})
    edges = {kind: plot_edges(counts[kind], config.histogram_bins) for kind in KINDS
             if kind in counts and counts[kind].scored}
    low, plots = _resolve(_run(shards, executor, _pass_two, filters=filters, bins={g: wanted for g in (*KINDS, ALL)},
                               edges=edges), edges)
    resolved = {v: {g: _threshold(c, low.get(g, {})) for g, c in by_group.items()} for v, by_group in cuts.items()}
    table = [_sweep_row(v, resolved[v], counts, low, rule.per_kind) for v in values]
    return Thresholds(resolved[rule.value], counts, errors, plots, sweep=sorted(table, key=lambda r: r["value"]),
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

