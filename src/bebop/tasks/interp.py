"""A tiny, safe integer language that Bebop defines and interprets itself (the ``code`` task's runtime).

Model text is never passed to ``eval`` or ``exec``: it is checked against a fixed alphabet, parsed into a
small tree by a hand-written parser, and walked by an interpreter with hard limits. ``run`` never raises;
any syntax error, undefined variable or exceeded limit comes back as ``RunResult.error``.

Grammar (one statement per line; blank lines are ignored)::

    stmt    := NAME "=" expr
             | "print" expr
             | "repeat" INT ":"            # body: the following lines, indented deeper (spaces only)
    expr    := term (("+" | "-") term)*
    term    := unary ("*" unary)*
    unary   := "-" unary | primary
    primary := INT | NAME | "(" expr ")"

``NAME`` is 1..``MAX_NAME`` lowercase ASCII letters and not a keyword (``repeat``, ``print``). ``INT`` is a
decimal literal of at most ``MAX_DIGITS`` digits without leading zeros. A ``repeat`` body is a block of at
least one line, all at the indentation of its first line (nested blocks deeper still); a line indented
deeper or shallower than its block is an error. The loop count is a literal in 0..``MAX_REPEAT``, so every
loop is bounded before it starts. Example::

    x = 5
    repeat 4:
      x = x+3
    print x

Limits (each violation is an error, never a hang): source length and line count, line length, loop count,
loop nesting depth, expression depth, number of executed statements, ``|value| <= MAX_ABS`` for every
intermediate result, number of variables and number of ``print`` outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_SOURCE_CHARS = 2000
MAX_LINES = 64
MAX_LINE_CHARS = 120
MAX_NAME = 8
MAX_DIGITS = 6
MAX_REPEAT = 100
MAX_NESTING = 4
MAX_EXPR_DEPTH = 16
MAX_STEPS = 2000
MAX_ABS = 10**9
MAX_VARS = 16
MAX_OUTPUT = 16

KEYWORDS = frozenset({"repeat", "print"})
_LETTERS = frozenset("abcdefghijklmnopqrstuvwxyz")
_DIGITS = frozenset("0123456789")
_SYMBOLS = frozenset("+-*()=:")
_ALPHABET = _LETTERS | _DIGITS | _SYMBOLS | frozenset(" \n")

# Expression tree: ("int", value) | ("var", name) | ("neg", expr) | (op, left, right) with op in "+-*".
Expr = tuple
# Statement tree: ("set", name, expr) | ("print", expr) | ("repeat", count, [stmt, ...]).
Stmt = tuple


class _Reject(Exception):
    """Internal signal carrying the reason a program is rejected (never escapes this module)."""


@dataclass(frozen=True)
class RunResult:
    """Outcome of ``run``: final variables, printed values, executed statements and the error, if any."""

    variables: dict[str, int] = field(default_factory=dict)
    output: tuple[int, ...] = ()
    steps: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _tokenize(text: str) -> list[str]:
    """Split one line's text into literals, names and single-character symbols, or raise ``_Reject``."""
    tokens: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == " ":
            i += 1
        elif c in _SYMBOLS:
            tokens.append(c)
            i += 1
        elif c in _DIGITS or c in _LETTERS:
            kind = _DIGITS if c in _DIGITS else _LETTERS
            j = i
            while j < n and text[j] in kind:
                j += 1
            word = text[i:j]
            if kind is _DIGITS and (len(word) > MAX_DIGITS or (word[0] == "0" and len(word) > 1)):
                raise _Reject("bad integer literal")
            if kind is _LETTERS and len(word) > MAX_NAME:
                raise _Reject("name too long")
            tokens.append(word)
            i = j
        else:
            raise _Reject("bad character")
    return tokens


class _ExprParser:
    """Recursive-descent parser from tokens to an expression tree, with a depth limit."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.depth = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise _Reject("incomplete expression")
        self.pos += 1
        return tok

    def parse(self) -> Expr:
        tree = self.expr()
        if self.pos != len(self.tokens):
            raise _Reject("unexpected token")
        return tree

    def expr(self) -> Expr:
        tree = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            tree = (op, tree, self.term())
        return tree

    def term(self) -> Expr:
        tree = self.unary()
        while self.peek() == "*":
            self.take()
            tree = ("*", tree, self.unary())
        return tree

    def unary(self) -> Expr:
        if self.peek() != "-":
            return self.primary()
        self.take()
        self.enter()
        tree = ("neg", self.unary())
        self.depth -= 1
        return tree

    def primary(self) -> Expr:
        tok = self.take()
        if tok == "(":
            self.enter()
            tree = self.expr()
            if self.take() != ")":
                raise _Reject("unbalanced parenthesis")
            self.depth -= 1
            return tree
        if tok[0] in _DIGITS:
            return ("int", int(tok))
        if tok[0] in _LETTERS and tok not in KEYWORDS:
            return ("var", tok)
        raise _Reject("unexpected token")

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_EXPR_DEPTH:
            raise _Reject("expression too deep")


def _parse_expr(text: str) -> Expr:
    return _ExprParser(_tokenize(text)).parse()


def _parse_statement(text: str) -> Stmt:
    """One statement line without indentation; a ``repeat`` comes back with an empty body."""
    tokens = _tokenize(text)
    if not tokens:
        raise _Reject("empty statement")
    head = tokens[0]
    if head == "repeat":
        if len(tokens) != 3 or tokens[2] != ":" or tokens[1][0] not in _DIGITS:
            raise _Reject("bad repeat")
        count = int(tokens[1])
        if count > MAX_REPEAT:
            raise _Reject("loop count limit")
        return ("repeat", count, [])
    if head == "print":
        return ("print", _ExprParser(tokens[1:]).parse())
    if len(tokens) >= 2 and tokens[1] == "=" and head[0] in _LETTERS and head not in KEYWORDS:
        return ("set", head, _ExprParser(tokens[2:]).parse())
    raise _Reject("bad statement")


def _parse_program(source: str) -> list[Stmt]:
    """The statement tree of ``source``; raises ``_Reject`` (internal) on any error or exceeded limit."""
    if not isinstance(source, str) or len(source) > MAX_SOURCE_CHARS:
        raise _Reject("program too long")
    if not set(source) <= _ALPHABET:
        raise _Reject("bad character")
    lines: list[tuple[int, str]] = []
    for raw in source.split("\n"):
        if len(raw) > MAX_LINE_CHARS:
            raise _Reject("line too long")
        text = raw.lstrip(" ")
        if text.strip(" "):
            lines.append((len(raw) - len(text), text.rstrip(" ")))
    if len(lines) > MAX_LINES:
        raise _Reject("too many lines")

    def block(i: int, indent: int, nesting: int) -> tuple[list[Stmt], int]:
        stmts: list[Stmt] = []
        while i < len(lines) and lines[i][0] >= indent:
            if lines[i][0] != indent:
                raise _Reject("unexpected indent")
            stmt = _parse_statement(lines[i][1])
            i += 1
            if stmt[0] == "repeat":
                if nesting >= MAX_NESTING:
                    raise _Reject("nesting limit")
                if i >= len(lines) or lines[i][0] <= indent:
                    raise _Reject("empty repeat body")
                body, i = block(i, lines[i][0], nesting + 1)
                stmt[2].extend(body)
            stmts.append(stmt)
        return stmts, i

    program, end = block(0, 0, 0)
    if end != len(lines):
        raise _Reject("unexpected indent")
    return program


class _Machine:
    """Walks a statement tree, counting steps and checking every value against the limits."""

    def __init__(self) -> None:
        self.variables: dict[str, int] = {}
        self.output: list[int] = []
        self.steps = 0

    def execute(self, stmts: list[Stmt]) -> None:
        for stmt in stmts:
            if self.steps >= MAX_STEPS:
                raise _Reject("step limit")
            self.steps += 1
            kind = stmt[0]
            if kind == "set":
                if stmt[1] not in self.variables and len(self.variables) >= MAX_VARS:
                    raise _Reject("too many variables")
                self.variables[stmt[1]] = self.value(stmt[2])
            elif kind == "print":
                if len(self.output) >= MAX_OUTPUT:
                    raise _Reject("output limit")
                self.output.append(self.value(stmt[1]))
            else:
                for _ in range(stmt[1]):
                    self.execute(stmt[2])

    def value(self, tree: Expr) -> int:
        kind = tree[0]
        if kind == "int":
            return _checked(tree[1])
        if kind == "var":
            if tree[1] not in self.variables:
                raise _Reject("undefined variable")
            return self.variables[tree[1]]
        if kind == "neg":
            return -self.value(tree[1])
        a, b = self.value(tree[1]), self.value(tree[2])
        return _checked(a + b if kind == "+" else a - b if kind == "-" else a * b)


def _checked(value: int) -> int:
    if abs(value) > MAX_ABS:
        raise _Reject("value limit")
    return value


def run(source: str) -> RunResult:
    """Run ``source``; the result's ``error`` names the first problem (syntax or limit), else is ``None``."""
    machine = _Machine()
    try:
        machine.execute(_parse_program(source))
    except _Reject as e:
        return RunResult(dict(machine.variables), tuple(machine.output), machine.steps, str(e))
    except RecursionError:  # unreachable within the limits above; a last line of defence
        return RunResult(steps=machine.steps, error="recursion limit")
    return RunResult(dict(machine.variables), tuple(machine.output), machine.steps)


def evaluate_expression(text: str, variables: dict[str, int] | None = None) -> int | None:
    """Value of the expression ``text`` over ``variables`` (same grammar and limits), or ``None``."""
    if not isinstance(text, str) or len(text) > MAX_LINE_CHARS or not set(text) <= _ALPHABET - {"\n"}:
        return None
    machine = _Machine()
    machine.variables = dict(variables or {})
    try:
        return machine.value(_parse_expr(text))
    except (_Reject, RecursionError):
        return None
