"""A job's command line with its driver paused at a chosen point: after its N-th commit the file MARKER is created
and the driver waits (its stages may go on) until it is killed, interrupted (Ctrl-C), or MARKER.release appears.
Kill, Ctrl-C and two-jobs tests interrupt a run exactly there, not by making it slow.

    python -m tests.support.paused_job N MARKER jobs.score --input ... (the job's own arguments)
"""

from __future__ import annotations

import os
import runpy
import sys
import time

import pipeline.commit.committer as committer


def main() -> None:
    after, marker, module, *argv = sys.argv[1:]
    count = committer.ShardCommitter._count

    def paused(self, *args, **kwargs):
        count(self, *args, **kwargs)
        if len(self.committed) == int(after):
            with open(marker, "w"):
                pass
            while not os.path.exists(marker + ".release"):
                time.sleep(0.05)  # a signal (SIGINT: KeyboardInterrupt) is acted on here

    committer.ShardCommitter._count = paused
    sys.argv = [module, *argv]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
