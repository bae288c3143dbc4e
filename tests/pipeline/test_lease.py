"""The output lease: one job at a time per output, locally and on S3; a killed job's lease expires."""

from __future__ import annotations

import json
import multiprocessing
import time

import pytest

from pipeline.errors import LeaseLost, OutputBusy
from pipeline.lease import LEASE_NAME, Lease


def _stale(payload: dict, **changes) -> bytes:
    return json.dumps({**payload, **changes}).encode()


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
    _write(output, {**payload, "host": "another-host", "expires_at": time.time() - 1})  # a killed job elsewhere
    with Lease(output, "score", ttl_s=30) as lease:
        assert _read(output)["token"] == lease._holder.token
    _write(output, {**payload, "host": "another-host", "expires_at": time.time() + 60})  # alive elsewhere
    with pytest.raises(OutputBusy, match="another-host"):
        Lease(output, "score", ttl_s=30).acquire()


def _hold(output: str, ready) -> None:
    Lease(output, "score", ttl_s=600).acquire()
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
        _write(output, {**payload, "token": "someone-else", "host": "another-host",
                        "expires_at": time.time() + 60})
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
