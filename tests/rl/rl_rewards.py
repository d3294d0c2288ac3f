"""Reward functions for RL tests, in TRL's form ``f(prompts, completions, **columns) -> list[float]``: a random
tiny policy never solves a task, so tests reward something it does produce with varying frequency, to get
non-zero group advantages."""


def digit_fraction(prompts, completions, **columns) -> list[float]:
    """Fraction of each completion's characters that are digits."""
    return [sum(c.isdigit() for c in text) / max(1, len(text)) for text in completions]
