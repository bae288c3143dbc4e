"""Curation's threshold passes when a score file kills the worker evaluating it (a crash in evaluation, a memory
kill): Ray retries the task a bounded number of times, then the run ends naming that score file."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pipeline.curation import CurateConfig
from pipeline.curation.filters import Filters
from pipeline.curation.passes import compute_thresholds
from pipeline.errors import BrokenWorker, ShardFault
from pipeline.io.listing import Shard
from pipeline.runner.deaths import TASK_RETRIES
from pipeline.runner.executors import LocalExecutor, RayExecutor
from tests.support import hostile


def test_a_score_file_that_keeps_killing_its_worker_ends_the_run_naming_it(tmp_path, ray_cluster):
    shards = [Shard(str(hostile.score_file(tmp_path / "scores" / f"{name}.parquet", f"{name}.tar", 20, seed=k)),
                    f"{name}.tar") for k, name in enumerate(["a", "b", "c"])]
    config = CurateConfig(scores=str(tmp_path / "scores"), output=str(tmp_path / "cur"), keep_fraction=0.5)
    with pytest.raises(BrokenWorker, match=f"died {TASK_RETRIES + 1} times on the score file b.tar"):
        compute_thresholds(config, shards, hostile.KillsOnShard(source="b.tar"), RayExecutor())


@dataclass(frozen=True)
class RunsOutOfMemoryOnShard(Filters):
    """Filters without a term whose evaluation runs out of memory on one shard's records."""

    source: str = ""

    def evaluate(self, table):
        if self.source in table.column("source").to_pylist():
            raise MemoryError()
        return super().evaluate(table)


def test_a_pass_that_fails_for_want_of_memory_is_a_fault_not_the_users_filters(tmp_path):
    """No `--where` was given: nothing for the user to check; a fault (exit 1, rerun), naming the shard."""
    shards = [Shard(str(hostile.score_file(tmp_path / "scores" / f"{name}.parquet", f"{name}.tar", 20, seed=k)),
                    f"{name}.tar") for k, name in enumerate(["a", "b"])]
    config = CurateConfig(scores=str(tmp_path / "scores"), output=str(tmp_path / "cur"), keep_fraction=0.5)
    with pytest.raises(ShardFault, match="the threshold passes failed on shard b.tar: MemoryError"):
        compute_thresholds(config, shards, RunsOutOfMemoryOnShard(source="b.tar"), LocalExecutor())
