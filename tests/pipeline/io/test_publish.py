"""Writing to an output whole or not at all (`pipeline.io.publish`), on the local filesystem and on the S3 server:
what a reader finds is the old content or the new, never a part, and never a temporary file beside it."""

from __future__ import annotations

import os

import boto3
import pyarrow.fs as pafs
import pytest

from pipeline.errors import Category, CorruptState, ShardFault
from pipeline.io import publish
from pipeline.io.publish import publish_file, read_json, write_bytes, write_json, write_with_retries
from pipeline.io.uris import filesystem_for
from tests.support.s3_faults import s3_fault_proxy


def s3_objects(bucket: str) -> dict[str, bytes]:
    """The bucket's objects and their content (the empty `folder/` markers pyarrow makes left out)."""
    s3 = boto3.client("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []) if not o["Key"].endswith("/")]
    return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    """An output root on the local filesystem, or in a fresh bucket on the S3 server."""
    if request.param == "local":
        return str(tmp_path / "out")
    return f"s3://{request.getfixturevalue('s3_bucket')}/out"


# -- write_bytes -----------------------------------------------------------------------------------------------
def test_a_local_write_creates_its_folders_and_leaves_only_the_file(tmp_path):
    path = tmp_path / "out" / "_manifest" / "part.json"
    write_bytes(pafs.LocalFileSystem(), str(path), b"{}")
    assert path.read_bytes() == b"{}"
    assert os.listdir(path.parent) == ["part.json"]


def test_a_local_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "state.json"
    path.write_bytes(b"old content, longer than the new")
    write_bytes(pafs.LocalFileSystem(), str(path), b"new")
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["state.json"]


def test_a_local_write_that_fails_raises_and_leaves_no_temporary_file(tmp_path):
    (tmp_path / "out" / "taken").mkdir(parents=True)  # a folder where the file should go: the rename fails
    with pytest.raises(IsADirectoryError):
        write_bytes(pafs.LocalFileSystem(), str(tmp_path / "out" / "taken"), b"data")
    assert os.listdir(tmp_path / "out") == ["taken"]


def test_an_s3_write_publishes_the_object_with_its_content_type(s3_bucket):
    fs, _ = filesystem_for(f"s3://{s3_bucket}")
    write_bytes(fs, f"{s3_bucket}/report/index.html", b"<html></html>", content_type="text/html")
    head = boto3.client("s3").head_object(Bucket=s3_bucket, Key="report/index.html")
    assert head["ContentType"] == "text/html"
    assert s3_objects(s3_bucket) == {"report/index.html": b"<html></html>"}


def test_an_s3_upload_that_fails_publishes_nothing_and_keeps_the_previous_object(s3_bucket):
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="out/summary.json", Body=b"previous")
    with s3_fault_proxy() as proxy:
        proxy.fail(method="PUT", key_pattern="out/summary.json", times=None, status=500)
        with pytest.raises(OSError):
            write_bytes(proxy.pyarrow_fs(), f"{s3_bucket}/out/summary.json", b"new and never whole")
    assert s3_objects(s3_bucket) == {"out/summary.json": b"previous"}


# -- publish_file ----------------------------------------------------------------------------------------------
def test_publishing_a_local_file_moves_it_into_place(tmp_path):
    finished = tmp_path / "work" / "shard.parquet"
    finished.parent.mkdir()
    finished.write_bytes(b"rows")
    publish_file(finished, str(tmp_path / "out" / "scores" / "shard.parquet"))
    assert (tmp_path / "out" / "scores" / "shard.parquet").read_bytes() == b"rows"
    assert not finished.exists()


def test_a_file_larger_than_one_upload_chunk_is_published_whole_to_s3(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(publish, "_CHUNK", 1000)
    data = os.urandom(3500)
    finished = tmp_path / "shard.tar"
    finished.write_bytes(data)
    publish_file(finished, f"s3://{s3_bucket}/out/shards/shard.tar", content_type="application/x-tar")
    assert s3_objects(s3_bucket) == {"out/shards/shard.tar": data}
    head = boto3.client("s3").head_object(Bucket=s3_bucket, Key="out/shards/shard.tar")
    assert head["ContentType"] == "application/x-tar"


def test_a_publish_to_s3_that_fails_leaves_no_object(s3_bucket, tmp_path):
    finished = tmp_path / "shard.tar"
    finished.write_bytes(b"x" * 5000)
    with s3_fault_proxy(set_env=True) as proxy:
        proxy.fail(method="PUT", key_pattern="out/shard.tar", times=None, status=500)
        with pytest.raises(OSError):
            publish_file(finished, f"s3://{s3_bucket}/out/shard.tar")
    assert s3_objects(s3_bucket) == {}
    assert finished.read_bytes() == b"x" * 5000  # still there to publish again


# -- JSON state ------------------------------------------------------------------------------------------------
def test_a_json_object_written_is_read_back(output):
    write_json(f"{output}/_lease.json", {"holder": "job-1", "expires": 12.5, "shards": ["a", "b"]})
    assert read_json(f"{output}/_lease.json") == {"holder": "job-1", "expires": 12.5, "shards": ["a", "b"]}


def test_a_json_file_that_is_not_there_reads_as_none(output):
    assert read_json(f"{output}/_identity.json") is None


@pytest.mark.parametrize("content", [b'{"holder": "job-1", "exp', b'["a", "list"]', b""],
                         ids=["truncated", "not-an-object", "empty"])
def test_a_json_file_that_is_not_an_object_is_corrupt_state_naming_the_file_the_field_and_the_remedy(
        content, tmp_path):
    path = tmp_path / "_lease.json"
    path.write_bytes(content)
    with pytest.raises(CorruptState) as err:
        read_json(str(path), field="scores", remedy="delete it and run again")
    assert err.value.field == "scores"
    assert str(path) in str(err.value) and "delete it and run again" in str(err.value)


# -- write_with_retries ----------------------------------------------------------------------------------------
class FlakyWrite:
    """A write that fails with the given errors, in order, then succeeds."""

    def __init__(self, *errors: BaseException):
        self.errors, self.calls = list(errors), 0

    def __call__(self) -> None:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)


def test_a_write_that_fails_for_io_reasons_is_tried_again_until_it_succeeds():
    write = FlakyWrite(OSError("SlowDown"), OSError("SlowDown"))
    write_with_retries("s3://b/out/x.parquet", write, attempts=3, backoff_s=0)
    assert write.calls == 3


def test_a_write_that_keeps_failing_is_a_fault_naming_the_file_and_the_attempts():
    write = FlakyWrite(*[OSError(28, "No space left on device")] * 3)
    with pytest.raises(ShardFault) as fault:
        write_with_retries("/out/scores/x.parquet", write, attempts=3, backoff_s=0)
    assert fault.value.category is Category.IO
    assert fault.value.detail == ("cannot write /out/scores/x.parquet: [Errno 28] No space left on device "
                                  "(gave up after 3 attempts)")
    assert write.calls == 3


def test_an_io_error_without_a_message_is_named_by_its_kind():
    with pytest.raises(ShardFault, match="cannot write x: ConnectionResetError "):
        write_with_retries("x", FlakyWrite(ConnectionResetError()), attempts=1, backoff_s=0)


def test_a_failure_that_is_no_io_error_is_not_tried_again():
    write = FlakyWrite(ValueError("a bug"))
    with pytest.raises(ValueError, match="a bug"):
        write_with_retries("x", write, attempts=3, backoff_s=0)
    assert write.calls == 1
