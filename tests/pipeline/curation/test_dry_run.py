"""`python -m jobs.curate --dry-run`: the exact thresholds of the rule and of a sweep of fractions (or minimum
scores), the records each keeps per kind, computed without a lease and without writing anything."""

from __future__ import annotations

import os

import numpy as np
import pytest

from jobs import curate as curate_cli
from pipeline.curation import CurateConfig, CurationJob
from pipeline.curation import thresholds as selection
from pipeline.runner import dry_run
from tests.support.curation import curate, fake_scores, random_records


@pytest.fixture(scope="module")
def two_kinds(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    shards = {"a.tar": random_records(50, "caption", 10, "a"), "b.tar": random_records(40, "caption", 11, "b"),
              "c.parquet": random_records(30, "interleaved", 12, "c")}
    shards["a.tar"].append({"id": "bad", "kind": "caption", "score": None, "label": None, "error": "decode: x"})
    fake_scores(str(root / "scores"), shards)
    return root / "scores", [r for rs in shards.values() for r in rs if r["error"] is None]


def _sweep(scores, output, **rule) -> dict[float, dict]:
    job = CurationJob(CurateConfig(scores=str(scores), output=str(output), executor="local", **rule))
    dry_run(job)
    return {row["value"]: row for row in job.thresholds.sweep}


def test_dry_run_thresholds_equal_a_real_runs(tmp_path, two_kinds):
    scores, records = two_kinds
    rows = _sweep(scores, tmp_path / "dry", keep_fraction=0.3, per_kind=True, sweep=[0.1, 0.5])
    assert sorted(rows) == [0.1, 0.3, 0.5]
    for fraction in (0.3, 0.5):
        own = curate(tmp_path, scores, f"real{fraction}", keep_fraction=fraction, per_kind=True)["curate"]
        assert rows[fraction]["thresholds"] == own["thresholds"]
        assert rows[fraction]["kept"] == {k: v["kept"] for k, v in own["by_kind"].items()}
    for kind in ("caption", "interleaved"):  # and the one never run: the sort-based rule
        of_kind = np.array([r["score"] for r in records if r["kind"] == kind])
        assert rows[0.1]["thresholds"][kind] == selection.sort_threshold(of_kind, 0.1)


def test_a_min_score_sweep_counts_what_each_minimum_keeps(tmp_path, two_kinds):
    scores, records = two_kinds
    rows = _sweep(scores, tmp_path / "dry", min_score=2.0, sweep=[0.5, 1.25, 2.9])
    for value, row in rows.items():
        for kind in ("caption", "interleaved"):
            assert row["kept"][kind] == sum(1 for r in records if r["kind"] == kind and r["score"] >= np.float32(value))
        assert row["thresholds"] == {"all": float(np.float32(value))}


def test_the_dry_run_writes_nothing_and_prints_the_table(tmp_path, two_kinds, capsys):
    scores, _ = two_kinds
    before = sorted(os.walk(scores))
    status = curate_cli.main(["--scores", str(scores), "--output", str(tmp_path / "cur"), "--keep-fraction", "0.3",
                              "--sweep", "0.1,0.5", "--dry-run", "--executor", "local"])
    out = capsys.readouterr().out
    assert status == 0
    assert not (tmp_path / "cur").exists() and sorted(os.walk(scores)) == before
    assert "no lease taken, nothing written" in out and "fraction -> threshold -> kept" in out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("  * ")] == ["0.3"]
