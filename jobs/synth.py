"""Write semi-synthetic training pairs: `python -m jobs.synth --input URI --format FMT --output URI
--generator offline|bedrock|openai [--endpoint URL] [--llm ID]`.

Rerunning the same command finishes the shards not yet committed and never pays twice for a cached request.
Exit status: 0 when every shard is committed, 1 when some are incomplete, 2 on bad configuration.
"""

from __future__ import annotations

import sys

from jobs._config import connect_ray, input_errors_exit_2, parse_config


def main(argv: list[str] | None = None) -> int:
    import time

    started = time.time()
    from pipeline.synth import SynthConfig, format_summary, prepare_synth, synthesize

    config = parse_config(SynthConfig, argv, "python -m jobs.synth", __doc__.split("\n")[0])
    with input_errors_exit_2():
        prepared = prepare_synth(config, started)  # shards, generator, output: before Ray starts
    try:
        connect_ray()
        summary = synthesize(config, prepared=prepared)
    finally:
        if prepared.lease is not None:
            prepared.lease.release()
    print(format_summary(summary))
    return 1 if summary["shards"]["incomplete"] or summary.get("aborted") else 0


if __name__ == "__main__":
    sys.exit(main())
