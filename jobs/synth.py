"""Write semi-synthetic training pairs: `python -m jobs.synth --input URI --format FMT --output URI
--generator offline|bedrock|openai [--endpoint URL] [--llm ID]`.

Rerunning the same command finishes the shards not yet committed and never pays twice for a cached request.
`--dry-run` says what a run would do, starting nothing. Exit status: 0 when every shard is committed, 1 when some
are incomplete, 2 on bad configuration.
"""

from __future__ import annotations

import sys
import time

from jobs._config import entry, exit_status, parse, run_prepared


def main(argv: list[str] | None = None) -> int:
    return entry(lambda: _run(argv), argv)


def _run(argv: list[str] | None) -> int:
    started = time.time()
    from pipeline.synth import SynthConfig, dry_run_plan, format_summary, prepare_synth, synthesize

    invocation = parse(SynthConfig, argv, "python -m jobs.synth", __doc__.split("\n")[0])
    config = invocation.config
    if invocation.dry_run:
        print(dry_run_plan(config))
        return 0
    prepared = prepare_synth(config, started)  # shards, generator, output: before Ray starts
    summary = run_prepared(prepared, "synth", invocation.verbose, lambda: synthesize(config, prepared=prepared))
    print(format_summary(summary))
    return exit_status(summary)


if __name__ == "__main__":
    sys.exit(main())
