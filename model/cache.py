"""A node-local cache of checkpoints on object storage: one download per node and checkpoint version, shared by
every process on the node (a node's 8 scoring actors) and by later jobs there.

Layout: `$UNIFILTER_CACHE_DIR` (default `~/.cache/unifilter/checkpoints`) / <hash of the URI> / <version>, where
the version hashes the checkpoint's listing (file names, sizes, modification times: one LIST call), so a checkpoint
rewritten at the same URI is a new entry. Processes that start together take an `fcntl` lock per entry: one
downloads into a temporary folder inside the cache and renames it into place, with a completion marker; the
others wait and then read it. Each download is recorded in `fetches.log`. Old versions are not evicted (delete
the directory to clear the cache).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from model import storage
from model.errors import CheckpointError
from model.weights import is_weight_file

CACHE_DIR_ENV = "UNIFILTER_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/unifilter/checkpoints"
COMPLETE_MARKER = ".complete"  # written inside an entry before it is renamed into place
FETCH_LOG = "fetches.log"  # one JSON line per download
CONFIG_ONLY_SUFFIX = "-config"  # an entry without the weights, for processor-only loads


@dataclass(frozen=True)
class RemoteFile:
    name: str  # relative to the checkpoint's prefix
    size: int
    mtime_ns: int | None


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR).expanduser()


def fetch(uri: str, weights: bool = True) -> Path:
    """A local directory holding the checkpoint at `uri` (an `s3://` prefix or another remote URI), downloaded at
    most once per version on this node. With `weights=False` only the small files (config, tokenizer) are
    fetched, unless the whole checkpoint is cached already."""
    uri = storage.normalize_uri(uri)
    fs, root = storage.filesystem_for(uri)
    files = list_checkpoint(fs, root)
    if not files:
        raise CheckpointError(f"no checkpoint at {uri}: nothing found under that prefix")
    version = listing_version(files)
    entries = cache_dir() / hashlib.sha256(uri.encode()).hexdigest()[:24]
    full = entries / version
    if (full / COMPLETE_MARKER).is_file():
        return full
    entry = full if weights else entries / (version + CONFIG_ONLY_SUFFIX)
    wanted = files if weights else [f for f in files if not is_weight_file(f.name)]
    entries.mkdir(parents=True, exist_ok=True)
    with _locked(entries / f"{entry.name}.lock"):
        if not (entry / COMPLETE_MARKER).is_file():  # another process may have fetched it while we waited
            _download(fs, root, wanted, entry, {"uri": uri, "version": version})
    return entry


def list_checkpoint(fs: pafs.FileSystem, root: str) -> list[RemoteFile]:
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(
        (RemoteFile(info.path[len(root):].lstrip("/"), info.size, info.mtime_ns)
         for info in infos if info.type == pafs.FileType.File),
        key=lambda f: f.name,
    )


def listing_version(files: list[RemoteFile]) -> str:
    """A checkpoint's version: a hash over its files' names, sizes and modification times."""
    listing = json.dumps([[f.name, f.size, f.mtime_ns] for f in files])
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _locked(lock_path: Path):
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when the process dies
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _download(fs: pafs.FileSystem, root: str, files: list[RemoteFile], entry: Path, about: dict) -> None:
    """Fetch `files` into a temporary folder next to `entry`, check their sizes against the listing, mark it
    complete and rename it into place. Runs under the entry's lock."""
    for stale in entry.parent.glob(f".tmp-{entry.name}-*"):  # left by a process that died holding the lock
        shutil.rmtree(stale, ignore_errors=True)
    if entry.exists():  # renamed into place but unmarked: not ours to trust
        shutil.rmtree(entry)
    staging = entry.parent / f".tmp-{entry.name}-{uuid.uuid4().hex[:8]}"
    started = time.time()
    try:
        for f in files:
            target = staging / f.name
            target.parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(f"{root}/{f.name}", str(target), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
            if target.stat().st_size != f.size:
                raise CheckpointError(f"{about['uri']}/{f.name} changed while it was downloaded; load it again")
        (staging / COMPLETE_MARKER).write_text(json.dumps({**about, "files": [f.name for f in files]}))
        os.rename(staging, entry)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    record = {**about, "entry": entry.name, "files": len(files), "bytes": sum(f.size for f in files),
              "seconds": round(time.time() - started, 3), "pid": os.getpid()}
    with open(entry.parent.parent / FETCH_LOG, "a") as log:
        log.write(json.dumps(record) + "\n")
