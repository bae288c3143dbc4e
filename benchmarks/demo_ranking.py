"""Does the demo's model tell the held-out levels apart? `python -m jobs.demo` at its default three epochs, on a
local Ray instance in a scratch folder; the held-out mean score per true level, and whether level 3 scores above
level 0 (unrelated captions) as it should. The test suite runs the demo for one epoch and checks its chain, not its
learning: learning is measured here and in benchmarks/learning.py.

    python benchmarks/demo_ranking.py [--epochs 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-demo-"))
    from jobs import demo

    started = time.time()
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        status = demo.main(["--workdir", str(work), "--epochs", str(args.epochs)])
    summary = json.loads((work / "demo_summary.json").read_text())
    means = {int(k): v for k, v in summary["held_out_mean_score_by_level"].items()}
    print(f"demo at {args.epochs} epochs ({time.time() - started:.0f} s, exit {status}): held-out mean score by "
          "true level")
    print("| level | mean score |\n|---|---|")
    for level, mean in sorted(means.items()):
        print(f"| {level} | {mean:.3f} |")
    ranks = means.get(3, 0) > means.get(0, 0)
    print(f"level 3 above level 0 (unrelated): {'yes' if ranks else 'NO'}; kept {summary['kept']} of "
          f"{summary['scored']}")
    return 0 if status == 0 and ranks else 1


if __name__ == "__main__":
    sys.exit(main())
