"""Score every sample of a corpus: `python -m jobs.score --input URI --format FMT --output URI --model URI`.

Runs on the Ray cluster in RAY_ADDRESS, or a local one. Rerunning the same command scores only the shards not
yet committed. `--dry-run` says what a run would do and cost, starting nothing. Exit status: 0 when every shard is
committed, 1 when some are incomplete, 2 on bad configuration, 130 after Ctrl-C.
"""

from __future__ import annotations

import sys

from jobs._config import Command, entry, run_command

COMMAND = Command("jobs.score", __doc__, dry_run=(
    "say what a run would do and cost (shards new and committed, samples, GPU-hours at "
    "--gpu-rate and --gpu-hour-price), starting nothing and writing nothing"))


def _job(config, sources):
    from pipeline.scoring.job import ScoringJob

    return ScoringJob(config, sources)


def main(argv: list[str] | None = None) -> int:
    from pipeline.scoring.config import ScoreConfig

    return entry(lambda: run_command(ScoreConfig, _job, argv, COMMAND), argv)


if __name__ == "__main__":
    sys.exit(main())
