"""Opening a shard for reading, with the line between a fault and bad data drawn in one place.

A remote shard is downloaded whole into a local spool file (memory up to a limit, then disk) before any parsing,
retrying with backoff on I/O errors; a local shard is opened in place. Either way the reader gets a seekable file
whose I/O errors surface as `ShardFault(io)`, which is no `OSError`: whatever else a parser raises afterwards
comes from the bytes themselves, and is data.
"""

from __future__ import annotations

import contextlib
import io
import random
import tempfile
import time
from collections.abc import Iterator

import pyarrow.fs as pafs

from pipeline.errors import Category, ShardFault
from pipeline.storage import filesystem_for, is_local

SPOOL_IN_MEMORY = 64 * 2**20  # larger shards spill to a temporary file on local disk
_CHUNK = 8 * 2**20


class GuardedFile(io.RawIOBase):
    """A seekable binary file whose I/O errors become `ShardFault(io)`."""

    def __init__(self, raw, name: str):
        super().__init__()
        self._raw, self.name = raw, name

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
        here = self.tell()
        end = self.seek(0, io.SEEK_END)
        self.seek(here)
        return end

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._raw.close()
        super().close()


def _download(fs: pafs.FileSystem, path: str, expected_size: int | None):
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY, prefix="unifilter-shard-")
    try:
        with fs.open_input_stream(path) as src:
            while chunk := src.read(_CHUNK):
                spool.write(chunk)
        size = spool.tell()
        if expected_size is None:
            expected_size = fs.get_file_info(path).size
        if expected_size is not None and size != expected_size:
            raise OSError(f"short read: got {size} of {expected_size} bytes")
        spool.seek(0)
        return spool
    except BaseException:
        spool.close()
        raise


@contextlib.contextmanager
def open_shard(uri: str, attempts: int = 5, backoff_s: float = 1.0, size: int | None = None,
               sleep=time.sleep) -> Iterator[GuardedFile]:
    """A seekable file over the shard's bytes. I/O failures (a missing file, a network error, throttling, a short
    read) are retried `attempts` times with exponential backoff and full jitter, then raise `ShardFault(io)`."""
    fs, path = filesystem_for(uri)
    last: Exception | None = None
    for attempt in range(attempts):
        if attempt:
            sleep(random.uniform(0, min(30.0, backoff_s * 2 ** (attempt - 1))))
        try:
            raw = open(path, "rb") if is_local(uri) else _download(fs, path, size)  # noqa: SIM115
            break
        except FileNotFoundError as err:
            last = err
        except OSError as err:
            last = err
    else:
        missing = isinstance(last, FileNotFoundError)
        detail = "shard does not exist" if missing else f"{type(last).__name__}: {last}"
        raise ShardFault(Category.IO, f"cannot read {uri}: {detail} (gave up after {attempts} attempts)")
    guarded = GuardedFile(raw, uri)
    try:
        yield guarded
    finally:
        guarded.close()
