"""A shell for Ray's command line in tests: `ray job submit` against the session's token-auth cluster
(`token_cluster` in tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.jobs import job_env

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def ray_env(home: Path, **extra) -> dict:
    """A shell of a user (or pod) whose home is `home`: no Ray auth settings but those given."""
    env = {k: v for k, v in job_env().items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(home), **extra)
    return env


def submit(dashboard: str, env: dict, *entrypoint: str, cwd=None, timeout: float = 180) -> subprocess.CompletedProcess:
    """`ray job submit --address DASHBOARD [--working-dir .] -- ENTRYPOINT` (the working dir when `cwd` is given)."""
    working_dir = ["--working-dir", "."] if cwd else []
    return subprocess.run([RAY, "job", "submit", "--address", dashboard, *working_dir, "--", *entrypoint], env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=timeout)
