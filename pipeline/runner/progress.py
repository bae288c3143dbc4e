"""One progress line per job: shards and samples done, rate, ETA, errors. On a terminal it redraws in place; into a
log it prints a plain line now and then, never a flood."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Progress:
    def __init__(self, job: str, total_shards: int, unit: str = "samples", stream=None, enabled: bool = True,
                 log_every_s: float = 30.0, note: Callable[[], str] | None = None):
        self.job = job
        self.total = total_shards
        self.unit = unit
        self.note = note
        self.stream = stream or sys.stderr
        self.enabled = enabled and total_shards > 0
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.5 if self.tty else log_every_s
        self.started = time.time()
        self._last = 0.0
        self._drawn = False

    def update(self, shards_done: int, samples: int, errors: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.time()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        elapsed = now - self.started
        rate = samples / elapsed if elapsed > 0 else 0.0
        eta = ""
        if 0 < shards_done < self.total:
            eta = f" · ETA {_duration(elapsed / shards_done * (self.total - shards_done))}"
        width = len(str(self.total))
        bar_len = 20
        filled = int(bar_len * shards_done / self.total)
        line = (f"[{self.job}] [{'#' * filled}{'.' * (bar_len - filled)}] {shards_done:>{width}}/{self.total} shards · "
                f"{samples} {self.unit} · {rate:.1f}/s · {errors} errors · {_duration(elapsed)}{eta}")
        note = self.note() if self.note else ""
        if note:
            line += f" · {note}"
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._drawn = True

    def close(self, shards_done: int, samples: int, errors: int) -> None:
        if not self.enabled:
            return
        self.update(shards_done, samples, errors, force=True)
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
