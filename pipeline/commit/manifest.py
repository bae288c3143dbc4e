"""The commit manifest: what makes resume exact.

- `OUTPUT/_manifest/<shard>.json`: a shard's commit record, written after all its files are durable. Its presence
  is the commit: a shard without one is not done, whatever files it left behind.
- `OUTPUT/_manifest/_parts/<id>.parquet`: commit records consolidated as a run goes (every `CONSOLIDATE_EVERY`
  commits and at its end): written first, then the per-shard records it holds are deleted. A kill between the two
  leaves a record in both places, read once. Start-up reads a few Parquet files instead of one object per shard.
- A shard committed again (its files lost, cut or replaced, or its input rewritten) has a newer record: of a
  shard's records the newest counts (`committed_ns`; a per-shard record before a part's, a later part before an
  earlier one, where records predate it), so the record and the files it checks always agree.

A commit record names its shard's files and, for each, what it was when committed (`file_checks`: its bytes,
records and sha256), so a file cut, replaced or lost since is noticed: by a rerun from one listing of the output
(`damaged_files`: sizes only, nothing read), by readers from the bytes they read (`pipeline.commit.records`).

Outputs written before consolidation existed (per-shard records keyed by the shard's full URI) still read and
resume: their records are matched to today's shard keys by path suffix.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import CorruptState
from pipeline.io.listing import output_name
from pipeline.io.publish import write_bytes, write_json
from pipeline.io.uris import filesystem_for, join

MANIFEST_DIR = "_manifest"
PARTS_DIR = f"{MANIFEST_DIR}/_parts"
CONSOLIDATE_EVERY = 1000
MAX_PARTS = 32  # more part files than this are merged into one
_READERS = 32  # parallel reads of commit records
_ENTRY_SCHEMA = pa.schema([("shard", pa.string()), ("entry", pa.string())])


def entry_path(shard_key: str) -> str:
    """A shard's commit record: named after its full key, so shards of two corpora (`00000.tar` and
    `00000.parquet` scored into one output) never share one."""
    return f"{MANIFEST_DIR}/{output_name(shard_key, keep_suffix=True)}.json"


def write_entry(output: str, entry: dict) -> None:
    write_json(join(output, entry_path(entry["shard"])), entry)


# -- reading -----------------------------------------------------------------------------------------------------
def _list(fs: pafs.FileSystem, root: str) -> tuple[list[str], list[str]]:
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/{MANIFEST_DIR}", recursive=True, allow_not_found=True))
    files = [i.path for i in infos if i.type == pafs.FileType.File]
    parts = [p for p in files if p.startswith(f"{root}/{PARTS_DIR}/") and p.endswith(".parquet")]
    jsons = [p for p in files if not p.startswith(f"{root}/{PARTS_DIR}/") and p.endswith(".json")]
    return parts, jsons


def _uri(fs: pafs.FileSystem, path: str) -> str:
    return f"s3://{path}" if fs.type_name == "s3" else path


def _read_part(fs: pafs.FileSystem, path: str, field: str = "output") -> list[dict]:
    with fs.open_input_file(path) as f:
        try:
            table = pq.read_table(f)
            entries = [json.loads(e) for e in table.column("entry").to_pylist()]
        except (ValueError, KeyError) as err:  # pyarrow's ArrowInvalid is a ValueError; I/O errors are not
            raise CorruptState(
                f"{_uri(fs, path)} (a part of the commit manifest) cannot be read ({str(err).splitlines()[0]}): "
                "restore it from a backup, or delete it and rerun: the shards it records are done again (their "
                "files are overwritten, never duplicated)", field) from None
    if not all(isinstance(e, dict) and isinstance(e.get("shard"), str) for e in entries):
        raise CorruptState(f"{_uri(fs, path)} (a part of the commit manifest) holds records without a shard: "
                           "restore it from a backup, or delete it and rerun", field)
    return entries


def _read_entry(fs: pafs.FileSystem, path: str, field: str = "output") -> dict | None:
    try:
        with fs.open_input_stream(path) as f:
            data = f.read()
    except FileNotFoundError:  # consolidated (and deleted) while we listed
        return None
    try:
        entry = json.loads(data)
    except ValueError:
        entry = None
    if not isinstance(entry, dict) or not isinstance(entry.get("shard"), str):
        raise CorruptState(f"{_uri(fs, path)} (the commit record of one shard) is not valid (truncated?): restore "
                           "it from a backup, or delete it and rerun: that shard is done again (its files are "
                           "overwritten, never duplicated)", field)
    entry["_path"] = path
    return entry


def read_manifest(output: str, field: str = "output") -> dict[str, dict]:
    """Every commit record of an output, by shard key (consolidated parts and per-shard records, read in
    parallel). A record found twice (a kill during consolidation) counts once; of two records of one shard (it
    was committed again) the newer counts. A part or record that cannot be read raises CorruptState naming it
    (reported as the setting `field`)."""
    fs, root = filesystem_for(output)
    parts, jsons = _list(fs, root)
    entries: dict[str, dict] = {}
    with ThreadPoolExecutor(_READERS) as pool:
        for batch in pool.map(lambda p: _read_part(fs, p, field), sorted(parts)):  # parts are named by time
            for entry in batch:
                _keep_newer(entries, entry)
        for entry in pool.map(lambda p: _read_entry(fs, p, field), jsons):
            if entry is not None:
                _keep_newer(entries, entry)
    return entries


def _keep_newer(entries: dict[str, dict], entry: dict) -> None:
    """`entry` in `entries` unless the shard's record there is newer (read later records last: on a tie, or
    between records that predate `committed_ns`, the later one read counts)."""
    held = entries.get(entry["shard"])
    if held is None or (entry.get("committed_ns") or 0) >= (held.get("committed_ns") or 0):
        entries[entry["shard"]] = entry


def match_legacy(entries: dict[str, dict], keys: Iterable[str]) -> dict[str, dict]:
    """Commit records by today's shard keys: records of an earlier version, keyed by the shard's full URI, match
    the key that ends their path."""
    keys = list(keys)
    out = {k: entries[k] for k in keys if k in entries}
    legacy = {shard: e for shard, e in entries.items() if "://" in shard or shard.startswith("/")}
    if legacy:
        for key in keys:
            if key not in out:
                hit = next((e for shard, e in legacy.items() if shard.endswith("/" + key) or shard == key), None)
                if hit is not None:
                    out[key] = hit
    return out


def file_check(data: bytes, records: int) -> dict:
    """What a commit record says of one file it commits: its size, its records and its sha256."""
    return {"bytes": len(data), "records": records, "sha256": hashlib.sha256(data).hexdigest()}


def damaged_files(output: str, entries: dict[str, dict]) -> dict[str, dict[str, str]]:
    """Shards whose committed files are gone (deleted by hand, a lifecycle rule) or not the size their commit
    record says (cut, replaced): {shard: {file: "gone" or what differs}}. One listing of the output's data folders,
    not one request per file; nothing is read."""
    folders = {f.split("/", 1)[0] for e in entries.values() for f in e.get("files", []) if "/" in f}
    if not folders:
        return {}
    fs, root = filesystem_for(output)
    present: dict[str, int | None] = {}
    for folder in folders:
        infos = fs.get_file_info(pafs.FileSelector(f"{root}/{folder}", recursive=True, allow_not_found=True))
        present.update((i.path[len(root) + 1:], i.size) for i in infos if i.type == pafs.FileType.File)
    out: dict[str, dict[str, str]] = {}
    for shard, entry in entries.items():
        checks = entry.get("file_checks") or {}
        for f in entry.get("files", []):
            committed = (checks.get(f) or {}).get("bytes")
            if f not in present:
                out.setdefault(shard, {})[f] = GONE
            elif committed is not None and present[f] is not None and present[f] != committed:
                out.setdefault(shard, {})[f] = f"{present[f]} bytes where {committed} were committed"
    return out


GONE = "gone"


# -- consolidation -----------------------------------------------------------------------------------------------
def consolidate(output: str, entries: list[dict]) -> None:
    """Move per-shard commit records into one Parquet part: the part first, then the records' JSON files go."""
    if not entries:
        return
    fs, root = filesystem_for(output)
    clean = [{k: v for k, v in e.items() if k != "_path"} for e in entries]
    table = pa.table({"shard": [e["shard"] for e in clean], "entry": [json.dumps(e, sort_keys=True) for e in clean]},
                     schema=_ENTRY_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    name = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}.parquet"
    write_bytes(fs, f"{root}/{PARTS_DIR}/{name}", sink.getvalue().to_pybytes())
    paths = [e.get("_path") or f"{root}/{entry_path(e['shard'])}" for e in entries]
    _delete_all(fs, paths)
    parts, _ = _list(fs, root)
    if len(parts) > MAX_PARTS:
        _compact(fs, root, parts)


def _compact(fs: pafs.FileSystem, root: str, parts: list[str]) -> None:
    merged: dict[str, dict] = {}
    for part in sorted(parts):
        for entry in _read_part(fs, part):
            _keep_newer(merged, entry)
    entries = list(merged.values())
    table = pa.table({"shard": [e["shard"] for e in entries],
                      "entry": [json.dumps(e, sort_keys=True) for e in entries]}, schema=_ENTRY_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    write_bytes(fs, f"{root}/{PARTS_DIR}/{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-merged-"
                    f"{uuid.uuid4().hex[:8]}.parquet", sink.getvalue().to_pybytes())
    _delete_all(fs, parts)


def _delete_all(fs: pafs.FileSystem, paths: list[str]) -> None:
    def delete(path: str) -> None:
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            pass

    with ThreadPoolExecutor(_READERS) as pool:
        list(pool.map(delete, paths))


