"""Listing the input shards a job reads: a directory or prefix, a glob, a brace range, a list file, one shard.

A shard's identity in every output is its `key`: its path relative to the input root (`00000.tar`,
`part-1/00000.tar`; a symbolic link by its own path there, not its target's). Records carry it as `source` and the
commit manifest is keyed by it, so a corpus that moves (another bucket, a local copy) keeps its committed shards
and its records. What a directory's listing leaves out (names starting with `_`, which are metadata; files of other
extensions, `.TAR` beside `.tar` included) is counted and named (`ShardListing.left_out`), never skipped silently.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import posixpath
import re
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from model.storage import (
    filesystem_for,
    is_local,
    is_remote,
    join,
    normalize_uri,
    s3_endpoint,
    scheme_of,
    to_uri,
)
from pipeline.errors import InputError

SHARD_SUFFIXES = {
    "webdataset": (".tar",),
    "interleaved-wds": (".tar",),
    "parquet": (".parquet",),
    "obelics": (".parquet",),
}
_GLOB_CHARS = "*?["
_BRACE = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True)
class Shard:
    uri: str  # normalised URI (what readers open)
    key: str  # path relative to the input root (what outputs are keyed by)
    size: int | None = None  # bytes, where the listing (or a commit record) gave it
    aux: str | None = None  # a second shard a job reads with it (curation: the input shard a score file scored)
    aux_format: str | None = None  # its format
    mtime_ns: int | None = None  # last modified, where the listing gave it (S3: to the second)
    records: int | None = None  # records it holds, where known (a committed file: as its commit record says)
    sha256: str | None = None  # its bytes' sha256, where known (likewise)


@dataclass
class ShardListing:
    root: str
    shards: list[Shard]
    duplicates: int = 0  # entries named more than once (in a list file or brace pattern), listed once
    spellings: dict[str, list[str]] = field(default_factory=dict)  # key -> the spellings that named it
    left_out: dict[str, list[str]] = field(default_factory=dict)  # why -> files under the root not listed

    def left_out_summary(self, examples: int = 3) -> dict[str, dict]:
        """What the listing left out: {why: {"count", "examples"}}, the largest groups first."""
        return {why: {"count": len(paths), "examples": paths[:examples]}
                for why, paths in sorted(self.left_out.items(), key=lambda item: -len(item[1]))}


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion as webdataset uses it: `{00000..00099}` (zero-padded numeric ranges) and
    `{a,b,c}` alternatives, any number of groups."""
    match = _BRACE.search(pattern)
    if not match:
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if numeric:
        first, last = numeric.group(1), numeric.group(2)
        width = len(first) if first.startswith("0") or len(first) == len(last) else 0
        step = 1 if int(last) >= int(first) else -1
        options = [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        options = ["{" + body + "}"]  # not a brace pattern: keep it literal
        head, tail = pattern[:match.end()], pattern[match.end():]
        return [head + rest for rest in expand_braces(tail)]
    out = []
    for option in options:
        out += expand_braces(pattern[:match.start()] + option + pattern[match.end():])
    return out


def _has_braces(path: str) -> bool:
    return any(re.fullmatch(r"-?\d+\.\.-?\d+", m) or "," in m for m in _BRACE.findall(path))


def list_shards(input_uri: str, fmt: str, field: str = "input") -> ShardListing:
    """The input's shards, normalised, each once, sorted by key: a directory or prefix (recursive, by suffix;
    paths under `_` folders are metadata), a glob (`*`, `?`, `[...]` in the last part), a brace pattern
    (`{00000..00999}.tar`), a list file (`.txt`, one URI per line, `#` comments), or one shard. Nothing there:
    `InputError` naming `field`."""
    suffixes = SHARD_SUFFIXES[fmt]
    try:
        fs, path = filesystem_for(input_uri)
    except ValueError as err:
        raise InputError(field, str(err)) from None
    # Shards named by a list file or a brace pattern have no listed size or mtime: `open_shard` takes them when it
    # opens the shard (nothing to compare then; a local shard is still checked again once it has been read).
    if path.endswith(".txt") and not any(c in path for c in _GLOB_CHARS):
        listed = _read_list_file(fs, path, input_uri, field)
        base = posixpath.dirname(input_uri) if not is_local(input_uri) else os.path.dirname(path)
        return _listing([_absolute(entry, base) for entry in listed], [None] * len(listed), root=None)
    if _has_braces(input_uri):
        _check_bucket(fs, path, input_uri, field)
        expanded = expand_braces(input_uri)
        return _listing(expanded, [None] * len(expanded), root=_parent(_normal(input_uri.split("{", 1)[0] + "x")))
    found, root, left_out = _find(fs, path, input_uri, suffixes, field)
    if not found:
        _check_bucket(fs, path, input_uri, field)
        seen = f" (left out: {_said(left_out)})" if left_out else ""
        raise InputError(field, f"no {fmt} shards ({'/'.join(suffixes)}) found at {input_uri}{seen}")
    listing = _listing([to_uri(input_uri, i.path) for i in found], found, root=root)
    listing.left_out = left_out
    return listing


def _said(left_out: dict[str, list[str]]) -> str:
    return "; ".join(f"{len(paths)} {why}, e.g. {paths[0]}" for why, paths in left_out.items())


def _left_out(relative: str, suffixes: tuple[str, ...]) -> str:
    """Why a file under a listed directory is not one of its shards."""
    if any(part.startswith("_") for part in relative.split("/")):
        return "names starting with _, or under one (metadata, never read as shards)"
    base = relative.rsplit("/", 1)[-1]
    ext = "." + base.rsplit(".", 1)[-1] if "." in base else None
    if ext and ext.lower() in suffixes:
        return f"{ext} files (shards end with {'/'.join(suffixes)}: the case differs; rename them to be read)"
    shards = f"not {'/'.join(suffixes)} shards"
    return f"{ext} files ({shards})" if ext else f"files without an extension ({shards})"


def _read_list_file(fs: pafs.FileSystem, path: str, input_uri: str, field: str) -> list[str]:
    try:
        with fs.open_input_stream(path) as f:
            lines = f.read().decode("utf-8").splitlines()
    except FileNotFoundError:
        _check_bucket(fs, path, input_uri, field)
        raise InputError(field, f"list file {input_uri} does not exist") from None
    except OSError as err:
        raise InputError(field, f"cannot read list file {input_uri}{_endpoint(input_uri)}: {_first_line(err)}"
                         ) from None
    listed = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not listed:
        raise InputError(field, f"list file {input_uri} names no shards")
    return listed


def _find(fs: pafs.FileSystem, path: str, input_uri: str, suffixes: tuple[str, ...], field: str
          ) -> tuple[list[pafs.FileInfo], str, dict[str, list[str]]]:
    """The files a directory, prefix, glob or single shard names, the root their keys are relative to, and what a
    directory's listing left out ({why: [paths relative to the root]}). A store that cannot be reached (a wrong
    endpoint, no network, no permission) is an `InputError` naming `field`."""
    try:
        return _find_files(fs, path, input_uri, suffixes, field)
    except OSError as err:
        raise InputError(field, f"cannot list {input_uri}{_endpoint(input_uri)}: {_first_line(err)}") from None


def _find_files(fs, path, input_uri, suffixes, field):
    if any(c in path for c in _GLOB_CHARS):
        base, _, pattern = path.rpartition("/")
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=False, allow_not_found=True))
        return ([i for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.base_name, pattern)],
                to_uri(input_uri, base), {})
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [info], to_uri(input_uri, path.rpartition("/")[0]), {}
    if info.type == pafs.FileType.Directory or is_remote(input_uri):
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        found, left_out = [], {}
        for i in infos:
            if i.type != pafs.FileType.File:
                continue
            relative = i.path[len(path):].lstrip("/")
            if i.path.endswith(suffixes) and not any(part.startswith("_") for part in relative.split("/")):
                found.append(i)
            else:
                left_out.setdefault(_left_out(relative, suffixes), []).append(relative)
        return found, to_uri(input_uri, path), left_out
    raise InputError(field, f"{input_uri} does not exist")


def _check_bucket(fs: pafs.FileSystem, path: str, input_uri: str, field: str) -> None:
    """On S3, a bucket that does not exist (or cannot be reached) is named as such, not as "no shards found"."""
    if not is_remote(input_uri):
        return
    bucket = path.split("/", 1)[0]
    try:
        missing = fs.get_file_info(bucket).type == pafs.FileType.NotFound
    except OSError as err:
        raise InputError(field, f"cannot reach bucket {bucket}{_endpoint(input_uri)}: {_first_line(err)}") from None
    if missing:
        raise InputError(field, f"bucket {bucket} does not exist{_endpoint(input_uri)} (in {input_uri})")


def _endpoint(uri: str) -> str:
    return f" at endpoint {s3_endpoint()}" if is_remote(uri) and s3_endpoint() else ""


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _absolute(entry: str, base: str) -> str:
    """A list file's entry: a URI, an absolute path, or a path relative to the list file's folder."""
    if "://" in entry or entry.startswith("/"):
        return entry
    return join(base, entry) if "://" in base else os.path.join(base, entry)


def _parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0]


def _normal(uri: str) -> str:
    """`normalize_uri`, except that a local path's last parts are not resolved: a shard that is a symbolic link
    keeps its own path (and so its key under the input root), not its target's."""
    if not is_local(uri):
        return normalize_uri(uri)
    local = uri[len("file://"):] if uri.startswith("file://") else uri
    return os.path.normpath(os.path.abspath(os.path.expanduser(local)))


def _listing(uris: list[str], infos: list[pafs.FileInfo | None], root: str | None) -> ShardListing:
    normalised = [_normal(u) for u in uris]
    if root is None:  # a list of shards: their deepest common folder
        root = _common_root(normalised)
    root = _normal(root) if root else root
    shards: dict[str, Shard] = {}
    spellings: dict[str, list[str]] = {}
    duplicates = 0
    for uri, spelled, info in zip(normalised, uris, infos):
        key = shard_key(uri, root)
        spellings.setdefault(key, []).append(spelled)
        if key in shards:
            duplicates += 1
            continue
        shards[key] = Shard(uri, key, info.size, mtime_ns=info.mtime_ns) if info is not None else Shard(uri, key)
    return ShardListing(root or "", sorted(shards.values(), key=lambda s: s.key), duplicates,
                        {k: v for k, v in spellings.items() if len(v) > 1})


def _common_root(uris: list[str]) -> str:
    parents = [_parent(u) for u in uris]
    if len({scheme_of(u) for u in uris}) > 1:
        return ""
    prefix = os.path.commonprefix(parents)
    if not all(p == prefix or p.startswith(prefix.rstrip("/") + "/") for p in parents):
        prefix = prefix.rsplit("/", 1)[0]
    return prefix.rstrip("/")


def shard_key(uri: str, root: str) -> str:
    """`uri` relative to `root`; the scheme-less URI when it lies outside."""
    if root and uri.startswith(root.rstrip("/") + "/"):
        return uri[len(root.rstrip("/")) + 1:]
    return re.sub(r"^([a-z0-9+.-]+)://", r"\1/", uri).lstrip("/")


def output_name(key: str, keep_suffix: bool = False) -> str:
    """A shard's file stem in an output (`part-1/00000.tar` -> `part-1/00000`, or `part-1/00000.tar` with
    `keep_suffix`): readable, never escaping the output folder, unique per shard key with `keep_suffix`."""
    stem = key.rsplit(".", 1)[0] if "." in key.rsplit("/", 1)[-1] and not keep_suffix else key
    parts = [re.sub(r"[\x00-\x1f]", "_", p) for p in stem.split("/") if p not in ("", ".", "..")]
    parts = [("-" + p[1:]) if p.startswith("_") else p for p in parts]  # `_` paths are metadata in outputs
    name = "/".join(parts) or "shard"
    if name != stem:  # changed to fit: a hash of the key keeps it unique
        name += "-" + hashlib.sha1(key.encode()).hexdigest()[:8]
    return name
