"""Curate a scored corpus: `python -m jobs.curate --scores URI --output URI (--min-score X | --keep-fraction F)
[--per-kind] [--rank-by EXPR] [--balance-by COLUMN --max-per-group N] [--where EXPR] [--drop-truncated]
[--min-images N] [--exclude FILE ... [--exclude-column NAME]] [--input URI --format FMT] [--materialize |
--samples-per-shard N] [--write-dropped] [--export-ids] [--report DIR] [--dry-run [--sweep A,B,...]]`.

Selects the best-scored records that pass the filters (error records never), writes them per input shard to
OUTPUT/selected/ (and, with --materialize, the kept samples as shards in the input's format to OUTPUT/shards/; with
--samples-per-shard, as balanced shards of N with img2dataset sidecars to OUTPUT/shards/<format>/), and with
--report an HTML report to judge the threshold by (written by the run itself, as `pipeline.curation.curate` does);
--write-dropped also writes the records not selected to OUTPUT/dropped/ with the rule that removed each, and
--export-ids OUTPUT/kept_ids.parquet (and DataComp's uids.npy where the metadata has `uid`).
Rerunning after a kill finishes the job exactly once; with --min-score a rerun curates only the score shards
committed since the last run. `--dry-run` computes the exact thresholds of the rule and of a sweep (no lease taken,
nothing written). Exit status: 0 when every shard is committed, 1 when some are incomplete, 2 on bad
configuration, 130 after Ctrl-C.
"""

from __future__ import annotations

import sys

from jobs._config import Command, Invocation, entry, run_command
from pipeline.errors import ConfigError

COMMAND = Command("jobs.curate", __doc__, dry_run=(
    "compute the rule's exact thresholds (and --sweep's table) on Ray, taking no lease and "
    "writing nothing"))


def _job(config, sources):
    from pipeline.curation.job import CurationJob

    return CurationJob(config, sources)


def _report(job, summary: dict) -> None:
    if job.report_uri:  # the run wrote it (`report`)
        print(f"  report     {job.report_uri}")


def _check(invocation: Invocation) -> None:
    """A sweep is a dry run's table (and the report's comparison): a run with neither would ignore it."""
    c = invocation.config
    if c.sweep is not None and not invocation.dry_run and not c.report:
        raise ConfigError("field 'sweep': --sweep is printed by --dry-run (and compared in --report), and this run "
                          "has neither: add --dry-run to see its table first (nothing is written), or drop --sweep")


def main(argv: list[str] | None = None) -> int:
    from pipeline.curation.config import CurateConfig

    return entry(lambda: run_command(CurateConfig, _job, argv, COMMAND,
                                     _report, _check), argv)


if __name__ == "__main__":
    sys.exit(main())
