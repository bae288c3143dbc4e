"""Placement across nodes: the shard readers on one node, the scoring actors (which decode) on the node that holds
the accelerator, and what crosses between them the encoded samples."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support.jobs import REPO_ROOT, job_env
from tests.support.shards import write_shards


def test_decode_runs_beside_the_accelerator_and_encoded_samples_cross_the_nodes(tmp_path, tiny_checkpoint):
    write_shards(tmp_path / "in", 2, 12, prefix="n", name="{k}")
    (tmp_path / "where").mkdir()
    res = subprocess.run([sys.executable, "-m", "tests.pipeline.scoring.two_nodes", str(tmp_path / "in"),
                          str(tmp_path / "out"), tiny_checkpoint, str(tmp_path / "where")],
                         cwd=REPO_ROOT, env=job_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    nodes, ran, summary = report["nodes"], report["ran"], report["summary"]
    assert nodes["head"] != nodes["scorer"]
    readers = {node for name, node in ran.items() if name.startswith("ReadStage-")}
    scorers = {node for name, node in ran.items() if name.startswith("ScoreStage-")}
    assert readers == {nodes["head"]} and scorers == {nodes["scorer"]}
    assert summary["records"]["this_run"] == 24 and summary["shards"]["incomplete"] == []
    own = summary["score"]
    assert own["transfer_bytes_per_sample"] < 2 * own["input_bytes_per_sample"]
