"""The commit manifest and the output's identity: what makes resume exact and keeps one output to one model.

- `OUTPUT/_manifest/<shard>.json`: a shard's commit record, written after all its files are durable. Its presence
  is the commit: a shard without one is not done, whatever files it left behind.
- `OUTPUT/_manifest/_parts/<id>.parquet`: commit records consolidated as a run goes (every `CONSOLIDATE_EVERY`
  commits and at its end): written first, then the per-shard records it holds are deleted. A kill between the two
  leaves a record in both places, read once. Start-up reads a few Parquet files instead of one object per shard.
- `OUTPUT/_output.json`: the output's identity: the job, and what changes its records (the model's content hash,
  the score-changing settings). A run whose identity differs is refused; `read_committed` checks every commit
  record against it.

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
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import CorruptState, OutputMismatch
from pipeline.storage import filesystem_for, join, output_name

MANIFEST_DIR = "_manifest"
PARTS_DIR = f"{MANIFEST_DIR}/_parts"
IDENTITY_NAME = "_output.json"
CONSOLIDATE_EVERY = 1000
MAX_PARTS = 32  # more part files than this are merged into one
_READERS = 32  # parallel reads of commit records
_ENTRY_SCHEMA = pa.schema([("shard", pa.string()), ("entry", pa.string())])


def identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


# -- writing -----------------------------------------------------------------------------------------------------
def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Object stores publish an upload only when it completes; a local file is written aside, then renamed. A
    failed write leaves nothing behind (no `.tmp` file)."""
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
        with fs.open_output_stream(path) as f:
            f.write(data)


def write_json(uri: str, payload: dict) -> None:
    fs, path = filesystem_for(uri)
    write_bytes(fs, path, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())


# What to do about a state file that cannot be read, by its name (a file of another name: restore it).
_REMEDIES = {
    IDENTITY_NAME: "restore it from a backup, or delete it and rerun with the same model and settings (the run "
                   "records the output's identity again from its own)",
    "summary.json": "delete it: the next run writes it again",
}


def read_json(uri: str, field: str = "output") -> dict | None:
    """A JSON object, or None where there is none; one that does not parse is named (CorruptState, reported as
    the setting `field`)."""
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
        remedy = _REMEDIES.get(uri.rsplit("/", 1)[-1], "restore it from a backup")
        raise CorruptState(f"{uri} is not a valid JSON object (truncated?): {remedy}", field)
    return payload


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
    parallel). A record found twice (a kill during consolidation) counts once. A part or record that cannot be
    read raises CorruptState naming it (reported as the setting `field`)."""
    fs, root = filesystem_for(output)
    parts, jsons = _list(fs, root)
    entries: dict[str, dict] = {}
    with ThreadPoolExecutor(_READERS) as pool:
        for batch in pool.map(lambda p: _read_part(fs, p, field), parts):
            for entry in batch:
                entries[entry["shard"]] = entry
        for entry in pool.map(lambda p: _read_entry(fs, p, field), jsons):
            if entry is not None:
                entries.setdefault(entry["shard"], entry)
    return entries


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


def missing_files(output: str, entries: dict[str, dict]) -> dict[str, list[str]]:
    """Shards whose committed files are gone (deleted by hand, a lifecycle rule): {shard: [files]}. One listing of
    the output's data folders, not one request per file."""
    folders = {f.split("/", 1)[0] for e in entries.values() for f in e.get("files", []) if "/" in f}
    if not folders:
        return {}
    fs, root = filesystem_for(output)
    present: set[str] = set()
    for folder in folders:
        infos = fs.get_file_info(pafs.FileSelector(f"{root}/{folder}", recursive=True, allow_not_found=True))
        present.update(i.path[len(root) + 1:] for i in infos if i.type == pafs.FileType.File)
    out = {}
    for shard, entry in entries.items():
        gone = [f for f in entry.get("files", []) if f not in present]
        if gone:
            out[shard] = gone
    return out


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
    for part in parts:
        for entry in _read_part(fs, part):
            merged[entry["shard"]] = entry
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


# -- identity ---------------------------------------------------------------------------------------------------
def describe_identity(identity: dict) -> str:
    model = identity.get("model")
    if isinstance(model, dict):
        weights = f", weights {model['weights']}" if model.get("weights") else ""
        return f"model {model.get('id')} (revision {model.get('revision') or 'unknown'}{weights})"
    return ", ".join(f"{k}={v}" for k, v in sorted(identity.items()))


def _same_model(a: dict, b: dict) -> bool:
    """The weights decide where both sides know them (a content digest); else the revision, else the id."""
    if a.get("weights") and b.get("weights"):
        return a["weights"] == b["weights"]
    if a.get("revision") or b.get("revision"):
        return a.get("revision") == b.get("revision")
    return a.get("id") == b.get("id")


def _differences(theirs: dict, ours: dict) -> list[str]:
    fields = []
    for name in sorted(set(theirs) | set(ours)):
        a, b = theirs.get(name), ours.get(name)
        if name == "model" and isinstance(a, dict) and isinstance(b, dict):
            if not _same_model(a, b):
                fields.append(name)
        elif a != b:
            fields.append(name)
    return fields


@dataclass
class Claim:
    """How a run stands with an output's identity: the identity its commits record (an output written by an
    earlier version keeps its own), whether `_output.json` must be written, and a note for the user."""

    identity: dict
    write: bool
    note: str | None = None

    @property
    def hash(self) -> str:
        return identity_hash(self.identity)


def check_identity(output: str, job: str, identity: dict, entries: dict[str, dict]) -> Claim:
    """Whether this run may write into `output` (reads only). Raises OutputMismatch naming the fields that differ
    rather than mixing records of two models or settings; an output that holds an identity but no committed shard
    may be re-claimed (the Claim says so)."""
    uri = join(output, IDENTITY_NAME)
    current = read_json(uri)
    if current is None:
        legacy_models = {e.get("model") for e in entries.values()} - {None}  # an empty shard names no model
        if legacy_models and isinstance(identity.get("model"), dict) and legacy_models != {identity["model"].get("id")}:
            raise OutputMismatch("model", f"{output} already holds records of {sorted(map(str, legacy_models))}, "
                                 f"not of {identity['model'].get('id')}: score into another output")
        return Claim(identity, write=True)
    if current.get("job") != job:
        if not entries:
            return Claim(identity, True, f"{output} held the identity of a '{current.get('job')}' job but no "
                                         f"committed shard: re-claimed for this '{job}' job")
        raise OutputMismatch("output", f"{output} holds the output of a '{current.get('job')}' job, not '{job}'")
    theirs = current.get("identity", {})
    differ = _differences(theirs, identity)
    if not differ:
        # An output written before the weights' digest was recorded keeps its identity (and so its hash).
        legacy = isinstance(theirs.get("model"), dict) and not theirs["model"].get("weights")
        return Claim(theirs if legacy else identity, write=False)
    if not entries:
        return Claim(identity, True, f"{output} held no committed shard (it was claimed with "
                     + ", ".join(f"{f}={_shown(theirs, f)}" for f in differ)
                     + "): re-claimed with this run's " + ", ".join(f"{f}={_shown(identity, f)}" for f in differ))
    first = differ[0]
    if first == "model":
        problem = (f"{output} holds scores of {describe_identity(theirs)}; this run's is "
                   f"{describe_identity(identity)}. One output holds one model's scores: choose another output, "
                   "or delete this one to score it again")
    else:
        problem = (f"{output} was written with " + ", ".join(f"{f}={theirs.get(f)!r}" for f in differ)
                   + "; this run has " + ", ".join(f"{f}={identity.get(f)!r}" for f in differ)
                   + ". Settings that change the records cannot change within one output: choose another output")
    raise OutputMismatch(first, problem)


def _shown(identity: dict, field: str):
    value = identity.get(field)
    return describe_identity(identity) if field == "model" and isinstance(value, dict) else repr(value)


def record_identity(output: str, job: str, claim: Claim) -> None:
    """Write `_output.json` (the caller holds the output's lease)."""
    if claim.write:
        write_json(join(output, IDENTITY_NAME), {"job": job, "identity": claim.identity, "identity_hash": claim.hash,
                                                 "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def claim_output(output: str, job: str, identity: dict, entries: dict[str, dict], record: bool = True) -> Claim:
    """`check_identity`, then (unless `record` is False) `record_identity`."""
    claim = check_identity(output, job, identity, entries)
    if record:
        record_identity(output, job, claim)
    return claim


def check_entries(output: str, entries: dict[str, dict]) -> None:
    """Every commit record belongs to the output's identity and names one model (raises OutputMismatch naming the
    mix, or a record that carries no identity)."""
    current = read_json(join(output, IDENTITY_NAME))
    models = {e.get("model") for e in entries.values()} - {None}  # a shard with no sample names no model
    if len(models) > 1:
        raise OutputMismatch("output", f"{output} holds records of {len(models)} models: {sorted(map(str, models))}")
    if current is None:
        return
    # Records of the version before identities carry only their model: they belong if it is the output's model
    # (checked when that version's output was first claimed by this one).
    model = (current.get("identity") or {}).get("model")
    model_id = model.get("id") if isinstance(model, dict) else None
    unnamed = sorted(shard for shard, e in entries.items()
                     if not e.get("identity") and (e.get("model") != model_id or model_id is None))
    if unnamed:
        raise OutputMismatch("output", f"{output} holds {len(unnamed)} commit records that carry no identity (e.g. "
                                       f"{unnamed[0]!r}): they were not written by a job that claimed this output")
    foreign = sorted({e["identity"] for e in entries.values() if e.get("identity")} - {current.get("identity_hash")})
    if foreign:
        raise OutputMismatch("output", f"{output} holds records of {len(foreign) + 1} different models or "
                                       f"settings (identities {[current.get('identity_hash'), *foreign]})")
