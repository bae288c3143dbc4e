"""The README's main command: the demo scores the bundled corpus end to end and says what the scores mean."""

from __future__ import annotations

import json
import subprocess
import sys

from pipeline.sinks import read_scores
from tests.conftest import job_env


def test_demo_scores_the_bundled_corpus(tmp_path, ray_cluster):
    res = subprocess.run([sys.executable, "-m", "jobs.demo", "--workdir", str(tmp_path)],
                         env=job_env(RAY_ADDRESS=ray_cluster), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    captions = read_scores(str(tmp_path / "scores" / "captions"))
    documents = read_scores(str(tmp_path / "scores" / "documents"))
    assert captions.num_rows == 240 and documents.num_rows == 80
    assert set(captions.column("kind").to_pylist()) == {"caption"}
    assert set(documents.column("kind").to_pylist()) == {"interleaved"}
    assert captions.column("error").null_count == 240 and documents.column("error").null_count == 80
    assert "RANDOM weights" in res.stdout
    summary = json.loads((tmp_path / "scores" / "captions" / "summary.json").read_text())
    assert summary["committed_samples_total"] == 240
