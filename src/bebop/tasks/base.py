"""The task interface: a prompt generator, a reference-solution generator (for SFT) and a reward.

A completion always ends with a final answer line ``A: <answer>``. Rewards parse model text with a
whitelist grammar; model text is never evaluated as Python.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Problem:
    """One task instance: the prompt the policy sees and whatever the reward needs to grade it."""

    prompt: str
    answer: str
    data: dict[str, Any] = field(default_factory=dict)


class Task(Protocol):
    name: str

    def sample_problem(self, rng: random.Random) -> Problem:
        """Draw one problem; deterministic given the state of ``rng``."""
        ...

    def reference_solution(self, problem: Problem, rng: random.Random) -> str:
        """A correct worked completion (text after the prompt), drawn from a deliberately varied family."""
        ...

    def reward(self, problem: Problem, completion: str) -> float:
        """1.0 for a correct final answer (plus at most a small format bonus), else 0.0; never raises."""
        ...


def sample_problems(task: Task, n: int, seed: int) -> list[Problem]:
    """``n`` problems from ``task``, deterministic by ``seed``."""
    rng = random.Random(seed)
    return [task.sample_problem(rng) for _ in range(n)]


DEFAULT_COMPLETION_TOKENS = 96
"""The completion budget of evaluation and RL rollouts for a task that declares no longer one."""


def completion_budget(task: Task) -> int:
    """Tokens a completion of ``task`` may take by default: ``DEFAULT_COMPLETION_TOKENS``, or the task's own
    ``completion_tokens`` when longer (a long-trace or multi-turn task whose answers a 96-token cap would cut)."""
    return max(DEFAULT_COMPLETION_TOKENS, int(getattr(task, "completion_tokens", 0)))
