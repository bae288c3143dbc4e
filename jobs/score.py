"""Score every sample of a corpus: `python -m jobs.score --input URI --format FMT --output URI --model URI`.

Runs on the Ray cluster in RAY_ADDRESS, or a local one. Rerunning the same command scores only the shards not
yet committed. Exit status: 0 when every shard is committed, 1 when some are incomplete, 2 on bad configuration.
"""

from __future__ import annotations

import sys

from jobs._config import connect_ray, input_errors_exit_2, parse_config


def main(argv: list[str] | None = None) -> int:
    import time

    started = time.time()
    from pipeline.scoring import ScoreConfig, format_summary, prepare_scoring, run_scoring

    config = parse_config(ScoreConfig, argv, "python -m jobs.score", __doc__.split("\n")[0])
    with input_errors_exit_2():
        prepared, model_id = prepare_scoring(config, started)  # shards, model, output: before Ray starts
    try:
        connect_ray()
        summary = run_scoring(prepared, config, model_id)
    finally:
        if prepared.lease is not None:
            prepared.lease.release()
    print(format_summary(summary))
    return 1 if summary["shards"]["incomplete"] or summary.get("aborted") else 0


if __name__ == "__main__":
    sys.exit(main())
