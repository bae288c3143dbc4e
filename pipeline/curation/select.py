"""Curation's stage: per committed score shard, the records at or above the cut (never error records), their counts
by kind and level, the score errors by reason, and with `materialize` the kept samples written as a shard in the
input's format (`pipeline.curation.materialize`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.commit.committer import ErrorCounts
from pipeline.commit.markers import wire_schema
from pipeline.curation.config import CurateConfig
from pipeline.curation.materialize import MISSING_IDS_SHOWN, materialize
from pipeline.curation.thresholds import ALL
from pipeline.errors import Category, ShardFault
from pipeline.io.listing import Shard, output_name
from pipeline.io.uris import filesystem_for, join
from pipeline.runner.stage import Resources, ShardStage

SELECTED_DIR = "selected"
SHARDS_DIR = "shards"
SELECTED_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("kind", pa.string()),
                             ("score", pa.float32()), ("label", pa.int8()), ("key", pa.string()),
                             ("url", pa.string())])
_SCORE_COLUMNS = ["id", "source", "kind", "score", "label", "error", "key", "url"]


def selected_folder(table: pa.Table) -> list[str]:
    """Every selected record goes to `OUTPUT/selected/`."""
    return [SELECTED_DIR] * table.num_rows


class SelectStage(ShardStage):
    name = "select"
    schema = wire_schema(*SELECTED_SCHEMA)

    def __init__(self, resources: Resources, config: CurateConfig, thresholds: dict[str, float | None]):
        super().__init__(resources)
        self.config, self.thresholds = config, thresholds

    def _cut(self, kind: str) -> float | None:
        return self.thresholds.get(kind if self.config.per_kind else ALL)

    def process_shard(self, shard: Shard) -> Iterator[list[dict]]:
        table = self._score_records(shard)
        cut = np.array([self._cut(k) if self._cut(k) is not None else np.inf for k in table.column("kind").to_pylist()],
                       dtype=np.float64)
        scores = table.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
        ok = table.column("error").is_null().to_numpy(zero_copy_only=False) & np.isfinite(scores)
        keep = ok & (np.nan_to_num(scores, nan=-np.inf) >= cut)
        stats = {"kept": Counter(), "dropped": Counter()}
        errors = ErrorCounts()
        for sample_id, kind, label, k, good, err in zip(
                table.column("id").to_pylist(), table.column("kind").to_pylist(), table.column("label").to_pylist(),
                keep, ok, table.column("error").to_pylist()):
            if not good:
                errors.add(err or "score: no finite score", None, sample_id, shard.key)
            else:
                stats["kept" if k else "dropped"][f"{kind}/{label}"] += 1
        kept = table.filter(pa.array(keep))
        files = self._materialize(shard, kept, stats) if self.config.materialize and kept.num_rows else []
        rows = kept.select(SELECTED_SCHEMA.names).to_pylist()
        for i, row in enumerate(rows):
            row["ordinal"] = i
        yield rows
        return {"artifacts": files, "stats": {**{k: dict(v) for k, v in stats.items()}, **errors.as_summary()}}

    @staticmethod
    def _score_records(shard: Shard) -> pa.Table:
        """The score file's records, each with its row: a score file holds every sample of its input shard in
        reading order, so a record's row is its position in the input (what Parquet rows are matched by when
        materializing; their ids may repeat)."""
        fs, path = filesystem_for(shard.uri)
        try:
            with fs.open_input_file(path) as f:
                table = pq.read_table(f, columns=_SCORE_COLUMNS)
        except OSError as err:
            raise ShardFault(Category.IO, f"cannot read {shard.uri}: {err}") from None
        return table.append_column("ordinal", pa.array(np.arange(table.num_rows, dtype=np.int64)))

    def _materialize(self, shard: Shard, kept: pa.Table, stats: dict) -> list[str]:
        if not shard.aux:
            raise ShardFault(Category.CONFIG, f"the input has no shard {shard.key} (set input to the scored corpus)")
        name = output_name(shard.key) + "." + shard.key.rsplit(".", 1)[-1]
        done = materialize(shard.aux_format, shard.aux, kept, join(self.config.output, SHARDS_DIR, name),
                           self.config.source)
        if done.missing:  # kept, but no longer whole in the input: named, the rest written
            stats["not_materializable"] = {"count": len(done.missing), "ids": done.missing[:MISSING_IDS_SHOWN]}
        return [f"{SHARDS_DIR}/{name}"]
