"""Reward functions in TRL's form for tests/rl/test_user_rewards.py, loaded by path (``tests/rl/my_rewards.py:fn``).

``record`` appends what it received to ``$BEBOP_TEST_REWARDS/calls.jsonl``. The faulty ones behave until their
second call (counted in ``$BEBOP_TEST_REWARDS/<name>.count``, a file so that no state outlives a test), i.e. they
fail while grading RL step 1, after step 0 was trained and checkpointed."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

NOT_CALLABLE = 3


def _dir() -> Path:
    return Path(os.environ["BEBOP_TEST_REWARDS"])


def _count(name: str) -> int:
    """This function's call number (1, 2, …) in the current test."""
    path = _dir() / f"{name}.count"
    n = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(n))
    return n


def record(prompts, completions, completion_ids, **columns) -> list[float]:
    """Logs its arguments; rewards the completion's length in characters / 10."""
    with (_dir() / "calls.jsonl").open("a") as f:
        f.write(json.dumps({"prompts": prompts, "completions": completions, "completion_ids": completion_ids,
                            "columns": columns}) + "\n")
    return [len(c if isinstance(c, str) else c[0]["content"]) / 10 for c in completions]


def digits(prompts, completions, **kwargs) -> list[float | None]:
    """Fraction of digits; None ("not applicable") for an empty completion."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [sum(ch.isdigit() for ch in t) / len(t) if t else None for t in texts]


def raises(prompts, completions, **kwargs) -> list[float]:
    """From its second call on, raises on every row whose prompt is the batch's 4th prompt of call 2."""
    n = _count("raises")
    poison = _dir() / "poison.json"
    if n == 2:
        poison.write_text(json.dumps(prompts[3]))
    if n >= 2 and json.loads(poison.read_text()) in prompts:
        return [1 / 0 for p in prompts]
    return [0.0] * len(prompts)


def nan_at_5(prompts, completions, **kwargs) -> list[float]:
    n = _count("nan")
    return [math.nan if i == 5 and n >= 2 else 0.0 for i in range(len(prompts))]


def inf_at_2(prompts, completions, **kwargs) -> list[float]:
    n = _count("inf")
    return [math.inf if i == 2 and n >= 2 else 0.0 for i in range(len(prompts))]


def short(prompts, completions, **kwargs) -> list[float]:
    return [0.0] * (len(prompts) - (_count("short") >= 2))


def text_at_1(prompts, completions, **kwargs) -> list:
    n = _count("text")
    return ["high" if i == 1 and n >= 2 else 0.0 for i in range(len(prompts))]


def old_form(problem, completion):
    """The pre-TRL form (problem, completion text): refused when loaded."""
    return 0.0
