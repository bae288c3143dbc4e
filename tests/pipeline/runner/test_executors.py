"""Where stages run: the local executor runs the same stage objects in this process, batched as Ray batches them,
and a job run on it commits what the same job run on Ray commits."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.commit.markers import SHARD_END, end_marker, wire_schema
from pipeline.io.listing import list_shards
from pipeline.runner import Resources, ShardStage, TableStage
from pipeline.runner.executors import LocalExecutor, rebatched
from pipeline.runner.stage import StageActor
from pipeline.scoring import ScoreConfig, read_scores, score_dataset
from tests.support.shards import write_shards

ROWS = wire_schema(("n", pa.int64()))


def _table(start: int, stop: int) -> pa.Table:
    return pa.table({"n": pa.array(range(start, stop), pa.int64())})


def test_rebatching_cuts_and_joins_tables_at_the_batch_size_in_order():
    tables = [_table(0, 3), _table(3, 4), _table(4, 11), _table(11, 11), _table(11, 13)]
    batches = list(rebatched(tables, 4))
    assert [b.num_rows for b in batches] == [4, 4, 4, 1]
    assert [n for b in batches for n in b.column("n").to_pylist()] == list(range(13))
    assert [b.num_rows for b in rebatched(tables, None)] == [3, 1, 7, 0, 2]  # None: each as it comes


class Counting(ShardStage):
    """Three rows per shard, then the shard's end marker; counts its set-ups."""

    name = "counting"
    schema = ROWS
    setups = 0

    def setup(self) -> None:
        type(self).setups += 1

    def process_shard(self, shard):
        yield [{"id": f"{shard.key}-{i}", "source": shard.key, "kind": "caption", "ordinal": i, "n": i}
               for i in range(3)]


class Doubling(TableStage):
    """Records each batch it was called with."""

    name = "doubling"
    schema = ROWS

    def __init__(self, resources):
        super().__init__(resources)
        self.calls: list[int] = []

    def process_table(self, table: pa.Table) -> pa.Table:
        self.calls.append(table.num_rows)
        return self.table(table.set_column(table.schema.get_field_index("n"), "n",
                                           pa.compute.multiply(table.column("n"), 2)))


def test_the_local_executor_streams_shards_through_the_stages_batched_across_shards_and_markers(tmp_path):
    write_shards(tmp_path, 3, 1)
    shards = list_shards(str(tmp_path), "webdataset").shards
    reader, model = Counting(Resources(max_actors=3)), Doubling(Resources(batch_size=5))
    out = list(LocalExecutor().batches(shards, [reader, model], no_progress_timeout_s=60))
    assert Counting.setups == 1  # set up once, as one actor
    rows = [r for b in out for r in b.to_pylist()]
    # 3 x (3 rows + 1 end marker) = 12 rows, cut at 5 across shards and markers: the model saw 5, 5 and 2 rows
    # (marker rows pass around its own work)
    assert [b.num_rows for b in out] == [5, 5, 2]
    assert sum(model.calls) == 9
    data = [r for r in rows if r["kind"] == "caption"]
    assert [r["n"] for r in data] == [0, 2, 4] * 3
    ends = [r for r in rows if r["kind"] == SHARD_END]
    assert [r["source"] for r in ends] == [s.key for s in shards]
    assert ends[0]["id"] == "3" and ends[0] == {**dict.fromkeys(ROWS.names), **end_marker(shards[0].key, 3)}


class TornDown(Doubling):
    """Says when it is set up and torn down; fails on a batch holding `fails_on` when told to."""

    def __init__(self, resources, log: list[str], fails_on: int | None = None):
        super().__init__(resources)
        self.log = log
        self.fails_on = fails_on

    def setup(self) -> None:
        self.log.append(f"setup {self.name}")

    def teardown(self) -> None:
        self.log.append(f"teardown {self.name}")

    def process_table(self, table: pa.Table) -> pa.Table:
        if self.fails_on in table.column("n").to_pylist():
            raise RuntimeError("this stage fails")
        return super().process_table(table)


def test_the_local_executor_tears_each_stage_down_once_its_batches_are_read(tmp_path):
    write_shards(tmp_path, 2, 1)
    shards = list_shards(str(tmp_path), "webdataset").shards
    log: list[str] = []
    reader, model = Counting(Resources()), TornDown(Resources(batch_size=4), log)
    batches = LocalExecutor().batches(shards, [reader, model], no_progress_timeout_s=60)
    first = next(batches)
    assert first.num_rows == 4 and log == ["setup doubling"]  # still running: nothing torn down
    list(batches)
    assert log == ["setup doubling", "teardown doubling"]


def test_the_local_executor_tears_its_stages_down_when_a_stage_fails(tmp_path):
    write_shards(tmp_path, 1, 1)
    shards = list_shards(str(tmp_path), "webdataset").shards
    log: list[str] = []
    with pytest.raises(RuntimeError, match="this stage fails"):
        list(LocalExecutor().batches(shards, [Counting(Resources()), TornDown(Resources(), log, fails_on=0)],
                                     no_progress_timeout_s=60))
    assert log == ["setup doubling", "teardown doubling"]


def test_a_stage_is_torn_down_when_its_ray_actor_object_is_dropped():
    """Ray Data drops its callable class's instance as the actor exits gracefully (`__ray_shutdown__`)."""
    log: list[str] = []
    actor = StageActor(TornDown(Resources(), log))
    del actor
    assert log == ["setup doubling", "teardown doubling"]


def test_a_failure_that_ends_an_actor_on_ray_ends_the_local_run(tmp_path, tiny_checkpoint):
    """A device fault leaves a process unusable: on Ray its actor ends and is restarted; in this process the run
    ends, saying why, and commits nothing of the failed batch."""
    from pipeline.errors import DeviceFault
    from pipeline.runner.run import run_job
    from pipeline.scoring.job import ScoringJob

    class Faulty(ScoringJob):
        def model_stage(self, resources):
            stage = super().model_stage(resources)

            def fault(table):
                raise DeviceFault("CUDA error: an illegal memory access was encountered")

            stage.process_table = fault
            return stage

    write_shards(tmp_path / "in", 1, 2)
    config = ScoreConfig(input=str(tmp_path / "in"), format="webdataset", output=str(tmp_path / "out"),
                         model=tiny_checkpoint, executor="local")
    summary = run_job(Faulty(config), progress=False)
    assert summary["aborted"].startswith("DeviceFault: CUDA error: an illegal memory access")
    assert summary["shards"]["incomplete"] == ["000.tar"]


@pytest.mark.parametrize("fmt", ["webdataset", "obelics"])
def test_the_local_executor_commits_what_ray_commits(fmt, tmp_path, tiny_checkpoint, ray_cluster):
    """The same corpus scored on Ray and in this process gives the same records: every column equal, the scores
    to float32's batching noise (Ray bundles blocks into calls in the order they arrive, so a sample may share its
    micro-batch with other samples there: 1 ulp); the summaries agree on the shards, records and errors."""
    write_shards(tmp_path / "in", 3, 5, fmt)
    summaries, tables = {}, {}
    for executor in ("ray", "local"):
        config = ScoreConfig(input=str(tmp_path / "in"), format=fmt, output=str(tmp_path / executor),
                             model=tiny_checkpoint, batch_size=4, executor=executor)
        summaries[executor] = score_dataset(config, progress=False)
        tables[executor] = read_scores(config.output).sort_by([("source", "ascending"), ("id", "ascending")])
    ray_table, local_table = tables["ray"], tables["local"]
    assert ray_table.num_rows == 15
    assert local_table.drop_columns(["score"]).equals(ray_table.drop_columns(["score"]))
    assert local_table.column("score").to_pylist() == pytest.approx(ray_table.column("score").to_pylist(), abs=1e-6)
    same = ("shards", "records", "errors", "incomplete_reasons")
    assert {k: summaries["local"][k] for k in same} == {k: summaries["ray"][k] for k in same}
