"""The one place that turns a URI into a filesystem: local paths, `s3://` (pyarrow's S3, honouring
`AWS_ENDPOINT_URL`), and any other fsspec filesystem (`gs://`, `az://`, `memory://`, ...) wrapped for pyarrow.

pyarrow's S3 filesystem ignores `AWS_ENDPOINT_URL`; this helper honours it (and `AWS_ENDPOINT_URL_S3`), so every
reader and writer, the model's checkpoints included, can point at any S3-compatible store. Credentials come from
the standard chains (environment, instance role); they never pass through here. URIs are normalised once
(`normalize_uri`) so that two spellings of one object are one key.
"""

from __future__ import annotations

import functools
import importlib
import os
import posixpath
import re
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

# Modules to import before resolving a URI: where a custom fsspec filesystem registers itself (comma-separated).
FSSPEC_IMPORTS_ENV = "UNIFILTER_FSSPEC_IMPORTS"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def scheme_of(uri: str) -> str:
    """`s3`, `gs`, `memory`, ...; `file` for local paths."""
    match = _SCHEME.match(str(uri))
    if not match:
        return "file"
    scheme = match.group(1).lower()
    return "s3" if scheme == "s3a" else scheme


def is_remote(uri: str) -> bool:
    """On S3 (the object store this project talks to natively)."""
    return scheme_of(uri) == "s3"


def is_local(uri: str) -> bool:
    return scheme_of(uri) == "file"


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


@functools.lru_cache(maxsize=8)
def _s3(region: str, endpoint: str | None) -> pafs.S3FileSystem:
    kwargs: dict = {"region": region}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https")
        # S3-compatible servers (MinIO, moto, Ceph) generally want path-style addressing.
        kwargs["force_virtual_addressing"] = False
    return pafs.S3FileSystem(**kwargs)


def s3_filesystem() -> pafs.S3FileSystem:
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return _s3(region, s3_endpoint())


def _fsspec_filesystem(scheme: str) -> pafs.FileSystem:
    import fsspec

    for module in filter(None, (m.strip() for m in os.environ.get(FSSPEC_IMPORTS_ENV, "").split(","))):
        importlib.import_module(module)
    try:
        fs = fsspec.filesystem(scheme)
    except (ImportError, ValueError) as err:
        raise ValueError(f"no filesystem for {scheme}:// URIs ({err}); install its fsspec package "
                         f"(gcsfs for gs://, adlfs for az://) or use a local path or s3://") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """`(filesystem, path)` for a URI: `s3://bucket/key` -> (S3, "bucket/key"); a local path -> (local, abspath);
    `scheme://rest` -> (that fsspec filesystem, its path)."""
    uri = str(uri)
    scheme = scheme_of(uri)
    if scheme == "s3":
        return s3_filesystem(), uri.split("://", 1)[1].rstrip("/")
    if scheme == "file":
        local = uri[len("file://"):] if uri.startswith("file://") else uri
        return pafs.LocalFileSystem(), str(Path(local).expanduser().resolve())
    fs = _fsspec_filesystem(scheme)
    return fs, fs.handler.fs._strip_protocol(uri).rstrip("/") or "/"


def normalize_uri(uri: str) -> str:
    """One spelling per object: `s3a://` -> `s3://`, `file://` and relative local paths -> absolute paths, `.`, `..`
    and repeated slashes resolved, no trailing slash."""
    uri = str(uri).strip()
    scheme = scheme_of(uri)
    if scheme == "file":
        local = uri[len("file://"):] if uri.startswith("file://") else uri
        return str(Path(local).expanduser().resolve())
    rest = uri.split("://", 1)[1]
    absolute = rest.startswith("/")  # `memory:///x`, `file:///x`-like filesystems: keep the root
    rest = posixpath.normpath("/" + rest)
    return f"{scheme}://{rest if absolute else rest.lstrip('/')}"


def to_uri(uri_like: str, path: str) -> str:
    """A filesystem path (as `filesystem_for` gives it) back to a URI of the same kind as `uri_like`."""
    scheme = scheme_of(uri_like)
    if scheme == "file":
        return path
    if scheme == "s3":
        return f"s3://{path.lstrip('/')}"
    return f"{scheme}://{path}"  # fsspec paths keep their own root (`memory:///x`, `gs://bucket/x`)


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
