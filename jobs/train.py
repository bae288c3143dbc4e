"""Train the classifier on Ray Train: `python -m jobs.train --train URI --val URI --output URI
--model-config tiny|qwen2.5-0.5b|qwen2.5-1.5b [--init URI] [--workers N] [--use-gpu]`.

Rerunning with the same `--name` and storage resumes from the latest checkpoint. The best checkpoint by
validation accuracy is exported to OUTPUT/best/, which `python -m jobs.score --model OUTPUT/best` loads.
"""

from __future__ import annotations

import sys

from jobs._config import connect_ray, input_errors_exit_2, parse_config


def main(argv: list[str] | None = None) -> int:
    from pipeline.training import TrainConfig, TrainingStalled, format_summary, train_classifier

    config = parse_config(TrainConfig, argv, "python -m jobs.train", __doc__.split("\n")[0])
    connect_ray()
    with input_errors_exit_2():
        try:
            summary = train_classifier(config)
        except TrainingStalled as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
