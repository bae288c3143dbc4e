"""Write semi-synthetic training pairs: `python -m jobs.synth --input URI --format FMT --output URI
--generator offline|bedrock|openai [--endpoint URL] [--llm ID]`.

Rerunning the same command finishes the shards not yet committed and never pays twice for a cached request.
`--dry-run` says what a run would do, starting nothing. Exit status: 0 when every shard is committed, 1 when some
are incomplete, 2 on bad configuration, 130 after Ctrl-C.
"""

from __future__ import annotations

import sys

from jobs._config import Command, entry, run_command

COMMAND = Command("jobs.synth", __doc__, dry_run=(
    "say what a run would do (shards, origins, pairs, requests and their estimated cost), "
    "starting nothing and writing nothing"))


def _job(config, sources):
    from pipeline.synth.job import SynthJob

    return SynthJob(config, sources)


def main(argv: list[str] | None = None) -> int:
    from pipeline.synth.config import SynthConfig

    return entry(lambda: run_command(SynthConfig, _job, argv, COMMAND), argv)


if __name__ == "__main__":
    sys.exit(main())
