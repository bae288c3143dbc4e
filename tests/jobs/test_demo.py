"""The README's main command: the demo runs synth -> train -> score -> curate -> report on the bundled corpus, and
its trained model ranks the held-out samples by their true level."""

from __future__ import annotations

import json
import subprocess
import sys

from pipeline.commit.records import read_committed
from pipeline.curation import SELECTED_SCHEMA
from pipeline.scoring import read_scores
from tests.conftest import job_env


def test_demo_runs_end_to_end_and_its_model_tells_good_from_unrelated(tmp_path, ray_cluster):
    res = subprocess.run([sys.executable, "-m", "jobs.demo", "--workdir", str(tmp_path), "--epochs", "3"],
                         env=job_env(RAY_ADDRESS=ray_cluster), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    demo = json.loads((tmp_path / "demo_summary.json").read_text())
    means = {int(k): v for k, v in demo["held_out_mean_score_by_level"].items()}
    assert means[3] > means[0], means  # level-3 samples score higher than unrelated (level-0) ones

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
    assert "trained from scratch for 3 epochs on CPU" in res.stdout.replace("\n", " ")  # and says what that means
