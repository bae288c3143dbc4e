"""Opening a shard for reading, with the line between a fault and bad data drawn in one place.

A remote shard is downloaded whole into a local spool file (memory up to a limit, then disk) before any parsing,
retrying with backoff on I/O errors; a local shard is opened in place. Either way the reader gets a seekable file
whose I/O errors surface as `ShardFault(io)`, which is no `OSError`: whatever else a parser raises afterwards
comes from the bytes themselves, and is data.

A shard that changed since it was listed (its size, or its modification time where the listing gave one) is a
`ShardFault(io)` too, raised at once rather than retried: it is never read short and committed; the next run lists
it again and reads it whole. A local shard is checked again once it has been read (`GuardedFile.check_unchanged`),
so a file cut or rewritten while it is read is never committed either.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime

import pyarrow.fs as pafs

from pipeline.errors import Category, ShardFault
from pipeline.io.uris import filesystem_for, is_local

SPOOL_IN_MEMORY = 64 * 2**20  # larger shards spill to a temporary file on local disk
_CHUNK = 8 * 2**20


class GuardedFile(io.RawIOBase):
    """A seekable binary file whose I/O errors become `ShardFault(io)`."""

    def __init__(self, raw, name: str, stat: tuple[int, int] | None = None):
        super().__init__()
        self._raw = raw
        self.name = name
        self._stat = stat  # a local file's (size, mtime_ns) when it was opened
        self._end = self._guard(raw.seek, 0, io.SEEK_END)
        self._guard(raw.seek, 0)

    def check_unchanged(self) -> None:
        """Raise `ShardFault(io)` if the local file changed since it was opened (a downloaded copy cannot)."""
        if self._stat is None:
            return
        st = self._guard(os.fstat, self._raw.fileno())
        change = _change(self._stat, (st.st_size, st.st_mtime_ns))
        if change:
            raise ShardFault(Category.IO, f"{self.name} changed while it was read: {change}")

    def _guard(self, op, *args):
        try:
            return op(*args)
        except OSError as err:
            raise ShardFault(Category.IO, f"reading {self.name} failed ({type(err).__name__}: {err})") from None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if size is not None and size > _CHUNK:  # never allocate more than the file holds (a header may say 1 TB)
            size = max(0, min(size, self._end - self.tell()))
        return self._guard(self._raw.read, size)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._guard(self._raw.seek, offset, whence)

    def tell(self) -> int:
        return self._guard(self._raw.tell)

    def size(self) -> int:
        return self._end

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._raw.close()
        super().close()


def _change(listed: tuple[int | None, int | None], now: tuple[int | None, int | None], mtime_unit_ns: int = 1
            ) -> str | None:
    """How a shard differs from what was listed ((size, mtime_ns); None: not known), or None."""
    (size, mtime), (size_now, mtime_now) = listed, now
    if size is not None and size_now is not None and size != size_now:
        return f"size {size} -> {size_now} bytes"
    if mtime is not None and mtime_now is not None and mtime // mtime_unit_ns != mtime_now // mtime_unit_ns:
        return f"modified at {mtime_now / 1e9:.3f}, listed as {mtime / 1e9:.3f} (seconds since the epoch)"
    return None


def _changed(uri: str, change: str) -> ShardFault:
    return ShardFault(Category.IO, f"{uri} changed since it was listed: {change} (a rerun lists it again)")


def _open_local(path: str, uri: str, size: int | None, mtime_ns: int | None):
    raw = open(path, "rb")  # noqa: SIM115 - closed by the GuardedFile
    st = os.fstat(raw.fileno())
    change = _change((size, mtime_ns), (st.st_size, st.st_mtime_ns))
    if change:
        raw.close()
        raise _changed(uri, change)
    return raw, (st.st_size, st.st_mtime_ns)


def _last_modified_ns(src) -> int | None:
    """The object's Last-Modified from the download's own response (S3 gives it), to the second; else None."""
    try:
        value = (src.metadata() or {}).get("Last-Modified")
        return int(datetime.fromisoformat(value.decode()).timestamp()) * 10**9 if value else None
    except (ValueError, AttributeError, OSError):
        return None


def _download(fs: pafs.FileSystem, path: str, uri: str, size: int | None, mtime_ns: int | None):
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY, prefix="unifilter-shard-")
    try:
        with fs.open_input_stream(path) as src:
            modified = _last_modified_ns(src)
            while chunk := src.read(_CHUNK):
                spool.write(chunk)
        got = spool.tell()
        change = _change((None, mtime_ns), (None, modified), mtime_unit_ns=10**9)  # S3 times are whole seconds
        if change:
            raise _changed(uri, change)
        if got != size:  # a short read (retried), or a shard that changed since it was listed (not)
            now = fs.get_file_info(path).size
            if size is not None and now is not None and now != size:
                raise _changed(uri, f"size {size} -> {now} bytes")
            if now is not None and got != now:
                raise OSError(f"short read: got {got} of {now} bytes")
        spool.seek(0)
        return spool
    except BaseException:
        spool.close()
        raise


@contextlib.contextmanager
def open_shard(uri: str, attempts: int = 5, backoff_s: float = 1.0, size: int | None = None,
               mtime_ns: int | None = None, sleep=time.sleep) -> Iterator[GuardedFile]:
    """A seekable file over the shard's bytes. I/O failures (a missing file, a network error, throttling, a short
    read) are retried `attempts` times with exponential backoff and full jitter, then raise `ShardFault(io)`. A
    shard whose size or mtime differs from the listing's (`size`, `mtime_ns`; None: not listed) raises
    `ShardFault(io)` at once."""
    fs, path = filesystem_for(uri)
    last: Exception | None = None
    stat = None
    for attempt in range(attempts):
        if attempt:
            sleep(random.uniform(0, min(30.0, backoff_s * 2 ** (attempt - 1))))
        try:
            if is_local(uri):
                raw, stat = _open_local(path, uri, size, mtime_ns)
            else:
                raw = _download(fs, path, uri, size, mtime_ns)
            break
        except FileNotFoundError as err:
            last = err
        except OSError as err:
            last = err
    else:
        missing = isinstance(last, FileNotFoundError)
        detail = "shard does not exist" if missing else f"{type(last).__name__}: {last}"
        raise ShardFault(Category.IO, f"cannot read {uri}: {detail} (gave up after {attempts} attempts)")
    try:
        guarded = GuardedFile(raw, uri, stat)
    except BaseException:
        raw.close()
        raise
    try:
        yield guarded
    finally:
        guarded.close()
