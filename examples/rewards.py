"""Reward functions for GRPO on examples/arith_prompts.jsonl, in TRL's form, so this one file serves both TRL's
``GRPOTrainer(reward_funcs=[...])`` and ``bebop rl --reward examples/rewards.py:FUNCTION`` (docs/trl.md, docs/rl.md).

Each function gets the batch's ``prompts`` and ``completions`` (text; for a prompt given as messages, messages),
``completion_ids``, and every other field of the prompt rows as a keyword list; it returns one float per
completion, or None where it does not apply."""

from __future__ import annotations

import re

ANSWER = re.compile(r"^A: (-?\d+)\s*$", re.MULTILINE)


def _text(completion) -> str:
    """A completion's text, whether it came as text or as TRL's conversational ``[{"role", "content"}]``."""
    return completion if isinstance(completion, str) else completion[0]["content"]


def format_reward(prompts, completions, **kwargs) -> list[float]:
    """1 when the completion has a final ``A: <integer>`` line, else 0."""
    return [1.0 if ANSWER.search(_text(c)) else 0.0 for c in completions]


def reward_len(prompts, completions, **kwargs) -> list[float]:
    """TRL's quick-start reward (docs/trl.md): prefers completions of 20 characters, −1 per character away."""
    return [-abs(20 - len(_text(c))) for c in completions]


def answer_reward(prompts, completions, answer=None, **kwargs) -> list[float | None]:
    """1 when the ``A:`` line holds the row's ``answer`` column; None (not applicable) for rows without one."""
    answers = answer if answer is not None else [None] * len(completions)
    out: list[float | None] = []
    for c, a in zip(completions, answers, strict=True):
        if a is None:
            out.append(None)
            continue
        m = ANSWER.search(_text(c))
        out.append(1.0 if m and m.group(1) == str(a) else 0.0)
    return out
