"""Curate a scored corpus: `python -m jobs.curate --scores URI --output URI (--min-score X | --keep-fraction F)
[--per-kind] [--input URI --format FMT] [--materialize] [--report DIR]`.

Selects the best-scored records (error records never), writes them per input shard to OUTPUT/selected/ (and, with
--materialize, the kept samples as shards in the input's format to OUTPUT/shards/), and with --report an HTML
report to judge the threshold by. Rerunning after a kill finishes the job exactly once; with --min-score a rerun
curates only the score shards committed since the last run. `--dry-run` says what a run would do, starting
nothing. Exit status: 0 when every shard is committed, 1 when some are incomplete, 2 on bad configuration.
"""

from __future__ import annotations

import sys
import time

from jobs._config import connect_ray, entry, exit_status, parse


def main(argv: list[str] | None = None) -> int:
    return entry(lambda: _run(argv), argv)


def _run(argv: list[str] | None) -> int:
    started = time.time()
    from pipeline.curation import (
        CurateConfig,
        compute_thresholds,
        dry_run_plan,
        format_summary,
        prepare_curation,
        run_curation,
    )

    invocation = parse(CurateConfig, argv, "python -m jobs.curate", __doc__.split("\n")[0])
    config = invocation.config
    if invocation.dry_run:
        print(dry_run_plan(config))
        return 0
    plan = prepare_curation(config, started)  # the scores and the output: before Ray starts
    connect_ray(invocation.verbose, "curate")
    thresholds = compute_thresholds(plan)
    _, summary = run_curation(plan, thresholds)
    print(format_summary(summary))
    if config.report:
        from pipeline.curation_report import write_curation_report

        print(f"  report     {write_curation_report(plan, thresholds, summary)}")
    return exit_status(summary)


if __name__ == "__main__":
    sys.exit(main())
