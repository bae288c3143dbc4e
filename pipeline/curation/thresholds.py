"""The curation threshold, exact and distributed: the score of the k-th best record over corpora far larger than
one machine's memory, in two passes of Ray Data over the committed score records.

Scores are float32. Each maps to a 32-bit key that sorts like the score (`sortable_key`). Pass one counts records
per kind in 65,536 bins of the key's high 16 bits (and min, max, errors by reason, records per level); the bin
holding the k-th best record is found on the driver. Pass two counts, inside that bin only, the key's low 16
bits: that gives the k-th best score exactly, whatever the corpus size. Memory is two arrays of 65,536 counts
per kind on the driver; each block of records is read once per pass.

The rule (documented in the README): `--keep-fraction F` keeps the best `round(F x N)` scored records of N, and
every record tied with the last of them (its score is the threshold; records scoring at or above it are kept),
so ties never split arbitrarily and a rerun keeps exactly the same records. Error records are never counted in N
and never kept. `--min-score X` keeps the records scoring X or more.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

BINS = 1 << 16
KINDS = ("caption", "interleaved")
ALL = "all"


def sortable_key(scores: np.ndarray) -> np.ndarray:
    """float32 -> uint32 with the same order (IEEE 754 sign-magnitude flipped into two's-complement order)."""
    bits = np.ascontiguousarray(scores, dtype=np.float32).view(np.uint32)
    return np.where(bits & np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000)).astype(np.uint32)


def score_of_key(key: int) -> float:
    bits = (key & 0x7FFFFFFF) if key & 0x80000000 else (~key & 0xFFFFFFFF)
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def keep_count(fraction: float, n: int) -> int:
    """How many records a keep-fraction keeps: round(F x N), half up, computed in decimals (0.7 x 100 = 70)."""
    return min(n, int(math.floor(round(fraction * n, 9) + 0.5)))


@dataclass
class KindCounts:
    """Pass one's counts for one group of records (a kind, or all)."""

    scored: int = 0
    low: float = math.inf
    high: float = -math.inf
    high_bins: np.ndarray = field(default_factory=lambda: np.zeros(BINS, dtype=np.int64))
    labels: Counter = field(default_factory=Counter)

    def merge(self, other: KindCounts) -> None:
        self.scored += other.scored
        self.low, self.high = min(self.low, other.low), max(self.high, other.high)
        self.high_bins += other.high_bins
        self.labels.update(other.labels)


def _groups(kinds: np.ndarray) -> dict[str, np.ndarray]:
    """Every record counts in its kind and in `all` (the global threshold's group)."""
    return {**{k: kinds == k for k in KINDS}, ALL: np.ones(len(kinds), dtype=bool)}


def _scored(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ok = pc.and_(pc.is_null(table.column("error")), pc.is_valid(table.column("score")))
    scored = table.filter(ok)
    scores = scored.column("score").to_numpy(zero_copy_only=False).astype(np.float32)
    finite = np.isfinite(scores)
    kinds = np.asarray(scored.column("kind").to_pylist(), dtype=object)[finite]
    labels = scored.column("label").to_numpy(zero_copy_only=False)[finite]
    return scores[finite], kinds, labels


def pass_one(batch: pa.Table) -> pa.Table:
    """Ray Data UDF: one row of counts per block (as JSON and raw histogram bytes)."""
    scores, kinds, labels = _scored(batch)
    out = {}
    for name, mask in _groups(kinds).items():
        s = scores[mask]
        out[name] = {"scored": int(len(s)), "low": float(s.min()) if len(s) else None,
                     "high": float(s.max()) if len(s) else None, "bins": _sparse(sortable_key(s) >> 16),
                     "labels": {int(k): int(v) for k, v in Counter(labels[mask].tolist()).items()}}
    errors = Counter(str(e).split(":", 1)[0] for e in batch.column("error").drop_null().to_pylist())
    return pa.table({"counts": [json.dumps(out)], "errors": [json.dumps(errors)]})


def _sparse(values: np.ndarray) -> list[list[int]]:
    """Counts of 16-bit values as [[value, count], ...] for the values present (scores fill few bins)."""
    found, counts = np.unique(values.astype(np.int64), return_counts=True)
    return [[int(v), int(c)] for v, c in zip(found, counts)]


def _dense(pairs: list[list[int]]) -> np.ndarray:
    out = np.zeros(BINS, dtype=np.int64)
    for value, count in pairs:
        out[value] += count
    return out


def merge_pass_one(rows: list[dict]) -> tuple[dict[str, KindCounts], Counter]:
    groups: dict[str, KindCounts] = {}
    errors: Counter = Counter()
    for row in rows:
        errors.update(json.loads(row["errors"]))
        for name, c in json.loads(row["counts"]).items():
            part = KindCounts(c["scored"], c["low"] if c["low"] is not None else math.inf,
                              c["high"] if c["high"] is not None else -math.inf,
                              _dense(c["bins"]),
                              Counter({int(k): v for k, v in c["labels"].items()}))
            groups.setdefault(name, KindCounts()).merge(part)
    return groups, errors


def cut_bin(counts: KindCounts, k: int) -> tuple[int, int]:
    """(high bin holding the k-th best record, how many of that bin's best records are needed)."""
    above = np.cumsum(counts.high_bins[::-1])  # above[i]: records in bins >= BINS-1-i
    i = int(np.searchsorted(above, k))  # first index where the running count reaches k
    b = BINS - 1 - i
    before = int(above[i - 1]) if i > 0 else 0
    return b, k - before


def pass_two(batch: pa.Table, cut_bins: dict[str, int], edges: dict[str, list[float]]) -> pa.Table:
    """Ray Data UDF: per group, the low-16-bit counts inside its cut bin, and the plotting histogram."""
    scores, kinds, _ = _scored(batch)
    out = {}
    for name, mask in _groups(kinds).items():
        s = scores[mask]
        keys = sortable_key(s)
        entry = {"plot": np.histogram(s, bins=edges[name])[0].tolist() if name in edges else None}
        if name in cut_bins:
            inside = keys[(keys >> 16) == cut_bins[name]]
            entry["low_bins"] = _sparse(inside & 0xFFFF)
        out[name] = entry
    return pa.table({"counts": [json.dumps(out)]})


def threshold_in_bin(b: int, needed: int, low_bins: np.ndarray) -> float:
    """The score of the `needed`-th best record inside high bin `b`."""
    above = np.cumsum(low_bins[::-1])
    i = int(np.searchsorted(above, needed))
    return score_of_key((b << 16) | (BINS - 1 - i))


def plot_edges(counts: KindCounts, bins: int = 50) -> list[float]:
    low, high = counts.low, counts.high
    if not math.isfinite(low):
        low, high = 0.0, 3.0
    if high - low < 1e-6:
        low, high = low - 0.5, high + 0.5
    return np.linspace(low, high, bins + 1).tolist()


def sort_threshold(scores: np.ndarray, fraction: float) -> float | None:
    """The same rule by sorting (for tests and small inputs): the score of the round(F x N)-th best."""
    k = keep_count(fraction, len(scores))
    if k == 0:
        return None
    return float(np.sort(np.asarray(scores, dtype=np.float32))[::-1][k - 1])


@dataclass
class Thresholds:
    """The cut per group (a kind, or `all`), and what the passes counted on the way."""

    by_group: dict[str, float | None]
    counts: dict[str, KindCounts]
    errors: Counter
    plots: dict[str, tuple[list[float], list[int]]] = field(default_factory=dict)  # kind -> (edges, counts)

    def for_kind(self, kind: str, per_kind: bool) -> float | None:
        return self.by_group.get(kind if per_kind else ALL)

    def as_dict(self) -> dict:
        return {k: v for k, v in sorted(self.by_group.items())}


def compute_thresholds(config, score_files: list[str]) -> Thresholds:
    """Two passes of Ray Data over the score files (their URIs): exact thresholds, and the histograms on the way.
    A fixed min_score with no report needs neither: no pass is made."""
    import ray

    from pipeline.io.uris import filesystem_for

    if config.min_score is not None and not config.report:
        cut = float(np.float32(config.min_score))
        return Thresholds({name: cut for name in (KINDS if config.per_kind else [ALL])},
                          {}, Counter())
    fs, _ = filesystem_for(config.scores)
    paths = [filesystem_for(uri)[1] for uri in score_files]
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=["kind", "score", "error", "label"])
    counts, errors = merge_pass_one(
        ds.map_batches(pass_one, batch_size=None, batch_format="pyarrow").take_all())
    groups = list(KINDS) if config.per_kind else [ALL]
    by_group: dict[str, float | None] = {}
    cut_bins, needed = {}, {}
    for name in groups:
        c = counts.get(name, KindCounts())
        if config.min_score is not None:
            by_group[name] = float(np.float32(config.min_score))
            continue
        k = keep_count(config.keep_fraction, c.scored)
        if k == 0:
            by_group[name] = None  # nothing kept
        else:
            cut_bins[name], needed[name] = cut_bin(c, k)
    edges = {kind: plot_edges(counts.get(kind, KindCounts()), config.histogram_bins)
             for kind in KINDS if kind in counts and counts[kind].scored}
    rows = ds.map_batches(pass_two, fn_kwargs={"cut_bins": cut_bins, "edges": edges}, batch_size=None,
                          batch_format="pyarrow").take_all()
    low_bins = {name: np.zeros(BINS, dtype=np.int64) for name in cut_bins}
    plots = {kind: np.zeros(len(e) - 1, dtype=np.int64) for kind, e in edges.items()}
    for row in rows:
        for name, entry in json.loads(row["counts"]).items():
            if name in low_bins and "low_bins" in entry:
                low_bins[name] += _dense(entry["low_bins"])
            if name in plots and entry.get("plot") is not None:
                plots[name] += np.asarray(entry["plot"], dtype=np.int64)
    for name, b in cut_bins.items():
        by_group[name] = threshold_in_bin(b, needed[name], low_bins[name])
    return Thresholds(by_group, counts, errors, {k: (edges[k], plots[k].tolist()) for k in plots})
