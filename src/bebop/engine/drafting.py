"""The drafting-policy protocol: how a caller above the engine (adaptive drafting) steers speculative decoding.

The engine drafts a fixed γ and verifies every row with one rule unless it is given a :class:`DraftPolicy`. A
policy answers, per decoding call, with a :class:`Drafting` object that the engine consults at fixed points of
each step (DESIGN §3):

* at the step's host sync (``step``): whether every row is done, how many drafts to plan (γ_t ≤ ``gamma_max``),
  and which rows verify with target-only (TO) instead of rejection sampling (RS) — a TO row is verified as RS
  against the one-hot draft at ``argmax q``, which is exactly the TO rule, so rows may differ in one batch; the
  same call hands over what the last verify measured (accepted drafts, each draft's acceptance chance and, on the
  steps it learns from under rule auto, both rules' expected α per step) for the policy to learn from;
* after each drawn draft d_k (``extend``): whether the head runs again.

Every such choice may depend only on emitted tokens, on drafts already drawn and on the head's draft
distributions, never on the verify outcome it governs; that keeps the emitted tokens exactly distributed as plain
sampling whatever the policy decides.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

AUTO = "auto"
"""The rule name under which a policy picks RS or TO per row (``DraftPolicy.start(..., auto_rule=True)``)."""


@runtime_checkable
class Drafting(Protocol):
    """Per-call drafting state (one decoding call, one batch)."""

    @property
    def learning(self) -> bool:
        """Whether the current step's verify is learned from (the engine computes ``alphas`` only then)."""
        ...

    def step(self, done: Tensor, q1: Tensor, accepted: Tensor | None = None, accept: Tensor | None = None,
             alphas: Tensor | None = None) -> tuple[bool, int, Tensor | None]:
        """(all rows done, planned γ_t, TO rows ``[B]`` bool or None) for the step whose first draft distributions
        are ``q1 [B, V]``; after a verify also its ``accepted`` drafts ``[B]``, each draft's acceptance chance
        ``accept [B, γ_t]`` (RS may pass the raw ratio p(d)/q(d)) and, when learning under rule auto, ``alphas``
        ``[B, 2·γ_t]`` (α_RS then α_TO per step). ``done [B]`` marks rows that need no more tokens."""
        ...

    def extend(self, k: int, q: Tensor, d: Tensor) -> int:
        """The draft length planned now that draft ``d [B]`` number ``k`` is drawn from the head's raw
        ``q [B, V]``: ``k`` stops drafting, anything larger runs the head again."""
        ...


@runtime_checkable
class DraftPolicy(Protocol):
    """What a caller passes as ``gamma`` to steer drafting: the longest draft, and a per-call state."""

    @property
    def gamma_max(self) -> int:
        """The longest draft any step may plan (the engine sizes its buffers for it)."""
        ...

    def start(self, batch: int, rule: str, auto_rule: bool, device: torch.device | str,
              eos_id: int | None) -> Drafting:
        """The drafting state for one call over ``batch`` rows verified with ``rule`` (``rejection`` or
        ``greedy``); ``auto_rule``: pick RS or TO per row."""
        ...
