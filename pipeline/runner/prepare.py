"""Everything a run does before Ray reads a shard: `survey` (reading only: the output's identity checked, its commit
records matched to the listed shards, what is left to do; a dry run is a survey) and `claim` (the output's lease
taken, surveyed again under it, the identity recorded: the first write a run makes, after every check passed).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import pyarrow.fs as pafs

from pipeline.commit.identity import check_identity, record_identity
from pipeline.commit.lease import Lease
from pipeline.commit.manifest import GONE, damaged_files, match_legacy, read_manifest
from pipeline.errors import InputError
from pipeline.io.listing import Shard
from pipeline.io.uris import filesystem_for, is_remote, join, normalize_uri
from pipeline.runner.job import JobSpec, PreparedJob


def check_writable(output: str, create: bool = True, field: str = "output") -> None:
    """The output (or another folder a job writes, named as the setting `field`) can be created and written (a file
    where a folder should be, a read-only mount, a missing bucket: fail now). Without `create` nothing is written:
    only what can be seen without writing is checked."""
    fs, path = filesystem_for(output)
    try:
        info = fs.get_file_info(path)
    except OSError as err:
        raise InputError(field, f"cannot reach {output}: {err}") from None
    if info.type == pafs.FileType.File:
        raise InputError(field, f"{output} is a file, not a folder or prefix")
    if create:
        try:
            fs.create_dir(path, recursive=True)
        except OSError as err:
            raise InputError(field, f"cannot create {output}: {err}") from None
    elif isinstance(fs, pafs.LocalFileSystem):
        existing = os.path.abspath(path)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
            raise InputError(field, f"cannot create {output}: {existing} is not a writable folder")
    elif is_remote(output):
        bucket = path.split("/", 1)[0]
        try:
            missing = fs.get_file_info(bucket).type == pafs.FileType.NotFound
        except OSError as err:
            raise InputError(field, f"cannot reach {output}: {err}") from None
        if missing:
            raise InputError(field, f"bucket {bucket!r} of {output} does not exist")


def survey(spec: JobSpec, started: float | None = None) -> PreparedJob:
    """What a run would do, reading only: the output's identity (checked, not written), its commit records, the
    shards left to do."""
    check_writable(spec.output, create=False)
    entries = read_manifest(spec.output)
    claim = check_identity(spec.output, spec.job, spec.identity, entries, ignore=spec.identity_later)
    committed, changed = match_committed(spec, entries)
    notes = [claim.note] if claim.note else []
    left_out = spec.listing.left_out_summary()
    if left_out:  # never skipped silently: hidden names, other extensions
        notes.append("not listed as shards: " + "; ".join(
            f"{n['count']} {why} (e.g. {', '.join(n['examples'])})" for why, n in left_out.items()))
    if changed:  # rewritten in place since: its records are of the earlier file, so it is done again
        key, change = next(iter(changed.items()))
        notes.append(f"{len(changed)} committed shards' input files changed since they were read (e.g. {key}: "
                     f"{change}): they are done again")
        committed = {k: v for k, v in committed.items() if k not in changed}
    damaged = damaged_files(spec.output, committed)
    if damaged:  # committed, then deleted, cut or replaced: done again (their commit records are rewritten)
        lost = {s: f for s, files in damaged.items() for f, problem in files.items() if problem == GONE}
        cut = {s: (f, problem) for s, files in damaged.items() for f, problem in files.items() if problem != GONE}
        if lost:
            notes.append(f"{len(lost)} committed shards lost their files since (e.g. {next(iter(lost.values()))}): "
                         "they are done again")
        if cut := {s: v for s, v in cut.items() if s not in lost}:
            path, problem = next(iter(cut.values()))
            notes.append(f"{len(cut)} committed shards' files were cut or replaced since (e.g. {path}: {problem}): "
                         "they are done again")
        committed = {k: v for k, v in committed.items() if k not in damaged}
    todo = [s for s in spec.listing.shards if s.key not in committed]
    return PreparedJob(spec, committed, entries, todo, started or time.time(), claim, notes=notes)


@contextlib.contextmanager
def claim(spec: JobSpec, started: float | None = None) -> Iterator[PreparedJob]:
    """Hold the output's lease for the block: surveyed again under it (another job may have committed since) and
    its identity recorded. The lease is released however the block ends."""
    survey(spec, started)  # every refusal before anything is written
    check_writable(spec.output)
    lease = Lease(spec.output, spec.job, ttl_s=spec.lease_ttl_s)
    try:
        lease.acquire()
    except OSError as err:
        raise InputError("output", f"cannot write to {spec.output}: {err}") from None
    try:
        prepared = survey(spec, started)
        prepared.lease = lease
        if not spec.identity_later:  # else recorded once the job knows the rest (`record_claim`)
            record_identity(spec.output, spec.job, prepared.claim)
        yield prepared
    finally:
        lease.release()


def record_claim(prepared: PreparedJob, identity: dict) -> None:
    """Complete an identity whose last fields a job learns under the lease (curation's thresholds): checked
    against the output's, then recorded."""
    spec = prepared.spec
    spec.identity = identity
    prepared.claim = check_identity(spec.output, spec.job, identity, prepared.entries)
    record_identity(spec.output, spec.job, prepared.claim)


def match_committed(spec: JobSpec, entries: dict[str, dict]) -> tuple[dict[str, dict], dict[str, str]]:
    """The commit records of the listed shards, by shard key, and those whose input file changed in place since
    it was read (`{key: what changed}`: done again). Each match is checked against what its record says of the file
    it was read from: a key committed from another file (another corpus whose shards share names with this one),
    in another format, or, when the corpus moved (`moved_from`, or the listing's root), from a file of another size
    is refused, naming the field and what to do; a listed file committed under another key (the listing's root
    moved) counts as committed."""
    committed = match_legacy(entries, [s.key for s in spec.listing.shards])
    by_input = {e["input"]: e for e in entries.values() if e.get("input")}
    changed = {}
    for shard in spec.listing.shards:
        entry = committed.get(shard.key)
        if entry is None and shard.uri in by_input:
            entry = committed[shard.key] = by_input[shard.uri]
        if entry is not None:
            change = _check_same_input(spec, shard, entry)
            if change:
                changed[shard.key] = change
    return committed, changed


def _check_same_input(spec: JobSpec, shard: Shard, entry: dict) -> str | None:
    """Refuses a listed shard that is not the file its commit record was read from; returns what changed when it is
    that file, rewritten in place since (its size or modification time, where both are known)."""
    read_from, output = entry.get("input"), spec.output
    if entry.get("format") and spec.format and entry["format"] != spec.format:
        raise InputError("format", f"{output} holds shard {shard.key!r} committed as {entry['format']} records; this "
                                   f"run reads it as {spec.format}. Choose another output (or delete this one to "
                                   "score the corpus again)")
    size, mtime = entry.get("input_size"), entry.get("input_mtime_ns")
    if read_from and read_from != shard.uri:
        moved = spec.moved_from and read_from == join(normalize_uri(spec.moved_from), entry.get("shard", shard.key))
        old_root = read_from[: -len(shard.key)].rstrip("/") if read_from.endswith(shard.key) else read_from
        if not moved:
            raise InputError("input", f"{output} already holds shard {shard.key!r} read from {read_from}; this run's "
                                      f"{shard.uri} has the same key. Score another corpus into its own output; if "
                                      f"this is the same corpus moved, set moved_from: {old_root}")
        if size is not None and shard.size is not None and size != shard.size:  # a copy keeps its size, not its mtime
            raise InputError("moved_from", f"{output} holds shard {shard.key!r} read from {read_from} ({size} bytes, "
                                           f"{entry.get('samples', entry.get('records'))} samples); this run's "
                                           f"{shard.uri} has {shard.size} bytes: it is not that file moved, so "
                                           f"{old_root} is not where this corpus was. Score another corpus into its "
                                           "own output")
        return None
    if size is not None and shard.size is not None and size != shard.size:
        return f"{size} -> {shard.size} bytes"
    if mtime is not None and shard.mtime_ns is not None and mtime != shard.mtime_ns:
        return f"modified at {shard.mtime_ns / 1e9:.3f}, read when it was modified at {mtime / 1e9:.3f} (seconds)"
    return None
