"""The README's main command: the demo runs synth -> train -> score on the bundled corpus and says what the
scores mean."""

from __future__ import annotations

import json
import subprocess
import sys

from pipeline.sinks import read_scores
from tests.conftest import job_env


def test_demo_scores_the_bundled_corpus(tmp_path, ray_cluster):
    res = subprocess.run([sys.executable, "-m", "jobs.demo", "--workdir", str(tmp_path), "--epochs", "1"],
                         env=job_env(RAY_ADDRESS=ray_cluster), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    captions = read_scores(str(tmp_path / "scores" / "captions"))
    documents = read_scores(str(tmp_path / "scores" / "documents"))
    assert captions.num_rows == 240 and documents.num_rows == 80
    assert set(captions.column("kind").to_pylist()) == {"caption"}
    assert set(documents.column("kind").to_pylist()) == {"interleaved"}
    assert captions.column("error").null_count == 240 and documents.column("error").null_count == 80
    assert "trained from\nscratch for 1 epochs" in res.stdout
    summary = json.loads((tmp_path / "scores" / "captions" / "summary.json").read_text())
    assert summary["committed_samples_total"] == 240
    assert summary["model"].startswith(str(tmp_path / "training" / "best") + "@")  # scored with the trained model
    pairs = json.loads((tmp_path / "pairs" / "summary.json").read_text())
    assert pairs["pairs_this_run"] == 4 * 80  # the last synth run: the documents
    trained = json.loads((tmp_path / "training" / "train_summary.json").read_text())
    assert trained["train_pairs"] > 1000 and trained["history"][-1]["epoch"] == 1
