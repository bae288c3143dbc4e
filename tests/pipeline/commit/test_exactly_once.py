"""Nothing lost, nothing mixed: every input sample yields exactly one record, from the model named, under I/O
faults (reads and writes, a full disk, a failed consolidation), a lost lease, reruns with another model,
concurrent jobs, odd shard spellings and wrong column settings. The driver's logic runs the stages in this process
(the local executor); the two-jobs test pauses its first job after its first commit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import sample_corpus as corpus
from model.create import create
from pipeline.commit.manifest import read_manifest
from pipeline.errors import InputError, OutputMismatch
from pipeline.io.samples import SourceOptions
from pipeline.scoring import ScoreConfig, read_scores, score_dataset
from tests.support.jobs import job_env, paused_job, release, run_main, wait_for
from tests.support.shards import assert_exactly_once, write_shards

FAST_RETRIES = SourceOptions(read_attempts=2, read_backoff_s=0.0)


def score(input_uri, output, model, fmt="webdataset", **kw):
    """The scoring job, its stages in this process: what these tests check is the driver's (commits, identity,
    lease, faults), the same whichever executor runs the stages (tests/pipeline/runner/test_executors.py)."""
    kw.setdefault("executor", "local")
    return score_dataset(ScoreConfig(input=str(input_uri), format=fmt, output=str(output), model=model, **kw),
                         progress=False)


def caption_shards(root: Path | str, n: int, prefix: str = "s") -> list[str]:
    """`n` webdataset shards `00000.tar`... of 4 samples each; returns every sample key."""
    return write_shards(root, n, 4, prefix=prefix, name="{k:05d}")


def files_of(output: Path) -> dict[str, bytes]:
    return {str(p.relative_to(output)): p.read_bytes() for p in sorted(output.rglob("*"))
            if p.is_file() and not p.name.startswith("_lease")}


def test_a_missing_shard_stays_uncommitted_and_a_rerun_finishes_it(tmp_path, tiny_checkpoint):
    expected = caption_shards(tmp_path / "in", 2)
    missing = tmp_path / "in" / "00001.tar"
    held = missing.read_bytes()
    missing.unlink()
    listing = tmp_path / "shards.txt"
    listing.write_text("in/00000.tar\nin/00001.tar\n")  # listed, but not there (yet)
    out = tmp_path / "out"
    first = score(listing, out, tiny_checkpoint, source=FAST_RETRIES)
    assert first["shards"]["incomplete"] == ["00001.tar"]
    assert "shard does not exist" in first["incomplete_reasons"]["00001.tar"]
    assert first["records"]["errors"] == 0  # a fault is not bad data: no error record for it
    assert sorted(read_manifest(str(out))) == ["00000.tar"]
    missing.write_bytes(held)  # the file appears
    second = score(listing, out, tiny_checkpoint, source=FAST_RETRIES)
    assert second["shards"]["already_committed"] == 1 and second["shards"]["committed_this_run"] == 1
    assert second["shards"]["incomplete"] == []
    table = read_scores(str(out))
    assert_exactly_once(table, expected)
    assert table.column("error").null_count == len(expected)


@pytest.fixture(scope="module")
def scored_once(tmp_path_factory, tiny_checkpoint) -> tuple[Path, list[str]]:
    """Two shards scored by the tiny model, once for the module (tests that change it take a copy: `scored`)."""
    root = tmp_path_factory.mktemp("scored")
    expected = caption_shards(root / "in", 2)
    score(root / "in", root / "out", tiny_checkpoint)
    return root / "out", expected


@pytest.fixture()
def scored(scored_once, tmp_path) -> list[str]:
    """A copy of `scored_once`'s output at `tmp_path / "out"`; returns its sample keys."""
    out, expected = scored_once
    shutil.copytree(out, tmp_path / "out")
    return expected


def test_a_rerun_with_another_model_is_refused_and_changes_nothing(tmp_path, tiny_checkpoint, scored):
    expected = scored
    out = tmp_path / "out"
    before = files_of(out)
    other = str(tmp_path / "other-model")
    create("tiny", other, seed=7)
    caption_shards(tmp_path / "in", 3)  # the scored shards and a new one: not scored by the other model either
    with pytest.raises(OutputMismatch, match=r"field 'model': .* holds scores of model .*tiny.* this run's is model "
                                             r".*other-model"):
        score(tmp_path / "in", out, other)
    assert files_of(out) == before
    table = read_scores(str(out))
    assert {m.split("@")[0] for m in table.column("model").to_pylist()} == {tiny_checkpoint}
    assert_exactly_once(table, expected)
    with pytest.raises(OutputMismatch, match="field 'jpeg_draft'"):  # a setting that changes scores, likewise
        score(tmp_path / "in", out, tiny_checkpoint, jpeg_draft=True)


def test_read_scores_refuses_an_output_that_mixes_models(tmp_path, scored):
    out = tmp_path / "out"
    entry = next(iter(read_manifest(str(out)).values()))
    forged = {**entry, "shard": "99999.tar", "identity": "0123456789abcdef"}
    forged.pop("_path", None)
    (out / "_manifest" / "99999.json").write_text(json.dumps(forged))
    with pytest.raises(OutputMismatch, match="different models or settings"):
        read_scores(str(out))


def test_one_shard_spelled_several_ways_is_scored_once(tmp_path, tiny_checkpoint):
    expected = caption_shards(tmp_path / "D", 1)
    d = tmp_path / "D"
    listing = tmp_path / "list.txt"
    listing.write_text(f"{d}/00000.tar\n{d}/../D/00000.tar\nfile://{d}/00000.tar\n{d}/00000.tar\n")
    summary = score(listing, tmp_path / "out", tiny_checkpoint)
    assert summary["shards"]["total"] == 1 and summary["shards"]["duplicates_in_input"] == 3
    assert len(summary["shards"]["duplicate_spellings"]["00000.tar"]) == 4  # and says which spellings named it
    assert summary["records"]["this_run"] == len(expected)
    assert_exactly_once(read_scores(str(tmp_path / "out")), expected)


def _caption_table(n: int, text_column: str, seed: int) -> pa.Table:
    items = corpus.caption_samples(n, seed=seed, prefix=f"p{seed}-")
    return pa.table({"id": [i["key"] for i in items], "image": pa.array([i["image"] for i in items], pa.binary()),
                     text_column: [i["caption"] for i in items]})


def test_a_wrong_column_setting_fails_before_anything_is_committed(tmp_path, tiny_checkpoint):
    (tmp_path / "in").mkdir()
    pq.write_table(_caption_table(3, "text", 0), tmp_path / "in" / "a.parquet")
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"field 'source_text_column': the shard has no column 'caption'"):
        score(tmp_path / "in", out, tiny_checkpoint, fmt="parquet")
    assert not (out / "_manifest").exists() and not (out / "scores").exists()
    # A later shard that lacks the column stays uncommitted with that reason, never committed as row errors.
    pq.write_table(_caption_table(3, "caption", 1), tmp_path / "in" / "0.parquet")
    summary = score(tmp_path / "in", out, tiny_checkpoint, fmt="parquet")
    assert summary["shards"]["incomplete"] == ["a.parquet"]
    assert summary["incomplete_reasons"]["a.parquet"].startswith("config: the shard has no column 'caption'")
    assert summary["records"]["errors"] == 0 and sorted(read_manifest(str(out))) == ["0.parquet"]


def test_two_jobs_on_one_output_one_refuses(tmp_path, tiny_checkpoint, capsys):
    """The first job (a process of its own) holds the output, paused after its first commit; a second job on the
    same output is refused naming the holder and writes nothing; the first then finishes every shard."""
    from jobs.score import main

    expected = caption_shards(tmp_path / "in", 3)
    out = tmp_path / "out"
    argv = ["--input", tmp_path / "in", "--format", "webdataset", "--output", out, "--model", tiny_checkpoint,
            "--batch-size", "4", "--executor", "local"]
    marker = tmp_path / "paused"
    first = paused_job("jobs.score", argv, marker, job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
    wait_for(marker, first)
    before = files_of(out)
    code, _, err = run_main(main, argv, capsys)
    assert code == 2, err
    assert "error: field 'output':" in err and "in use by job 'score'" in err and f"pid {first.pid}" in err
    assert "Traceback" not in err
    assert files_of(out) == before  # the refused job wrote nothing
    release(marker)
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert_exactly_once(read_scores(str(out)), expected)
    assert not (out / "_lease.json").exists()  # released at the end


def test_an_unusable_output_or_model_fails_before_ray_starts(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    from jobs.score import main
    from pipeline.runner.executors import RayExecutor

    def no_ray(*args):
        raise AssertionError("the job connected to Ray before refusing its configuration")

    monkeypatch.setattr(RayExecutor, "connect", no_ray)
    caption_shards(tmp_path / "in", 1)
    (tmp_path / "a-file").write_text("not a folder")
    for output, model, message in (
        (str(tmp_path / "a-file"), tiny_checkpoint, "error: field 'output': "),
        (str(tmp_path / "a-file" / "below"), tiny_checkpoint, "error: field 'output': "),
        (str(tmp_path / "out"), str(tmp_path / "no-model"), "error: field 'model': "),
    ):
        code, _, err = run_main(main, ["--input", tmp_path / "in", "--format", "webdataset", "--output", output,
                                       "--model", model], capsys)
        assert code == 2 and message in err, err[-2000:]
    assert not (tmp_path / "out" / "_manifest").exists()


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    import pyarrow.fs as pafs

    from pipeline.io.publish import write_bytes

    class FullDisk(pafs.LocalFileSystem):
        def move(self, src, dest):
            raise OSError(28, "No space left on device")

    fs = FullDisk()
    with pytest.raises(OSError, match="No space left"):
        write_bytes(fs, str(tmp_path / "x" / "file.json"), b"{}")
    assert os.listdir(tmp_path / "x") == []


def test_reads_that_fail_are_retried_and_a_shard_that_keeps_failing_stays_uncommitted(s3_bucket, tiny_checkpoint):
    """Through a loopback proxy in front of the S3 server that fails GETs of one shard on purpose."""
    from tests.support.s3_faults import s3_fault_proxy

    expected = caption_shards(f"s3://{s3_bucket}/in", 3, prefix="f")
    out = f"s3://{s3_bucket}/out"
    retries = SourceOptions(read_attempts=4, read_backoff_s=0.0)
    with s3_fault_proxy(set_env=True) as proxy:
        # Six failures in a row: more than the S3 client's own three tries, so the reader's retry takes over.
        flaky = proxy.fail("GET", "*/in/00001.tar", times=6, status=503)
        broken = proxy.fail("GET", "*/in/00002.tar", times=None, status=500)
        first = score(f"s3://{s3_bucket}/in", out, tiny_checkpoint, source=retries)
        assert flaky.hits == 6 and proxy.count("GET", f"{s3_bucket}/in/00001.tar") > 6
        assert first["shards"]["incomplete"] == ["00002.tar"]
        assert first["incomplete_reasons"]["00002.tar"].startswith("io: cannot read")
        assert "gave up after 4 attempts" in first["incomplete_reasons"]["00002.tar"]
        assert first["records"]["errors"] == 0  # an I/O failure is never committed as an error record
        broken.cancel()
        second = score(f"s3://{s3_bucket}/in", out, tiny_checkpoint, source=retries)
    assert second["shards"]["already_committed"] == 2 and second["shards"]["committed_this_run"] == 1
    table = read_scores(out)
    assert_exactly_once(table, expected)
    assert table.column("error").null_count == len(expected)


def _lease_held(output: str) -> bool:
    from pipeline.commit.lease import Lease

    return Lease(output, "probe")._store.read() is not None


def test_a_score_file_that_cannot_be_written_leaves_its_shard_uncommitted_and_the_run_goes_on(
        s3_bucket, tiny_checkpoint):
    """An S3 server that answers 503 to every upload of one shard's score file, past every retry."""
    from tests.support.s3_faults import s3_fault_proxy

    expected = caption_shards(f"s3://{s3_bucket}/in", 3, prefix="w")
    out = f"s3://{s3_bucket}/out"
    with s3_fault_proxy(set_env=True) as proxy:
        throttled = proxy.fail("PUT", "*/out/scores/00001.tar.parquet", times=None, status=503)
        first = score(f"s3://{s3_bucket}/in", out, tiny_checkpoint)
        assert throttled.hits > 3  # the S3 client's own tries, each of the committer's
        throttled.cancel()
        assert "aborted" not in first  # the run went on past the failed shard
        assert first["shards"]["incomplete"] == ["00001.tar"]
        reason = first["incomplete_reasons"]["00001.tar"]
        assert reason.startswith(f"io: cannot write {out}/scores/00001.tar.parquet: ") and "SLOW_DOWN" in reason
        assert "gave up after 3 attempts" in reason
        assert sorted(read_manifest(out)) == ["00000.tar", "00002.tar"]
        assert json.loads(proxy.boto3_client().get_object(Bucket=s3_bucket, Key="out/summary.json")["Body"].read()
                          )["incomplete_reasons"] == first["incomplete_reasons"]
        assert not _lease_held(out)
        second = score(f"s3://{s3_bucket}/in", out, tiny_checkpoint)
    assert second["shards"]["already_committed"] == 2 and second["shards"]["incomplete"] == []
    assert_exactly_once(read_scores(out), expected)


def test_a_full_disk_under_one_shard_leaves_it_uncommitted_and_a_rerun_finishes_it(tmp_path, tiny_checkpoint,
                                                                                   monkeypatch):
    import errno

    import pipeline.commit.committer as sinks
    import pipeline.io.publish as publish

    expected = caption_shards(tmp_path / "in", 3)
    out = tmp_path / "out"
    real_write = sinks.write_bytes

    def full_under_one_shard(fs, path, data):  # the local write seam: ENOSPC for one shard's file
        if path.endswith("/scores/00001.tar.parquet"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(fs, path, data)

    monkeypatch.setattr(sinks, "write_bytes", full_under_one_shard)
    monkeypatch.setattr(publish, "WRITE_BACKOFF_S", 0.0)
    first = score(tmp_path / "in", out, tiny_checkpoint)
    assert "aborted" not in first
    assert first["shards"]["incomplete"] == ["00001.tar"]
    assert "[Errno 28] No space left on device" in first["incomplete_reasons"]["00001.tar"]
    assert sorted(read_manifest(str(out))) == ["00000.tar", "00002.tar"]
    assert json.loads((out / "summary.json").read_text())["shards"]["incomplete"] == ["00001.tar"]
    assert not (out / "_lease.json").exists()
    monkeypatch.setattr(sinks, "write_bytes", real_write)  # space again
    second = score(tmp_path / "in", out, tiny_checkpoint)
    assert second["shards"]["committed_this_run"] == 1 and second["shards"]["incomplete"] == []
    assert_exactly_once(read_scores(str(out)), expected)


def test_a_consolidation_that_fails_leaves_every_commit_and_the_summary(s3_bucket, tiny_checkpoint):
    from tests.support.s3_faults import s3_fault_proxy

    expected = caption_shards(f"s3://{s3_bucket}/in", 2, prefix="c")
    out = f"s3://{s3_bucket}/out"
    with s3_fault_proxy(set_env=True) as proxy:
        proxy.fail(None, "*/out/_manifest/_parts/*", times=None, status=503)  # every write of a manifest part
        first = score(f"s3://{s3_bucket}/in", out, tiny_checkpoint)
        proxy.clear()
        assert first["shards"]["incomplete"] == [] and "aborted" not in first
        assert "_manifest/_parts" in first["consolidation_failed"]
        assert sorted(read_manifest(out)) == ["00000.tar", "00001.tar"]  # committed, as per-shard records
        summary = json.loads(proxy.boto3_client().get_object(Bucket=s3_bucket, Key="out/summary.json")["Body"].read())
        assert summary["consolidation_failed"] == first["consolidation_failed"]
        assert not _lease_held(out)
        second = score(f"s3://{s3_bucket}/in", out, tiny_checkpoint)  # nothing to score: consolidates what is left
        listed = proxy.boto3_client().list_objects_v2(Bucket=s3_bucket, Prefix="out/_manifest/")["Contents"]
    assert second["shards"]["already_committed"] == 2 and "consolidation_failed" not in second
    assert [o["Key"] for o in listed if o["Key"].endswith(".json")] == []
    assert_exactly_once(read_scores(out), expected)


def test_a_run_that_loses_its_lease_commits_nothing_more_and_a_rerun_finishes_exactly_once(
        tmp_path, tiny_checkpoint, monkeypatch):
    """After the first commit another job takes the output over (a holder elsewhere whose clock ran ahead)."""
    import pipeline.commit.committer as sinks
    from pipeline.commit.lease import Lease

    expected = caption_shards(tmp_path / "in", 3)
    out = tmp_path / "out"
    real_write = sinks.write_bytes

    def take_over_after_the_first_commit(fs, path, data):  # the next shard's file: the output is taken meanwhile
        if list((out / "_manifest").glob("*.json")) and not (out / "taken").exists():
            (out / "taken").touch()
            store = Lease(str(out), "probe")._store
            current, version = store.read()
            other = {**json.loads(current), "token": "another-job", "host": "another-host", "boot_id": "another-boot"}
            assert store.replace(json.dumps(other).encode(), version)
        real_write(fs, path, data)

    monkeypatch.setattr(sinks, "write_bytes", take_over_after_the_first_commit)
    first = score(tmp_path / "in", out, tiny_checkpoint)
    assert "LeaseLost: another job took over the lease" in first["aborted"]
    assert len(read_manifest(str(out))) == 1  # the shards after the takeover were not committed
    assert first["summary_not_written"].endswith("this run lost the output's lease (another job took over the "
                                                 f"lease on {out})")
    assert not (out / "summary.json").exists()  # the output is the other job's now
    assert json.loads((out / "_lease.json").read_text())["token"] == "another-job"  # and its lease stays
    (out / "_lease.json").unlink()  # that job ends
    monkeypatch.setattr(sinks, "write_bytes", real_write)
    second = score(tmp_path / "in", out, tiny_checkpoint)
    assert second["shards"]["already_committed"] == 1 and second["shards"]["incomplete"] == []
    assert_exactly_once(read_scores(str(out)), expected)


def test_a_full_disk_ends_with_the_summary_on_the_terminal_not_a_traceback(tmp_path, tiny_checkpoint, capsys,
                                                                             monkeypatch):
    """A disk that is full under the output once the job holds it: every write of a shard's file, of a commit
    record and of the summary fails with ENOSPC (the write seam, replaced)."""
    import errno

    import pipeline.commit.committer as committer
    import pipeline.commit.manifest as manifest
    import pipeline.io.publish as publish
    from jobs.score import main

    real_write = publish.write_bytes

    def full(fs, path, data, content_type=None):
        if path.endswith("/_output.json"):  # written as the job takes the output: there was space then
            return real_write(fs, path, data, content_type)
        raise OSError(errno.ENOSPC, "No space left on device")

    for module in (publish, committer, manifest):
        monkeypatch.setattr(module, "write_bytes", full)
    monkeypatch.setattr(publish, "WRITE_BACKOFF_S", 0.0)
    caption_shards(tmp_path / "in", 2)
    out = tmp_path / "out"
    code, stdout, stderr = run_main(main, ["--input", tmp_path / "in", "--format", "webdataset", "--output", out,
                                           "--model", tiny_checkpoint, "--executor", "local"], capsys)
    assert code == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "INCOMPLETE 2 shards were not committed" in stdout
    assert "00000.tar: io: cannot write" in stdout and "No space left on device" in stdout
    assert "NOT SAVED  summary.json was not written: cannot write" in stdout
    assert not (out / "_lease.json").exists()
    assert read_manifest(str(out)) == {}
