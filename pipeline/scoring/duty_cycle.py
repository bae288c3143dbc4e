"""How busy a scoring actor keeps its device, and what the device waited for when it was not busy.

Each actor keeps one `DutyCycle` from its first call on. The device is busy while a micro-batch runs through the
model: measured with CUDA events on a GPU (the device's own time, launches and syncs left out), by the forward's
wall clock on CPUs. Every other moment of the actor's wall time goes to the first of these that holds:
- `decode`: a micro-batch was awaited from the decode threads (its images not decoded, padded and resized yet);
- `host`: a call was under way on the host (planning and tokenising samples, building records) or a forward's
  host side outlasted its device time (kernel launches, the copy back): the CPU that drives the device;
- `input`: no call was under way: the actor waited for rows (the shard readers, or the job's driver, behind).

Two calls may run at once on an actor, so the states are counted, not assumed exclusive: a moment in which one
call's micro-batch is on the device is busy whatever the other call is doing. `summary` turns the actors'
snapshots into the summary's `device_busy`: below `BUSY_TARGET` it names what starved the device most and what to
change."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pyarrow as pa

BUSY_TARGET = 90.0  # % of wall time; below it the summary says what starved the device
WAITS = ("decode", "input", "host")
# An actor's snapshot on the wire (the scorer's per-call account): seconds, cumulative since its first call.
SNAPSHOT_FIELDS = [pa.field("wall_s", pa.float64()), pa.field("busy_s", pa.float64()),
                   *(pa.field(f"{wait}_s", pa.float64()) for wait in WAITS)]

# What the device waited for, and what to change about it.
STARVED_BY = {
    "decode": "waiting for its images to be decoded",
    "input": "waiting for input rows (the shard readers, or the driver committing, behind)",
    "host": "waiting for the host (planning and tokenising samples, launching kernels)",
}
ADVICE = {
    "decode": "give each scoring actor more CPUs for its decode threads (cpus_per_actor, decode_threads), decode "
              "large JPEGs at reduced scale (jpeg_draft: true), or decode JPEGs on the GPU (image_decoder: nvjpeg)",
    "input": "more shard readers (read_workers) or CPUs for them (read_cpus)",
    "host": "larger micro-batches (token_budget, max_batch), compile: true, and CPUs beside the device "
            "(cpus_per_actor)",
}


class DutyCycle:
    """One actor's account: enter `call()` for each scoring call, `waiting_for_decode()` while a micro-batch is
    awaited from the decode threads, and `forward()` around each micro-batch on the device."""

    def __init__(self, cuda: bool = False, clock=time.perf_counter):
        self.cuda = cuda
        self._clock = clock
        self._lock = threading.Lock()
        self._calls = self._forwards = self._waiting = 0
        self._since: float | None = None  # the last change of state; None until the first call
        self._spent = {"forward": 0.0, "decode": 0.0, "host": 0.0, "input": 0.0}
        self._busy = 0.0

    def _advance(self, now: float) -> None:
        """The time since the last change of state, to the state it was in (under the lock)."""
        if self._since is None:
            return
        state = ("forward" if self._forwards else "decode" if self._waiting else "host" if self._calls
                 else "input")
        self._spent[state] += now - self._since
        self._since = now

    def _change(self, counter: str, delta: int) -> None:
        with self._lock:
            now = self._clock()
            if self._since is None and counter == "_calls":
                self._since = now  # the account starts with the first call: set-up and compiling are not in it
            self._advance(now)
            setattr(self, counter, getattr(self, counter) + delta)

    @contextmanager
    def call(self):
        self._change("_calls", 1)
        try:
            yield
        finally:
            self._change("_calls", -1)

    @contextmanager
    def waiting_for_decode(self):
        self._change("_waiting", 1)
        try:
            yield
        finally:
            self._change("_waiting", -1)

    @contextmanager
    def forward(self):
        """Around one micro-batch on the device (the caller holds the device: forwards never overlap). On a GPU
        the body must wait for the forward's results (the scorer copies them back), so the end event has passed
        when it exits."""
        import torch

        self._change("_forwards", 1)
        started = self._clock()
        events = None
        if self.cuda:
            events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            events[0].record()
        try:
            yield
            if events is not None:
                events[1].record()
                events[1].synchronize()
                busy = events[0].elapsed_time(events[1]) / 1000
            else:
                busy = self._clock() - started
            with self._lock:
                if self._since is not None:
                    self._busy += busy
        finally:
            self._change("_forwards", -1)

    def reset(self) -> None:
        """Forget what was counted (the warm-up's forwards, say)."""
        with self._lock:
            self._since = None
            self._spent = dict.fromkeys(self._spent, 0.0)
            self._busy = 0.0

    def snapshot(self) -> dict:
        """Seconds since the first call: `wall_s`, `busy_s` (the device in forwards) and the waits (`SNAPSHOT_FIELDS`);
        the forwards' host time beyond their device time counts as `host`."""
        with self._lock:
            self._advance(self._clock())
            spent, busy = dict(self._spent), self._busy
        wall = sum(spent.values())
        host = spent["host"] + max(0.0, spent["forward"] - busy)
        return {"wall_s": wall, "busy_s": min(busy, wall), "decode_s": spent["decode"], "input_s": spent["input"],
                "host_s": host}


def summary(snapshots: list[dict]) -> dict | None:
    """The summary's `device_busy` from each actor's latest snapshot: busy % over all actors, the lowest actor's,
    the share of wall time spent waiting for each cause, and below `BUSY_TARGET` what starved the device most and
    what to change."""
    wall = sum(s["wall_s"] for s in snapshots)
    if not snapshots or wall <= 0:
        return None
    pct = lambda seconds: round(100 * seconds / wall, 1)  # noqa: E731
    out = {"pct": pct(sum(s["busy_s"] for s in snapshots)), "actors": len(snapshots),
           "lowest_actor_pct": round(min(100 * s["busy_s"] / s["wall_s"] for s in snapshots if s["wall_s"] > 0), 1),
           "waiting_pct": {wait: pct(sum(s[f"{wait}_s"] for s in snapshots)) for wait in WAITS},
           "starved_by": None, "advice": None}
    if out["pct"] < BUSY_TARGET:
        cause = max(WAITS, key=lambda wait: out["waiting_pct"][wait])
        out["starved_by"], out["advice"] = cause, ADVICE[cause]
    return out


def lines(busy: dict | None) -> list[str]:
    """The summary's lines for it: busy %, and below the target, what starved the device and what to change."""
    if not busy:
        return []
    text = f"busy {busy['pct']:g}% of the scoring actors' time"
    if busy["actors"] > 1:
        text += f" (lowest actor {busy['lowest_actor_pct']:g}%)"
    if not busy["starved_by"]:
        return [text]
    waited = busy["waiting_pct"][busy["starved_by"]]
    return [f"{text}; below {BUSY_TARGET:g}%: {waited:g}% of the time {STARVED_BY[busy['starved_by']]}",
            f"to change it: {busy['advice']}"]
