"""What a checkpoint's weights are, as a short digest: the part of an output's identity that says which weights
produced its scores (a checkpoint's config names a revision, but a weight file replaced in place keeps it).

- A local directory: sha256 of each weight file's bytes, cached beside the weights in `.unifilter-digest.json`. A
  cached digest is trusted only while the file is provably the one hashed: same size, modification time, inode
  and change time (ctime, which no copy tool can set: `cp -p`, `rsync -t` and archives restore the mtime, not
  it) and the same sha256 of its first and last MiB (`partial_hash`, for filesystems whose ctime is unreliable).
  So the files are read once (about 1 GB/s) and later runs and every scoring actor read 2 MiB of each (3.2 ms
  for the 0.5B config's 3.64 GB file, against 14 s to hash it: `benchmarks/scale.py --only digest`). A read-only
  directory is hashed each time.
- `s3://` and other remote prefixes: the weight files' listing (names, sizes, modification times: an object
  rewritten in place gets a new modification time), the same version the node-local cache downloads by.
- A Hugging Face hub id: the commit the snapshot resolves to.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from model import storage
from model.weights import WEIGHTS_INDEX_NAME, content_hash

CACHE_NAME = ".unifilter-digest.json"
PARTIAL_BYTES = 2**20  # read from each end of a weight file to check a cached digest


def _is_weight(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base == WEIGHTS_INDEX_NAME or (base.startswith("model") and base.endswith(".safetensors"))


def _combine(parts: list[tuple[str, str]]) -> str:
    return hashlib.sha256(json.dumps(sorted(parts)).encode()).hexdigest()[:16]


def partial_hash(path: Path, size: int) -> str:
    """sha256 of a file's first and last `PARTIAL_BYTES` (the whole file when it is smaller than both)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(PARTIAL_BYTES))
        if size > PARTIAL_BYTES:
            f.seek(max(PARTIAL_BYTES, size - PARTIAL_BYTES))
            digest.update(f.read(PARTIAL_BYTES))
    return digest.hexdigest()


def _fingerprint(path: Path) -> dict:
    """What a cached digest is keyed by: the file's stat (size, mtime, inode, ctime) and its partial hash."""
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns,
            "inode": stat.st_ino, "partial_sha256": partial_hash(path, stat.st_size)}


def local_digest(directory: str | Path) -> str:
    """sha256-based digest of a local checkpoint's weight files, cached beside them while they are provably
    unchanged (`_fingerprint`)."""
    directory = Path(directory)
    cache_path = directory / CACHE_NAME
    try:
        cached = json.loads(cache_path.read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        cached = {}
    files, parts = {}, []
    for path in sorted(p for p in directory.iterdir() if p.is_file() and _is_weight(p.name)):
        seen = _fingerprint(path)
        hit = cached.get(path.name)
        if isinstance(hit, dict) and isinstance(hit.get("sha256"), str) and {
                k: hit.get(k) for k in seen} == seen:
            sha = hit["sha256"]
        else:
            sha = content_hash(path)
            if _fingerprint(path) != seen:  # rewritten while it was hashed: not cached, hashed again next time
                seen = {}
        files[path.name] = {**seen, "sha256": sha}
        parts.append((path.name, sha))
    if files != cached:
        tmp = directory / f"{CACHE_NAME}.{os.getpid()}.tmp"
        try:
            tmp.write_text(json.dumps({"files": files}, indent=1, sort_keys=True))
            os.replace(tmp, cache_path)
        except OSError:  # a read-only checkpoint: hashed again next time
            tmp.unlink(missing_ok=True)
    return "sha256:" + _combine(parts)


def remote_digest(uri: str) -> str:
    """The weight files' listing version of a remote checkpoint (names, sizes, modification times)."""
    from model.cache import list_checkpoint

    fs, root = storage.filesystem_for(storage.normalize_uri(uri))
    files = [f for f in list_checkpoint(fs, root) if _is_weight(f.name)]
    return "listing:" + _combine([(f.name, f"{f.size}:{f.mtime_ns}") for f in files])


def weights_digest(uri: str, revision: str | None = None) -> str:
    """The digest of the weights at `uri` (see the module docstring); `revision` is a hub id's commit."""
    if storage.is_local(uri) and Path(storage.normalize_uri(uri)).is_dir():
        return local_digest(storage.normalize_uri(uri))
    if storage.is_local(uri) or storage.scheme_of(uri) == "hf":  # a hub id (not a local directory)
        return f"hub:{revision}"
    return remote_digest(uri)
