"""Opening a shard (`pipeline.io.files.open_shard`): a seekable file over its bytes, local in place or an object
downloaded whole; I/O failures retried, then a `ShardFault(io)` that is no `OSError`; a shard that differs from
its listing a fault at once, never read short."""

from __future__ import annotations

import io
import os

import boto3
import pytest

from pipeline.errors import Category, ShardFault
from pipeline.io.files import GuardedFile, open_shard
from pipeline.io.uris import filesystem_for

BYTES = bytes(range(256)) * 40


def local_shard(tmp_path, data: bytes = BYTES):
    path = tmp_path / "00000.tar"
    path.write_bytes(data)
    return path


def s3_shard(bucket: str, data: bytes = BYTES) -> str:
    boto3.client("s3").put_object(Bucket=bucket, Key="in/00000.tar", Body=data)
    return f"s3://{bucket}/in/00000.tar"


def never_sleep(seconds):
    raise AssertionError(f"retried (a pause of {seconds:.2f} s) where the fault should be at once")


def test_a_local_shard_is_a_seekable_file_of_its_bytes(tmp_path):
    path = local_shard(tmp_path)
    st = path.stat()
    with open_shard(str(path), size=st.st_size, mtime_ns=st.st_mtime_ns, sleep=never_sleep) as f:
        assert f.size() == len(BYTES) and f.read() == BYTES
        f.seek(-10, io.SEEK_END)
        assert f.read() == BYTES[-10:]
        f.seek(100)
        assert f.read(5) == BYTES[100:105]


def test_an_s3_shard_listed_with_its_own_size_and_time_is_read_whole(s3_bucket):
    uri = s3_shard(s3_bucket)
    fs, path = filesystem_for(uri)
    info = fs.get_file_info(path)
    with open_shard(uri, size=info.size, mtime_ns=info.mtime_ns, sleep=never_sleep) as f:
        assert f.read() == BYTES
        f.seek(0)
        assert f.read(3) == BYTES[:3]


def test_a_shard_the_listing_gave_no_size_or_time_for_is_read_as_it_is(tmp_path, s3_bucket):
    for uri in (str(local_shard(tmp_path)), s3_shard(s3_bucket)):
        with open_shard(uri, sleep=never_sleep) as f:
            assert f.read() == BYTES, uri


def test_an_empty_shard_is_an_empty_file(tmp_path, s3_bucket):
    for uri in (str(local_shard(tmp_path, b"")), s3_shard(s3_bucket, b"")):
        with open_shard(uri, size=0, sleep=never_sleep) as f:
            assert f.size() == 0 and f.read() == b"", uri


def test_a_read_asking_for_more_than_the_file_holds_gets_what_it_holds(tmp_path):
    with open_shard(str(local_shard(tmp_path))) as f:
        f.seek(len(BYTES) - 7)
        assert f.read(2**40) == BYTES[-7:]  # a header claiming a terabyte allocates nothing of the sort


def test_a_missing_shard_is_retried_then_a_fault_saying_it_does_not_exist(tmp_path):
    pauses = []
    with pytest.raises(ShardFault) as fault, open_shard(str(tmp_path / "gone.tar"), attempts=3, sleep=pauses.append):
        pass
    assert fault.value.category is Category.IO and not isinstance(fault.value, OSError)
    assert "shard does not exist (gave up after 3 attempts)" in fault.value.detail
    assert len(pauses) == 2


def test_the_pauses_between_attempts_grow_from_the_backoff(tmp_path):
    pauses = []
    with pytest.raises(ShardFault), open_shard(str(tmp_path / "gone.tar"), attempts=5, backoff_s=2.0,
                                               sleep=pauses.append):
        pass
    # full jitter: each pause is drawn below a ceiling that doubles from the backoff
    assert len(pauses) == 4
    assert all(0 <= pause <= ceiling for pause, ceiling in zip(pauses, (2.0, 4.0, 8.0, 16.0)))


def test_a_shard_that_appears_between_attempts_is_read(tmp_path):
    path = tmp_path / "late.tar"
    with open_shard(str(path), attempts=2, sleep=lambda _: path.write_bytes(BYTES)) as f:
        assert f.read() == BYTES


@pytest.mark.parametrize("listed", ["size", "mtime"])
def test_a_local_shard_that_differs_from_its_listing_is_a_fault_at_once(listed, tmp_path):
    path = local_shard(tmp_path)
    st = path.stat()
    size, mtime = (st.st_size + 1, st.st_mtime_ns) if listed == "size" else (st.st_size, st.st_mtime_ns - 10**9)
    with pytest.raises(ShardFault, match="changed since it was listed") as fault, \
            open_shard(str(path), size=size, mtime_ns=mtime, sleep=never_sleep):
        pass
    assert fault.value.category is Category.IO
    assert ("size" if listed == "size" else "modified at") in fault.value.detail


def test_an_s3_shard_whose_size_differs_from_its_listing_is_a_fault_at_once(s3_bucket):
    uri = s3_shard(s3_bucket)
    with pytest.raises(ShardFault, match=f"size {len(BYTES) - 1} -> {len(BYTES)} bytes"), \
            open_shard(uri, size=len(BYTES) - 1, sleep=never_sleep):
        pass


def test_a_local_shard_cut_after_it_was_opened_fails_its_check(tmp_path):
    path = local_shard(tmp_path)
    with open_shard(str(path)) as f:
        f.check_unchanged()  # as it was opened: nothing to say
        os.truncate(path, len(BYTES) // 2)
        with pytest.raises(ShardFault, match="changed while it was read: size"):
            f.check_unchanged()


def test_a_downloaded_copy_has_nothing_to_check_once_read(s3_bucket):
    uri = s3_shard(s3_bucket)
    with open_shard(uri) as f:
        boto3.client("s3").put_object(Bucket=s3_bucket, Key="in/00000.tar", Body=b"replaced")
        f.check_unchanged()
        assert f.read() == BYTES


def test_an_io_error_of_the_file_underneath_is_a_shard_fault_not_an_os_error():
    read_end, write_end = os.pipe()
    os.close(write_end)
    pipe = open(read_end, "rb", buffering=0)  # noqa: SIM115 - a pipe cannot seek: the guard meets an OSError
    try:
        with pytest.raises(ShardFault, match=r"reading a-pipe failed \(.*Illegal seek") as fault:
            GuardedFile(pipe, "a-pipe")
        assert fault.value.category is Category.IO and not isinstance(fault.value, OSError)
    finally:
        pipe.close()
