"""Where an output's lease is kept (`pipeline.lease`): a file or object that can be created exclusively, read with
a version, and replaced or deleted only if that version still holds. Locally a file under an advisory lock
(`flock` on `_lease.json.lock`); on S3 conditional requests (`If-None-Match: *` to create, `If-Match` on the
ETag to replace or delete); other filesystems get a best-effort store (write, then read back). `fence` is a
replace whose guarantee lasts for a block: locally the lock is held until the block ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid

from pipeline.errors import CorruptState
from pipeline.io.uris import filesystem_for, is_remote


def corrupt_lease(uri: str) -> CorruptState:
    return CorruptState(f"{uri} is not a valid lease (truncated?): if no job is running on this output, delete it "
                        "(the next job takes the lease again)")


def _version_of(data: bytes, uri: str) -> str:
    """A local lease's version: its token and the time of its last renewal."""
    try:
        payload = json.loads(data)
        return payload["token"] + ":" + str(payload["renewed_at"])
    except (ValueError, TypeError, KeyError):
        raise corrupt_lease(uri) from None


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


def store_for(uri: str):
    if is_remote(uri):
        return _S3Store(uri)
    fs, path = filesystem_for(uri)
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        return _LocalStore(path)
    return _BestEffortStore(uri)
