"""`benchmarks/gpu_machine.sh --dry-run` runs what the GPU machine will run (the tiny config, on a CPU, short rows)
and passes: in the GPU machine's twin with only the carried wheels where the twin is built, else here with Ray,
s3fs and boto3 unimportable (the GPU machine has none of them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.support.gpu_twin import REPO_ROOT, carried_wheels, twin_python


def test_the_gpu_machines_dry_run_passes_without_ray(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    twin = twin_python() if carried_wheels() else None
    if twin:
        env.update(PYTHON=twin, TMPDIR=str(tmp_path))
    else:
        blocked = tmp_path / "blocked"
        for name in ("ray", "s3fs", "boto3"):
            (blocked / name).mkdir(parents=True)
            (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here')\n")
        env.update(PYTHON=sys.executable, PYTHONPATH=str(blocked))
    out = tmp_path / "out"
    res = subprocess.run(["bash", "benchmarks/gpu_machine.sh", "--dry-run"], cwd=REPO_ROOT,
                         env={**env, "OUT": str(out)}, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:]
    report = json.loads((out / "gpu.json").read_text())
    assert "no row is a GPU measurement" in report["device"]["note"]
    rows = report["rows"]
    assert {row["part"] for row in rows} >= {"check", "decode", "model", "agreement", "padding", "sweep", "path"}
    assert all(row["ok"] for row in rows if "ok" in row)  # the checks and the agreements
    assert all(row["recompiles"] == 0 and row["failures"] == "none" for row in rows if row["part"] == "sweep")
    assert all(row["vision_padding"] <= 1.05 for row in rows if row["part"] == "padding")
    path = [row for row in rows if row["part"] == "path"]
    assert path and all(row["samples_per_s"] > 0 and 0 < row["busy_pct"] <= 100 for row in path)
    table = (out / "gpu-table.md").read_text()
    assert table.count("time box") == 3 and "CUT" not in table and "| padding |" in table
