"""Countdown: reach a target from given numbers with ``+ - * /``.

Prompt: ``Q: 3 5 7 -> 22\\n`` (3 or 4 numbers in 1..12; the target is in 1..100, reachable, and not
itself one of the numbers). Reference solution: one step per line, then the graded expression, e.g.
``5*3=15\\n15+7=22\\nA: (5*3)+7``.

Rules (what the reward accepts): any expression over the grammar in ``bebop.tasks.grammar`` whose
value is the target and whose integer literals form a sub-multiset of the given numbers, i.e. each
given number is used **at most once** (as in the TV game; unused numbers are fine). Division must be
exact. The reward never looks at the reference solution or ``Problem.answer``.

Reference solutions are drawn uniformly from all step sequences that reach the target (enumerated by
brute force; steps keep intermediates positive and skip ``*1`` and ``/1``), with ``+`` and ``*``
operands randomly commuted and each step phrased like ``5*3=15``, ``5*3 = 15``, ``so 5*3=15`` or
``then 5*3=15``, so a policy trained on them has real entropy.
"""

from __future__ import annotations

import random
from collections import Counter
from functools import lru_cache

from bebop.tasks.arith import PHRASINGS, check_format_reward
from bebop.tasks.base import Problem
from bebop.tasks.grammar import evaluate_with_literals, final_answer

MIN_NUMBER, MAX_NUMBER = 1, 12
MAX_TARGET = 100

# An operand is ("n", value) for a given number or ("s", i) for the result of step i.
Ref = tuple[str, int]
Step = tuple[str, Ref, Ref]  # (op, left, right), stored with left >= right in value


def _combine(x: int, y: int) -> list[tuple[str, int]]:
    """Canonical moves on two values with ``x >= y``: positive results, no ``*1`` or ``/1``."""
    moves = [("+", x + y)]
    if x > y:
        moves.append(("-", x - y))
    if y > 1:
        moves.append(("*", x * y))
        if x % y == 0:
            moves.append(("/", x // y))
    return moves


@lru_cache(maxsize=4096)
def solutions(numbers: tuple[int, ...], target: int) -> tuple[tuple[Step, ...], ...]:
    """All step sequences that reach ``target``, each using every step result exactly once later."""
    found: dict[tuple[Step, ...], None] = {}

    def search(pool: list[tuple[int, Ref]], steps: list[Step]) -> None:
        for i in range(len(pool)):
            for j in range(i + 1, len(pool)):
                (x, rx), (y, ry) = sorted((pool[i], pool[j]), reverse=True)
                rest = [p for k, p in enumerate(pool) if k not in (i, j)]
                for op, value in _combine(x, y):
                    new_steps = [*steps, (op, rx, ry)]
                    if value == target:
                        if all(ref[0] == "n" for _, ref in rest):
                            found[tuple(new_steps)] = None
                    else:
                        search([*rest, (value, ("s", len(steps)))], new_steps)

    search([(n, ("n", n)) for n in numbers], [])
    return tuple(found)


def render(steps: tuple[Step, ...], rng: random.Random | None = None) -> tuple[list[str], str, int]:
    """Step lines, final expression and value.

    With ``rng``, ``+``/``*`` operands are randomly swapped and each step line gets a random phrasing.
    """
    values: list[int] = []
    exprs: list[str] = []
    lines: list[str] = []
    for op, a, b in steps:
        (va, ea), (vb, eb) = (_resolve(r, values, exprs) for r in (a, b))
        if op in "+*" and rng is not None and rng.random() < 0.5:
            (va, ea), (vb, eb) = (vb, eb), (va, ea)
        value = {"+": va + vb, "-": va - vb, "*": va * vb, "/": va // max(vb, 1)}[op]
        phrasing = PHRASINGS[0] if rng is None else rng.choice(PHRASINGS)
        lines.append(phrasing.format(e=f"{va}{op}{vb}", v=value))
        values.append(value)
        exprs.append(f"{ea}{op}{eb}")
    return lines, exprs[-1], values[-1]


def _resolve(ref: Ref, values: list[int], exprs: list[str]) -> tuple[int, str]:
    kind, x = ref
    return (x, str(x)) if kind == "n" else (values[x], f"({exprs[x]})")


class CountdownTask:
    """Reach the target with the given numbers (each at most once); reward checks the ``A:`` expression."""

    name = "countdown"

    def __init__(self, format_reward: float = 0.0) -> None:
        self.format_reward = check_format_reward(format_reward)

    def sample_problem(self, rng: random.Random) -> Problem:
        while True:
            numbers = tuple(rng.randint(MIN_NUMBER, MAX_NUMBER) for _ in range(rng.choice((3, 4))))
            steps = self._random_steps(numbers, rng)
            _, expression, target = render(steps)
            if target <= MAX_TARGET and target not in numbers:
                break
        return Problem(
            prompt=f"Q: {' '.join(map(str, numbers))} -> {target}\n",
            answer=expression,
            data={"numbers": numbers, "target": target},
        )

    @staticmethod
    def _random_steps(numbers: tuple[int, ...], rng: random.Random) -> tuple[Step, ...]:
        """Combine random pairs with random canonical moves until one value is left."""
        pool: list[tuple[int, Ref]] = [(n, ("n", n)) for n in numbers]
        steps: list[Step] = []
        while len(pool) > 1:
            i, j = rng.sample(range(len(pool)), 2)
            (x, rx), (y, ry) = sorted((pool[i], pool[j]), reverse=True)
            op, value = rng.choice(_combine(x, y))
            pool = [p for k, p in enumerate(pool) if k not in (i, j)]
            pool.append((value, ("s", len(steps))))
            steps.append((op, rx, ry))
        return tuple(steps)

    def reference_solution(self, problem: Problem, rng: random.Random) -> str:
        numbers, target = tuple(problem.data["numbers"]), problem.data["target"]
        lines, expression, _ = render(rng.choice(solutions(numbers, target)), rng)
        return "\n".join([*lines, f"A: {expression}"])

    def reward(self, problem: Problem, completion: str) -> float:
        text = final_answer(completion)
        parsed = None if text is None else evaluate_with_literals(text)
        if parsed is None:
            return 0.0
        value, literals = parsed
        used_ok = not Counter(literals) - Counter(problem.data["numbers"])
        return 1.0 if used_ok and value == problem.data["target"] else self.format_reward
