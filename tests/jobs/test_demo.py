"""The README's main command: the demo runs synth -> train -> score -> curate -> report on the bundled corpus and
ends with the report's path and what was kept. One epoch: whether its model learns (level 3 above level 0 at the
default three epochs) is measured by `make bench-learning` (benchmarks/demo_ranking.py)."""

from __future__ import annotations

import json
import subprocess
import sys

from pipeline.commit.records import read_committed
from pipeline.curation import SELECTED_SCHEMA
from pipeline.scoring import read_scores
from tests.support.jobs import job_env


def test_demo_runs_the_whole_chain_and_ends_with_the_report_and_what_was_kept(tmp_path, ray_cluster):
    res = subprocess.run([sys.executable, "-m", "jobs.demo", "--workdir", str(tmp_path), "--epochs", "1"],
                         env=job_env(RAY_ADDRESS=ray_cluster), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    demo = json.loads((tmp_path / "demo_summary.json").read_text())
    assert sorted(demo["held_out_mean_score_by_level"]) == ["0", "1", "2", "3"]  # every level scored
    assert "held-out   mean score by true level: L0 " in res.stdout

    assert sorted(p.name for p in (tmp_path / "pairs").iterdir() if not p.name.startswith("_")) == [
        "summary.json", "train", "val"]  # the pairs, split by origin
    assert (tmp_path / "training" / "best" / "config.json").is_file()  # the trained model, exported
    scores = read_scores(str(tmp_path / "scores"))
    assert scores.num_rows == 4 * (60 + 24) and scores.column("error").null_count == scores.num_rows
    assert set(scores.column("kind").to_pylist()) == {"caption", "interleaved"}
    kept = read_committed(str(tmp_path / "curated"), SELECTED_SCHEMA)
    assert kept.num_rows == demo["kept"] and 0.45 <= demo["kept"] / demo["scored"] <= 0.6
    assert sorted((tmp_path / "curated" / "shards").iterdir())  # the curated corpus, as shards
    assert (tmp_path / "report" / "index.html").is_file()
    lines = res.stdout.strip().splitlines()
    assert lines[-2] == f"[demo] report: {tmp_path / 'report' / 'index.html'}"
    assert lines[-1].startswith(f"[demo] kept {demo['kept']} of {demo['scored']} held-out samples")
    assert "trained from scratch for 1 epoch" in res.stdout.replace("\n", " ")  # and says what that means
