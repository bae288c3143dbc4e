"""The curation threshold, exact and distributed: the score of the k-th best record over corpora far larger than
one machine's memory, in two passes over the committed score records (`pipeline.curation.passes` runs them on
Ray Data; this module is their arithmetic, with no Ray in it).

Scores are float32. Each maps to a 32-bit key that sorts like the score (`sortable_key`). Pass one counts records
per kind in 65,536 bins of the key's high 16 bits (and min, max, records per level, records outside 0-3); the bin
holding the k-th best record is found on the driver. Pass two counts, inside that bin only, the key's low 16
bits: that gives the k-th best score exactly, whatever the corpus size. Any number of bins can be resolved in the
same pass: a sweep of fractions (or of minimum scores) costs no extra pass, and how many records score at or above
any threshold is exact (`kept_at`). Memory is one array of 65,536 counts per kind, plus the resolved bins.

The rule (documented in the README): `--keep-fraction F` keeps the best `round(F x N)` records of the N that pass
the filters, and every record tied with the last of them (its score is the threshold; records scoring at or above
it are kept), so ties never split arbitrarily and a rerun keeps exactly the same records. Error records are never
counted in N and never kept. `--min-score X` keeps the records scoring X or more.
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
LEVELS = (0.0, 3.0)  # what the regression head was trained toward; nothing bounds its output
CLIP = (0.005, 0.995)  # the report's histograms span these quantiles; records beyond are counted, not drawn


def sortable_key(scores: np.ndarray) -> np.ndarray:
    """float32 -> uint32 with the same order (IEEE 754 sign-magnitude flipped into two's-complement order); -0.0
    is 0.0 first, so a key comparison agrees with a float comparison."""
    scores = np.ascontiguousarray(scores, dtype=np.float32) + np.float32(0.0)
    bits = scores.view(np.uint32)
    return np.where(bits & np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000)).astype(np.uint32)


def score_key(score: float) -> int:
    return int(sortable_key(np.array([score], dtype=np.float32))[0])


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
    below: int = 0  # scores under 0
    above: int = 0  # scores over 3

    def merge(self, other: KindCounts) -> None:
        self.scored += other.scored
        self.low, self.high = min(self.low, other.low), max(self.high, other.high)
        self.high_bins += other.high_bins
        self.labels.update(other.labels)
        self.below += other.below
        self.above += other.above


def scored_arrays(table: pa.Table) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """(scores, {group: mask}, labels) of the records with a finite score and no error."""
    ok = pc.and_(pc.is_null(table.column("error")), pc.is_valid(table.column("score")))
    scored = table.filter(ok)
    scores = scored.column("score").to_numpy(zero_copy_only=False).astype(np.float32)
    finite = np.isfinite(scores)
    kinds = scored.column("kind")
    groups = {k: pc.equal(kinds, k).to_numpy(zero_copy_only=False)[finite] for k in KINDS}
    labels = scored.column("label").to_numpy(zero_copy_only=False)[finite]
    return scores[finite], {**groups, ALL: np.ones(int(finite.sum()), dtype=bool)}, labels


def count_groups(scores: np.ndarray, groups: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, dict]:
    """Pass one's counts per group, as JSON-able values."""
    out = {}
    for name, mask in groups.items():
        s = scores[mask]
        out[name] = {"scored": int(len(s)), "low": float(s.min()) if len(s) else None,
                     "high": float(s.max()) if len(s) else None, "bins": sparse(sortable_key(s) >> 16),
                     "labels": {int(k): int(v) for k, v in Counter(labels[mask].tolist()).items()},
                     "below": int((s < LEVELS[0]).sum()), "above": int((s > LEVELS[1]).sum())}
    return out


def pass_one(batch: pa.Table) -> pa.Table:
    """One row of counts for a table of score records (as JSON and raw histogram bytes)."""
    scores, groups, labels = scored_arrays(batch)
    errors = Counter(str(e).split(":", 1)[0] for e in batch.column("error").drop_null().to_pylist())
    return pa.table({"counts": [json.dumps(count_groups(scores, groups, labels))], "errors": [json.dumps(errors)]})


def sparse(values: np.ndarray) -> list[list[int]]:
    """Counts of 16-bit values as [[value, count], ...] for the values present (scores fill few bins)."""
    found, counts = np.unique(values.astype(np.int64), return_counts=True)
    return [[int(v), int(c)] for v, c in zip(found, counts)]


def dense(pairs: list[list[int]]) -> np.ndarray:
    out = np.zeros(BINS, dtype=np.int64)
    for value, count in pairs:
        out[value] += count
    return out


def merge_counts(into: dict[str, KindCounts], counts: dict[str, dict]) -> None:
    for name, c in counts.items():
        part = KindCounts(c["scored"], c["low"] if c["low"] is not None else math.inf,
                          c["high"] if c["high"] is not None else -math.inf, dense(c["bins"]),
                          Counter({int(k): v for k, v in c["labels"].items()}), c.get("below", 0), c.get("above", 0))
        into.setdefault(name, KindCounts()).merge(part)


def merge_pass_one(rows: list[dict]) -> tuple[dict[str, KindCounts], Counter]:
    groups: dict[str, KindCounts] = {}
    errors: Counter = Counter()
    for row in rows:
        errors.update(json.loads(row["errors"]))
        merge_counts(groups, json.loads(row["counts"]))
    return groups, errors


def cut_bin(counts: KindCounts, k: int) -> tuple[int, int]:
    """(high bin holding the k-th best record, how many of that bin's best records are needed)."""
    above = np.cumsum(counts.high_bins[::-1])  # above[i]: records in bins >= BINS-1-i
    i = int(np.searchsorted(above, k))  # first index where the running count reaches k
    b = BINS - 1 - i
    before = int(above[i - 1]) if i > 0 else 0
    return b, k - before


def low_counts(scores: np.ndarray, groups: dict[str, np.ndarray], bins: list[int]) -> dict[str, dict[str, list]]:
    """Per group, the low-16-bit counts inside each of `bins` (high bins): {group: {bin: sparse counts}}."""
    wanted = np.asarray(sorted(bins), dtype=np.int64)
    out: dict[str, dict[str, list]] = {}
    for name, mask in groups.items():
        keys = sortable_key(scores[mask]).astype(np.int64)
        inside = keys[np.isin(keys >> 16, wanted)]
        out[name] = {str(b): sparse(inside[(inside >> 16) == b] & 0xFFFF) for b in np.unique(inside >> 16).tolist()}
    return out


def pass_two(batch: pa.Table, bins: dict[str, list[int]], edges: dict[str, list[float]]) -> pa.Table:
    """Per group, the low-16-bit counts inside the bins asked for, and the plotting histogram with the records
    outside its range counted."""
    scores, groups, _ = scored_arrays(batch)
    low = low_counts(scores, groups, sorted({b for bs in bins.values() for b in bs}))
    out = {name: {"low_bins": {b: v for b, v in low.get(name, {}).items() if int(b) in bins.get(name, [])},
                  "plot": plot_counts(scores[mask], edges[name]) if name in edges else None}
           for name, mask in groups.items()}
    return pa.table({"counts": [json.dumps(out)]})


def plot_counts(scores: np.ndarray, edges: list[float]) -> list:
    """[histogram counts, records below the first edge, records above the last]."""
    return [np.histogram(scores, bins=edges)[0].tolist(), int((scores < edges[0]).sum()),
            int((scores > edges[-1]).sum())]


def threshold_in_bin(b: int, needed: int, low_bins: np.ndarray) -> float:
    """The score of the `needed`-th best record inside high bin `b`."""
    above = np.cumsum(low_bins[::-1])
    i = int(np.searchsorted(above, needed))
    return score_of_key((b << 16) | (BINS - 1 - i))


def kept_at(counts: KindCounts, low_bins: np.ndarray | None, key: int) -> int:
    """How many of the group's records have a key at or above `key` (score at or above its score): exact, given
    the low counts of the key's high bin."""
    b, lo = key >> 16, key & 0xFFFF
    above = int(counts.high_bins[b + 1:].sum())
    return above + (int(low_bins[lo:].sum()) if low_bins is not None else 0)


def quantile_key(counts: KindCounts, q: float, upper: bool) -> int:
    """The key at the bin edge holding the q-quantile record (nearest rank): its bin's first key, or its last."""
    rank = max(1, math.ceil(q * counts.scored))
    b = int(np.searchsorted(np.cumsum(counts.high_bins), rank))
    return (b << 16) | (0xFFFF if upper else 0)


def plot_edges(counts: KindCounts, bins: int = 50) -> list[float]:
    """Edges spanning the 0.5th-99.5th percentiles (to the resolution of pass one's bins), so one stray score does
    not squeeze the rest into a few bars."""
    if not counts.scored or not math.isfinite(counts.low):
        return np.linspace(0.0, 3.0, bins + 1).tolist()
    low = max(counts.low, score_of_key(quantile_key(counts, CLIP[0], upper=False)))
    high = min(counts.high, score_of_key(quantile_key(counts, CLIP[1], upper=True)))
    if high - low < 1e-6:
        low, high = low - 0.5, high + 0.5
    return np.linspace(low, high, bins + 1).tolist()


def kept_curve(counts: KindCounts) -> tuple[list[float], list[float]]:
    """Share of the group's records kept against the threshold, at each occupied bin's lowest score."""
    occupied = np.nonzero(counts.high_bins)[0][::-1]
    if not counts.scored or not len(occupied):
        return [], []
    kept = np.cumsum(counts.high_bins[occupied]) / counts.scored
    return [score_of_key(int(b) << 16) for b in occupied], kept.tolist()


def sort_threshold(scores: np.ndarray, fraction: float) -> float | None:
    """The same rule by sorting (for tests and small inputs): the score of the round(F x N)-th best."""
    k = keep_count(fraction, len(scores))
    if k == 0:
        return None
    return float(np.sort(np.asarray(scores, dtype=np.float32))[::-1][k - 1])


@dataclass
class Plot:
    """A kind's score histogram over the clipped range, and the records left out on either side."""

    edges: list[float]
    counts: list[int]
    below: int = 0
    above: int = 0


@dataclass
class Thresholds:
    """The cut per group (a kind, or `all`), and what the passes counted on the way (over the records that pass
    the filters, unless said otherwise)."""

    by_group: dict[str, float | None]
    counts: dict[str, KindCounts]
    errors: Counter
    plots: dict[str, Plot] = field(default_factory=dict)
    sweep: list[dict] | None = None  # per value: {"value", "thresholds": {group: cut}, "kept"/"scored": {kind: n}}
    filters: dict = field(default_factory=dict)  # terms, removed by each, removed in all, records without metadata

    def for_kind(self, kind: str, per_kind: bool) -> float | None:
        return self.by_group.get(kind if per_kind else ALL)

    def as_dict(self) -> dict:
        return {k: v for k, v in sorted(self.by_group.items())}
