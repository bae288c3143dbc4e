"""One job at a time per output: the lease `OUTPUT/_lease.json`.

A job takes the lease before it writes anything and holds it until it ends; a second job on the same output is
refused with a message naming the holder. Taking it is an exclusive create (a local file created under an
advisory lock; on S3 a conditional put, `If-None-Match: *`); a background thread renews it every `ttl_s / 3`
with a compare-and-swap on the version it last wrote (S3: `If-Match` on the ETag). The lease is also a fence:
each commit record is written inside `fenced()`, which renews the lease by the same compare-and-swap first (and,
locally, keeps the lock until the record is written), so a job that lost its lease commits nothing more.

A killed job stops renewing: its lease expires after `ttl_s`, or at once when its holder is a dead process on
this host. Expiry is judged on the host's boot clock when the holder shares this host's kernel (a wall-clock jump
never takes over a live lease; a holder paused past its TTL loses it), and on the wall clock for another host.
The holder times its own validity on the boot clock too. Other filesystems get a best-effort lease (create, then
read back).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from pipeline.errors import CorruptState, LeaseLost, OutputBusy
from pipeline.storage import filesystem_for, is_remote, join

LEASE_NAME = "_lease.json"


@dataclass
class Holder:
    token: str
    job: str
    host: str
    boot_id: str
    pid: int
    pid_started: str
    acquired_at: float
    renewed_at: float
    expires_at: float
    pid_namespace: str = ""  # containers sharing a host name and boot id do not share process ids
    expires_boot: float = 0.0  # the expiry on the holder's boot clock (0: a lease of an earlier version)

    def _same_boot(self) -> bool:
        """Written by a process of this host's running kernel: its boot clock is ours."""
        return bool(self.boot_id) and self.boot_id == _boot_id() and bool(self.expires_boot)

    def _remaining(self, now: float) -> float:
        return self.expires_boot - boot_clock() if self._same_boot() else self.expires_at - now

    def describe(self, now: float) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.acquired_at))
        return (f"job '{self.job}' on host {self.host} (pid {self.pid}), started {started}, lease renewed "
                f"{max(0.0, now - self.renewed_at):.0f} s ago, expires in {max(0.0, self._remaining(now)):.0f} s")

    def is_stale(self, now: float) -> bool:
        """Held by a process of this host that is gone; else expired: by this host's boot clock for a holder on
        this kernel (a live process holds the lease whatever the wall clock says, until it stops renewing), by
        the wall clock `now` for another host."""
        if self.host == socket.gethostname() and self.boot_id == _boot_id() and \
                self.pid_namespace == _pid_namespace() and _process_started(self.pid) != self.pid_started:
            return True
        return self._remaining(now) <= 0


def boot_clock() -> float:
    """Seconds since this host booted: one clock for every process of the host, never stepped like the wall
    clock, and (unlike `time.monotonic`) still counting while the machine sleeps, as others' wall clocks do."""
    clock = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(clock) if clock is not None else time.monotonic()


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _process_started(pid: int) -> str:
    """The process's start time (clock ticks since boot), so a reused pid is not mistaken for the holder."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _parse(data: bytes, uri: str) -> dict:
    """The lease's fields; a file that is not a lease names itself and what to do."""
    try:
        payload = json.loads(data)
        Holder(**{k: v for k, v in payload.items() if k in Holder.__dataclass_fields__})
        return payload
    except (ValueError, TypeError, AttributeError):
        raise CorruptState(f"{uri} is not a valid lease (truncated?): if no job is running on this output, delete "
                           "it (the next job takes the lease again)") from None


def _holder_of(data: bytes, uri: str) -> Holder:
    payload = _parse(data, uri)
    return Holder(**{k: v for k, v in payload.items() if k in Holder.__dataclass_fields__})


def _version_of(data: bytes, uri: str) -> str:
    """A local lease's version: its token and the time of its last renewal."""
    payload = _parse(data, uri)
    return payload["token"] + ":" + str(payload["renewed_at"])


# -- storage backends: create exclusively, read with a version, replace or delete if the version matches ---------
class _LocalStore:
    def __init__(self, path: str):
        self.path = self.uri = path
        self.lock_path = path + ".lock"

    @contextlib.contextmanager
    def _locked(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _read(self) -> tuple[bytes, str] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, _version_of(data, self.uri)

    def _write(self, data: bytes) -> None:
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def read(self):
        with self._locked():
            return self._read()

    def create(self, data: bytes) -> bool:
        with self._locked():
            if self._read() is not None:
                return False
            self._write(data)
            return True

    def replace(self, data: bytes, version: str) -> bool:
        with self._locked():
            current = self._read()
            if current is None or current[1] != version:
                return False
            self._write(data)
            return True

    @contextlib.contextmanager
    def fence(self, data: bytes, version: str):
        """`replace`, keeping the lock until the block ends: no other job can take the lease meanwhile."""
        with self._locked():
            current = self._read()
            if current is None or current[1] != version:
                yield None
                return
            self._write(data)
            yield True

    def delete(self, version: str) -> None:
        with self._locked():
            current = self._read()
            if current is not None and current[1] == version:
                os.unlink(self.path)

    def version_of(self, data: bytes) -> str:
        return _version_of(data, self.uri)


class _S3Store:
    def __init__(self, uri: str):
        import boto3

        from model.storage import s3_endpoint

        self.uri = uri
        bucket_key = uri.split("://", 1)[1]
        self.bucket, _, self.key = bucket_key.partition("/")
        self.client = boto3.client("s3", endpoint_url=s3_endpoint())

    @staticmethod
    def _code(err) -> str:
        return str(err.response.get("Error", {}).get("Code", ""))

    def read(self):
        from botocore.exceptions import ClientError

        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as err:
            if self._code(err) in ("NoSuchKey", "404"):
                return None
            raise
        return obj["Body"].read(), obj["ETag"]

    def _conditional(self, **kwargs):
        from botocore.exceptions import ClientError

        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, ContentType="application/json",
                                          **kwargs)["ETag"]
        except ClientError as err:
            if self._code(err) in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409", "NoSuchKey"):
                return None
            raise

    def create(self, data: bytes):
        return self._conditional(Body=data, IfNoneMatch="*")

    def replace(self, data: bytes, version: str):
        return self._conditional(Body=data, IfMatch=version)

    @contextlib.contextmanager
    def fence(self, data: bytes, version: str):
        """`replace`: the conditional put is the fence (the record that follows is a separate object)."""
        yield self.replace(data, version)

    def delete(self, version: str) -> None:
        from botocore.exceptions import ClientError

        with contextlib.suppress(ClientError):
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=version)


class _BestEffortStore:
    """Filesystems without an atomic create: write, then read back to see who won."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.path = filesystem_for(uri)

    def read(self):
        try:
            with self.fs.open_input_stream(self.path) as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, _version_of(data, self.uri)

    def _put(self, data: bytes):
        self.fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)
        back = self.read()
        return back[1] if back and back[0] == data else None

    def create(self, data: bytes):
        return None if self.read() is not None else self._put(data)

    def replace(self, data: bytes, version: str):
        current = self.read()
        return self._put(data) if current and current[1] == version else None

    @contextlib.contextmanager
    def fence(self, data: bytes, version: str):
        yield self.replace(data, version)

    def delete(self, version: str) -> None:
        current = self.read()
        if current and current[1] == version:
            with contextlib.suppress(OSError):
                self.fs.delete_file(self.path)


def _store_for(uri: str):
    if is_remote(uri):
        return _S3Store(uri)
    fs, path = filesystem_for(uri)
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        return _LocalStore(path)
    return _BestEffortStore(uri)


class Lease:
    """`with Lease(output, job="score"):` holds the output for this job; `check()` raises LeaseLost if it was lost;
    `with lease.fenced():` wraps each commit record's write."""

    def __init__(self, output: str, job: str, ttl_s: float = 60.0):
        self.output, self.job, self.ttl_s = output, job, ttl_s
        self.uri = join(output, LEASE_NAME)
        self._store = _store_for(self.uri)
        self._version = None
        self._valid_until = 0.0  # on the boot clock: the expiry of the last write that succeeded
        self._holder: Holder | None = None
        self._lost: str | None = None
        self._lock = threading.Lock()  # one write of the lease at a time: the renewals and the fences
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def lost(self) -> str | None:
        """Why this job lost the lease, if it did."""
        return self._lost

    def _payload(self, started: float) -> bytes:
        """The lease as this write states it: `started` is the boot clock read before the write."""
        now = time.time()
        self._holder.renewed_at = now
        self._holder.expires_at = now + self.ttl_s
        self._holder.expires_boot = started + self.ttl_s
        return json.dumps(asdict(self._holder), sort_keys=True).encode()

    def _written(self, version, data: bytes, started: float) -> None:
        self._version = self._store.version_of(data) if version is True else version
        self._valid_until = started + self.ttl_s

    def _lose(self, reason: str) -> LeaseLost:
        self._lost = reason
        return LeaseLost(reason)

    def acquire(self) -> Lease:
        now = time.time()
        self._holder = Holder(token=uuid.uuid4().hex, job=self.job, host=socket.gethostname(), boot_id=_boot_id(),
                              pid=os.getpid(), pid_started=_process_started(os.getpid()),
                              pid_namespace=_pid_namespace(), acquired_at=now,
                              renewed_at=now, expires_at=now + self.ttl_s)
        for _ in range(3):
            started = boot_clock()
            data = self._payload(started)
            version = self._store.create(data)
            if version:
                self._written(version, data, started)
                break
            current = self._store.read()
            if current is None:
                continue  # released between our create and read: try again
            holder = _holder_of(current[0], self.uri)
            if not holder.is_stale(time.time()):
                raise OutputBusy(f"{self.output} is in use by {holder.describe(time.time())}. Two jobs on one output "
                                 "would redo each other's work: wait for that job to end, or choose another "
                                 "output.")
            version = self._store.replace(data, current[1])  # take over an expired lease, if nobody else did
            if version:
                self._written(version, data, started)
                break
        else:
            raise OutputBusy(f"could not take the lease on {self.output}: other jobs keep taking it")
        self._thread = threading.Thread(target=self._renew_loop, name="output-lease", daemon=True)
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            with self._lock:
                if self._lost or self._stop.is_set():
                    return
                started = boot_clock()
                try:
                    data = self._payload(started)
                    version = self._store.replace(data, self._version)
                except Exception as err:  # storage unreachable: keep trying while the last renewal still holds
                    if boot_clock() > self._valid_until - self.ttl_s / 3:
                        self._lost = f"could not renew the lease on {self.output}: {err}"
                        return
                    continue
                if not version:
                    self._lost = f"another job took over the lease on {self.output}"
                    return
                self._written(version, data, started)

    def check(self) -> None:
        """Raise LeaseLost unless this job still holds the lease as far as it knows: one that could not be renewed
        in time (storage down, or this process paused past its expiry) is lost even before another job takes it."""
        if self._lost:
            raise LeaseLost(self._lost)
        if boot_clock() > self._valid_until:
            raise self._lose(f"the lease on {self.output} expired before it could be renewed")

    @contextlib.contextmanager
    def fenced(self):
        """Hold the lease across one commit: renew it by compare-and-swap first (locally, keeping the lock until
        the block ends), so a job that lost it, however long it was paused, raises LeaseLost and writes nothing.
        If the lease's storage fails, the last renewal vouches for the lease until it expires."""
        with self._lock, contextlib.ExitStack() as held:
            self.check()
            started = boot_clock()
            data = self._payload(started)
            try:
                version = held.enter_context(self._store.fence(data, self._version))
            except Exception as err:
                if boot_clock() >= self._valid_until:
                    raise self._lose(f"could not renew the lease on {self.output}: {err}") from None
            else:
                if not version:
                    raise self._lose(f"another job took over the lease on {self.output}")
                self._written(version, data, started)
            yield

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._version:  # a compare-and-swap delete: never another job's lease, even after this one lost it
            with contextlib.suppress(Exception):
                self._store.delete(self._version)
        self._version = None

    def __enter__(self) -> Lease:
        return self.acquire() if self._version is None else self

    def __exit__(self, *exc) -> None:
        self.release()
