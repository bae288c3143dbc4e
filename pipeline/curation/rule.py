"""Curation's rule as one value: which records it keeps by their score (`--min-score X` or `--keep-fraction F`,
each within every kind with `--per-kind`). Decided once from the configuration (`CurateConfig.rule`); everything
else asks the rule for what it needs (its unit, its label, its cut), never which rule it is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipeline.curation.thresholds import ALL, KINDS, KindCounts, cut_bin, keep_count, score_key

DEFAULT_FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
DEFAULT_MIN_SCORES = (0.5, 1.0, 1.5, 2.0, 2.5)


@dataclass(frozen=True)
class Rule:
    """`kind`: keep the records scoring at least `value` (`min_score`), or the best `value` share of them
    (`keep_fraction`); `per_kind`: within each kind separately rather than over all records."""

    kind: Literal["min_score", "keep_fraction"]
    value: float
    per_kind: bool = False
    rank_by: str | None = None  # the fused value ranked instead of the score (`pipeline.curation.rank`)

    @property
    def unit(self) -> str:
        """What the rule's values are, as the sweep's column says it."""
        return "fraction" if self.kind == "keep_fraction" else "min-score"

    @property
    def label(self) -> str:
        """The rule as a user reads it (the summary's and the report's `rule`, part of the output's identity)."""
        return (f"{self.kind.replace('_', '-')} {self.value:g}" + (" per kind" if self.per_kind else "")
                + (f" by {self.rank_by}" if self.rank_by else ""))

    @property
    def fixed_cut(self) -> float | None:
        """The cut when it is the number given (a minimum score, as the float32 a score is); None when the corpus
        decides it (a fraction: the threshold passes find it, and it joins the output's identity)."""
        return float(np.float32(self.value)) if self.kind == "min_score" else None

    @property
    def groups(self) -> list[str]:
        """The groups a cut is found for: each kind, or all records together."""
        return list(KINDS) if self.per_kind else [ALL]

    def sweep_values(self, sweep: list[float] | None) -> list[float]:
        """What a dry run (or a report) tabulates: the rule's own value and the sweep's (or the standard set of the
        rule's unit), in order."""
        default = DEFAULT_FRACTIONS if self.kind == "keep_fraction" else DEFAULT_MIN_SCORES
        return sorted({self.value, *(sweep or default)})

    def check_sweep(self, sweep: list[float]) -> None:
        """A sweep's values in the rule's unit (fractions lie in (0, 1]); a ValueError naming `sweep`."""
        if not sweep:
            raise ValueError("field 'sweep': give at least one value")
        if self.kind == "keep_fraction" and not all(0 < v <= 1 for v in sweep):
            raise ValueError("field 'sweep': fractions lie in (0, 1]")

    def cut(self, counts: KindCounts, value: float) -> tuple[int, int] | int | None:
        """Where the cut at `value` (in the rule's unit) lies in a group's pass-one counts: (high bin, rank inside
        it) for a fraction, the score's key for a minimum score, None when nothing is kept."""
        if self.kind == "min_score":
            return score_key(float(np.float32(value)))
        k = keep_count(value, counts.scored)
        return cut_bin(counts, k) if k else None
