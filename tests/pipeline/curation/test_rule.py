"""Curation's rule as one value (`pipeline.curation.rule`): decided once from the configuration, it answers what
the passes, the summary, the report and the output's identity need (its unit, its label, its cut)."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from pipeline.curation import CurateConfig
from pipeline.curation.rule import DEFAULT_FRACTIONS, DEFAULT_MIN_SCORES, Rule
from pipeline.curation.thresholds import ALL, KINDS, KindCounts, score_key, score_of_key


def _config(**rule) -> CurateConfig:
    return CurateConfig(scores="/tmp/scores", output="/tmp/curated", **rule)


def test_a_keep_fraction_is_a_fraction_whose_cut_the_corpus_decides():
    rule = _config(keep_fraction=0.3, per_kind=True).rule
    assert rule == Rule("keep_fraction", 0.3, per_kind=True)
    assert (rule.unit, rule.label, rule.fixed_cut, rule.groups) == ("fraction", "keep-fraction 0.3 per kind", None,
                                                                   list(KINDS))


def test_a_min_score_cuts_at_its_number_as_a_float32_score():
    rule = _config(min_score=0.1).rule
    assert (rule.unit, rule.label, rule.groups) == ("min-score", "min-score 0.1", [ALL])
    assert rule.fixed_cut == float(np.float32(0.1)) != 0.1


def test_a_sweep_holds_the_rules_own_value_in_order():
    assert _config(keep_fraction=0.25).rule.sweep_values(None) == sorted({0.25, *DEFAULT_FRACTIONS})
    assert _config(min_score=2.2).rule.sweep_values([3.0, 1.0]) == [1.0, 2.2, 3.0]
    assert _config(min_score=2.0).rule.sweep_values(None) == list(DEFAULT_MIN_SCORES)


def test_a_sweep_of_fractions_outside_zero_to_one_is_refused_naming_sweep():
    with pytest.raises(ValidationError, match="field 'sweep': fractions lie in"):
        _config(keep_fraction=0.3, sweep=[0.5, 1.5])
    assert _config(min_score=1.0, sweep=[1.5, 7.0]).sweep == [1.5, 7.0]  # minimum scores are unbounded


def test_the_cut_of_a_fraction_is_the_bin_and_rank_of_its_last_kept_record():
    counts = KindCounts(scored=10)
    key = score_key(1.5)
    counts.high_bins[key >> 16] = 10  # ten records in one bin
    assert Rule("keep_fraction", 0.3).cut(counts, 0.3) == (key >> 16, 3)
    assert Rule("keep_fraction", 0.3).cut(counts, 0.01) is None  # rounds to none kept
    assert score_of_key(Rule("min_score", 1.5).cut(counts, 1.5)) == 1.5
