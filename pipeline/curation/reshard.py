"""Resharding (`samples_per_shard N`): the kept samples written as balanced shards of N samples (the last of a
format may hold fewer), per input format, in `OUTPUT/shards/<format>/00000.tar` (or `.parquet`), numbered from
00000; beside each tar shard img2dataset's sidecars: `<shard>.parquet` (one row per sample: `key`, `url`,
`caption`, `score`, `label` and the input sidecar's other columns) and `<shard>_stats.json` (counts). Each tar
sample's JSON member carries its `score` and `label` (one is added where the sample had none); every other member
is copied as it was. A Parquet shard holds the kept rows with every input column, plus `score` and `label` where
the input has no such column.

Exactly once: the assignment of samples to output shards is a plan, `shards/_reshard_plan.json`, written once
(whole) before any shard, in the order (input shard key, row) of the kept records; a rerun reads it back, so a
shard holds the same samples whichever run writes it. Samples kept later (score shards committed since, with a
`min_score` rule) go into new shards after the planned ones. Each shard's files are published whole, its
`_stats.json` last: a shard is done when its stats exist, and a rerun writes only the shards that are not.
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.curation.filters import ROW, TAR_FORMATS, Filters, sidecar_uri
from pipeline.curation.materialize import kept_rows
from pipeline.curation.select import SHARDS_DIR, kept_records
from pipeline.errors import BrokenWorker, Category, ShardFault
from pipeline.io.files import open_shard
from pipeline.io.listing import Shard
from pipeline.io.publish import publish_file, read_json, write_json
from pipeline.io.samples import SourceOptions, tar_samples_by_id
from pipeline.io.uris import filesystem_for, join

PLAN = "_reshard_plan.json"
# one planned sample, as a JSON list (`ordinal`: its record's row in its score file; samples are matched by `id`)
_FIELDS = ("source", "input", "ordinal", "id", "score", "label")


def kept_of(row: dict, filters: Filters, thresholds: dict, per_kind: bool) -> list[list]:
    """The kept samples of one score shard (`row`: its `Shard` as a dict), as planned samples (`_FIELDS`), in
    reading order."""
    filtered, keep = kept_records(Shard(**row), filters, thresholds, per_kind)
    kept = filtered.table.filter(pa.array(keep))
    return [[row["key"], row["aux"], o, i, s, lv] for o, i, s, lv in zip(
        kept.column(ROW).to_pylist(), kept.column("id").to_pylist(), kept.column("score").to_pylist(),
        kept.column("label").to_pylist())]


def extend_plan(plan: dict | None, kept: dict[str, list[list]], n: int) -> dict:
    """`plan` ({"samples_per_shard", "formats": {format: [shard: [sample, ...]]}}) with the kept samples it does
    not hold yet added as new shards of `n` after its own."""
    plan = plan or {"samples_per_shard": n, "formats": {}}
    for fmt, samples in sorted(kept.items()):
        shards = plan["formats"].setdefault(fmt, [])
        planned = {(s[0], s[2]) for shard in shards for s in shard}
        new = sorted((s for s in samples if (s[0], s[2]) not in planned), key=lambda s: (s[0], s[2]))
        shards += [new[i:i + n] for i in range(0, len(new), n)]
    return plan


def shard_uri(output: str, fmt: str, number: int) -> str:
    return join(output, SHARDS_DIR, fmt, f"{number:05d}" + (".tar" if fmt in TAR_FORMATS else ".parquet"))


def stats_uri(uri: str) -> str:
    return uri.rsplit(".", 1)[0] + "_stats.json"


def is_written(uri: str) -> bool:
    fs, path = filesystem_for(stats_uri(uri))
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_shard(fmt: str, samples: list[list], uri: str, options: dict) -> dict:
    """One output shard from its planned samples; its stats (the last file published)."""
    options = SourceOptions.model_validate(options)
    by_input: dict[str, list[dict]] = {}
    for s in samples:
        by_input.setdefault(s[1], []).append(dict(zip(_FIELDS, s)))
    if fmt in TAR_FORMATS:
        written, missing = _write_tar(by_input, uri, options)
    else:
        written, missing = _write_parquet(by_input, uri, options)
    scores = [s[4] for s in samples]
    stats = {"count": len(samples), "successes": written, "failed_to_download": 0, "failed_to_resize": 0,
             "status_dict": {"success": written, **({"not_materializable": len(missing)} if missing else {})},
             "not_materializable": missing[:20], "score_min": min(scores), "score_max": max(scores)}
    write_json(stats_uri(uri), stats)
    return stats


def _json_member(members: list[tuple[tarfile.TarInfo, bytes]], sample: dict) -> list[tuple[tarfile.TarInfo, bytes]]:
    """The members with `score` and `label` in the sample's JSON (a JSON member added where it had none)."""
    out, done = [], False
    for member, data in members:
        if member.name.endswith(".json") and not done:
            try:
                meta = json.loads(data)
            except ValueError:
                meta = None
            if isinstance(meta, dict):
                data, done = json.dumps({**meta, "score": sample["score"], "label": sample["label"]}).encode(), True
                member = _resized(member, len(data))
        out.append((member, data))
    if not done:
        stem = out[0][0].name.rsplit("/", 1)[-1].split(".", 1)[0]
        data = json.dumps({"key": sample["id"], "score": sample["score"], "label": sample["label"]}).encode()
        out.append((_resized(tarfile.TarInfo(f"{stem}.json"), len(data)), data))
    return out


def _resized(member: tarfile.TarInfo, size: int) -> tarfile.TarInfo:
    copy = tarfile.TarInfo(member.name)
    copy.mode, copy.mtime, copy.uid, copy.gid, copy.uname, copy.gname = (
        member.mode or 0o644, member.mtime, member.uid, member.gid, member.uname, member.gname)
    copy.size = size
    return copy


def _sidecar_rows(input_uri: str) -> dict[str, dict]:
    """The input shard's img2dataset metadata by key (none where it has no sidecar)."""
    fs, path = filesystem_for(sidecar_uri(input_uri))
    try:
        with fs.open_input_file(path) as f:
            table = pq.read_table(f)
    except FileNotFoundError:
        return {}
    except (OSError, pa.ArrowException) as err:
        raise ShardFault(Category.IO, f"cannot read {sidecar_uri(input_uri)}: {err}") from None
    return {str(r["key"]): r for r in table.to_pylist()} if "key" in table.column_names else {}


def _write_tar(by_input: dict[str, list[dict]], uri: str, options: SourceOptions) -> tuple[int, list[str]]:
    rows, missing = [], []
    with tempfile.TemporaryDirectory(prefix="unifilter-reshard-") as tmp:
        tar_path = Path(tmp) / "shard.tar"
        with tarfile.open(tar_path, mode="w", format=tarfile.PAX_FORMAT) as tar_out:
            for input_uri, samples in by_input.items():
                wanted = {s["id"]: s for s in samples}
                meta, found = _sidecar_rows(input_uri), set()
                with open_shard(input_uri, options.read_attempts, options.read_backoff_s) as src:
                    for sample_id, sample in tar_samples_by_id(src, input_uri, options):
                        if sample_id in wanted and sample.members is not None and sample_id not in found:
                            for member, data in _json_member(sample.members, wanted[sample_id]):
                                tar_out.addfile(member, io.BytesIO(data))
                            found.add(sample_id)
                            rows.append(_sidecar_row(wanted[sample_id], meta.get(sample_id), sample.files or {}))
                    src.check_unchanged()
                missing += sorted(set(wanted) - found)
        sidecar = Path(tmp) / "shard.parquet"
        pq.write_table(pa.Table.from_pylist(rows), sidecar)
        publish_file(tar_path, uri)
        publish_file(sidecar, sidecar_uri(uri))
    return len(rows), missing


def _sidecar_row(sample: dict, meta: dict | None, files: dict[str, bytes]) -> dict:
    row = dict(meta or {})
    caption = row.get("caption")
    if caption is None and "txt" in files:
        caption = files["txt"].decode("utf-8", "replace")
    return {**row, "key": sample["id"], "url": row.get("url"), "caption": caption, "score": sample["score"],
            "label": sample["label"]}


def _write_parquet(by_input: dict[str, list[dict]], uri: str, options: SourceOptions) -> tuple[int, list[str]]:
    tables, missing = [], []
    for input_uri, samples in by_input.items():
        by_id = {s["id"]: s for s in samples}
        part, found = _read_rows(input_uri, set(by_id), options)
        missing += sorted(set(by_id) - set(found))
        for name, values, typ in (("score", [by_id[i]["score"] for i in found], pa.float32()),
                                  ("label", [by_id[i]["label"] for i in found], pa.int8())):
            if name not in part.column_names:
                part = part.append_column(name, pa.array(values, typ))
        tables.append(part)
    try:
        merged = pa.concat_tables(tables, promote_options="default")
    except pa.ArrowInvalid as err:
        raise ShardFault(Category.CONFIG, f"the input shards of {uri} do not share a schema: {err}") from None
    with tempfile.TemporaryDirectory(prefix="unifilter-reshard-") as tmp:
        local = Path(tmp) / "shard.parquet"
        pq.write_table(merged, local, compression="zstd")
        publish_file(local, uri)
    return merged.num_rows, missing


def _read_rows(input_uri: str, wanted: set[str], options: SourceOptions) -> tuple[pa.Table, list[str]]:
    """The rows of a Parquet shard whose ids are `wanted` (matched by id, as the scorer named them: never by
    position), reading only the row groups that hold them; and their ids, in the same order."""
    parts, found = [], []
    with open_shard(input_uri, options.read_attempts, options.read_backoff_s) as src:
        pf = pq.ParquetFile(src)
        for part, ids in kept_rows(pf, input_uri, wanted, options):
            parts.append(part)
            found += ids
        src.check_unchanged()
        schema = pf.schema_arrow
    return (pa.concat_tables(parts) if parts else schema.empty_table()), found


def reshard(config, shards: list[Shard], filters: Filters, thresholds: dict, executor) -> dict:
    """Plan (or read the plan back, extended with samples kept since) and write every shard not yet written, one
    task each (on Ray, or in this process); returns {"shards": {format: count}, "written_now", "incomplete":
    {shard: reason}}."""
    n, output = config.samples_per_shard, config.output
    calls = [(asdict(s), filters, thresholds, config.per_kind) for s in shards]
    kept: dict[str, list[list]] = {}
    for shard, outcome in zip(shards, executor.tasks(kept_of, calls)):
        if isinstance(outcome.error, BrokenWorker):
            raise BrokenWorker(f"resharding, on the score file {shard.key}: {outcome.error}") from None
        if outcome.error is not None:
            raise outcome.error
        kept.setdefault(shard.aux_format, []).extend(outcome.value)
    plan_uri = join(output, SHARDS_DIR, PLAN)
    old = read_json(plan_uri, remedy="delete shards/ and rerun")
    plan = extend_plan(old, kept, n)
    if plan != old:
        write_json(plan_uri, plan)
    pending = {}
    for fmt, planned in plan["formats"].items():
        for number, samples in enumerate(planned):
            uri = shard_uri(output, fmt, number)
            if samples and not is_written(uri):
                pending[f"{fmt}/{number:05d}"] = (fmt, samples, uri, config.source.model_dump())
    incomplete = {}
    for name, outcome in zip(pending, executor.tasks(write_shard, pending.values())):
        if outcome.error is not None:  # a fault: the shard stays unwritten, named, and a rerun writes it
            incomplete[name] = str(outcome.error).strip().splitlines()[-1][:300]
    return {"samples_per_shard": n, "shards": {fmt: len(p) for fmt, p in plan["formats"].items()},
            "written_now": len(pending) - len(incomplete), "incomplete": incomplete}
