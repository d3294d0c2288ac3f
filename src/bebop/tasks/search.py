"""Search: countdown solved by a written, randomised depth-first search — long, branching completions.

Prompt: as ``countdown``, ``Q: 7 7 7 3 -> 63\\n`` (``NUMBERS`` numbers in 1..``MAX_NUMBER``; the target is in
``MIN_TARGET``..``MAX_TARGET``, reachable, not one of the numbers nor one move away from two of them, and reached
by at most ``MAX_SOLUTIONS`` step sequences). The reference solution is the trace of a depth-first search over the
canonical countdown moves, one tried step per line, indented one space per depth (a whole reference)::

    3+7=10 (7 7 10)
     10-7=3 (7 3)
      3+7=10
      7*3=21
      7-3=4
     10+7=17 (7 17)
      17+7=24
      17-7=10
      7*17=119
     7*10=70 (7 70)
      70/7=10
      70+7=77
      7*70=490
      70-7=63
    A: (7*(3+7))-7

A line is a tried step ``a op b=value``; while two or more numbers remain it ends with the remaining pool (the
other numbers in their order, then the new value), and the search goes one level deeper. A step whose value is
the target ends the search, and the next line is the graded ``A:`` expression. Backtracking is the return to a
shallower indent: the subtree below the previous line at that depth is exhausted. Moves are ``countdown``'s
canonical ones (positive results, exact division, no ``*1`` or ``/1``) with the larger operand first, except that
``+`` and ``*`` operands are swapped at random; equal numbers in a pool are one choice (the first copies are
combined, and a pair of values is tried once per node).

Every node shuffles the order of its number pairs and of each pair's moves, so one problem has many different
traces: the branching is real entropy inside the reference, not only in its phrasing. With 4 numbers and targets
in 10..100, references are a few hundred to a few thousand tokens (docs/tasks.md gives the distribution);
references are drawn from the traces of at most ``MAX_TRACE_TOKENS`` tokens (a trace that runs longer is redrawn
with a fresh order), and problems whose trace from a fixed order runs longer are resampled.

The reward is ``countdown``'s: 1.0 iff the last ``A:`` line is an expression over the given numbers, each used at
most once, whose value is the target; the trace itself is not graded and the reference is never consulted. Its
text uses only pieces the other tasks' texts already hold (digits, ``+-*/=()``, space, newline, ``A:``), so the
shared tokenizer covers it without adding tokens (``in_tokenizer_corpus`` is False).
"""

from __future__ import annotations

import random
import re
from collections import Counter

from bebop.tasks.arith import check_format_reward
from bebop.tasks.base import Problem
from bebop.tasks.countdown import _combine, solutions
from bebop.tasks.grammar import evaluate_with_literals, final_answer

NUMBERS = 4
MIN_NUMBER, MAX_NUMBER = 1, 12
MIN_TARGET, MAX_TARGET = 10, 100
MAX_SOLUTIONS = 4                # at most this many step sequences reach the target (countdown.solutions)
MAX_TRACE_TOKENS = 3000          # reference traces are drawn among those at most this long (project tokenizer)
CONTEXT = 4096                   # positions the policy needs: prompt + the longest reference + EOS, with room
COMPLETION_TOKENS = 3584         # default completion budget of rollouts and evaluation (fits CONTEXT)
MAX_COMPLETION_CHARS = 32_768    # longer completions get reward 0 without being parsed
_REDRAWS = 64                    # fresh orders tried before a reference falls back to the fixed order

# ``bebop.models.tokenizer.SPLIT_PATTERN`` (one token per piece), written here so that importing the tasks does not
# load transformers (the CLI reads task names for --help); tests check the two are equal.
SPLIT_PATTERN = r"\d|[A-Za-z_]+|\s|[^\sA-Za-z_\d]"
_PIECES = re.compile(SPLIT_PATTERN)

Node = tuple[int, str]  # (value, expression)


def count_tokens(text: str) -> int:
    """Tokens of ``text`` under the project tokenizer (one per piece of ``SPLIT_PATTERN``), without BOS/EOS."""
    return len(_PIECES.findall(text))


def dfs_trace(numbers: tuple[int, ...], target: int, rng: random.Random | None) -> tuple[list[str], str]:
    """The lines of a depth-first search for ``target`` from ``numbers`` and the expression it found.

    With ``rng`` every node shuffles its pairs and moves and ``+``/``*`` operands are swapped at random; with
    None the order is fixed (pairs in index order, moves as ``countdown._combine`` lists them). Raises
    ``ValueError`` when no sequence of canonical moves reaches ``target`` (``sample_problem`` never draws one).
    """
    lines: list[str] = []

    def search(pool: list[Node], depth: int) -> str | None:
        pairs = [(i, j) for i in range(len(pool)) for j in range(i + 1, len(pool))]
        if rng is not None:
            rng.shuffle(pairs)
        seen: set[tuple[int, int]] = set()
        for pair in pairs:
            i, j = _first_copies(pool, *pair)
            if (i, j) in seen:  # equal values elsewhere in the pool: the same subtree, searched once
                continue
            seen.add((i, j))
            (x, ex), (y, ey) = sorted((pool[i], pool[j]), key=lambda node: node[0], reverse=True)
            rest = [node for k, node in enumerate(pool) if k not in (i, j)]
            moves = _combine(x, y)
            if rng is not None:
                rng.shuffle(moves)
            for op, value in moves:
                (a, ea), (b, eb) = (x, ex), (y, ey)
                if op in "+*" and rng is not None and rng.random() < 0.5:
                    (a, ea), (b, eb) = (b, eb), (a, ea)
                expr = f"{_wrap(ea)}{op}{_wrap(eb)}"
                line = f"{' ' * depth}{a}{op}{b}={value}"
                if value == target:
                    lines.append(line)
                    return expr
                child = [*rest, (value, expr)]
                if len(child) == 1:
                    lines.append(line)
                    continue
                lines.append(f"{line} ({' '.join(str(v) for v, _ in child)})")
                found = search(child, depth + 1)
                if found is not None:
                    return found
        return None

    found = search([(n, str(n)) for n in numbers], 0)
    if found is None:
        raise ValueError(f"{target} is not reachable from {numbers}")
    return lines, found


def _first_copies(pool: list[Node], i: int, j: int) -> tuple[int, int]:
    """The pair of the pool's first nodes with the values of nodes ``i`` and ``j`` (in index order), so equal
    values give one pair and the remaining pool is the same whichever copies were drawn."""
    a = next(k for k, node in enumerate(pool) if node[0] == pool[i][0])
    b = next(k for k, node in enumerate(pool) if node[0] == pool[j][0] and k != a)
    return min(a, b), max(a, b)


def _one_step(numbers: tuple[int, ...], target: int) -> bool:
    """Whether one canonical move on two of ``numbers`` gives ``target``."""
    return any(value == target for i, x in enumerate(numbers) for y in numbers[i + 1:]
               for _, value in _combine(max(x, y), min(x, y)))


def _wrap(expr: str) -> str:
    """``expr`` as an operand: a number stays bare, a compound expression gets parentheses."""
    return expr if expr.isdigit() else f"({expr})"


def render_trace(lines: list[str], expression: str) -> str:
    """The completion text: the trace lines, then the graded ``A:`` line."""
    return "\n".join([*lines, f"A: {expression}"])


class SearchTask:
    """Countdown with a written depth-first search as the reference; the reward checks the ``A:`` expression."""

    name = "search"
    context = CONTEXT                    # sft builds the policy with at least this many positions
    completion_tokens = COMPLETION_TOKENS
    in_tokenizer_corpus = False          # adds no token to the shared vocabulary (module doc)

    def __init__(self, format_reward: float = 0.0) -> None:
        self.format_reward = check_format_reward(format_reward)

    def sample_problem(self, rng: random.Random) -> Problem:
        while True:
            numbers = tuple(rng.randint(MIN_NUMBER, MAX_NUMBER) for _ in range(NUMBERS))
            target = self._random_target(numbers, rng)
            if not MIN_TARGET <= target <= MAX_TARGET or target in numbers or _one_step(numbers, target):
                continue
            if len(solutions(numbers, target)) > MAX_SOLUTIONS:
                continue
            lines, expression = dfs_trace(numbers, target, None)
            if count_tokens(render_trace(lines, expression)) <= MAX_TRACE_TOKENS:
                break
        return Problem(
            prompt=f"Q: {' '.join(map(str, numbers))} -> {target}\n",
            answer=expression,
            data={"numbers": numbers, "target": target},
        )

    @staticmethod
    def _random_target(numbers: tuple[int, ...], rng: random.Random) -> int:
        """The value left after combining random pairs with random canonical moves until one remains."""
        pool = list(numbers)
        while len(pool) > 1:
            i, j = rng.sample(range(len(pool)), 2)
            x, y = sorted((pool[i], pool[j]), reverse=True)
            _, value = rng.choice(_combine(x, y))
            pool = [v for k, v in enumerate(pool) if k not in (i, j)] + [value]
        return pool[0]

    def reference_solution(self, problem: Problem, rng: random.Random) -> str:
        numbers, target = tuple(problem.data["numbers"]), problem.data["target"]
        for _ in range(_REDRAWS):
            text = render_trace(*dfs_trace(numbers, target, rng))
            if count_tokens(text) <= MAX_TRACE_TOKENS:
                return text
        return render_trace(*dfs_trace(numbers, target, None))  # fits: sample_problem checked this order

    def reward(self, problem: Problem, completion: str) -> float:
        text = final_answer(completion, MAX_COMPLETION_CHARS)   # a long trace: the search task's own cap
        parsed = None if text is None else evaluate_with_literals(text)
        if parsed is None:
            return 0.0
        value, literals = parsed
        used_ok = not Counter(literals) - Counter(problem.data["numbers"])
        return 1.0 if used_ok and value == problem.data["target"] else self.format_reward
