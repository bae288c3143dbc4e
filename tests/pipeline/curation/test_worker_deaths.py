"""Curation's threshold passes when a score file kills the worker evaluating it (a crash in evaluation, a memory
kill): Ray retries the task a bounded number of times, then the run ends naming that score file."""

from __future__ import annotations

import pytest

from pipeline.curation import CurateConfig
from pipeline.curation.passes import compute_thresholds
from pipeline.errors import BrokenWorker
from pipeline.io.listing import Shard
from pipeline.runner.deaths import TASK_RETRIES
from pipeline.runner.executors import executor_named
from tests.support import hostile


def test_a_score_file_that_keeps_killing_its_worker_ends_the_run_naming_it(tmp_path, ray_cluster):
    shards = [Shard(str(hostile.score_file(tmp_path / "scores" / f"{name}.parquet", f"{name}.tar", 20, seed=k)),
                    f"{name}.tar") for k, name in enumerate(["a", "b", "c"])]
    config = CurateConfig(scores=str(tmp_path / "scores"), output=str(tmp_path / "cur"), keep_fraction=0.5)
    with pytest.raises(BrokenWorker, match=f"died {TASK_RETRIES + 1} times on the score file b.tar"):
        compute_thresholds(config, shards, hostile.KillsOnShard(source="b.tar"), executor_named(config.executor))
