"""Write semi-synthetic training pairs: `python -m jobs.synth --input URI --format FMT --output URI
--generator offline|bedrock|openai [--endpoint URL] [--llm ID]`.

Rerunning the same command finishes the shards not yet committed and never pays twice for a cached request.
Exit status: 0 when every shard is committed, 1 when some are incomplete, 2 on bad configuration.
"""

from __future__ import annotations

import sys

from jobs._config import connect_ray, input_errors_exit_2, parse_config


def main(argv: list[str] | None = None) -> int:
    from pipeline.synth import SynthConfig, format_summary, synthesize

    config = parse_config(SynthConfig, argv, "python -m jobs.synth", __doc__.split("\n")[0])
    connect_ray()
    with input_errors_exit_2():
        summary = synthesize(config)
    print(format_summary(summary))
    return 1 if summary["shards"]["incomplete"] else 0


if __name__ == "__main__":
    sys.exit(main())
