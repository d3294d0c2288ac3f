"""A whitelist parser/evaluator for small integer arithmetic, used by the task rewards.

Model text is never passed to ``eval``: it is tokenized against a fixed alphabet and parsed by a
recursive-descent parser with hard limits, so every public function returns ``None`` on bad input
instead of raising, and runs in time linear in a capped input length.

Grammar (standard precedence, left-associative)::

    expr    := term (("+" | "-") term)*
    term    := unary (("*" | "/") unary)*
    unary   := "-" unary | primary
    primary := INT | "(" expr ")"

``INT`` is a non-negative decimal literal of at most ``MAX_DIGITS`` ASCII digits without leading zeros.
Spaces and tabs between tokens are ignored. Division must be exact (``7/2`` and ``1/0`` are rejected),
and every intermediate value must satisfy ``|x| <= MAX_ABS``.
"""

from __future__ import annotations

MAX_EXPR_CHARS = 200
MAX_DEPTH = 32
MAX_DIGITS = 6
MAX_ABS = 10**9
MAX_COMPLETION_CHARS = 4096

_DIGITS = frozenset("0123456789")
_SYMBOLS = frozenset("+-*/()")
_SPACES = frozenset(" \t")


class _Reject(Exception):
    """Internal signal: the input is not a valid expression (never escapes this module)."""


def _tokenize(text: str) -> list[str]:
    """Split ``text`` into integer literals and single-character symbols, or raise ``_Reject``."""
    tokens: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in _SPACES:
            i += 1
        elif c in _SYMBOLS:
            tokens.append(c)
            i += 1
        elif c in _DIGITS:
            j = i
            while j < n and text[j] in _DIGITS:
                j += 1
            literal = text[i:j]
            if j - i > MAX_DIGITS or (literal[0] == "0" and len(literal) > 1):
                raise _Reject
            tokens.append(literal)
            i = j
        else:
            raise _Reject
    return tokens


class _Parser:
    """Recursive-descent evaluator over a token list; records the integer literals it reads."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.depth = 0
        self.literals: list[int] = []

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise _Reject
        self.pos += 1
        return tok

    def expr(self) -> int:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            rhs = self.term()
            value = _checked(value + rhs if op == "+" else value - rhs)
        return value

    def term(self) -> int:
        value = self.unary()
        while self.peek() in ("*", "/"):
            op = self.take()
            rhs = self.unary()
            if op == "*":
                value = _checked(value * rhs)
            elif rhs == 0 or value % rhs != 0:
                raise _Reject
            else:
                value = _checked(value // rhs)
        return value

    def unary(self) -> int:
        if self.peek() != "-":
            return self.primary()
        self.take()
        self.enter()
        value = -self.unary()
        self.depth -= 1
        return value

    def primary(self) -> int:
        tok = self.take()
        if tok == "(":
            self.enter()
            value = self.expr()
            if self.take() != ")":
                raise _Reject
            self.depth -= 1
            return value
        if tok[0] in _DIGITS:
            self.literals.append(int(tok))
            return int(tok)
        raise _Reject

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Reject


def _checked(value: int) -> int:
    if abs(value) > MAX_ABS:
        raise _Reject
    return value


def evaluate_with_literals(text: str) -> tuple[int, list[int]] | None:
    """Value of the expression ``text`` and the integer literals it uses (in order), or ``None``."""
    if not isinstance(text, str) or len(text) > MAX_EXPR_CHARS:
        return None
    try:
        parser = _Parser(_tokenize(text))
        value = parser.expr()
        if parser.pos != len(parser.tokens):
            return None
        return value, parser.literals
    except _Reject:
        return None


def evaluate(text: str) -> int | None:
    """Value of the expression ``text``, or ``None`` if it is not a valid expression."""
    result = evaluate_with_literals(text)
    return None if result is None else result[0]


def parse_int(text: str) -> int | None:
    """A plain integer literal with optional leading ``-`` (e.g. ``"-12"``), or ``None``."""
    if not isinstance(text, str) or not 1 <= len(text) <= MAX_DIGITS + 1:
        return None
    digits = text[1:] if text[0] == "-" else text
    if not digits or any(c not in _DIGITS for c in digits) or (digits[0] == "0" and len(digits) > 1):
        return None
    return int(text)


def final_answer(completion: str, max_chars: int = MAX_COMPLETION_CHARS) -> str | None:
    """The stripped text after ``A:`` on the last line that starts with ``A:`` (leading spaces allowed).

    Returns ``None`` if there is no such line, or if the completion is longer than ``max_chars`` (default
    ``MAX_COMPLETION_CHARS``; over-long completions are rejected outright, not truncated).
    """
    if not isinstance(completion, str) or len(completion) > max_chars:
        return None
    for line in reversed(completion.split("\n")):
        line = line.strip(" \t\r")
        if line.startswith("A:"):
            return line[2:].strip(" \t\r")
    return None


def integer_answer_reward(completion: str, answer: str, format_reward: float) -> float:
    """1.0 if the final ``A:`` line is the integer ``answer``; ``format_reward`` for another integer; else 0.0."""
    text = final_answer(completion)
    value = None if text is None else parse_int(text)
    if value is None:
        return 0.0
    return 1.0 if value == int(answer) else format_reward
