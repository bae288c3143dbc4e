"""A job's command line with its driver paused at a chosen point: after its N-th commit (or the N-th call of a
function the driver runs, `N:module.function`), the file MARKER is created and the driver waits (its Ray stages
may go on) until it is killed, interrupted (Ctrl-C), or MARKER.release appears. Kill, Ctrl-C and two-jobs tests
interrupt a run exactly there, not by making it slow.

    python -m tests.support.paused_job N[:module.function] MARKER jobs.score --input ... (the job's arguments)
"""

from __future__ import annotations

import functools
import importlib
import os
import runpy
import sys
import time


def _pause(marker: str) -> None:
    with open(marker, "w"):
        pass
    while not os.path.exists(marker + ".release"):
        time.sleep(0.05)  # a signal (SIGINT: KeyboardInterrupt) is acted on here


def _after_commits(n: int, marker: str) -> None:
    import pipeline.commit.committer as committer

    count = committer.ShardCommitter._count

    def paused(self, *args, **kwargs):
        count(self, *args, **kwargs)
        if len(self.committed) == n:
            _pause(marker)

    committer.ShardCommitter._count = paused


def _after_calls(n: int, target: str, marker: str) -> None:
    module_name, name = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    real, calls = getattr(module, name), []

    @functools.wraps(real)
    def paused(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == n:
            _pause(marker)
        return result

    setattr(module, name, paused)


def main() -> None:
    point, marker, module, *argv = sys.argv[1:]
    n, _, target = point.partition(":")
    if target:
        _after_calls(int(n), target, marker)
    else:
        _after_commits(int(n), marker)
    sys.argv = [module, *argv]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
