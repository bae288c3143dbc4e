"""`benchmarks/gpu_machine.sh` runs what the GPU machine will run, and passes: its smoke run (`--smoke`: the dry
run's tiny config on a CPU, every part and time box, a handful of samples in each) here with Ray, s3fs and boto3
unimportable (the GPU machine has none of them), and in the GPU machine's twin with only the carried wheels where
the twin is built. The whole dry run (`bash benchmarks/gpu_machine.sh --dry-run`) is the same code on more samples;
it is run by hand before GPU time is spent, not by the tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.support.gpu_twin import REPO_ROOT, require_twin


def smoke_run(out, python: str, **env) -> tuple[dict, str]:
    """`gpu_machine.sh --smoke` with `python`: (gpu.json, gpu-table.md); its output where it fails."""
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    res = subprocess.run(["bash", "benchmarks/gpu_machine.sh", "--smoke"], cwd=REPO_ROOT,
                         env={**clean, **env, "PYTHON": python, "OUT": str(out)}, capture_output=True, text=True,
                         timeout=1200)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:]
    return json.loads((out / "gpu.json").read_text()), (out / "gpu-table.md").read_text()


def assert_every_part_ran_and_held(report: dict, table: str) -> None:
    assert "no row is a GPU measurement" in report["device"]["note"]
    rows = report["rows"]
    assert {row["part"] for row in rows} >= {"check", "decode", "model", "agreement", "padding", "sweep", "path"}
    assert all(row["ok"] for row in rows if "ok" in row)  # the checks and the agreements
    sweeps = [row for row in rows if row["part"] == "sweep"]
    assert sweeps and all(row["recompiles"] == 0 and row["failures"] == "none" for row in sweeps)
    assert all(row["vision_padding"] <= 1.05 for row in rows if row["part"] == "padding")
    path = [row for row in rows if row["part"] == "path"]
    assert path and all(row["samples_per_s"] > 0 and 0 < row["busy_pct"] <= 100 for row in path)
    assert table.count("time box") == 3 and "CUT" not in table and "| padding |" in table


def test_the_gpu_machines_smoke_run_passes_without_ray_s3fs_or_boto3(tmp_path):
    blocked = tmp_path / "blocked"
    for name in ("ray", "s3fs", "boto3"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    report, table = smoke_run(tmp_path / "out", sys.executable, PYTHONPATH=str(blocked))
    assert_every_part_ran_and_held(report, table)


def test_in_the_twin_the_gpu_machines_smoke_run_passes_with_only_the_carried_wheels(tmp_path):
    report, table = smoke_run(tmp_path / "out", require_twin(), TMPDIR=str(tmp_path))
    assert_every_part_ran_and_held(report, table)
    assert report["device"]["versions"]["torch"].startswith("2.11.0")
    # torchvision's decoder is there: its pixels from two threads at once are one thread's, its scores Pillow's
    assert any(row["settings"].startswith("nvjpeg on cpu") for row in report["rows"] if row["part"] == "check")
    assert any(row["settings"] == "nvjpeg vs pillow decode" for row in report["rows"] if row["part"] == "agreement")
