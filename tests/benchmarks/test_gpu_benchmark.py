"""`make bench-gpu` runs on a bare GPU machine (torch, transformers, pyarrow, Pillow; no Ray, s3fs or boto3): its
CPU mode exercises the same code there, so it must run to completion with those packages unimportable."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_the_benchmarks_cpu_mode_runs_without_ray(tmp_path):
    blocked = tmp_path / "blocked"
    for name in ("ray", "s3fs", "boto3"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    out = tmp_path / "bench" / "bench-gpu.json"
    env = dict(os.environ, PYTHONPATH=f"{blocked}{os.pathsep}{REPO_ROOT}")
    res = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "benchmarks", "gpu.py"), "--device", "cpu",
                          "--seconds", "0.05", "--out", str(out)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "jobs.score rows skipped: Ray is not installed here" in res.stdout
    assert "no row is a GPU measurement" in res.stdout
    report = json.loads(out.read_text())
    parts = {row["part"] for row in report["rows"]}
    assert parts == {"decode", "model", "agreement", "path", "training", "done"}
    assert all(row["ok"] for row in report["rows"] if row["part"] == "agreement")
    nvjpeg = [row for row in report["rows"] if row["part"] == "decode" and "nvjpeg" in row["settings"]]
    assert len(nvjpeg) == 2  # 512 px and a megapixel: measured where torchvision loads, else why not
    path = [row for row in report["rows"] if row["part"] == "path"]
    assert path and all(row["samples_per_s"] > 0 for row in path)
