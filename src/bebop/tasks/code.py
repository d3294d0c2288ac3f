"""Code: write a tiny program (the language of ``bebop.tasks.interp``) that computes a requested value.

Prompts (four kinds, small numbers)::

    Q: code: start at 12, then 5 times add 7          -> 12 + 7*5
    Q: code: start at 30, then 3 times subtract 4     -> 30 - 4*3
    Q: code: start at 3, then 4 times multiply by 2   -> 3 * 2**4
    Q: code: sum of 4 to 9                            -> 4+5+...+9

Completion: program lines, then a final answer line ``A: <expr>`` whose expression is evaluated over the
program's variables, e.g. ``x = 12\\nrepeat 5:\\n  x = x+7\\nA: x``.

Reward: 1.0 iff the lines before the last ``A:`` line run without error within the interpreter's limits
and the ``A:`` expression then evaluates to the requested value; the text is never run as Python. The
answer expression may be any expression over the program's variables, a bare integer included: the reward
grades the value the program computes, not its shape. ``print`` output is ignored. Any syntax error,
undefined variable, exceeded limit or missing ``A:`` line gives 0.0 (or ``format_reward`` if the program
ran and the answer evaluated to a wrong value).

Reference programs are deliberately varied (all correct): a loop on the value, a loop with the step in its
own variable, a loop accumulating from 0 (or 1) combined with the start in the ``A:`` line, straight-line
arithmetic in one or two lines, or ``A: <expr>`` alone; statement order and the operand order of ``+`` and
``*`` are random. Variable names vary over two per role only (``x``/``y`` for the value, ``s``/``t`` for a
helper): with eight free names a 1.6M-parameter policy sampled a fresh name at each use after a 15-minute SFT
(undefined variables were most of its errors at τ = 1). Prompt plus program stay under ~60 tokens.
"""

from __future__ import annotations

import random

from bebop.tasks.arith import check_format_reward
from bebop.tasks.base import Problem
from bebop.tasks.grammar import MAX_COMPLETION_CHARS
from bebop.tasks.interp import evaluate_expression, run

KINDS = ("add", "sub", "mul", "sum")
VALUE_NAMES = ("x", "y")  # the result (or the running total of a sum)
AUX_NAMES = ("s", "t")  # a step, accumulator or counter
INDENT = "  "


def _ints(kind: str, rng: random.Random) -> tuple[int, int, int]:
    """``(start, step, count)`` for a kind (for ``sum``: ``(first, last, count)``)."""
    if kind == "add":
        return rng.randint(0, 20), rng.randint(2, 9), rng.randint(2, 6)
    if kind == "sub":
        return rng.randint(10, 40), rng.randint(2, 9), rng.randint(2, 5)
    if kind == "mul":
        return rng.randint(1, 5), rng.randint(2, 3), rng.randint(2, 4)
    first = rng.randint(1, 9)
    last = first + rng.randint(2, 6)
    return first, last, last - first + 1


def split_program(completion: str) -> tuple[str, str] | None:
    """``(program, answer expression)``: the text before the last ``A:`` line and what follows ``A:``."""
    if not isinstance(completion, str) or len(completion) > MAX_COMPLETION_CHARS:
        return None
    lines = completion.split("\n")
    for k in range(len(lines) - 1, -1, -1):
        line = lines[k].strip(" \t\r")
        if line.startswith("A:"):
            return "\n".join(lines[:k]), line[2:].strip(" \t\r")
    return None


def program_value(completion: str) -> int | None:
    """The value of the ``A:`` expression after running the program before it, or ``None`` on any error."""
    parts = split_program(completion)
    if parts is None:
        return None
    result = run(parts[0])
    return evaluate_expression(parts[1], result.variables) if result.ok else None


class CodeTask:
    """Write a program in the tiny interpreted language; reward 1.0 iff its ``A:`` value is the request."""

    name = "code"

    def __init__(self, format_reward: float = 0.0) -> None:
        self.format_reward = check_format_reward(format_reward)

    def sample_problem(self, rng: random.Random) -> Problem:
        kind = rng.choice(KINDS)
        a, b, n = _ints(kind, rng)
        if kind == "sum":
            spec, answer = f"sum of {a} to {b}", sum(range(a, b + 1))
        else:
            verb = {"add": "add", "sub": "subtract", "mul": "multiply by"}[kind]
            spec = f"start at {a}, then {n} times {verb} {b}"
            answer = a + b * n if kind == "add" else a - b * n if kind == "sub" else a * b**n
        return Problem(
            prompt=f"Q: code: {spec}\n",
            answer=str(answer),
            data={"kind": kind, "a": a, "b": b, "n": n},
        )

    def reference_solution(self, problem: Problem, rng: random.Random) -> str:
        d = problem.data
        kind, a, b, n = d["kind"], d["a"], d["b"], d["n"]
        v, s = rng.choice(VALUE_NAMES), rng.choice(AUX_NAMES)
        lines = _sum_program(a, b, n, v, s, rng) if kind == "sum" else _step_program(kind, a, b, n, v, s, rng)
        return "\n".join(lines)

    def reward(self, problem: Problem, completion: str) -> float:
        value = program_value(completion)
        if value is None:
            return 0.0
        return 1.0 if value == int(problem.answer) else self.format_reward


def _swap(x: str, op: str, y: str, rng: random.Random) -> str:
    """``x op y``, with the operands of ``+`` and ``*`` randomly commuted."""
    return f"{y}{op}{x}" if op in "+*" and rng.random() < 0.5 else f"{x}{op}{y}"


def _step_program(kind: str, a: int, b: int, n: int, v: str, s: str, rng: random.Random) -> list[str]:
    """A program for ``start at a, then n times <op> b`` (op ``+``, ``-`` or ``*``)."""
    op = {"add": "+", "sub": "-", "mul": "*"}[kind]
    style = rng.randrange(5)
    if style == 0:  # loop on the value
        return [f"{v} = {a}", f"repeat {n}:", f"{INDENT}{v} = {_swap(v, op, str(b), rng)}", f"A: {v}"]
    if style == 1:  # step in its own variable
        init = [f"{v} = {a}", f"{s} = {b}"]
        rng.shuffle(init)
        return [*init, f"repeat {n}:", f"{INDENT}{v} = {_swap(v, op, s, rng)}", f"A: {v}"]
    if style == 2:  # accumulate the total effect, then combine with the start
        unit, acc = ("1", "*") if op == "*" else ("0", "+")
        return [f"{s} = {unit}", f"repeat {n}:", f"{INDENT}{s} = {_swap(s, acc, str(b), rng)}",
                f"A: {_swap(str(a), op, s, rng)}"]
    total = "*".join([str(b)] * n) if op == "*" else _swap(str(b), "*", str(n), rng)
    if op == "*":
        expr = _swap(str(a), "*", total, rng)
    else:
        expr = _swap(str(a), op, total, rng) if op == "+" else f"{a}-{total}"
    if style == 3 and op != "*":  # two straight lines
        return [f"{s} = {total}", f"{v} = {_swap(str(a), op, s, rng)}", f"A: {v}"]
    if style == 3 or rng.random() < 0.5:
        return [f"{v} = {expr}", f"A: {v}"]
    return [f"A: {expr}"]


def _sum_program(a: int, b: int, n: int, total: str, i: str, rng: random.Random) -> list[str]:
    """A program for ``sum of a to b`` (``n = b - a + 1`` terms)."""
    style = rng.randrange(3)
    if style == 2:
        expr = "+".join(str(x) for x in range(a, b + 1))
        return [f"{total} = {expr}", f"A: {total}"] if rng.random() < 0.5 else [f"A: {expr}"]
    add = f"{INDENT}{total} = {_swap(total, '+', i, rng)}"
    step = f"{INDENT}{i} = {_swap(i, '+', '1', rng)}"
    init = [f"{total} = 0", f"{i} = {a if style == 0 else a - 1}"]
    rng.shuffle(init)
    body = [add, step] if style == 0 else [step, add]
    return [*init, f"repeat {n}:", *body, f"A: {total}"]
