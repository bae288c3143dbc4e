"""Filters beside the score (`--where`, `--drop-truncated`, `--min-images`), intersected, over the score records
joined with the corpus' own metadata, evaluated with PyArrow compute wherever the records are read (the
threshold passes on Ray Data, the selection stage).

The join, per input shard: a tar shard's img2dataset sidecar (`<shard>.parquet` beside `<shard>.tar`, its rows
matched by `key`: the score record's `key`, else its id), or a Parquet shard's own scalar columns (matched by
row: a score file holds its shard's records in reading order). Score record columns win over metadata columns of
the same name. `aspect_ratio` is derived: `width / height`, where the metadata has both. A record whose shard has
no metadata (no sidecar; a Parquet shard that changed since it was scored) or whose key it lacks gets nulls, and
fails any condition on them; such records are counted (`no_metadata`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.curation import where
from pipeline.errors import Category, InputError, ShardFault
from pipeline.io.listing import Shard
from pipeline.io.uris import filesystem_for
from pipeline.scoring.records import SCORE_SCHEMA

TAR_FORMATS = ("webdataset", "interleaved-wds")
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
    """The conditions a record must pass, besides its score. `types`: the metadata columns they read and their
    types, known once checked against the corpus (`check_filters`)."""

    where: str | None = None
    drop_truncated: bool = False
    min_images: int | None = None
    types: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, config) -> Filters:
        return cls(config.where, config.drop_truncated, config.min_images)

    def conditions(self) -> list[where.Condition]:
        out = where.conjuncts(where.parse(self.where)) if self.where else []
        if self.drop_truncated:
            out.append(where.parse("not truncated"))
        if self.min_images is not None:
            out.append(where.parse(f"n_images >= {self.min_images}"))
        return list({str(c): c for c in out}.values())  # a term given twice is one term

    @property
    def terms(self) -> list[str]:
        return [str(c) for c in self.conditions()]

    def columns(self) -> set[str]:
        return set().union(*(where.columns_of(c) for c in self.conditions()))

    def metadata_columns(self) -> set[str]:
        return self.columns() - set(SCORE_TYPES)

    def evaluate(self, table: pa.Table) -> tuple[np.ndarray, list[np.ndarray]]:
        """(passes every term, [fails term i]) per record: a null value fails."""
        conditions = self.conditions()
        n = table.num_rows
        if not conditions:
            return np.ones(n, dtype=bool), []
        needed = sorted(self.columns())
        scanned = ds.dataset(table.select(needed)).to_table(
            columns={f"t{i}": where.expression(c) for i, c in enumerate(conditions)})
        passed = [pc.fill_null(scanned.column(i), False).to_numpy(zero_copy_only=False).astype(bool)
                  for i in range(len(conditions))]
        return np.logical_and.reduce(passed), [~p for p in passed]


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
    conditions = filters.conditions()
    if not conditions:
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
    for condition in conditions:
        where.check(condition, types, where_from)
    return replace(filters, types={c: types[c] for c in sorted(filters.metadata_columns())})


def _read_metadata(input_uri: str, fmt: str, columns: set[str]) -> pa.Table | None:
    uri = metadata_uri(input_uri, fmt)
    fs, path = filesystem_for(uri)
    try:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            names = set(pf.schema_arrow.names)
            wanted = sorted((columns | set(DERIVED["aspect_ratio"])) & names)
            if fmt in TAR_FORMATS:
                wanted = sorted({*wanted, "key"} & names) if "key" in names else []
            return pf.read(columns=wanted) if wanted else None
    except FileNotFoundError:
        return None
    except (OSError, pa.ArrowException) as err:
        raise ShardFault(Category.IO, f"cannot read the metadata {uri}: {err}") from None


def join_metadata(records: pa.Table, input_uri: str | None, fmt: str | None, filters: Filters
                  ) -> tuple[pa.Table, int]:
    """`records` with the metadata columns the filters read added (nulls where a record has none), and how many
    records found no metadata."""
    wanted = filters.metadata_columns()
    if not wanted:
        return records, 0
    meta = _read_metadata(input_uri, fmt, wanted) if input_uri and fmt else None
    n = records.num_rows
    rows = None
    if meta is not None and fmt in TAR_FORMATS:
        keys = pc.coalesce(records.column("key"), records.column("id"))
        rows = pc.index_in(keys, value_set=meta.column("key").cast(pa.string()))
    elif meta is not None and meta.num_rows == n:  # a Parquet shard's own rows, by position
        rows = pa.array(np.arange(n, dtype=np.int64))
    matched = meta.take(rows) if rows is not None else None
    if matched is not None and "aspect_ratio" not in matched.column_names and {"width", "height"} <= set(
            matched.column_names):
        w, h = (pc.cast(matched.column(c), pa.float64()) for c in ("width", "height"))
        matched = matched.append_column("aspect_ratio", pc.if_else(pc.greater(h, 0), pc.divide(w, h), None))
    for name in sorted(wanted):
        target = _CANONICAL.get(filters.types.get(name, "number"), pa.float64())
        column = matched.column(name) if matched is not None and name in matched.column_names else None
        if column is None or pa.types.is_null(column.type):
            column = pa.nulls(n, target)
        records = records.append_column(name, column)
    no_metadata = n if rows is None else int(pc.sum(pc.is_null(rows)).as_py() or 0)
    return records, no_metadata


def read_score_file(uri: str, extra: Iterable[str] = ()) -> pa.Table:
    """A score file's records (`SCORE_COLUMNS` and the `extra` score columns a filter reads), each with its row: a
    score file holds every sample of its input shard in reading order, so a record's row is its position in the
    input (what Parquet rows are matched by)."""
    wanted = [*SCORE_COLUMNS, *sorted(set(extra) - set(SCORE_COLUMNS))]
    fs, path = filesystem_for(uri)
    try:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            table = pf.read(columns=[c for c in wanted if c in pf.schema_arrow.names])
    except OSError as err:
        raise ShardFault(Category.IO, f"cannot read {uri}: {err}") from None
    for name in wanted:  # scored before the column existed: nulls
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, SCORE_SCHEMA.field(name).type))
    return table.append_column("ordinal", pa.array(np.arange(table.num_rows, dtype=np.int64)))


@dataclass
class FilteredShard:
    """One score file's records joined with their metadata, and what the filters made of them."""

    table: pa.Table
    scored: np.ndarray  # no error, a finite score
    passes: np.ndarray  # passes every filter
    removed: dict[str, int]  # term -> scored records failing it
    no_metadata: int

    @property
    def removed_in_all(self) -> int:
        return int((self.scored & ~self.passes).sum())


def filter_shard(score_uri: str, input_uri: str | None, fmt: str | None, filters: Filters) -> FilteredShard:
    """The threshold passes and the selection stage both see a shard through this, so they agree on every record."""
    score_columns = filters.columns() & set(SCORE_TYPES)
    table, no_metadata = join_metadata(read_score_file(score_uri, score_columns), input_uri, fmt, filters)
    scores = table.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
    scored = table.column("error").is_null().to_numpy(zero_copy_only=False) & np.isfinite(scores)
    passes, fails = filters.evaluate(table)
    removed = {term: int((fail & scored).sum()) for term, fail in zip(filters.terms, fails)}
    return FilteredShard(table, scored, passes, removed, no_metadata)
