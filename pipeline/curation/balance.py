"""`--balance-by COLUMN --max-per-group N`: at most N kept records per value of COLUMN (a source, a domain column of
the metadata), the best of each group by the ranking (the score, or `--rank-by`'s fused value), applied after the
rule. Exact and deterministic: records are ordered by (ranked value, highest first; then id; then source), so ties
are broken the same way in every run; one pass over every score file sends each group's best N of that file
(`group_tops`), the driver keeps each group's N-th best as its cap (`merge_caps`), and the selection keeps a
record kept by the rule when it is not after its group's cap (`Balance.within`). A null value is a group of its own.
The driver holds N entries per group that has more than N records kept by the rule."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa

Order = tuple[float, str, str]  # (-ranked value, id, source): smaller is better


@dataclass(frozen=True)
class Balance:
    """The cap (`most` per value of `column`), and once counted (`counted`) the order key of each capped group's
    last kept record (`caps`: groups with at most `most` records kept by the rule have none)."""

    column: str
    most: int
    caps: dict = field(default_factory=dict)  # group value -> Order of its `most`-th best record
    removed: int = 0  # records kept by the rule that the caps drop, over every score file
    counted: bool = False

    def with_caps(self, caps: dict, removed: int) -> Balance:
        return replace(self, caps=caps, removed=removed, counted=True)

    @property
    def digest(self) -> str:
        """The caps' content (part of the output's identity: a rerun whose caps differ is refused)."""
        text = json.dumps(sorted([repr(g), list(c)] for g, c in self.caps.items()))
        return hashlib.sha256(text.encode()).hexdigest()

    def within(self, table: pa.Table, keep: np.ndarray, ranked: np.ndarray) -> np.ndarray:
        """Which records kept by the rule (`keep`) the caps keep too."""
        out = keep.copy()
        if not self.caps:
            return out
        groups = table.column(self.column).to_pylist()
        ids, sources = table.column("id").to_pylist(), table.column("source").to_pylist()
        for i in np.flatnonzero(keep):
            cap = self.caps.get(groups[i])
            if cap is not None and _order(ranked[i], ids[i], sources[i]) > tuple(cap):
                out[i] = False
        return out


def _order(value: float, sample_id: str | None, source: str | None) -> Order:
    return (-float(value), sample_id or "", source or "")


def group_tops(table: pa.Table, keep: np.ndarray, ranked: np.ndarray, column: str, most: int) -> list:
    """One score file's part: per group value, how many records the rule keeps and the order keys of its best
    `most` of them, as [group, count, [order, ...]]."""
    groups = table.column(column).to_pylist()
    ids, sources = table.column("id").to_pylist(), table.column("source").to_pylist()
    by_group: dict = {}
    for i in np.flatnonzero(keep):
        by_group.setdefault(groups[i], []).append(_order(ranked[i], ids[i], sources[i]))
    return [[g, len(orders), sorted(orders)[:most]] for g, orders in by_group.items()]


def merge_caps(parts: list[list], most: int) -> tuple[dict, int]:
    """The caps over every score file, from their parts (`group_tops`), and how many records they drop."""
    counts: dict = {}
    tops: dict = {}
    for part in parts:
        for group, count, orders in part:
            key = tuple(group) if isinstance(group, list) else group
            counts[key] = counts.get(key, 0) + count
            tops.setdefault(key, []).extend(tuple(o) for o in orders)
    caps = {g: sorted(tops[g])[most - 1] for g, n in counts.items() if n > most}
    return caps, sum(n - most for n in counts.values() if n > most)
