"""`--rank-by EXPR`: the fused value a curation ranks records by instead of the score alone, e.g.
`0.7*pct(score) + 0.3*pct(similarity)`. A numeric expression in the style of `--where` (our own tokenizer and
recursive-descent parser; no user string reaches Python's `eval`):

    sum     := product (("+" | "-") product)*
    product := unary (("*" | "/") unary)*
    unary   := "-" unary | NUMBER | COLUMN | "pct" "(" COLUMN ")" | "(" sum ")"

over the number columns of the score records and of the corpus' metadata (joined as `--where` joins them).
`pct(column)` is the fraction of the record's kind's scored records whose value is at most the record's (ties share
the highest rank), from the exact distribution of that column per kind (`Ranking.with_distributions`, counted by
a pass over every score file: `pipeline.curation.passes.rank_distributions`). A record whose fused value is
missing or not finite (a null or NaN it reads, a division by zero) is never kept and not among the ranked. The
fused value is ranked as a float32, as a score is, so the threshold passes find its cut exactly."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa

from pipeline.errors import ConfigFieldError

FIELD = "rank_by"
RANK_VALUE = "rank_value"  # the fused value's column, in the records a curation writes with --rank-by
HELP = "a numeric expression of columns, numbers, + - * / and pct(column), e.g. \"0.7*pct(score) + " \
       "0.3*pct(similarity)\""
MAX_LENGTH, MAX_TERMS, MAX_DEPTH = 4096, 64, 32

_TOKEN = re.compile(r"\s*(?:(?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
                    r"|(?P<op>[-+*/()]))")


def _error(problem: str) -> ConfigFieldError:
    return ConfigFieldError(FIELD, f"{problem} ({HELP})")


@dataclass(frozen=True)
class Number:
    value: float


@dataclass(frozen=True)
class Col:
    name: str


@dataclass(frozen=True)
class Pct:
    name: str


@dataclass(frozen=True)
class Neg:
    operand: Node


@dataclass(frozen=True)
class Binary:
    op: str
    left: Node
    right: Node


Node = Number | Col | Pct | Neg | Binary


class _Parser:
    def __init__(self, text: str):
        self.tokens: list[tuple[str, str, int]] = []
        at = 0
        while at < len(text):
            match = _TOKEN.match(text, at)
            if match is None or match.end() == at:
                if not text[at:].strip():
                    break
                raise _error(f"unexpected {text[at:].strip()[0]!r} at position {at}")
            kind = match.lastgroup
            self.tokens.append((kind, match.group(kind), match.start(kind)))
            at = match.end()
        self.tokens.append(("end", "", len(text)))
        self.at, self.depth, self.terms = 0, 0, 0

    @property
    def next(self) -> tuple[str, str, int]:
        return self.tokens[self.at]

    def take(self) -> tuple[str, str, int]:
        token = self.tokens[self.at]
        self.at += 1
        return token

    def expect(self, text: str) -> None:
        kind, got, at = self.take()
        if got != text:
            raise _error(f"expected {text!r} at position {at}, found {got or 'the end'!r}")

    def sum(self) -> Node:
        node = self.product()
        while self.next[1] in ("+", "-"):
            node = Binary(self.take()[1], node, self.product())
        return node

    def product(self) -> Node:
        node = self.unary()
        while self.next[1] in ("*", "/"):
            node = Binary(self.take()[1], node, self.unary())
        return node

    def unary(self) -> Node:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _error(f"nested more than {MAX_DEPTH} levels deep")
        try:
            kind, text, at = self.take()
            if text == "-":
                return Neg(self.unary())
            if text == "(":
                node = self.sum()
                self.expect(")")
                return node
            if kind == "number":
                value = float(text)
                if not math.isfinite(value):
                    raise _error(f"the number {text[:40]} at position {at} is too large for a 64-bit float")
                return Number(value)
            if kind == "name":
                self.terms += 1
                if self.terms > MAX_TERMS:
                    raise _error(f"more than {MAX_TERMS} columns")
                if self.next[1] == "(":
                    if text != "pct":
                        raise _error(f"{text}(...) at position {at}: the only function is pct(column)")
                    self.take()
                    kind, name, at = self.take()
                    if kind != "name":
                        raise _error(f"pct( at position {at} takes a column name")
                    self.expect(")")
                    return Pct(name)
                return Col(text)
            raise _error(f"unexpected {text or 'end'!r} at position {at}")
        finally:
            self.depth -= 1


def parse(text: str) -> Node:
    """The expression `text` states; a ConfigFieldError naming `rank_by` for anything outside the grammar."""
    if len(text) > MAX_LENGTH:
        raise _error(f"the expression is {len(text):,} characters long, over the limit of {MAX_LENGTH:,}")
    parser = _Parser(text)
    if parser.next[0] == "end":
        raise _error("the expression is empty")
    tree = parser.sum()
    if parser.next[0] != "end":
        raise _error(f"unexpected {parser.next[1]!r} at position {parser.next[2]}")
    return tree


def columns_of(node: Node) -> set[str]:
    if isinstance(node, (Col, Pct)):
        return {node.name}
    if isinstance(node, Neg):
        return columns_of(node.operand)
    if isinstance(node, Binary):
        return columns_of(node.left) | columns_of(node.right)
    return set()


def pct_columns(node: Node) -> set[str]:
    if isinstance(node, Pct):
        return {node.name}
    if isinstance(node, Neg):
        return pct_columns(node.operand)
    if isinstance(node, Binary):
        return pct_columns(node.left) | pct_columns(node.right)
    return set()


@dataclass(frozen=True)
class Distribution:
    """One column's values among one kind's scored records: sorted distinct `values`, how many records hold a
    value at most each (`at_most`), and how many scored records the kind has (`scored`)."""

    values: np.ndarray
    at_most: np.ndarray
    scored: int

    def pct(self, x: np.ndarray) -> np.ndarray:
        """The fraction of the kind's scored records whose value is at most each of `x` (NaN for NaN)."""
        i = np.searchsorted(self.values, x, side="right")
        below = np.where(i > 0, self.at_most[np.maximum(i - 1, 0)], 0)
        return np.where(np.isnan(x), np.nan, below / max(self.scored, 1))


@dataclass(frozen=True)
class Ranking:
    """The parsed `--rank-by` expression (`text` as given) and, once counted, each pct column's distribution per
    kind (`distributions[(kind, column)]`)."""

    text: str
    tree: Node
    distributions: dict[tuple[str, str], Distribution] = field(default_factory=dict)
    counted: bool = False  # the distributions are those of every score file

    @property
    def ready(self) -> bool:
        """Whether fused values can be computed: its pct columns' distributions are counted (or it has none)."""
        return self.counted or not pct_columns(self.tree)

    @classmethod
    def of(cls, text: str) -> Ranking:
        return cls(text, parse(text))

    def columns(self) -> set[str]:
        return columns_of(self.tree)

    def pct_columns(self) -> list[str]:
        return sorted(pct_columns(self.tree))

    def with_distributions(self, counted: dict[tuple[str, str], Distribution]) -> Ranking:
        return replace(self, distributions=counted, counted=True)

    def check(self, types: dict[str, str], where_from: str) -> None:
        """Every column exists and is a number; a ConfigFieldError naming `rank_by` otherwise."""
        for name in sorted(self.columns()):
            if name not in types:
                raise _error(f"unknown column {name!r}: the columns are {', '.join(sorted(types))} ({where_from})")
            if types[name] != "number":
                raise _error(f"column {name!r} is a {types[name]}, not a number")

    def values(self, table: pa.Table) -> np.ndarray:
        """The fused value of each record of `table` (float32; NaN where it has none)."""
        kinds = np.asarray(table.column("kind").to_pylist(), dtype=object)
        with np.errstate(all="ignore"):
            out = self._eval(self.tree, table, kinds)
        out = np.broadcast_to(np.asarray(out, dtype=np.float64), (table.num_rows,))
        out = np.where(np.isfinite(out), out, np.nan)
        return out.astype(np.float32)

    def _eval(self, node: Node, table: pa.Table, kinds: np.ndarray):
        if isinstance(node, Number):
            return node.value
        if isinstance(node, Col):
            return _numbers(table.column(node.name))
        if isinstance(node, Pct):
            x = _numbers(table.column(node.name))
            out = np.full(len(x), np.nan)
            for kind in np.unique(kinds[kinds != None]):  # noqa: E711 - an object array compared elementwise
                mine = kinds == kind
                d = self.distributions.get((str(kind), node.name))
                if d is not None:
                    out[mine] = d.pct(x[mine])
            return out
        if isinstance(node, Neg):
            return -self._eval(node.operand, table, kinds)
        left, right = self._eval(node.left, table, kinds), self._eval(node.right, table, kinds)
        return {"+": np.add, "-": np.subtract, "*": np.multiply, "/": np.divide}[node.op](left, right)


def _numbers(column: pa.ChunkedArray) -> np.ndarray:
    """A number column as float64, nulls as NaN."""
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float64) if column.null_count == 0 else \
        np.array([np.nan if v is None else v for v in column.to_pylist()], dtype=np.float64)


def distribution_counts(table: pa.Table, scored: np.ndarray, columns: list[str]) -> dict[str, dict]:
    """One score file's part of the distributions: per kind, its scored records and, per column, each distinct
    value with its count (values as float64; NaN and null left out)."""
    kinds = np.asarray(table.column("kind").to_pylist(), dtype=object)
    out: dict[str, dict] = {}
    for kind in sorted({k for k in kinds[scored] if k is not None}):
        mine = scored & (kinds == kind)
        entry = {"scored": int(mine.sum()), "columns": {}}
        for name in columns:
            x = _numbers(table.column(name))[mine]
            values, counts = np.unique(x[~np.isnan(x)], return_counts=True)
            entry["columns"][name] = [values.tolist(), counts.tolist()]
        out[kind] = entry
    return out


def merge_distributions(parts: list[dict[str, dict]]) -> dict[tuple[str, str], Distribution]:
    """The distributions over every score file, from their parts (`distribution_counts`)."""
    scored: dict[str, int] = {}
    pieces: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]] = {}
    for part in parts:
        for kind, entry in part.items():
            scored[kind] = scored.get(kind, 0) + entry["scored"]
            for name, (values, counts) in entry["columns"].items():
                pieces.setdefault((kind, name), []).append((np.asarray(values, np.float64),
                                                            np.asarray(counts, np.int64)))
    out = {}
    for (kind, name), parts_of in pieces.items():
        values = np.concatenate([v for v, _ in parts_of])
        counts = np.concatenate([c for _, c in parts_of])
        distinct, where = np.unique(values, return_inverse=True)
        totals = np.bincount(where, weights=counts, minlength=len(distinct)).astype(np.int64)
        out[(kind, name)] = Distribution(distinct, np.cumsum(totals), scored[kind])
    return out
