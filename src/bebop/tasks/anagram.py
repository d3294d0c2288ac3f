"""Anagram: write the given digits in any order — short completions whose entropy is the references' own.

Prompt: the digits in ascending order, ``Q: 1 1 4 4 4 7 9 9\\n`` (``MIN_LENGTH``..``MAX_LENGTH`` digits drawn from
``MIN_KINDS``..``MAX_KINDS`` distinct values in 1..9, at least two of them present). A correct completion is
``A: 49147941``: every given digit exactly once, in any order. The reference is a uniformly random arrangement of
the multiset, so each of its ``arrangements(digits) = n! / Π c_d!`` orders is equally likely, and its entropy is
exactly ``ln arrangements`` nats (:func:`reference_entropy`). Written digit by digit, the next digit is ``d`` with
probability ``left_d / left``: the references branch at every digit but the last, and a policy that learns them keeps
that entropy; to be right it must also count what it has already written, which a small policy learns in a few
hundred SFT steps.

The reward is 1.0 iff the last ``A:`` line is a string of digits with the same multiset as the prompt's
(``format_reward`` for another string of digits, else 0.0); the reference is never consulted. The texts use only
pieces the other tasks' texts hold (digits, space, newline, ``Q:``/``A:``), so the shared tokenizer covers them without
adding tokens (``in_tokenizer_corpus`` is False) and every other task keeps its token ids.
"""

from __future__ import annotations

import math
import random
from collections import Counter

from bebop.tasks.arith import check_format_reward
from bebop.tasks.base import Problem
from bebop.tasks.grammar import final_answer

MIN_KINDS, MAX_KINDS = 3, 4      # distinct values a problem draws its digits from
MIN_LENGTH, MAX_LENGTH = 8, 12   # digits per problem
COMPLETION_TOKENS = 32           # default completion budget: ``A: `` + at most MAX_LENGTH digits + EOS, with room


def arrangements(digits: list[int] | tuple[int, ...]) -> int:
    """Distinct orders of the multiset ``digits``: ``n! / Π_d c_d!``."""
    out = math.factorial(len(digits))
    for c in Counter(digits).values():
        out //= math.factorial(c)
    return out


def reference_entropy(problem: Problem) -> float:
    """Entropy in nats of the reference distribution for ``problem``: uniform over its arrangements."""
    return math.log(arrangements(problem.data["digits"]))


def next_digit_probs(digits: list[int] | tuple[int, ...], written: str) -> dict[int, float]:
    """The reference's distribution of the next digit after the correct prefix ``written``: each remaining copy is
    equally likely (an empty dict when nothing remains or ``written`` is not a sub-multiset of ``digits``)."""
    left = Counter(digits)
    left.subtract(int(c) for c in written)
    if any(v < 0 for v in left.values()):
        return {}
    total = sum(left.values())
    return {d: c / total for d, c in sorted(left.items()) if c > 0}


class AnagramTask:
    """Write the prompt's digits in any order; the reward checks the ``A:`` line's multiset of digits."""

    name = "anagram"
    completion_tokens = COMPLETION_TOKENS
    in_tokenizer_corpus = False          # adds no token to the shared vocabulary (module doc)

    def __init__(self, format_reward: float = 0.0) -> None:
        self.format_reward = check_format_reward(format_reward)

    def sample_problem(self, rng: random.Random) -> Problem:
        while True:
            values = rng.sample(range(1, 10), rng.randint(MIN_KINDS, MAX_KINDS))
            digits = sorted(rng.choice(values) for _ in range(rng.randint(MIN_LENGTH, MAX_LENGTH)))
            if len(set(digits)) > 1:
                break
        return Problem(prompt=f"Q: {' '.join(map(str, digits))}\n", answer="".join(map(str, digits)),
                       data={"digits": tuple(digits)})

    def reference_solution(self, problem: Problem, rng: random.Random) -> str:
        digits = list(problem.data["digits"])
        rng.shuffle(digits)
        return "A: " + "".join(map(str, digits))

    def reward(self, problem: Problem, completion: str) -> float:
        text = final_answer(completion)
        if not text or not text.isascii() or not text.isdigit():
            return 0.0
        return 1.0 if sorted(map(int, text)) == sorted(problem.data["digits"]) else self.format_reward
