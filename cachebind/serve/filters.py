"""A strict SQL-style metadata filter, compiled to a pyarrow compute expression.

The grammar is a small, allow-listed subset of SQL ``WHERE``::

    expr      := or
    or        := and ("OR" and)*
    and       := unary ("AND" unary)*
    unary     := "NOT" unary | "(" expr ")" | predicate
    predicate := column op literal
               | column ["NOT"] "LIKE" string
               | column ["NOT"] "IN" "(" literal ("," literal)* ")"
               | column "IS" ["NOT"] "NULL"
               | column ["NOT"] "BETWEEN" literal "AND" literal
    op        := "=" | "!=" | "<>" | "<" | "<=" | ">" | ">="

Columns are limited to the table's metadata (never the vector or the thumbnail), literals are
typed against their column, and nothing of the client's text reaches a SQL engine: the parser
builds a pyarrow expression that filters candidate rows already fetched by id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pyarrow.compute as pc

INT_COLUMNS = frozenset({"id", "width", "height"})
STRING_COLUMNS = frozenset({"key", "caption", "url", "shard"})
COLUMNS = INT_COLUMNS | STRING_COLUMNS
MAX_FILTER_CHARS = 2000
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_DEPTH = 32

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<number>-?\d+(?:\.\d+)?)
      | (?P<string>'(?:[^']|'')*')
      | (?P<op><=|>=|<>|!=|=|<|>)
      | (?P<punct>[(),])
      | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
    )""",
    re.VERBOSE,
)
_KEYWORDS = frozenset({"AND", "OR", "NOT", "LIKE", "IN", "IS", "NULL", "BETWEEN"})


class FilterError(ValueError):
    """The filter is not in the allowed grammar; the message says where and why."""


@dataclass(frozen=True)
class Token:
    kind: str  # number | string | op | punct | word | keyword | end
    value: Any
    pos: int


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise FilterError(f"unexpected character {text[pos:].lstrip()[:1]!r} at {pos}")
        kind = m.lastgroup or ""
        raw = m.group(kind)
        start = m.start(kind)
        if kind == "number":
            # Exact: every numeric column is an integer one (see literal()).
            value: Any = Decimal(raw) if "." in raw else int(raw)
        elif kind == "string":
            value = raw[1:-1].replace("''", "'")
        elif kind == "word" and raw.upper() in _KEYWORDS:
            kind, value = "keyword", raw.upper()
        else:
            value = raw
        tokens.append(Token(kind, value, start))
        pos = m.end()
    tokens.append(Token("end", None, len(text)))
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = tokenize(text)
        self.i = 0
        self.depth = 0

    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def take(self) -> Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def accept(self, kind: str, value: Any = None) -> bool:
        if self.tok.kind == kind and (value is None or self.tok.value == value):
            self.i += 1
            return True
        return False

    def expect(self, kind: str, value: Any = None, what: str = "") -> Token:
        tok = self.tok
        if tok.kind != kind or (value is not None and tok.value != value):
            found = "end of filter" if tok.kind == "end" else repr(tok.value)
            raise FilterError(f"expected {what or value or kind} at {tok.pos}, found {found}")
        self.i += 1
        return tok

    def parse(self) -> pc.Expression:
        expr = self.or_()
        if self.tok.kind != "end":
            raise FilterError(f"unexpected {self.tok.value!r} at {self.tok.pos}")
        return expr

    def or_(self) -> pc.Expression:
        expr = self.and_()
        while self.accept("keyword", "OR"):
            expr = expr | self.and_()
        return expr

    def and_(self) -> pc.Expression:
        expr = self.unary()
        while self.accept("keyword", "AND"):
            expr = expr & self.unary()
        return expr

    def unary(self) -> pc.Expression:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise FilterError(f"filter nested deeper than {MAX_DEPTH}")
        try:
            if self.accept("keyword", "NOT"):
                return ~self.unary()
            if self.accept("punct", "("):
                expr = self.or_()
                self.expect("punct", ")", "')'")
                return expr
            return self.predicate()
        finally:
            self.depth -= 1

    def column(self) -> str:
        tok = self.tok
        if tok.kind != "word":
            found = "end of filter" if tok.kind == "end" else repr(tok.value)
            raise FilterError(f"expected a column name at {tok.pos}, found {found}")
        name = tok.value.lower()
        if name not in COLUMNS:
            raise FilterError(
                f"unknown column {tok.value!r} at {tok.pos}; allowed: {', '.join(sorted(COLUMNS))}"
            )
        self.i += 1
        return name

    def literal(self, column: str) -> Any:
        tok = self.take()
        if column in INT_COLUMNS:
            if tok.kind != "number":
                raise FilterError(f"column {column!r} is numeric: expected a number at {tok.pos}")
            value = tok.value
            # The columns hold whole numbers. "2.0" is 2; a fraction is the client's error
            # (arrow would compare the column to it in float32 and fail past 2^24, and row ids
            # are 63-bit).
            if isinstance(value, Decimal):
                if value != value.to_integral_value():
                    raise FilterError(
                        f"column {column!r} holds whole numbers: expected one at {tok.pos}, "
                        f"found {value}"
                    )
                value = int(value)
            # The columns are int64: a literal beyond it cannot become an arrow scalar.
            if not INT64_MIN <= value <= INT64_MAX:
                raise FilterError(f"number at {tok.pos} is out of the 64-bit integer range")
            return value
        if tok.kind != "string":
            raise FilterError(f"column {column!r} is text: expected a 'quoted string' at {tok.pos}")
        return tok.value

    def predicate(self) -> pc.Expression:
        column = self.column()
        field = pc.field(column)
        if self.tok.kind == "op":
            op = self.take().value
            value = self.literal(column)
            return {
                "=": field == value,
                "!=": field != value,
                "<>": field != value,
                "<": field < value,
                "<=": field <= value,
                ">": field > value,
                ">=": field >= value,
            }[op]
        if self.accept("keyword", "IS"):
            negate = self.accept("keyword", "NOT")
            self.expect("keyword", "NULL", "NULL")
            return field.is_valid() if negate else field.is_null()
        negate = self.accept("keyword", "NOT")
        if self.accept("keyword", "LIKE"):
            if column not in STRING_COLUMNS:
                raise FilterError(f"LIKE needs a text column, {column!r} is numeric")
            pattern = self.literal(column)
            expr = pc.match_like(field, pattern)
        elif self.accept("keyword", "IN"):
            self.expect("punct", "(", "'('")
            values = [self.literal(column)]
            while self.accept("punct", ","):
                values.append(self.literal(column))
            self.expect("punct", ")", "')'")
            expr = field.isin(values)
        elif self.accept("keyword", "BETWEEN"):
            low = self.literal(column)
            self.expect("keyword", "AND", "AND")
            high = self.literal(column)
            expr = (field >= low) & (field <= high)
        else:
            tok = self.tok
            found = "end of filter" if tok.kind == "end" else repr(tok.value)
            raise FilterError(
                f"expected an operator (=, !=, <, <=, >, >=, LIKE, IN, IS, BETWEEN) after "
                f"{column!r} at {tok.pos}, found {found}"
            )
        return ~expr if negate else expr


def parse_filter(text: str) -> pc.Expression:
    """Compile ``text`` to a pyarrow expression over the metadata columns.

    Raises FilterError (a ValueError) with the position and reason of the first problem.
    """
    if len(text) > MAX_FILTER_CHARS:
        raise FilterError(f"filter longer than {MAX_FILTER_CHARS} characters")
    if not text.strip():
        raise FilterError("filter is empty")
    return _Parser(text).parse()


def filter_columns() -> list[str]:
    """The columns a filter may name, which the search fetches for candidate rows."""
    return sorted(COLUMNS)
