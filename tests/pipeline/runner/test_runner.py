"""The one shard-job runner with a stand-in stage: any job built on it keeps every record exactly once, counts its
errors by reason, and leaves a shard it cannot read uncommitted (a new job is a spec, a stage and a summary)."""

from __future__ import annotations

import pyarrow as pa

from jobs import sample_corpus as corpus
from pipeline.commit.markers import MARKERS
from pipeline.commit.records import read_committed
from pipeline.io.listing import Shard, list_shards
from pipeline.io.samples import SourceOptions
from pipeline.runner import ShardJob, Stage, common_summary, execute, prepare

RECORD = pa.schema([("id", pa.string()), ("source", pa.string()), ("kind", pa.string()), ("ordinal", pa.int64()),
                    ("length", pa.int32()), ("error", pa.string()), ("error_category", pa.string())])


class CaptionLength:
    """A stand-in stage: one record per sample, its caption's length; a caption saying "bad" is a sample error."""

    def __init__(self, read_attempts: int = 1):
        self.options = SourceOptions(read_attempts=read_attempts, read_backoff_s=0)

    def __call__(self, batch: pa.Table):
        for shard in (Shard(**s) for group in batch.column("shards").to_pylist() for s in group):
            rows = []
            for row in read_shard(shard, "webdataset", self.options):
                out = {k: row.get(k) for k in RECORD.names}
                if row["kind"] not in MARKERS and not row["error"]:
                    caption = row["texts"][1]
                    out["length"] = len(caption)
                    if "bad" in caption:
                        out.update(error="malformed: a bad caption", error_category="malformed")
                rows.append(out)
            yield pa.Table.from_pylist(rows, schema=RECORD)


def test_a_job_built_on_the_runner_keeps_every_record_once_and_counts_its_errors(tmp_path, ray_cluster):
    expected = []
    for k in range(4):
        samples = corpus.caption_samples(5, seed=k, prefix=f"r{k}-")
        samples[0]["caption"] = "a bad caption"
        corpus.write_webdataset(str(tmp_path / "in" / f"{k}.tar"), samples)
        expected += [s["key"] for s in samples]
    listing = list_shards(str(tmp_path / "in"), "webdataset")
    (tmp_path / "in" / "3.tar").rename(tmp_path / "held.tar")  # listed, then gone: a fault, not data
    job = ShardJob(job="caption-length", output=str(tmp_path / "out"), listing=listing, identity={"stage": "v1"},
                   schema=RECORD, partition=lambda table: ["lengths"] * table.num_rows)
    prepared = prepare(job)
    result = execute(prepared, [Stage("length", CaptionLength, {}, max_actors=2)], progress=False)
    summary = common_summary(prepared, result)
    assert summary["shards"]["committed_this_run"] == 3 and summary["shards"]["incomplete"] == ["3.tar"]
    assert summary["incomplete_reasons"]["3.tar"].startswith("io: cannot read")
    assert summary["errors"]["by_category"] == {"malformed": 3}  # one per committed shard
    table = read_committed(str(tmp_path / "out"), RECORD)
    assert sorted(table.column("id").to_pylist()) == sorted(expected[:15])

    (tmp_path / "held.tar").rename(tmp_path / "in" / "3.tar")
    prepared = prepare(job)
    assert [s.key for s in prepared.todo] == ["3.tar"]  # the rerun does only what is left
    execute(prepared, [Stage("length", CaptionLength, {})], progress=False)
    ids = read_committed(str(tmp_path / "out"), RECORD).column("id").to_pylist()
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))
