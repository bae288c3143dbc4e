"""Filters beside the score (`--where`, `--drop-truncated`, `--min-images`), intersected, over the score records
joined with the corpus' own metadata, evaluated with PyArrow compute wherever the records are read (the
threshold passes on Ray Data, the selection stage).

The join, per input shard: a tar shard's img2dataset sidecar (`<shard>.parquet` beside `<shard>.tar`, its rows
matched by `key`: the score record's `key`, else its id), or a Parquet shard's own scalar columns (matched by id,
the scorer's id rule: never by position, so a shard rewritten in another order still joins right). Score record
columns win over metadata columns of the same name. `aspect_ratio` is derived: `width / height`, where the
metadata has both. A record whose shard has no metadata (no sidecar) or whose key it lacks gets nulls, and fails
any condition on them; such records are counted (`no_metadata`). A metadata column whose type in a shard is not the
one checked against the first shard (`width` held as strings) is absent for that shard's records, and counted
(`mistyped`). A NaN is null: it fails every comparison (`width != 5` and `not (width < 200)` alike).

The score file itself is read whole and checked against its commit record (bytes, sha256, records): a file cut or
replaced since is named, with what to do (`pipeline.commit.records.read_committed_file`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.commit.records import read_committed_file
from pipeline.curation import where
from pipeline.curation.balance import Balance
from pipeline.curation.rank import RANK_VALUE, Ranking
from pipeline.errors import Category, InputError, ShardFault
from pipeline.io.listing import Shard
from pipeline.io.samples import parquet_ids
from pipeline.io.uris import filesystem_for
from pipeline.scoring.records import SCORE_SCHEMA, SCORES_DIR

TAR_FORMATS = ("webdataset", "interleaved-wds")
ROW = "__row"  # a record's row in its score file (`where` refuses names starting with __: no column clashes)
SCORE_COLUMNS = ["id", "source", "kind", "score", "label", "error", "key", "url", "n_images", "truncated"]
DERIVED = {"aspect_ratio": ("width", "height")}
_CANONICAL = {"number": pa.float64(), "string": pa.string(), "bool": pa.bool_()}


def kind_of(arrow_type: pa.DataType) -> str:
    """A column's type as the filter language sees it: number, string, bool, or the Arrow type's name."""
    if pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type) or pa.types.is_decimal(arrow_type):
        return "number"
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "string"
    if pa.types.is_boolean(arrow_type):
        return "bool"
    return str(arrow_type)


SCORE_TYPES = {f.name: kind_of(f.type) for f in SCORE_SCHEMA}


@dataclass(frozen=True)
class Filters:
    """The conditions a record must pass, besides its score, parsed once (`Filters.of`): each term of `--where`
    joined by `and`, then `not truncated` and `n_images >= N` from their flags, a term given twice kept once.
    `types`: the metadata columns they read and their types, known once checked against the corpus
    (`check_filters`)."""

    conditions: tuple[where.Condition, ...] = ()
    types: dict[str, str] = field(default_factory=dict)
    id_column: str = "id"  # how a Parquet shard names its rows (`source.id_column`): its columns are joined by id
    rules: tuple[str, ...] = ()  # the setting each condition came from (`where`, `truncated`, `exclude:<file>`, ...)
    ranking: Ranking | None = None  # `--rank-by`: its fused value is computed where the records are seen (`RANK_VALUE`)
    balance: Balance | None = None  # `--balance-by`: the caps applied after the rule (`select.kept_records`)

    @classmethod
    def of(cls, config) -> Filters:
        """The filters of `config`; its exclusion lists are read here (an InputError naming `exclude`)."""
        from pipeline.curation.exclude import read_exclude_list

        terms = [("where", c) for c in where.conjuncts(where.parse(config.where))] if config.where else []
        if config.drop_truncated:
            terms.append(("truncated", where.parse("not truncated")))
        if config.min_images is not None:
            terms.append(("min_images", where.parse(f"n_images >= {config.min_images}")))
        for uri in config.exclude or []:
            listed = read_exclude_list(uri, config.exclude_column)
            terms.append((listed.label, listed))
        unique = {}
        for rule, condition in terms:  # a term given twice is kept once, with the setting that gave it first
            unique.setdefault(str(condition), (rule, condition))
        return cls(tuple(c for _, c in unique.values()), id_column=config.source.id_column,
                   rules=tuple(r for r, _ in unique.values()),
                   ranking=Ranking.of(config.rank_by) if config.rank_by else None,
                   balance=Balance(config.balance_by, config.max_per_group) if config.balance_by else None)

    @property
    def terms(self) -> list[str]:
        """Each condition as written back (the summary's and the identity's names for them)."""
        return [str(c) for c in self.conditions]

    @property
    def exclusions(self) -> list[dict]:
        """Each exclusion list as the output's identity knows it: its file, the column it matches, its content's
        sha256 and how many values it holds (a rerun with other lists is refused as other settings are)."""
        return [{"file": c.label.removeprefix("exclude:"), "column": c.column, "sha256": c.digest,
                 "values": len(c.values)} for c in self.conditions if isinstance(c, where.NotIn)]

    def first_rule(self, fails: list[np.ndarray]) -> np.ndarray:
        """Per record, the first setting whose term it fails, in the order `RULE_ORDER` gives them (None: none)."""
        out = np.full(len(fails[0]) if fails else 0, None, dtype=object)
        for i in sorted(range(len(fails)), key=lambda i: _rule_rank(self.rules[i]), reverse=True):
            out[fails[i]] = self.rules[i]  # the last written wins: the first in order
        return out

    def columns(self) -> set[str]:
        """The columns the conditions (and the ranking) read."""
        ranked = self.ranking.columns() if self.ranking else set()
        grouped = {self.balance.column} if self.balance else set()
        return ranked.union(grouped, *(where.columns_of(c) for c in self.conditions))

    def metadata_columns(self) -> set[str]:
        return self.columns() - set(SCORE_TYPES)

    def evaluate(self, table: pa.Table) -> tuple[np.ndarray, list[np.ndarray]]:
        """(passes every term, [fails term i]) per record: a null value fails."""
        conditions = self.conditions
        n = table.num_rows
        if not conditions:
            return np.ones(n, dtype=bool), []
        needed = table.select(sorted(self.columns()))
        needed = pa.table({name: _nan_as_null(needed.column(name)) for name in needed.column_names})
        scanned = ds.dataset(needed).to_table(
            columns={f"t{i}": where.expression(c) for i, c in enumerate(conditions)})
        passed = [pc.fill_null(scanned.column(i), False).to_numpy(zero_copy_only=False).astype(bool)
                  for i in range(len(conditions))]
        return np.logical_and.reduce(passed), [~p for p in passed]


RULE_ORDER = ("where", "exclude:", "min_images", "truncated")  # which rule a dropped record names first


def _rule_rank(rule: str) -> int:
    return next(i for i, prefix in enumerate(RULE_ORDER) if rule.startswith(prefix))


def _nan_as_null(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A NaN is a missing value: null, so it fails every comparison as null does (NaN would pass `!=`)."""
    if not pa.types.is_floating(column.type):
        return column
    return pc.if_else(pc.is_nan(column), pa.scalar(None, column.type), column)


# -- the corpus' metadata ---------------------------------------------------------------------------------------
def sidecar_uri(input_uri: str) -> str:
    """img2dataset's metadata beside a tar shard: `00000.tar` -> `00000.parquet`."""
    return input_uri[: -len(".tar")] + ".parquet" if input_uri.endswith(".tar") else input_uri + ".parquet"


def metadata_uri(input_uri: str, fmt: str) -> str:
    return sidecar_uri(input_uri) if fmt in TAR_FORMATS else input_uri


def metadata_types(shards: list[Shard]) -> tuple[dict[str, str], list[str]]:
    """The metadata columns (and types) of the first input shard of each format, and which files said so."""
    types: dict[str, str] = {}
    seen: list[str] = []
    for fmt in dict.fromkeys(s.aux_format for s in shards if s.aux and s.aux_format):
        first = next(s for s in shards if s.aux_format == fmt and s.aux)
        uri = metadata_uri(first.aux, fmt)
        fs, path = filesystem_for(uri)
        try:
            schema = pq.read_schema(path, filesystem=fs)
        except FileNotFoundError:
            continue
        except (OSError, pa.ArrowException) as err:
            raise InputError("where", f"cannot read the metadata of {first.key} ({uri}): {err}") from None
        seen.append(uri)
        for f in schema:
            types.setdefault(f.name, kind_of(f.type))
    if types.get("width") == types.get("height") == "number":
        types.setdefault("aspect_ratio", "number")
    return types, seen


def check_filters(filters: Filters, shards: list[Shard]) -> Filters:
    """Names and types of every condition checked against the score records' columns and the first input shards'
    metadata (exit 2 naming `where` before anything is written); returns the filters knowing their columns' types."""
    if not filters.conditions and not filters.ranking and not filters.balance:
        return filters
    types = {k: v for k, v in SCORE_TYPES.items()}
    seen: list[str] = []
    if filters.metadata_columns():
        if any(not (s.aux and s.aux_format) for s in shards):
            raise InputError("input", "the score records do not name their input shards (scored before this "
                                      "version): set input and format to read the corpus' metadata")
        meta, seen = metadata_types(shards)
        types = {**meta, **types}
    where_from = "the score records'" + (f" and the metadata of {', '.join(seen)}" if seen else
                                         "; no metadata beside the first input shard")
    for condition in filters.conditions:
        where.check(condition, types, where_from)
    if filters.ranking:
        filters.ranking.check(types, where_from)
    if filters.balance and filters.balance.column not in types:
        raise InputError("balance_by", f"unknown column {filters.balance.column!r}: the columns are "
                                       f"{', '.join(sorted(types))} ({where_from})")
    return replace(filters, types={c: types[c] for c in sorted(filters.metadata_columns())})


JOIN = "__id"  # the metadata's join key: a sidecar's `key`, a Parquet shard's row ids


def _read_metadata(input_uri: str, fmt: str, columns: set[str], id_column: str) -> pa.Table | None:
    """The metadata columns of an input shard that `columns` name (and `width`, `height` for the derived ones),
    with the key each row joins by (`JOIN`); None where it has none."""
    uri = metadata_uri(input_uri, fmt)
    fs, path = filesystem_for(uri)
    try:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            names = set(pf.schema_arrow.names)
            wanted = sorted((columns | set(DERIVED["aspect_ratio"])) & names)
            if fmt in TAR_FORMATS:
                if "key" not in names:
                    return None
                table = pf.read(columns=sorted({*wanted, "key"}))
                return table.append_column(JOIN, table.column("key").cast(pa.string()))
            if not wanted:
                return None
            ids, shared = parquet_ids(pf, input_uri, id_column)
            join_ids = pa.array([None if row in shared else i for row, i in enumerate(ids)], pa.string())
            return pf.read(columns=wanted).append_column(JOIN, join_ids)  # rows of shared ids join nothing
    except FileNotFoundError:
        return None
    except pa.ArrowInvalid as err:  # bytes that are not Parquet: a rerun would not help
        raise InputError("input", f"the metadata {uri} does not read as Parquet ({str(err).splitlines()[0][:200]}): "
                                  "repair or remove it (the records of a shard without metadata fail every term on "
                                  "it)") from None
    except (OSError, pa.ArrowException) as err:
        raise ShardFault(Category.IO, f"cannot read the metadata {uri}: {err}") from None


@dataclass
class JoinedMetadata:
    """The records with the metadata columns the filters read; how many found no metadata; and, per column, how
    many records had it with another type than the one checked (treated as absent)."""

    table: pa.Table
    no_metadata: int
    mistyped: dict[str, int]


def join_metadata(records: pa.Table, input_uri: str | None, fmt: str | None, filters: Filters) -> JoinedMetadata:
    """`records` with the metadata columns the filters read added (nulls where a record has none, or has it with
    another type than the one checked)."""
    return join_columns(records, input_uri, fmt, {c: filters.types.get(c, "number")
                                                  for c in filters.metadata_columns()}, filters.id_column)


def join_columns(records: pa.Table, input_uri: str | None, fmt: str | None, wanted: dict[str, str],
                 id_column: str = "id") -> JoinedMetadata:
    """`records` with the metadata columns `wanted` (name -> the type checked: number, string, bool) of their input
    shard added, joined as the filters join them."""
    if not wanted:
        return JoinedMetadata(records, 0, {})
    meta = _read_metadata(input_uri, fmt, set(wanted), id_column) if input_uri and fmt else None
    n = records.num_rows
    rows = None
    if meta is not None:
        keys = pc.coalesce(records.column("key"), records.column("id")) if fmt in TAR_FORMATS else records.column("id")
        rows = pc.index_in(keys, value_set=meta.column(JOIN))
    matched = meta.take(rows) if rows is not None else None
    with_metadata = 0 if rows is None else n - rows.null_count
    mistyped: dict[str, int] = {}
    for name in sorted(wanted):
        column, of_another_type = _column(matched, name, wanted[name])
        if of_another_type:
            mistyped[name] = with_metadata
        if column is None or pa.types.is_null(column.type):
            column = pa.nulls(n, _CANONICAL.get(wanted[name], pa.float64()))
        records = records.append_column(name, column)
    return JoinedMetadata(records, n - with_metadata, {k: v for k, v in mistyped.items() if v})


def _column(matched: pa.Table | None, name: str, kind: str) -> tuple[pa.ChunkedArray | None, bool]:
    """A metadata column as the filters checked it (`kind`), or None; and whether it is there with another type."""
    if matched is None:
        return None, False
    if name not in matched.column_names and name in DERIVED:
        (w, w_other), (h, h_other) = (_column(matched, c, "number") for c in DERIVED[name])
        if w is None or h is None:
            return None, w_other or h_other
        w, h = pc.cast(w, pa.float64()), pc.cast(h, pa.float64())
        return pc.if_else(pc.greater(h, 0), pc.divide(w, h), None), False
    if name not in matched.column_names:
        return None, False
    column = matched.column(name)
    if pa.types.is_null(column.type) or kind_of(column.type) == kind:
        return column, False
    return None, True


def read_score_file(shard: Shard, extra: Iterable[str] = ()) -> pa.Table:
    """A score file's records (`SCORE_COLUMNS` and the `extra` score columns a filter reads), each with its row
    (`ROW`), the file checked against its commit record (`shard`: its size, records and sha256)."""
    wanted = [*SCORE_COLUMNS, *sorted(set(extra) - set(SCORE_COLUMNS))]
    scores, _, path = shard.uri.rpartition(f"/{SCORES_DIR}/")
    check = {"bytes": shard.size, "records": shard.records, "sha256": shard.sha256}
    try:
        table = read_committed_file(scores, shard.key, f"{SCORES_DIR}/{path}", check, wanted, field="scores")
    except OSError as err:
        raise ShardFault(Category.IO, f"cannot read {shard.uri}: {err}") from None
    for name in wanted:  # scored before the column existed: nulls
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, SCORE_SCHEMA.field(name).type))
    return table.append_column(ROW, pa.array(np.arange(table.num_rows, dtype=np.int64)))


@dataclass
class FilteredShard:
    """One score file's records joined with their metadata, and what the filters made of them."""

    table: pa.Table
    scored: np.ndarray  # no error, a finite score
    passes: np.ndarray  # passes every filter
    removed: dict[str, int]  # term -> scored records failing it
    no_metadata: int
    mistyped: dict[str, int] = field(default_factory=dict)  # metadata column -> records it was absent for (its type)
    first_rule: np.ndarray | None = None  # per record, the first setting whose term it fails (None: it passes)
    capped: np.ndarray | None = None  # kept by the rule, dropped by `--balance-by`'s cap (`select.kept_records`)

    @property
    def ranked_by(self) -> np.ndarray:
        """The value each record is ranked by: its fused value with `--rank-by` (NaN: never kept), else its score."""
        name = RANK_VALUE if RANK_VALUE in self.table.column_names else "score"
        return self.table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)

    @property
    def removed_in_all(self) -> int:
        return int((self.scored & ~self.passes).sum())


def filter_shard(shard: Shard, filters: Filters) -> FilteredShard:
    """A score shard (`shard`: its score file, its input shard as `aux`) seen through the filters. The threshold
    passes and the selection stage both see a shard through this, so they agree on every record."""
    score_columns = filters.columns() & set(SCORE_TYPES)
    joined = join_metadata(read_score_file(shard, score_columns), shard.aux, shard.aux_format, filters)
    table = joined.table
    scores = table.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
    scored = table.column("error").is_null().to_numpy(zero_copy_only=False) & np.isfinite(scores)
    passes, fails = filters.evaluate(table)
    removed = {term: int((fail & scored).sum()) for term, fail in zip(filters.terms, fails)}
    first_rule = filters.first_rule(fails) if fails else np.full(table.num_rows, None, dtype=object)
    if filters.ranking and filters.ranking.ready:
        table = table.append_column(RANK_VALUE, pa.array(filters.ranking.values(table), pa.float32()))
    return FilteredShard(table, scored, passes, removed, joined.no_metadata, joined.mistyped, first_rule)
