"""The one place that turns a URI (local path or `s3://`) into a filesystem.

pyarrow's S3 filesystem ignores `AWS_ENDPOINT_URL`; this helper honours it (and `AWS_ENDPOINT_URL_S3`), so every
reader and writer, the model's checkpoints included, can point at any S3-compatible store. Credentials come from
the standard AWS chain (environment, instance role); they never pass through here.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

S3_SCHEMES = ("s3://", "s3a://")


def is_remote(uri: str) -> bool:
    return str(uri).startswith(S3_SCHEMES)


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_filesystem() -> pafs.S3FileSystem:
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    kwargs: dict = {"region": region}
    endpoint = s3_endpoint()
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https")
        # S3-compatible servers (MinIO, moto, Ceph) generally want path-style addressing.
        kwargs["force_virtual_addressing"] = False
    return pafs.S3FileSystem(**kwargs)


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """`(filesystem, path)` for a URI: `s3://bucket/key` -> (S3, "bucket/key"); a local path -> (local, abspath)."""
    uri = str(uri)
    if is_remote(uri):
        return s3_filesystem(), uri.split("://", 1)[1].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        raise ValueError(f"unsupported URI scheme in {uri!r}: use a local path or s3://bucket/prefix")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    return "/".join([str(uri).rstrip("/"), *(p.strip("/") for p in parts)])


def download_dir(uri: str, local_dir: str | Path, skip_suffixes: tuple[str, ...] = ()) -> Path:
    """Copy every file under a URI prefix into `local_dir` (created), keeping relative paths."""
    fs, root = filesystem_for(uri)
    local_dir = Path(local_dir)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    files = [i for i in infos if i.type == pafs.FileType.File and not i.path.endswith(skip_suffixes)]
    if not files:
        raise FileNotFoundError(f"nothing found under {uri}")
    for info in files:
        target = local_dir / info.path[len(root):].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(info.path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local_dir


def upload_file(local_path: str | Path, uri: str) -> None:
    fs, path = filesystem_for(uri)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    pafs.copy_files(str(local_path), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
