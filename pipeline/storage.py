"""Storage for the pipeline: the model library's URI-to-filesystem helper (one implementation, honouring
`AWS_ENDPOINT_URL`), plus listing the input shards a job reads."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re

import pyarrow.fs as pafs

from model.storage import download_dir, filesystem_for, is_remote, join, s3_filesystem, upload_file

__all__ = ["InputError", "download_dir", "filesystem_for", "is_remote", "join", "list_shards", "s3_filesystem",
           "shard_id", "storage_env", "upload_file", "to_uri"]


class InputError(ValueError):
    """A job's input or setting that cannot be used (nothing at the URI, no shards, no usable checkpoint). The
    message names the config field; the jobs report it as a configuration error (exit status 2), not a traceback."""

    def __init__(self, field: str, problem: str):
        self.field = field
        super().__init__(f"field '{field}': {problem}")

_STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def storage_env() -> dict[str, str]:
    """What Ray workers need to reach the same object store as the driver: the endpoint and region variables
    that are set (never credentials, which come from each node's own environment or instance role)."""
    return {k: os.environ[k] for k in _STORAGE_ENV if os.environ.get(k)}

SHARD_SUFFIXES = {
    "webdataset": (".tar",),
    "interleaved-wds": (".tar",),
    "parquet": (".parquet",),
    "obelics": (".parquet",),
}


def to_uri(uri_like: str, path: str) -> str:
    """A filesystem path back to a URI of the same kind as `uri_like`."""
    return f"s3://{path}" if is_remote(uri_like) else path


def list_shards(input_uri: str, fmt: str, field: str = "input") -> list[str]:
    """The input's shard URIs, sorted: a directory or prefix (recursive, by suffix), a glob (`*`, `?`, `[...]`
    in the last part), a list file (`.txt`, one URI per line), or one shard. Nothing there: `InputError`."""
    suffixes = SHARD_SUFFIXES[fmt]
    fs, path = filesystem_for(input_uri)
    if path.endswith(".txt") and not any(c in path for c in "*?["):
        try:
            with fs.open_input_stream(path) as f:
                lines = f.read().decode("utf-8").splitlines()
        except FileNotFoundError:
            raise InputError(field, f"list file {input_uri} does not exist") from None
        listed = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not listed:
            raise InputError(field, f"list file {input_uri} names no shards")
        return listed
    if any(c in path for c in "*?["):
        base, _, pattern = path.rpartition("/")
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=False))
        shards = [i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.base_name, pattern)]
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            shards = [path]
        elif info.type == pafs.FileType.Directory or is_remote(input_uri):
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
            shards = [i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffixes)
                      and not any(part.startswith("_") for part in i.path[len(path):].split("/"))]
        else:
            raise InputError(field, f"{input_uri} does not exist")
    if not shards:
        raise InputError(field, f"no {fmt} shards ({'/'.join(suffixes)}) found at {input_uri}")
    return sorted(to_uri(input_uri, s) for s in shards)


def shard_id(shard_uri: str) -> str:
    """A stable, filesystem-safe name for a shard: its base name plus a hash of the full URI."""
    base = shard_uri.rstrip("/").rsplit("/", 1)[-1]
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", base.rsplit(".", 1)[0])[:80]
    return f"{stem}-{hashlib.sha1(shard_uri.encode()).hexdigest()[:10]}"
