"""The one shard-job runner with stand-in stages: a job built on it is a spec, a stage and a summary; it keeps every
record exactly once, counts its errors by reason, and leaves a shard it cannot read (or a shard its stage failed
on) uncommitted and named. Stages run without Ray too."""

from __future__ import annotations

import json
import os
import signal

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from jobs import sample_corpus as corpus
from pipeline.commit.markers import SHARD_END, SHARD_FAILED, wire_schema
from pipeline.commit.records import read_committed
from pipeline.io.listing import Shard, list_shards
from pipeline.io.samples import SourceOptions, read_samples
from pipeline.runner import Job, JobSpec, Plan, Resources, ShardStage, TableStage, run_job
from pipeline.runner.executors import LocalExecutor, RayExecutor
from pipeline.runner.stage import shard_rows
from tests.support.shards import assert_exactly_once

RECORD = wire_schema(("length", pa.int32()))
SCORED = wire_schema(("length", pa.int32()), ("score", pa.float32()))


class CaptionLength(ShardStage):
    """A stand-in shard stage: one record per sample, its caption's length; a caption saying "bad" is a sample
    error; a caption saying `crash_on` makes the stage itself fail (a bug of ours, met part-way through a shard)."""

    name = "caption-length"
    schema = RECORD

    def __init__(self, resources: Resources, read_attempts: int = 1, crash_on: str | None = None):
        super().__init__(resources)
        self.options = SourceOptions(read_attempts=read_attempts, read_backoff_s=0)
        self.crash_on = crash_on

    def process_shard(self, shard: Shard):
        bad = 0
        for row in read_samples(shard, "webdataset", self.options):  # a shard that cannot be read: ShardFault
            caption = row["texts"][1]
            if self.crash_on and self.crash_on in caption:
                raise RuntimeError(f"cannot measure {caption!r}")
            out = {**row, "length": len(caption)}
            if "bad" in caption:
                out.update(error="malformed: a bad caption", error_category="malformed")
                bad += 1
            yield [out]  # sample by sample: a later failure finds rows of the shard already handed on
        return {"stats": {"bad_captions": bad}}


class LengthScore(TableStage):
    """A stand-in model stage: a score from each record's length."""

    name = "length-score"
    schema = SCORED

    def process_table(self, table: pa.Table) -> pa.Table:
        scores = pc.divide(pc.cast(table.column("length"), pa.float32()), pa.scalar(100.0, pa.float32()))
        return self.table(table.append_column("score", scores))


class CaptionLengthJob(Job):
    """A job on the runner: its spec, its stage, nothing else."""

    name = "caption-length"

    def __init__(self, input_uri: str, output: str, crash_on: str | None = None):
        super().__init__(config=None)
        self.executor = LocalExecutor()  # its stages in this process: the runner's logic is the same on Ray
        self.input_uri = input_uri
        self.output = output
        self.crash_on = crash_on

    def spec(self) -> JobSpec:
        return JobSpec(job=self.name, output=self.output, listing=list_shards(self.input_uri, "webdataset"),
                       identity={"stage": "v1"}, schema=RECORD, partition=lambda table: ["lengths"] * table.num_rows,
                       input=self.input_uri, format="webdataset")

    def stages(self, plan: Plan) -> list:
        return [CaptionLength(Resources(max_actors=2), crash_on=self.crash_on)]


class KilledByCaption(CaptionLength):
    """A stand-in stage whose process is killed (SIGKILL, as the kernel's out-of-memory killer does) on a caption
    saying "crash", every time; Ray restarts it and retries its call, a bounded number of times."""

    restarts, call_retries = 3, 1

    def process_shard(self, shard: Shard):
        for row in read_samples(shard, "webdataset", self.options):
            if "crash" in row["texts"][1]:
                os.kill(os.getpid(), signal.SIGKILL)
            yield [{**row, "length": len(row["texts"][1])}]


class KilledJob(CaptionLengthJob):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.executor = RayExecutor()  # a process that is killed must be an actor's, not this test's

    def stages(self, plan: Plan) -> list:
        return [KilledByCaption(Resources(max_actors=1))]


def caption_shards(root, n: int, per_shard: int = 5, crash_in: int | None = None) -> list[str]:
    """Shards `<k>.tar` whose first sample's caption says "bad" (and, in shard `crash_in`, whose third says
    "crash"); returns every sample key."""
    expected = []
    for k in range(n):
        samples = corpus.caption_samples(per_shard, seed=k, prefix=f"r{k}-")
        samples[0]["caption"] = "a bad caption"
        if k == crash_in:
            samples[2]["caption"] = "a caption that makes the stage crash"
        corpus.write_webdataset(str(root / f"{k}.tar"), samples)
        expected += [s["key"] for s in samples]
    return expected


def test_a_job_built_on_the_runner_keeps_every_record_once_and_counts_its_errors(tmp_path):
    expected = caption_shards(tmp_path / "in", 5, crash_in=4)
    listed = tmp_path / "shards.txt"
    listed.write_text("".join(f"in/{k}.tar\n" for k in range(5)))
    (tmp_path / "in" / "3.tar").rename(tmp_path / "held.tar")  # listed, but gone: a fault, not data
    summary = run_job(CaptionLengthJob(str(listed), str(tmp_path / "out"), crash_on="crash"), progress=False)
    assert summary["shards"]["committed_this_run"] == 3 and summary["shards"]["incomplete"] == ["3.tar", "4.tar"]
    assert summary["incomplete_reasons"]["3.tar"].startswith("io: cannot read")
    assert summary["incomplete_reasons"]["4.tar"].startswith(
        "internal: caption-length failed on 4.tar after 2 rows (RuntimeError: cannot measure")
    assert summary["errors"]["by_category"] == {"malformed": 3}  # one per committed shard
    assert summary["errors"]["by_reason"] == {"malformed: a bad caption": 3}
    table = read_committed(str(tmp_path / "out"), RECORD)
    assert_exactly_once(table, expected[:15])  # none of 4.tar's rows handed on before the failure

    (tmp_path / "held.tar").rename(tmp_path / "in" / "3.tar")
    summary = run_job(CaptionLengthJob(str(listed), str(tmp_path / "out")), progress=False)
    assert summary["shards"]["already_committed"] == 3 and summary["shards"]["new"] == 2  # only what is left
    assert summary["shards"]["committed_this_run"] == 2 and summary["shards"]["incomplete"] == []
    assert_exactly_once(read_committed(str(tmp_path / "out"), RECORD), expected)


def test_a_stage_whose_worker_keeps_dying_ends_the_run_in_one_line_naming_it(tmp_path, ray_cluster):
    caption_shards(tmp_path / "in", 2, crash_in=1)
    summary = run_job(KilledJob(str(tmp_path / "in"), str(tmp_path / "out")), progress=False)
    assert summary["aborted"].startswith("KilledByCaption's worker kept dying and Ray's bound on the retries of the "
                                         "call it was on was reached (the run stops rather than retrying forever)")
    assert "1.tar" in summary["shards"]["incomplete"]


class KilledByCaptionOnce(KilledByCaption):
    """The same reader with the shard stages' own bound on a call's retries."""

    restarts, call_retries = 64, ShardStage.call_retries


class KilledOnceJob(KilledJob):
    def stages(self, plan: Plan) -> list:
        return [KilledByCaptionOnce(Resources(max_actors=1))]


def test_a_shard_that_keeps_killing_its_reader_is_left_uncommitted_by_name_and_the_run_finishes(tmp_path, ray_cluster):
    expected = caption_shards(tmp_path / "in", 3, crash_in=1)
    summary = run_job(KilledOnceJob(str(tmp_path / "in"), str(tmp_path / "out")), progress=False)
    assert "aborted" not in summary, summary
    assert summary["shards"]["incomplete"] == ["1.tar"] and summary["shards"]["committed_this_run"] == 2
    assert summary["incomplete_reasons"]["1.tar"].startswith(
        "internal: the process reading 1.tar died 2 times (killed for memory or crashed; stage caption-length)")
    assert_exactly_once(read_committed(str(tmp_path / "out"), RECORD), expected[:5] + expected[10:])


def test_stages_called_without_ray_close_each_shard_with_its_marker(tmp_path):
    expected = caption_shards(tmp_path, 2, per_shard=3, crash_in=1)
    shards = [Shard(str(tmp_path / "0.tar"), "0.tar"), Shard(str(tmp_path / "gone.tar"), "gone.tar"),
              Shard(str(tmp_path / "1.tar"), "1.tar")]
    reader = CaptionLength(Resources(), crash_on="crash")
    reader.setup()
    read = pa.concat_tables(reader(pa.Table.from_pylist(shard_rows([shards]))))
    rows = read.to_pylist()
    # 0.tar: its 3 records, then its end marker counting them, with the stage's own counts
    assert [r["id"] for r in rows[:3]] == expected[:3] and all(r["kind"] == "caption" for r in rows[:3])
    assert rows[3]["kind"] == SHARD_END and rows[3]["source"] == "0.tar" and rows[3]["id"] == "3"
    assert json.loads(rows[3]["meta"]) == {"stats": {"bad_captions": 1}}
    # gone.tar: the reader's fault is the shard's failed marker, no record
    assert rows[4]["kind"] == SHARD_FAILED and rows[4]["source"] == "gone.tar"
    assert rows[4]["error_category"] == "io" and "shard does not exist" in rows[4]["error"]
    # 1.tar: the rows before the stage's own failure, then a failed marker blaming us, never the data
    assert [r["id"] for r in rows[5:7]] == expected[3:5]
    assert rows[7]["kind"] == SHARD_FAILED and rows[7]["source"] == "1.tar" and rows[7]["error_category"] == "internal"
    assert rows[7]["error"].startswith("internal: caption-length failed on 1.tar after 2 rows (RuntimeError:")
    assert len(rows) == 8

    scored = LengthScore(Resources())(read)
    assert scored.schema == SCORED
    data = scored.filter(pc.invert(pc.is_in(scored.column("kind"), pa.array([SHARD_END, SHARD_FAILED]))))
    assert data.column("id").to_pylist() == [r["id"] for r in rows if r["kind"] == "caption"]
    assert data.column("score").to_pylist() == [pytest.approx(r["length"] / 100)
                                                for r in rows if r["kind"] == "caption"]
    markers = scored.slice(data.num_rows).to_pylist()  # the markers, handed on as they came
    assert [(m["kind"], m["source"], m["id"], m["error"]) for m in markers] == [
        (r["kind"], r["source"], r["id"], r["error"]) for r in rows if r["kind"] != "caption"]


def test_every_run_keeps_its_own_summary_beside_the_latest(tmp_path):
    caption_shards(tmp_path / "in", 3)
    (tmp_path / "in" / "2.tar").rename(tmp_path / "later.tar")
    first = run_job(CaptionLengthJob(str(tmp_path / "in"), str(tmp_path / "out")), progress=False)
    (tmp_path / "later.tar").rename(tmp_path / "in" / "2.tar")  # a third shard since
    second = run_job(CaptionLengthJob(str(tmp_path / "in"), str(tmp_path / "out")), progress=False)
    runs = sorted((tmp_path / "out" / "_runs").glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    kept = [json.loads(p.read_text()) for p in runs]
    assert [k["shards"]["committed_this_run"] for k in kept] == [2, 1]
    assert kept == [first, second] and json.loads((tmp_path / "out" / "summary.json").read_text()) == second
