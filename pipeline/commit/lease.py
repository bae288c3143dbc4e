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
The holder times its own validity on the boot clock too. The storage of the lease: `pipeline.lease_store`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from pipeline.commit.lease_store import corrupt_lease, store_for
from pipeline.errors import LeaseLost, OutputBusy
from pipeline.io.uris import join

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


def _holder_of(data: bytes, uri: str) -> Holder:
    try:
        payload = json.loads(data)
        return Holder(**{k: v for k, v in payload.items() if k in Holder.__dataclass_fields__})
    except (ValueError, TypeError, AttributeError):
        raise corrupt_lease(uri) from None


class Lease:
    """`with Lease(output, job="score"):` holds the output for this job; `check()` raises LeaseLost if it was lost;
    `with lease.fenced():` wraps each commit record's write."""

    def __init__(self, output: str, job: str, ttl_s: float = 60.0):
        self.output = output
        self.job = job
        self.ttl_s = ttl_s
        self.uri = join(output, LEASE_NAME)
        self._store = store_for(self.uri)
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
