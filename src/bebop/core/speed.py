"""The speed model of DESIGN §8 as pure functions: what a speculative decoding step buys from measured forward costs,
and what a faster rollout buys an RL step."""

from __future__ import annotations


def speedup_limit(accept_length: float, c_1: float, c_verify: float, c_draft: float, gamma: int) -> float:
    """The decode speedup that forward costs allow: ``(1 + E[A]) / (c_verify/c_1 + γ·c_draft/c_1)``, with
    ``accept_length`` = 1 + E[A] tokens per verify step, ``c_1`` one plain target forward, ``c_verify`` one over γ+1
    tokens and ``c_draft`` one MTP step (any common unit). Host work between forwards is what a real engine loses
    against it."""
    return accept_length * c_1 / (c_verify + gamma * c_draft)


def rl_step_speedup(rollout_share: float, rollout_speedup: float) -> float:
    """Amdahl's law for an RL step: ``1 / ((1 − r) + r / s)`` when a fraction ``r`` of the step is rollout and the
    rollout gets ``s`` times faster."""
    if not 0.0 <= rollout_share <= 1.0:
        raise ValueError(f"rollout share must be in [0, 1], got {rollout_share}")
    return 1.0 / ((1.0 - rollout_share) + rollout_share / rollout_speedup)
