"""Scoring outputs with known records for the curation tests, committed through the real committer and manifest
(no model, no Ray)."""

from __future__ import annotations

import pyarrow as pa

from pipeline.commit.committer import ShardCommitter
from pipeline.commit.identity import check_identity, identity_hash, record_identity
from pipeline.commit.markers import end_marker
from pipeline.scoring.records import SCORE_SCHEMA, scores_folder


def fake_scores(output: str, shards: dict[str, list[dict]], inputs: dict[str, str] | None = None,
                fmt: str | None = None) -> None:
    """A scoring output with known records (id, kind, score, label, error, ...), committed through the real
    manifest; with `inputs` ({shard key: input URI}) and `fmt` the commit records name the input shards as a
    scoring run's do."""
    identity = {"model": {"id": "fake@0", "revision": "0"}}
    record_identity(output, "score", check_identity(output, "score", identity, {}))
    describe = (lambda key: {"input": inputs.get(key), "format": fmt}) if inputs else None
    committer = ShardCommitter(output, SCORE_SCHEMA, identity_hash(identity), scores_folder, describe=describe)
    for key, records in shards.items():
        rows = [{"source": key, "ordinal": i, "model": "fake@0", **r} for i, r in enumerate(records)]
        committer.add(pa.Table.from_pylist([*rows, end_marker(key, len(rows))]))
    committer.consolidate()
