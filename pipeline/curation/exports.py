"""`--export-ids`: what a curation kept, as the files other tools read, written once every score shard is committed
(under the lease, each file whole or not at all): `OUTPUT/kept_ids.parquet` (id, key, url, score, and `rank_value`
with `--rank-by`, of every selected record, from the committed selected/ files, checked against their commit
records) and, where the corpus' metadata has DataComp's `uid` column (32 hex digits), `OUTPUT/uids.npy`: the kept
samples' uids as DataComp's training scripts read a subset, a sorted one-dimensional array of `np.dtype("u8,u8")`
(the uid's first 16 hex digits, then the last 16), as DataComp's own baselines write it. The driver holds 16 bytes
per kept uid."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.commit.records import read_committed_file
from pipeline.curation.filters import join_columns, metadata_types
from pipeline.curation.rank import RANK_VALUE
from pipeline.curation.select import SELECTED_DIR
from pipeline.io.listing import Shard
from pipeline.io.publish import publish_file
from pipeline.io.uris import join

KEPT_IDS = "kept_ids.parquet"
UIDS = "uids.npy"
UID_DTYPE = np.dtype("u8,u8")  # DataComp's subset format
KEPT_IDS_SCHEMA = pa.schema([("id", pa.string()), ("key", pa.string()), ("url", pa.string()),
                             ("score", pa.float32())])
_UID = re.compile(r"[0-9a-fA-F]{32}")


def export_ids(output: str, entries: list[dict], shards: list[Shard], id_column: str, ranked: bool = False) -> dict:
    """Write the exports of the curation at `output` from its commit records `entries` (every curated shard's);
    `shards`: the score shards (their input shards, to join `uid`); `ranked`: the records carry `rank_value`.
    Returns what was written, for the summary."""
    schema = KEPT_IDS_SCHEMA.append(pa.field(RANK_VALUE, pa.float32())) if ranked else KEPT_IDS_SCHEMA
    inputs = {s.key: s for s in shards}
    with_uid = metadata_types(shards)[0].get("uid") == "string"
    uids: list[np.ndarray] = []
    counts = {"kept": 0, "uids": 0, "without_uid": 0}
    with tempfile.TemporaryDirectory(prefix="unifilter-export-") as tmp:
        local = Path(tmp) / KEPT_IDS
        with pq.ParquetWriter(local, schema, compression="zstd") as writer:
            for entry in sorted(entries, key=lambda e: e["shard"]):
                for path in (f for f in entry["files"] if f.startswith(f"{SELECTED_DIR}/")):
                    check = (entry.get("file_checks") or {}).get(path)
                    table = read_committed_file(output, entry["shard"], path, check, schema.names)
                    writer.write_table(table.select(schema.names).cast(schema))
                    counts["kept"] += table.num_rows
                    if with_uid:
                        shard = inputs.get(entry["shard"])
                        uid, missing = _uids(table, shard, id_column)
                        uids.append(uid)
                        counts["uids"] += len(uid)
                        counts["without_uid"] += missing
        publish_file(local, join(output, KEPT_IDS))
        written = {"kept_ids": KEPT_IDS, **counts}
        if with_uid:
            array = np.concatenate(uids) if uids else np.empty(0, UID_DTYPE)
            array.sort()
            np.save(Path(tmp) / UIDS, array)
            publish_file(Path(tmp) / UIDS, join(output, UIDS))
            written["uids_npy"] = UIDS
        else:
            written.pop("uids"), written.pop("without_uid")
    return written


def _uids(kept: pa.Table, shard: Shard | None, id_column: str) -> tuple[np.ndarray, int]:
    """The kept records' uids in DataComp's layout, and how many had none (no metadata, or not 32 hex digits)."""
    joined = join_columns(kept.select(["id", "key"]), shard.aux if shard else None,
                          shard.aux_format if shard else None, {"uid": "string"}, id_column)
    values = [u for u in joined.table.column("uid").to_pylist() if u is not None and _UID.fullmatch(u)]
    array = np.array([(int(u[:16], 16), int(u[16:], 16)) for u in values], UID_DTYPE)
    return array, kept.num_rows - len(values)
