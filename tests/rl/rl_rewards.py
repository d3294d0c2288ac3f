"""Reward functions for RL tests: a random tiny policy never solves a task, so tests reward something it
does produce with varying frequency, to get non-zero group advantages."""


def digit_fraction(problem, completion: str) -> float:
    """Fraction of the completion's characters that are digits."""
    return sum(c.isdigit() for c in completion) / max(1, len(completion))
