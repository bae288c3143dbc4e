"""The output lease: one job at a time per output, locally and on S3; a killed job's lease expires."""

from __future__ import annotations

import json
import multiprocessing
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pipeline.commit.lease import LEASE_NAME, Lease
from pipeline.errors import CorruptState, LeaseLost, OutputBusy
from tests.support.jobs import REPO_ROOT, job_env


def _elsewhere(payload: dict, **changes) -> dict:
    """The lease as a job on another host would write it: another host name, another kernel (boot id)."""
    return {**payload, "host": "another-host", "boot_id": "another-boot", **changes}


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/out"


def _read(output: str) -> dict:
    lease = Lease(output, "probe")
    data, _ = lease._store.read()
    return json.loads(data)


def _write(output: str, payload: dict) -> None:
    store = Lease(output, "probe")._store
    current = store.read()
    if current is None:
        assert store.create(json.dumps(payload).encode())
    else:
        assert store.replace(json.dumps(payload).encode(), current[1])


def test_a_second_job_is_refused_naming_the_holder(output):
    with Lease(output, "score", ttl_s=30):
        with pytest.raises(OutputBusy, match=r"field 'output': .* in use by job 'score' on host .*pid"):
            Lease(output, "score", ttl_s=30).acquire()
    with Lease(output, "score", ttl_s=30):  # released at the end of the first: the next job gets it
        pass


def test_a_lease_whose_holder_stopped_renewing_expires(output):
    with Lease(output, "score", ttl_s=30):
        payload = _read(output)
    _write(output, _elsewhere(payload, expires_at=time.time() - 1))  # a killed job elsewhere
    with Lease(output, "score", ttl_s=30) as lease:
        assert _read(output)["token"] == lease._holder.token
    _write(output, _elsewhere(payload, expires_at=time.time() + 60))  # alive elsewhere
    with pytest.raises(OutputBusy, match="another-host"):
        Lease(output, "score", ttl_s=30).acquire()


def _hold(output: str, ready, ttl_s: float = 600) -> None:
    Lease(output, "score", ttl_s=ttl_s).acquire()
    ready.set()
    time.sleep(600)


def test_the_lease_of_a_killed_process_on_this_host_is_stale_at_once(tmp_path):
    output = str(tmp_path / "out")
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold, args=(output, ready))
    holder.start()
    assert ready.wait(60)
    with pytest.raises(OutputBusy):
        Lease(output, "score").acquire()
    holder.kill()  # SIGKILL: no release
    holder.join()
    with Lease(output, "score", ttl_s=600):  # its pid is gone: no need to wait 600 s
        pass


def test_a_job_learns_that_it_lost_its_lease(output):
    lease = Lease(output, "score", ttl_s=0.6).acquire()
    try:
        payload = _read(output)
        _write(output, _elsewhere(payload, token="someone-else", expires_at=time.time() + 60))
        deadline = time.time() + 10
        while time.time() < deadline and lease._lost is None:
            time.sleep(0.1)
        with pytest.raises(LeaseLost, match="another job took over"):
            lease.check()
    finally:
        lease.release()
    assert _read(output)["token"] == "someone-else"  # and it did not delete the new holder's lease


def test_the_lease_file_is_metadata(tmp_path):
    with Lease(str(tmp_path / "o"), "score"):
        assert (tmp_path / "o" / LEASE_NAME).is_file()
    assert not (tmp_path / "o" / LEASE_NAME).exists()


def test_a_lease_that_cannot_be_renewed_in_time_is_lost(tmp_path):
    lease = Lease(str(tmp_path / "out"), "score", ttl_s=0.6).acquire()
    try:
        lease._stop.set()  # the renewals stop (storage down, or this process paused past its expiry)
        lease._thread.join()
        time.sleep(0.8)
        with pytest.raises(LeaseLost, match="expired before it could be renewed"):
            lease.check()  # before the next commit: no other job needs to have taken it over
    finally:
        lease.release()


def test_a_corrupt_lease_file_is_named_with_what_to_do(output):
    with Lease(output, "score", ttl_s=30):
        payload = json.dumps(_read(output)).encode()
    store = Lease(output, "probe")._store
    assert store.create(payload[: len(payload) // 2])  # a lease cut short
    with pytest.raises(CorruptState, match=r"field 'output': .*/out/_lease.json is not a valid lease \(truncated\?\): "
                                           r"if no job is running on this output, delete it"):
        Lease(output, "score").acquire()


def test_a_clock_ahead_never_takes_over_a_live_lease_on_this_host(tmp_path, monkeypatch):
    output = str(tmp_path / "out")
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold, args=(output, ready, 30))
    holder.start()
    try:
        assert ready.wait(60)
        real_time = time.time
        monkeypatch.setattr(time, "time", lambda: real_time() + 150)  # this process's wall clock 150 s ahead
        with pytest.raises(OutputBusy, match=rf"in use by job 'score' on host .*\(pid {holder.pid}\)"):
            Lease(output, "score").acquire()
    finally:
        holder.kill()
        holder.join()


def test_a_clock_jump_in_the_holder_does_not_lose_its_lease(tmp_path, monkeypatch):
    lease = Lease(str(tmp_path / "out"), "score", ttl_s=30).acquire()
    try:
        real_time = time.time
        monkeypatch.setattr(time, "time", lambda: real_time() + 150)  # the wall clock steps forward
        lease.check()
        with lease.fenced():
            pass
    finally:
        lease.release()


def test_a_commit_after_another_job_took_the_lease_over_writes_no_record(output):
    from pipeline.commit.committer import RecordLayout, ShardCommitter
    from pipeline.commit.manifest import read_manifest
    from tests.support.score_like import RECORDS, scores_folder, shard_table

    lease = Lease(output, "score", ttl_s=30).acquire()  # renewed every 10 s: no renewal during this test
    try:
        committer = ShardCommitter(output, RecordLayout(RECORDS, scores_folder), "id", lease=lease)
        committer.add(shard_table("a.tar", 2))
        _write(output, _elsewhere(_read(output), token="someone-else", expires_at=time.time() + 60))
        with pytest.raises(LeaseLost, match="another job took over"):
            committer.add(shard_table("b.tar", 2))
    finally:
        lease.release()
    assert sorted(read_manifest(output)) == ["a.tar"]
    assert _read(output)["token"] == "someone-else"


# Holds the lease (ttl 2 s) and commits shards a, b, c through a real ShardCommitter; just before writing b's
# file it says so and waits for a line on stdin (the test pauses it there, past the TTL, and takes the lease).
HOLD_AND_COMMIT = textwrap.dedent("""
    import sys
    import pipeline.commit.committer as sinks
    from pipeline.commit.lease import Lease
    from pipeline.commit.committer import RecordLayout, ShardCommitter
    from tests.support.score_like import RECORDS, scores_folder, shard_table

    real_write = sinks.write_bytes

    def write_bytes(fs, path, data):
        if path.endswith("/b.tar.parquet"):
            print("writing b", flush=True)
            sys.stdin.readline()
        real_write(fs, path, data)

    sinks.write_bytes = write_bytes
    lease = Lease(sys.argv[1], "score", ttl_s=2).acquire()
    committer = ShardCommitter(sys.argv[1], RecordLayout(RECORDS, scores_folder), "id", lease=lease)
    try:
        for key in ("a.tar", "b.tar", "c.tar"):
            committer.add(shard_table(key, 2))
    except Exception as err:
        print(f"{type(err).__name__}: {err}", flush=True)
    print("committed", *committer.committed, flush=True)
""")


def test_a_job_paused_past_its_lease_commits_nothing_more_once_another_took_it(output):
    from pipeline.commit.manifest import read_manifest

    holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_COMMIT, output], env=job_env(), cwd=REPO_ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "writing b\n", holder.stderr.read()[-2000:]
        holder.send_signal(signal.SIGSTOP)  # paused (its lease renewals too) with shard b half written
        deadline = time.time() + 60
        while True:  # a live but paused holder on this host loses the lease once it expires
            try:
                taker = Lease(output, "score", ttl_s=600).acquire()
                break
            except OutputBusy:
                assert time.time() < deadline
                time.sleep(0.2)
        try:
            holder.stdin.write("go\n")
            holder.stdin.flush()
            holder.send_signal(signal.SIGCONT)
            out, err = holder.communicate(timeout=60)
        finally:
            taker.release()
    finally:
        holder.kill()
    assert "LeaseLost" in out, err[-2000:]
    assert "committed a.tar\n" in out
    assert sorted(read_manifest(output)) == ["a.tar"]  # b (nor c) was not committed after the takeover
