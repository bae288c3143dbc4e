"""The output's identity, `OUTPUT/_output.json`: the job, and what changes its records (the model's weights, the
score-changing settings). A run whose identity differs is refused before anything is written, naming the field;
every commit record carries the identity's hash and `read_committed` refuses an output that mixes them."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

from pipeline.errors import OutputMismatch
from pipeline.io.publish import read_json, write_json
from pipeline.io.uris import join

IDENTITY_NAME = "_output.json"
_REMEDY = ("restore it from a backup, or delete it and rerun with the same model and settings (the run records the "
           "output's identity again from its own)")


def read_identity(output: str, field: str = "output") -> dict | None:
    """The output's `_output.json`, or None where it has none (a corrupt one is named, with what to do)."""
    return read_json(join(output, IDENTITY_NAME), field, _REMEDY)


def identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


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


def check_identity(output: str, job: str, identity: dict, entries: dict[str, dict],
                   ignore: tuple[str, ...] = ()) -> Claim:
    """Whether this run may write into `output` (reads only). Raises OutputMismatch naming the fields that differ
    rather than mixing records of two models or settings; an output that holds an identity but no committed shard
    may be re-claimed (the Claim says so). Fields in `ignore` are not compared (not known yet)."""
    current = read_identity(output)
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
    differ = [f for f in _differences(theirs, identity) if f not in ignore]
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


def check_entries(output: str, entries: dict[str, dict], field: str = "output") -> None:
    """Every commit record belongs to the output's identity and names one model (raises OutputMismatch naming the
    mix, or a record that carries no identity)."""
    current = read_identity(output, field)
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
