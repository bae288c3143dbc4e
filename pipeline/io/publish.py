"""Writing to an output, whole or not at all, everywhere in the project: object stores publish an upload only
when it completes; a local file is written aside and renamed. Writes that fail for I/O reasons (throttling, a full
disk) are retried, then raise `ShardFault(io)` naming the file; a state file that does not parse is named with
what to do (`CorruptState`)."""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs as pafs

from pipeline.errors import Category, CorruptState, ShardFault
from pipeline.io.uris import filesystem_for, is_local

_CHUNK = 16 * 2**20


# -- writing -----------------------------------------------------------------------------------------------------
def write_bytes(fs: pafs.FileSystem, path: str, data: bytes, content_type: str | None = None) -> None:
    """Object stores publish an upload only when it completes; a local file is written aside, then renamed. A
    failed write leaves nothing behind (no `.tmp` file). `content_type`: what an object store serves it as."""
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with fs.open_output_stream(tmp) as f:
                f.write(data)
            fs.move(tmp, path)
        except BaseException:
            try:
                fs.delete_file(tmp)
            except OSError:
                pass
            raise
    else:
        metadata = {"Content-Type": content_type} if content_type and fs.type_name == "s3" else None
        with fs.open_output_stream(path, metadata=metadata) as f:
            f.write(data)


def write_json(uri: str, payload: dict) -> None:
    fs, path = filesystem_for(uri)
    write_bytes(fs, path, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())


def read_json(uri: str, field: str = "output", remedy: str = "restore it from a backup") -> dict | None:
    """A JSON object, or None where there is none; one that does not parse is named with what to do (CorruptState,
    reported as the setting `field`)."""
    fs, path = filesystem_for(uri)
    try:
        with fs.open_input_stream(path) as f:
            data = f.read()
    except FileNotFoundError:
        return None
    try:
        payload = json.loads(data)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        raise CorruptState(f"{uri} is not a valid JSON object (truncated?): {remedy}", field)
    return payload


def publish_file(local: Path, uri: str, content_type: str | None = None) -> None:
    """Move a finished local file to `uri` whole: a rename locally; elsewhere one upload, which the object store
    publishes only once it completes."""
    fs, path = filesystem_for(uri)
    if is_local(uri):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(local).replace(path)
        return
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    metadata = {"Content-Type": content_type} if content_type else None
    with open(local, "rb") as f, fs.open_output_stream(path, metadata=metadata) as out:
        while chunk := f.read(_CHUNK):
            out.write(chunk)


# A write of an output that fails (throttling, a full disk) is tried this many times in all, the pauses doubling
# from the backoff (full jitter), before its shard is left uncommitted; S3 clients retry inside each try as well.
WRITE_ATTEMPTS = 3
WRITE_BACKOFF_S = 1.0


def write_with_retries(uri: str, write: Callable[[], None], attempts: int | None = None,
                       backoff_s: float | None = None) -> None:
    """Run `write`; an I/O failure (OSError) is retried, and raises ShardFault(io) naming `uri` once the
    attempts are spent (default: WRITE_ATTEMPTS, WRITE_BACKOFF_S). Anything else (LeaseLost, a bug) is not
    retried."""
    attempts = WRITE_ATTEMPTS if attempts is None else attempts
    backoff_s = WRITE_BACKOFF_S if backoff_s is None else backoff_s
    for attempt in range(1, attempts + 1):
        try:
            return write()
        except OSError as err:
            if attempt == attempts:
                detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise ShardFault(Category.IO, f"cannot write {uri}: {detail} (gave up after {attempts} attempts)") \
                    from None
            time.sleep(random.uniform(0, min(30.0, backoff_s * 2 ** (attempt - 1))))


