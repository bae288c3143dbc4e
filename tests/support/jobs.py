"""Running jobs from tests: a command line in this process (its exit status and what it printed), the environment
of a job run as a subprocess, a command line as a subprocess paused at a chosen commit, and waiting for that point."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def job_env(**extra) -> dict:
    """Environment for a job run as a subprocess (the same Python, the repo importable)."""
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")  # `python` is this venv's
    env = dict(os.environ, PATH=path, PYTHONPATH=REPO_ROOT, PYTHONUNBUFFERED="1", RAY_AUTH_MODE="disabled")
    env.update(extra)
    return env


def run_main(main, argv: list[str], capsys) -> tuple[int, str, str]:
    """`main(argv)` of a job's module in this process: (exit status, stdout, stderr). For tests about arguments,
    messages and refusals; what needs a process of its own (signals, Ray's native logging, the working directory
    a job imports from, a job starting its own Ray) runs as a subprocess."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def paused_job(module: str, argv: list, marker: Path, env: dict, after: int | str = 1, **popen) -> subprocess.Popen:
    """`python -m MODULE ARGV` as a subprocess whose driver pauses after its `after`-th commit (or `N:module.function`:
    that function's N-th call in the driver) (`marker` appears; `release(marker)` lets it go on):
    `tests.support.paused_job`."""
    cmd = [sys.executable, "-m", "tests.support.paused_job", str(after), str(marker), module, *map(str, argv)]
    return subprocess.Popen(cmd, env=env, **popen)


def wait_for(marker: Path, job: subprocess.Popen, timeout: float = 240) -> None:
    """Until the paused job reaches its point; fails if it ended first."""
    deadline = time.time() + timeout
    while not marker.exists():
        if job.poll() is not None:
            out, err = job.communicate()
            raise AssertionError(f"the job ended (exit {job.returncode}) before its pause: {out}{err}"[-3000:])
        if time.time() > deadline:
            job.kill()
            raise AssertionError(f"the job did not reach its pause within {timeout} s")
        time.sleep(0.05)


def release(marker: Path) -> None:
    Path(f"{marker}.release").touch()
