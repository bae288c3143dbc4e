"""Curation's stage: per committed score shard, the records at or above the cut (never error records), their counts
by kind and level, the score errors by reason, and with `materialize` the kept samples written as a shard in the
input's format (`pipeline.curation.materialize`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from pipeline.commit.committer import ErrorCounts
from pipeline.commit.markers import wire_schema
from pipeline.curation.config import CurateConfig
from pipeline.curation.filters import Filters, filter_shard
from pipeline.curation.materialize import MISSING_IDS_SHOWN, materialize
from pipeline.curation.thresholds import ALL
from pipeline.errors import Category, ShardFault
from pipeline.io.listing import Shard, output_name
from pipeline.io.uris import join
from pipeline.runner.stage import Resources, ShardStage

SELECTED_DIR = "selected"
SHARDS_DIR = "shards"
SELECTED_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("kind", pa.string()),
                             ("score", pa.float32()), ("label", pa.int8()), ("key", pa.string()),
                             ("url", pa.string())])


def selected_folder(table: pa.Table) -> list[str]:
    """Every selected record goes to `OUTPUT/selected/`."""
    return [SELECTED_DIR] * table.num_rows


class SelectStage(ShardStage):
    name = "select"
    schema = wire_schema(*SELECTED_SCHEMA)

    def __init__(self, resources: Resources, config: CurateConfig, thresholds: dict[str, float | None],
                 filters: Filters):
        super().__init__(resources)
        self.config, self.thresholds, self.filters = config, thresholds, filters

    def _cut(self, kind: str) -> float | None:
        return self.thresholds.get(kind if self.config.per_kind else ALL)

    def process_shard(self, shard: Shard) -> Iterator[list[dict]]:
        filtered = filter_shard(shard.uri, shard.aux, shard.aux_format, self.filters)
        table, ok = filtered.table, filtered.scored
        cut = np.array([self._cut(k) if self._cut(k) is not None else np.inf for k in table.column("kind").to_pylist()],
                       dtype=np.float64)
        scores = table.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
        keep = ok & filtered.passes & (np.nan_to_num(scores, nan=-np.inf) >= cut)
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
        if self.filters.terms:  # dropped by the filters, whatever their score
            stats["filtered"] = {"removed": filtered.removed, "removed_in_all": filtered.removed_in_all,
                                 "no_metadata": filtered.no_metadata}
        return {"artifacts": files, "stats": {**{k: dict(v) for k, v in stats.items()}, **errors.as_summary()}}

    def _materialize(self, shard: Shard, kept: pa.Table, stats: dict) -> list[str]:
        if not shard.aux:
            raise ShardFault(Category.CONFIG, f"the input has no shard {shard.key} (set input to the scored corpus)")
        name = output_name(shard.key) + "." + shard.key.rsplit(".", 1)[-1]
        done = materialize(shard.aux_format, shard.aux, kept, join(self.config.output, SHARDS_DIR, name),
                           self.config.source)
        if done.missing:  # kept, but no longer whole in the input: named, the rest written
            stats["not_materializable"] = {"count": len(done.missing), "ids": done.missing[:MISSING_IDS_SHOWN]}
        return [f"{SHARDS_DIR}/{name}"]
