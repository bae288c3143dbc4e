"""The GPU machine's twin, for the tests that need it: its interpreter (`benchmarks/gpu_twin.sh` builds it at
/tmp/gpu-twin; `UNIFILTER_GPU_TWIN` names another) with, installed beside it as on the GPU machine, only the wheels
that travel there (`make gpu-wheels`: .whl/). Where either is absent the test is skipped, saying which."""

from __future__ import annotations

import glob
import os
import subprocess

import pytest

from tests.support.jobs import REPO_ROOT

DEFAULT_TWIN = "/tmp/gpu-twin/bin/python"


def twin_python() -> str | None:
    python = os.environ.get("UNIFILTER_GPU_TWIN", DEFAULT_TWIN)
    return python if os.access(python, os.X_OK) else None


def carried_wheels() -> list[str]:
    return sorted(glob.glob(os.path.join(REPO_ROOT, ".whl", "*.whl")))


def require_twin() -> str:
    """The twin's python, where it and the wheels to carry to it are both there; else the test is skipped, saying
    which is missing."""
    python = twin_python()
    if python is None:
        pytest.skip(f"no GPU-machine twin at {os.environ.get('UNIFILTER_GPU_TWIN', DEFAULT_TWIN)}: build it with "
                    "`bash benchmarks/gpu_twin.sh` (or set UNIFILTER_GPU_TWIN to its python)")
    if not carried_wheels():
        pytest.skip("no wheels in .whl/ to carry to the twin: run `make gpu-wheels`")
    return python


def twin_or_skip(site_dir) -> tuple[str, dict]:
    """(the twin's python, an environment for it: the carried wheels installed into `site_dir` with `pip
    --target`, as `benchmarks/gpu_machine.sh` installs them there, and the repository on PYTHONPATH)."""
    python, wheels = require_twin(), carried_wheels()
    subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index", "--no-deps",
                    "--no-compile", "--target", str(site_dir), *wheels], check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PYTHONPATH"] = f"{site_dir}{os.pathsep}{REPO_ROOT}"
    return python, env
