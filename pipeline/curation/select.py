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
from pipeline.curation.filters import FilteredShard, Filters, filter_shard
from pipeline.curation.materialize import MISSING_IDS_SHOWN, materialize
from pipeline.curation.rank import RANK_VALUE
from pipeline.curation.thresholds import ALL, KINDS
from pipeline.errors import Category, ConfigFieldError, ShardFault
from pipeline.io.listing import Shard, output_name
from pipeline.io.uris import join
from pipeline.runner.stage import Resources, ShardStage

SELECTED_DIR = "selected"
SHARDS_DIR = "shards"
SELECTED_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("kind", pa.string()),
                             ("score", pa.float32()), ("label", pa.int8()), ("key", pa.string()),
                             ("url", pa.string())])


DROPPED_DIR = "dropped"
DROPPED_BY = pa.field("dropped_by", pa.string())  # with `write_dropped`
SCORE_ERROR = "error"  # a dropped record's rule when it is a score error record (never selectable)


def record_schema(config: CurateConfig) -> pa.Schema:
    """The records a curation writes: SELECTED_SCHEMA, with `rank_value` (`rank_by`) and `dropped_by`
    (`write_dropped`, null in selected/) where set."""
    schema = SELECTED_SCHEMA
    if config.rank_by:
        schema = schema.append(pa.field(RANK_VALUE, pa.float32()))
    return schema.append(DROPPED_BY) if config.write_dropped else schema


def selected_folder(table: pa.Table) -> list[str]:
    """Every selected record goes to `OUTPUT/selected/`."""
    return [SELECTED_DIR] * table.num_rows


def selected_or_dropped(table: pa.Table) -> list[str]:
    """With `write_dropped`: a record that names the rule that dropped it goes to `OUTPUT/dropped/`."""
    return [SELECTED_DIR if rule is None else DROPPED_DIR for rule in table.column("dropped_by").to_pylist()]


def dropped_by(filtered: FilteredShard, keep: np.ndarray) -> np.ndarray:
    """Per record, the first rule that removed it: a score error, a filter's setting (`where`, `exclude:<file>`,
    `min_images`, `truncated`, in that order), else the threshold; None for a kept record."""
    out = np.where(keep, None, "threshold").astype(object)
    if filtered.capped is not None:
        out[filtered.capped] = "balance"
    failed = filtered.first_rule != None  # noqa: E711 - an object array compared elementwise
    out[failed & ~keep] = filtered.first_rule[failed & ~keep]
    out[~filtered.scored] = SCORE_ERROR
    return out


def kept_records(shard: Shard, filters: Filters, thresholds: dict[str, float | None], per_kind: bool
                 ) -> tuple[FilteredShard, np.ndarray]:
    """A score shard's records seen through the filters, and which are kept: scored, passing every filter, at or
    above their group's cut, and with `--balance-by` within their group's cap once the caps are counted (those it
    drops: `filtered.capped`). The selection stage, the resharder and the report decide the same."""
    filtered = filter_shard(shard, filters)
    cuts = {kind: thresholds.get(kind if per_kind else ALL) for kind in (*KINDS, None)}
    kinds = filtered.table.column("kind").to_pylist()
    cut = np.array([np.inf if cuts.get(k) is None else cuts[k] for k in kinds], dtype=np.float64)
    ranked = filtered.ranked_by
    keep = filtered.scored & filtered.passes & (np.nan_to_num(ranked, nan=-np.inf) >= cut)
    if filters.balance and filters.balance.counted:
        balanced = filters.balance.within(filtered.table, keep, ranked)
        filtered.capped, keep = keep & ~balanced, balanced
    return filtered, keep


class SelectStage(ShardStage):
    name = "select"
    schema = wire_schema(*SELECTED_SCHEMA)  # the record_schema of the run's config, once built

    def __init__(self, resources: Resources, config: CurateConfig, thresholds: dict[str, float | None],
                 filters: Filters):
        super().__init__(resources)
        self.config, self.thresholds, self.filters = config, thresholds, filters
        self.columns = [f.name for f in record_schema(config) if f.name != DROPPED_BY.name]
        self.schema = wire_schema(*record_schema(config))

    def process_shard(self, shard: Shard) -> Iterator[list[dict]]:
        try:
            filtered, keep = kept_records(shard, self.filters, self.thresholds, self.config.per_kind)
        except ConfigFieldError as err:  # a score file that is not what was committed: named, with what to do
            raise ShardFault(Category.CONFIG, err.problem) from None
        table, ok = filtered.table, filtered.scored
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
        one_to_one = self.config.materialize and self.config.samples_per_shard is None  # else resharded after
        files = self._materialize(shard, kept, stats) if one_to_one and kept.num_rows else []
        rows = kept.select(self.columns).to_pylist()
        if self.config.write_dropped:
            rules = dropped_by(filtered, keep)
            dropped = table.filter(pa.array(~keep)).select(self.columns)
            rows += dropped.append_column("dropped_by", pa.array(rules[~keep], pa.string())).to_pylist()
        for i, row in enumerate(rows):
            row["ordinal"] = i
        yield rows
        if self.filters.terms:  # dropped by the filters, whatever their score
            stats["filtered"] = {"removed": filtered.removed, "removed_in_all": filtered.removed_in_all,
                                 "no_metadata": filtered.no_metadata, "mistyped": filtered.mistyped}
        balanced = {"balanced": int(filtered.capped.sum())} if filtered.capped is not None else {}
        return {"artifacts": files, "stats": {**{k: dict(v) for k, v in stats.items()}, **errors.as_summary(),
                                              **balanced}}

    def _materialize(self, shard: Shard, kept: pa.Table, stats: dict) -> list[str]:
        if not shard.aux:
            raise ShardFault(Category.CONFIG, f"the input has no shard {shard.key} (set input to the scored corpus)")
        name = output_name(shard.key) + "." + shard.key.rsplit(".", 1)[-1]
        done = materialize(shard.aux_format, shard.aux, kept, join(self.config.output, SHARDS_DIR, name),
                           self.config.source)
        if done.missing:  # kept, but no longer whole in the input: named, the rest written
            stats["not_materializable"] = {"count": len(done.missing), "ids": done.missing[:MISSING_IDS_SHOWN]}
        return [f"{SHARDS_DIR}/{name}"]
