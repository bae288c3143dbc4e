"""`--where EXPR`: the curation filter's own small expression language, parsed here (a tokenizer and a
recursive-descent parser) and compiled to a PyArrow compute expression. No user string is ever given to Python's
`eval`: the grammar has no names but columns, no attribute access, no calls, no arithmetic.

    condition  := disjunct ("or" disjunct)*
    disjunct   := negation ("and" negation)*
    negation   := "not" negation | comparison
    comparison := operand [("<" | "<=" | ">" | ">=" | "==" | "!=") operand]   (alone: a boolean column)
    operand    := COLUMN | NUMBER | STRING | "true" | "false" | "(" condition ")"

A comparison sets a column against a literal of its type (a number, a quoted string, true/false) or against
another column. A record whose value is missing (null) fails the comparison. `parse(text)` checks the syntax;
`check(tree, types, where_from)` checks names and types against the joined schema; `expression(tree)` compiles.

An expression is bounded before it runs anywhere: at most `MAX_LENGTH` characters, `MAX_TERMS` comparisons and
`MAX_DEPTH` nested parentheses or `not`s, and numbers that fit the columns' types (a 64-bit integer, a finite
float). A long chain of `and`/`or` compiles to a balanced tree, never a chain as deep as it is long (9,000 `or`
terms built as a chain crashed PyArrow's evaluation with a stack overflow).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import ConfigFieldError

FIELD = "where"
COMPARISONS = ("<=", ">=", "==", "!=", "<", ">")
KEYWORDS = {"and", "or", "not", "true", "false", "True", "False"}
HELP = "compare columns with values, e.g. \"width >= 200 and aspect_ratio <= 3 and not truncated\""

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<number>-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<op><=|>=|==|!=|<|>)
  | (?P<paren>[()])
""", re.VERBOSE)


def _error(problem: str) -> ConfigFieldError:
    return ConfigFieldError(FIELD, f"{problem} ({HELP})")


@dataclass(frozen=True)
class Token:
    kind: str  # number, name, string, op, paren, keyword, end
    text: str
    at: int


def tokenize(text: str) -> list[Token]:
    tokens, at = [], 0
    while at < len(text):
        match = _TOKEN.match(text, at)
        if match is None:
            char = text[at]
            if char == "." and tokens and tokens[-1].kind == "name":
                raise _error(f"attribute access ({tokens[-1].text}.…) is not allowed at position {at}")
            if char == "=":
                raise _error(f"'=' at position {at}: compare with '=='")
            if char in "\"'":
                raise _error(f"a string opened at position {at} is never closed")
            raise _error(f"unexpected character {char!r} at position {at}")
        kind = match.lastgroup
        if kind != "space":
            word = match.group()
            tokens.append(Token("keyword" if kind == "name" and word in KEYWORDS else kind, word, at))
        at = match.end()
    return tokens + [Token("end", "", len(text))]


# -- the tree -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Literal:
    value: float | int | str | bool
    text: str

    @property
    def type(self) -> str:
        return "bool" if isinstance(self.value, bool) else "string" if isinstance(self.value, str) else "number"

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Comparison:
    op: str
    left: Column | Literal
    right: Column | Literal

    def __str__(self) -> str:
        return f"{self.left} {self.op} {self.right}"


@dataclass(frozen=True)
class Not:
    operand: Condition

    def __str__(self) -> str:
        inner = str(self.operand)
        return f"not ({inner})" if isinstance(self.operand, (And, Or)) else f"not {inner}"


@dataclass(frozen=True)
class And:
    items: tuple[Condition, ...]

    def __str__(self) -> str:
        return " and ".join(f"({i})" if isinstance(i, Or) else str(i) for i in self.items)


@dataclass(frozen=True)
class Or:
    items: tuple[Condition, ...]

    def __str__(self) -> str:
        return " or ".join(str(i) for i in self.items)


@dataclass(frozen=True)
class NotIn:
    """A record passes when its `column`'s value is not among `values` (a null passes: it matches nothing). Built
    from a list (`pipeline.curation.exclude`), never parsed: `label` is how it is written back, `digest` what
    identifies the list's content."""

    column: str
    values: tuple[str, ...]
    label: str
    digest: str = ""

    def __str__(self) -> str:
        return self.label


Condition = Column | Comparison | Not | And | Or | NotIn


# -- parsing --------------------------------------------------------------------------------------------------------
MAX_DEPTH = 32  # parentheses and `not`s nested deeper are refused, not a recursion error
MAX_TERMS = 1_000  # comparisons (and boolean columns alone): a filter, not a list of ids
MAX_LENGTH = 65_536  # characters
_INT64 = (-(2**63), 2**63 - 1)


class _Parser:
    def __init__(self, text: str):
        self.tokens = tokenize(text)
        self.i = 0
        self.depth = 0
        self.terms = 0

    def nested(self, parse):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _error(f"nested more than {MAX_DEPTH} deep")
        try:
            return parse()
        finally:
            self.depth -= 1

    @property
    def next(self) -> Token:
        return self.tokens[self.i]

    def take(self) -> Token:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def condition(self) -> Condition:
        items = [self.disjunct()]
        while self.next.text == "or":
            self.take()
            items.append(self.disjunct())
        return items[0] if len(items) == 1 else Or(tuple(items))

    def disjunct(self) -> Condition:
        items = [self.negation()]
        while self.next.text == "and":
            self.take()
            items.append(self.negation())
        return items[0] if len(items) == 1 else And(tuple(items))

    def negation(self) -> Condition:
        if self.next.text == "not":
            self.take()
            return Not(self.nested(self.negation))
        return self.comparison()

    def comparison(self) -> Condition:
        self.terms += 1
        if self.terms > MAX_TERMS:
            raise _error(f"more than {MAX_TERMS} comparisons")
        left = self.operand()
        if self.next.kind != "op":
            if isinstance(left, Literal):
                raise _error(f"{left} alone is not a condition")
            return left
        op = self.take().text
        right = self.operand()
        if not isinstance(left, (Column, Literal)) or not isinstance(right, (Column, Literal)):
            raise _error(f"'{op}' compares a column with a value, not conditions")
        if isinstance(left, Literal) and isinstance(right, Literal):
            raise _error(f"'{left} {op} {right}' compares two values: name a column")
        if self.next.kind == "op":
            raise _error(f"comparisons do not chain ('{self.next.text}' at position {self.next.at}): join them "
                         "with 'and'")
        return Comparison(op, left, right)

    def operand(self) -> Condition | Literal:
        token = self.take()
        if token.kind == "paren" and token.text == "(":
            inner = self.nested(self.condition)
            if self.take().text != ")":
                raise _error(f"a parenthesis opened at position {token.at} is never closed")
            return inner
        if token.kind == "name":
            if self.next.text == "(":
                raise _error(f"calls are not allowed ({token.text}(…) at position {token.at})")
            if token.text.startswith("__"):
                raise _error(f"{token.text!r} is not a column")
            return Column(token.text)
        if token.kind == "number":
            return _number(token)
        if token.kind == "string":
            return Literal(re.sub(r"\\(.)", r"\1", token.text[1:-1]), token.text)
        if token.text in ("true", "True", "false", "False"):
            return Literal(token.text.lower() == "true", token.text.lower())
        if token.kind == "end":
            raise _error("the expression ends where a column or value was expected")
        raise _error(f"unexpected {token.text!r} at position {token.at}")


def _number(token: Token) -> Literal:
    """An integer literal is exact and 64-bit (what PyArrow compares integer columns with), any other number a
    finite float: a literal past either is refused here, never an overflow while a shard is evaluated."""
    text = token.text
    if re.fullmatch(r"-?\d+", text):
        digits = text.lstrip("-").lstrip("0") or "0"
        value = int(digits) * (-1 if text.startswith("-") else 1) if len(digits) <= 19 else None
        if value is None or not _INT64[0] <= value <= _INT64[1]:
            raise _error(f"the integer {_shortened(text)} at position {token.at} does not fit 64 bits (write it as "
                         "a float, e.g. 1e20, to compare with it)")
        return Literal(value, text)
    value = float(text)
    if not math.isfinite(value):
        raise _error(f"the number {_shortened(text)} at position {token.at} is too large for a 64-bit float")
    return Literal(value, text)


def _shortened(text: str) -> str:
    return text if len(text) <= 24 else f"{text[:10]}…{text[-4:]} ({len(text)} characters)"


def parse(text: str) -> Condition:
    """The condition `text` states; a ConfigFieldError naming `where` for anything outside the grammar or its
    bounds."""
    if len(text) > MAX_LENGTH:
        raise _error(f"the expression is {len(text):,} characters long, over the limit of {MAX_LENGTH:,}")
    parser = _Parser(text)
    if parser.next.kind == "end":
        raise _error("the expression is empty")
    tree = parser.condition()
    if parser.next.kind != "end":
        raise _error(f"unexpected {parser.next.text!r} at position {parser.next.at}")
    return tree


def conjuncts(tree: Condition) -> list[Condition]:
    """The terms a record must pass all of (`a and b and c` -> a, b, c): each is counted on its own."""
    return list(tree.items) if isinstance(tree, And) else [tree]


def columns_of(tree: Condition | Literal) -> set[str]:
    if isinstance(tree, Column):
        return {tree.name}
    if isinstance(tree, NotIn):
        return {tree.column}
    if isinstance(tree, Comparison):
        return columns_of(tree.left) | columns_of(tree.right)
    if isinstance(tree, Not):
        return columns_of(tree.operand)
    if isinstance(tree, (And, Or)):
        return set().union(*(columns_of(i) for i in tree.items))
    return set()


def check(tree: Condition, types: dict[str, str], where_from: str) -> None:
    """Every column exists in `types` (name -> number, string, bool or another type's name) and every comparison
    sets a column against its own type; `where_from` says where the columns came from, for the message."""
    for name in sorted(columns_of(tree)):
        if name not in types:
            if isinstance(tree, NotIn):
                raise ConfigFieldError("exclude", f"{tree.label[len('exclude:'):]} matches the column {name!r}, "
                                                  f"which is unknown: the columns are {', '.join(sorted(types))} "
                                                  f"({where_from})")
            raise _error(f"unknown column {name!r}: the columns are {', '.join(sorted(types))} ({where_from})")
    _check_types(tree, types)


def _check_types(tree: Condition, types: dict[str, str]) -> None:
    if isinstance(tree, NotIn):
        if types[tree.column] != "string":
            raise ConfigFieldError("exclude", f"{tree.label[len('exclude:'):]} matches the column {tree.column!r}, "
                                              f"a {types[tree.column]}: a list matches a string column (id, key, "
                                              "url, sha256)")
    elif isinstance(tree, Column):
        if types[tree.name] != "bool":
            raise _error(f"column {tree.name!r} is a {types[tree.name]}, not true/false: compare it with a value")
    elif isinstance(tree, Comparison):
        sides = [types[s.name] if isinstance(s, Column) else s.type for s in (tree.left, tree.right)]
        if any(t not in ("number", "string", "bool") for t in sides) or sides[0] != sides[1]:
            raise _error(f"'{tree}' compares a {sides[0]} with a {sides[1]}")
        if "bool" in sides and tree.op not in ("==", "!="):
            raise _error(f"'{tree}': true/false compare only with == and !=")
    elif isinstance(tree, Not):
        _check_types(tree.operand, types)
    else:
        for item in tree.items:
            _check_types(item, types)


def expression(tree: Condition) -> pc.Expression:
    """The condition as a PyArrow compute expression (null where a value it reads is missing)."""
    if isinstance(tree, Column):
        return pc.field(tree.name)
    if isinstance(tree, NotIn):
        return ~pc.field(tree.column).isin(pa.array(tree.values, pa.string()))
    if isinstance(tree, Comparison):
        left, right = (pc.field(s.name) if isinstance(s, Column) else pc.scalar(s.value)
                       for s in (tree.left, tree.right))
        return {"<": left < right, "<=": left <= right, ">": left > right, ">=": left >= right,
                "==": left == right, "!=": left != right}[tree.op]
    if isinstance(tree, Not):
        return ~expression(tree.operand)
    parts = [expression(i) for i in tree.items]
    while len(parts) > 1:  # pairwise: a tree as deep as log2 of the terms (Kleene and/or are associative)
        pairs = zip(parts[0::2], parts[1::2])
        joined = [(a & b) if isinstance(tree, And) else (a | b) for a, b in pairs]
        parts = joined + parts[len(parts) - len(parts) % 2:]
    return parts[0]
