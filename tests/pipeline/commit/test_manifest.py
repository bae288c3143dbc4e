"""The consolidated commit manifest: exactly once when a run is killed while consolidating, and outputs written
before consolidation existed (per-shard records keyed by the full URI) still resume and read."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap

import pyarrow.parquet as pq

from pipeline.commit.manifest import read_manifest
from pipeline.commit.records import read_committed
from pipeline.scoring import ScoreConfig, score_dataset
from pipeline.scoring.records import read_scores
from tests.support.jobs import REPO_ROOT, job_env
from tests.support.score_like import RECORDS, scores_folder, shard_rows, shard_table
from tests.support.shards import assert_exactly_once, write_shards

# Commits shards 0..n-1 of fake score records, consolidating every 10 commits, and SIGKILLs itself inside the
# third consolidation: after the part is written and half of its per-shard records are deleted.
COMMIT_AND_DIE = textwrap.dedent("""
    import os, signal, sys
    import pipeline.commit.manifest as manifest
    from pipeline.commit.committer import RecordLayout, ShardCommitter, WritePolicy
    from tests.support.score_like import RECORDS, scores_folder, shard_table

    output, n = sys.argv[1], int(sys.argv[2])
    calls = []
    real_delete = manifest._delete_all

    def delete_then_die(fs, paths):
        calls.append(1)
        if len(calls) == 3:
            real_delete(fs, paths[: len(paths) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        real_delete(fs, paths)

    manifest._delete_all = delete_then_die
    committer = ShardCommitter(output, RecordLayout(RECORDS, scores_folder), "id",
                               writes=WritePolicy(consolidate_every=10))
    for k in range(n):
        committer.add(shard_table(f"{k:03d}.tar", 3))
    committer.consolidate()
""")


def test_a_kill_during_consolidation_loses_and_repeats_nothing(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-c", COMMIT_AND_DIE, str(out), "50"], env=job_env(), cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == -9, res.stderr[-2000:]  # killed inside the third consolidation
    parts = list((out / "_manifest" / "_parts").glob("*.parquet"))
    left = list((out / "_manifest").glob("*.json"))
    assert len(parts) == 3 and 0 < len(left)  # records of the third part sit in both places now
    entries = read_manifest(str(out))
    assert sorted(entries) == [f"{k:03d}.tar" for k in range(30)]  # each committed shard once
    rows = read_committed(str(out), RECORDS).column("id").to_pylist()
    assert len(rows) == 90 and len(set(rows)) == 90

    # The rerun: the same 50 shards again; only the 20 not committed are committed now, each once.
    res = subprocess.run([sys.executable, "-c", COMMIT_AND_DIE.replace("len(calls) == 3", "False"), str(out), "50"],
                         env=job_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = read_committed(str(out), RECORDS).column("id").to_pylist()
    assert len(rows) == 150 and len(set(rows)) == 150
    assert sorted(read_manifest(str(out))) == [f"{k:03d}.tar" for k in range(50)]


def _as_before_consolidation(out, input_root: str) -> None:
    """Rewrite an output to the layout of the version before consolidation: one JSON record per shard keyed by
    the shard's full URI, files named `<stem>-<hash of the URI>.parquet`, no identity file, no key/url columns."""
    for entry in read_manifest(str(out)).values():
        uri = f"{input_root}/{entry['shard']}"
        stem = entry["shard"].rsplit(".", 1)[0]
        legacy = f"{stem}-{hashlib.sha1(uri.encode()).hexdigest()[:10]}"
        table = pq.read_table(out / entry["files"][0]).drop_columns(["key", "url"])
        pq.write_table(table, out / "scores" / f"{legacy}.parquet")
        (out / entry["files"][0]).unlink()
        (out / "_manifest" / f"{legacy}.json").write_text(json.dumps({
            "shard": uri, "files": [f"scores/{legacy}.parquet"], "records": entry["records"],
            "errors": entry["errors"], "model": entry["model"], "committed_at": entry["committed_at"]}))
    for part in (out / "_manifest" / "_parts").glob("*"):
        part.unlink()
    (out / "_output.json").unlink()


def test_an_output_of_the_version_before_still_resumes_and_reads(tmp_path, tiny_checkpoint):
    expected = write_shards(tmp_path / "in", 3, 3, prefix="v", name="{k}")
    (tmp_path / "in" / "2.tar").rename(tmp_path / "later.tar")  # not there for the first run
    out = tmp_path / "out"
    config = ScoreConfig(input=str(tmp_path / "in"), format="webdataset", output=str(out), model=tiny_checkpoint,
                         executor="local")
    score_dataset(config, progress=False)
    _as_before_consolidation(out, str(tmp_path / "in"))
    assert len(read_scores(str(out))) == 6  # it reads (key and url null: the old version had none)

    (tmp_path / "later.tar").rename(tmp_path / "in" / "2.tar")
    summary = score_dataset(config, progress=False)
    assert summary["shards"]["already_committed"] == 2 and summary["shards"]["committed_this_run"] == 1
    assert_exactly_once(read_scores(str(out)), expected)


def test_a_re_executed_task_after_its_commit_writes_nothing_twice(tmp_path):
    """Ray may run a finished task again (a lost block, a restarted actor): its rows and end marker for a shard
    already committed in this run are dropped, never committed a second time."""
    import pyarrow as pa

    from pipeline.commit.committer import RecordLayout, ShardCommitter
    from pipeline.commit.markers import end_marker

    out = str(tmp_path / "out")
    committer = ShardCommitter(out, RecordLayout(RECORDS, scores_folder), "id")
    committer.add(shard_table("a.tar", 2))
    again = shard_rows("a.tar", 2, score=2.0)
    committer.add(pa.Table.from_pylist(again[:1], schema=RECORDS))
    committer.add(pa.Table.from_pylist([*again[1:], end_marker("a.tar", 2)], schema=RECORDS))
    assert committer.committed == ["a.tar"] and committer.samples == 2
    table = read_committed(out, RECORDS)
    assert table.column("score").to_pylist() == [1.0, 1.0]
