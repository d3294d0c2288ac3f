"""Multi-step integer arithmetic: evaluate ``a op b op c`` with ``op`` in ``+ - *``.

Prompt: ``Q: 12+7*3-5\\n``. Reference solution: one step per line, then the answer line, e.g.
``7*3=21\\n12+21=33\\n33-5=28\\nA: 28``. Reference solutions are deliberately varied (all correct):
products are computed first (``a*b*c`` either left or right first), the signed terms are then summed
in a random order that starts with a positive term, additions and multiplications are randomly
commuted, and each step uses one of four phrasings (``7*3=21``, ``7*3 = 21``, ``so 7*3=21``,
``then 7*3=21``).
Operands are 2..MAX_OPERAND (12); a multiplication always has a single-digit operand and products stay <=
MAX_PRODUCT (120), so a tiny policy learns the task in minutes on a CPU.
"""

from __future__ import annotations

import random

from bebop.errors import BebopError
from bebop.tasks.base import Problem
from bebop.tasks.grammar import integer_answer_reward

OPERATORS = ("+", "-", "*")
MAX_OPERAND = 12
MAX_PRODUCT = 120
PHRASINGS = ("{e}={v}", "{e} = {v}", "so {e}={v}", "then {e}={v}")


def check_format_reward(format_reward: float) -> float:
    """``format_reward`` as a float, or a ``BebopError`` if it is outside [0, 1)."""
    if not 0.0 <= format_reward < 1.0:
        raise BebopError(f"format_reward must be in [0, 1), got {format_reward!r}")
    return float(format_reward)


def _terms(operands: tuple[int, ...], ops: tuple[str, ...]) -> list[tuple[int, list[int]]]:
    """Split ``a op b op c`` into signed product terms: ``[(sign, factors), ...]``."""
    terms = [(1, [operands[0]])]
    for op, x in zip(ops, operands[1:], strict=True):
        if op == "*":
            terms[-1][1].append(x)
        else:
            terms.append((1 if op == "+" else -1, [x]))
    return terms


def _product(factors: list[int]) -> int:
    value = 1
    for f in factors:
        value *= f
    return value


class ArithTask:
    """Evaluate a 3-operand integer expression; reward 1.0 iff the ``A:`` line is the exact integer."""

    name = "arith"

    def __init__(self, format_reward: float = 0.0) -> None:
        self.format_reward = check_format_reward(format_reward)

    def sample_problem(self, rng: random.Random) -> Problem:
        while True:
            ops = (rng.choice(OPERATORS), rng.choice(OPERATORS))
            operands = tuple(rng.randint(2, MAX_OPERAND) for _ in range(3))
            if self._valid(operands, ops):
                break
        terms = _terms(operands, ops)
        answer = sum(sign * _product(factors) for sign, factors in terms)
        expression = f"{operands[0]}{ops[0]}{operands[1]}{ops[1]}{operands[2]}"
        return Problem(
            prompt=f"Q: {expression}\n",
            answer=str(answer),
            data={"operands": operands, "ops": ops},
        )

    @staticmethod
    def _valid(operands: tuple[int, ...], ops: tuple[str, ...]) -> bool:
        """Every ``*`` has a single-digit side, and every product stays <= ``MAX_PRODUCT``."""
        for i, op in enumerate(ops):
            if op == "*" and min(operands[i], operands[i + 1]) > 9:
                return False
        return all(_product(factors) <= MAX_PRODUCT for _, factors in _terms(operands, ops))

    def reference_solution(self, problem: Problem, rng: random.Random) -> str:
        steps: list[tuple[str, int]] = []  # (left-hand side, value)

        def mul(x: int, y: int) -> int:
            x, y = (y, x) if rng.random() < 0.5 else (x, y)
            steps.append((f"{x}*{y}", x * y))
            return x * y

        terms: list[tuple[int, int]] = []  # (sign, value)
        for sign, factors in _terms(problem.data["operands"], problem.data["ops"]):
            if len(factors) == 2:
                value = mul(*factors)
            elif len(factors) == 3:
                a, b, c = factors
                value = mul(mul(a, b), c) if rng.random() < 0.5 else mul(a, mul(b, c))
            else:
                value = factors[0]
            terms.append((sign, value))

        first = rng.choice([i for i, (sign, _) in enumerate(terms) if sign > 0])
        rest = [t for i, t in enumerate(terms) if i != first]
        rng.shuffle(rest)
        acc = terms[first][1]
        for sign, value in rest:
            if sign < 0:
                lhs = f"{acc}-{value}"
            elif acc >= 0 and rng.random() < 0.5:
                lhs = f"{value}+{acc}"
            else:
                lhs = f"{acc}+{value}"
            acc += sign * value
            steps.append((lhs, acc))

        lines = [rng.choice(PHRASINGS).format(e=lhs, v=v) for lhs, v in steps]
        lines.append(f"A: {acc}")
        return "\n".join(lines)

    def reward(self, problem: Problem, completion: str) -> float:
        return integer_answer_reward(completion, problem.answer, self.format_reward)
