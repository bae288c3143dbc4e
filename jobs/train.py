"""Train the classifier on Ray Train: `python -m jobs.train --train URI --val URI --output URI
--model-config tiny|qwen2.5-0.5b|qwen2.5-1.5b [--init URI] [--workers N] [--use-gpu]`.

Rerunning with the same `--name` and storage resumes from the furthest checkpoint. The best checkpoint by
validation accuracy is exported to OUTPUT/best/, which `python -m jobs.score --model OUTPUT/best` loads.
`--dry-run` says what a run would do, starting nothing. Exit status: 0 when training finished, 1 when it stalled
or failed, 2 on bad configuration.
"""

from __future__ import annotations

import sys

from jobs._config import Command, entry, parse

COMMAND = Command("jobs.train", __doc__, dry_run=(
    "say what a run would do (pairs, steps, the model, workers, the resume point), starting "
    "nothing and writing nothing"))


def main(argv: list[str] | None = None) -> int:
    return entry(lambda: _run(argv), argv)


def _run(argv: list[str] | None) -> int:
    from pipeline.training import TrainConfig

    invocation = parse(TrainConfig, argv, COMMAND)
    from pipeline.training.preflight import check_before_start

    config = invocation.config
    if invocation.dry_run:
        from pipeline.training import dry_run_plan

        print(dry_run_plan(config))
        return 0
    checked = check_before_start(config)  # every path and setting, before Ray (or torch) loads
    from pipeline.training import format_summary, train_classifier
    from pipeline.training.summary import finished_lines

    if checked.finished:
        print(finished_lines(checked.finished))
        return 0
    from pipeline.runner.cluster import connect

    connect(invocation.verbose, "train")
    summary = train_classifier(config, sources=invocation.sources)
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
