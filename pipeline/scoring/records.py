"""Score records, the scoring output (docs/ARCHITECTURE.md): their schema, where they go, and how to read them."""

from __future__ import annotations

import pyarrow as pa

from pipeline.commit.records import read_committed

SCORE_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("source", pa.string()),
    ("kind", pa.string()),
    ("score", pa.float32()),
    ("label", pa.int8()),
    ("probs", pa.list_(pa.float32())),
    ("n_images", pa.int32()),
    ("n_tokens", pa.int32()),
    ("truncated", pa.bool_()),
    ("error", pa.string()),
    ("model", pa.string()),
    ("key", pa.string()),
    ("url", pa.string()),
])
SCORES_DIR = "scores"


def scores_folder(table: pa.Table) -> list[str]:
    """Every score record goes to `OUTPUT/scores/`."""
    return [SCORES_DIR] * table.num_rows


def read_scores(output: str) -> pa.Table:
    """All committed score records of a scoring output (nothing an interrupted run left behind; refused when the
    output mixes models or settings)."""
    return read_committed(output, SCORE_SCHEMA)
