"""Score every sample of a corpus: `python -m jobs.score --input URI --format FMT --output URI --model URI`.

Runs on the Ray cluster in RAY_ADDRESS, or a local one. Rerunning the same command scores only the shards not
yet committed. `--dry-run` says what a run would do and cost, starting nothing. Exit status: 0 when every shard is
committed, 1 when some are incomplete, 2 on bad configuration.
"""

from __future__ import annotations

import sys
import time

from jobs._config import entry, exit_status, parse, run_prepared


def main(argv: list[str] | None = None) -> int:
    return entry(lambda: _run(argv), argv)


def _run(argv: list[str] | None) -> int:
    started = time.time()
    from pipeline.scoring import ScoreConfig, dry_run_plan, format_summary, prepare_scoring, run_scoring

    invocation = parse(ScoreConfig, argv, "python -m jobs.score", __doc__.split("\n")[0])
    config = invocation.config
    if invocation.dry_run:
        print(dry_run_plan(config))
        return 0
    # shards, model, output, surveyed before Ray starts; the output is claimed once the job's resources are known
    prepared, model_id = prepare_scoring(config, started, dry_run=True)
    summary = run_prepared(prepared, "score", invocation.verbose,
                           lambda: run_scoring(prepared, config, model_id, sources=invocation.sources))
    print(format_summary(summary))
    return exit_status(summary)


if __name__ == "__main__":
    sys.exit(main())
