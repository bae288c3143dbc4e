"""Curation from tests: scoring outputs with known records (committed through the real manifest), curating them
(the stages in this process unless `executor` says otherwise), and reading what a curation selected or
materialized."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import pipeline.curation
from pipeline.commit.committer import CommitHooks, RecordLayout, ShardCommitter
from pipeline.commit.identity import check_identity, identity_hash, record_identity
from pipeline.commit.markers import end_marker
from pipeline.commit.records import read_committed
from pipeline.curation import CurateConfig
from pipeline.scoring.records import SCORE_SCHEMA, scores_folder

SELECTED = pa.schema([("id", pa.string()), ("source", pa.string()), ("kind", pa.string()), ("score", pa.float32()),
                      ("label", pa.int8()), ("key", pa.string()), ("url", pa.string())])


def fake_scores(output: str, shards: dict[str, list[dict]], inputs: dict[str, str] | None = None,
                fmt: str | None = None) -> None:
    """A scoring output with known records (id, kind, score, label, error, ...), committed through the real
    manifest (no model, no Ray); with `inputs` ({shard key: input URI}) and `fmt` the commit records name the
    input shards as a scoring run's do."""
    identity = {"model": {"id": "fake@0", "revision": "0"}}
    record_identity(output, "score", check_identity(output, "score", identity, {}))
    describe = (lambda key: {"input": inputs.get(key), "format": fmt}) if inputs else None
    committer = ShardCommitter(output, RecordLayout(SCORE_SCHEMA, scores_folder), identity_hash(identity),
                               hooks=CommitHooks(describe=describe))
    for key, records in shards.items():
        rows = [{"source": key, "ordinal": i, "model": "fake@0", **r} for i, r in enumerate(records)]
        committer.add(pa.Table.from_pylist([*rows, end_marker(key, len(rows))]))
    committer.consolidate()


def random_records(n: int, kind: str, seed: int, prefix: str) -> list[dict]:
    """`n` scored records of `kind` with scores rounded to hundredths (so some tie)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        score = float(np.float32(np.round(rng.uniform(0, 3), 2)))
        out.append({"id": f"{prefix}{i}", "kind": kind, "score": score, "label": int(min(3, round(score))),
                    "error": None})
    return out


def curate(tmp_path, scores, name="cur", executor="local", **kw) -> dict:
    """Curate `scores` into `tmp_path/name`; returns the run's summary."""
    config = CurateConfig(scores=str(scores), output=str(tmp_path / name), executor=executor, **kw)
    return pipeline.curation.curate(config, progress=False)


def selected(output, ranked: bool = False) -> pa.Table:
    """The selected records; `ranked`: with the fused value they were ranked by (`rank_value`, with rank_by)."""
    schema = SELECTED.append(pa.field("rank_value", pa.float32())) if ranked else SELECTED
    return read_committed(str(output), schema, folder="selected")


def dropped(output) -> pa.Table:
    """The dropped records a curation wrote with `write_dropped`, each with the rule that removed it."""
    return read_committed(str(output), SELECTED.append(pa.field("dropped_by", pa.string())), folder="dropped")


def materialized(path: Path, fmt: str) -> dict[str, bytes]:
    """Sample id -> its bytes, from a shard of any format (tar: every member; Parquet: the row)."""
    if fmt in ("webdataset", "interleaved-wds"):
        out: dict[str, bytes] = {}
        with tarfile.open(fileobj=io.BytesIO(path.read_bytes())) as tar:
            for m in tar.getmembers():
                key = m.name.split(".", 1)[0]
                out[key] = out.get(key, b"") + m.name.encode() + tar.extractfile(m).read()
        return out
    table = pq.read_table(path)
    return {r["id"]: json.dumps(r, default=str, sort_keys=True).encode() for r in table.to_pylist()}
