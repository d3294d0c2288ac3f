"""Acceptance formulas of speculative verification (DESIGN §3), each in one function.

``p`` is the target distribution and ``q`` the draft distribution over the vocabulary (last dim), both after the
same sampling transforms. α is the chance that one draft is accepted; the accept length counts the tokens one
verify step emits, the correction or bonus token included.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["accept_length", "alpha_rs", "alpha_to", "one_hot_argmax"]


def alpha_rs(p: Tensor, q: Tensor) -> Tensor:
    """Rejection-sampling acceptance ``α_RS = Σ_v min(p(v), q(v)) = 1 − TV(p, q)`` over the last dim
    (DESIGN §3, RS row): the chance that ``d ~ q`` is accepted with probability ``min(1, p(d)/q(d))``."""
    return torch.minimum(p, q).sum(dim=-1)


def alpha_to(p: Tensor, q: Tensor) -> Tensor:
    """Target-only acceptance ``α_TO = p(argmax q)`` over the last dim (DESIGN §3, TO row): the greedy draft
    ``d = argmax q`` is accepted with probability ``p(d)``."""
    return p.gather(-1, q.argmax(dim=-1, keepdim=True)).squeeze(-1)


def one_hot_argmax(q: Tensor) -> Tensor:
    """``1[v = argmax q]``: the draft distribution under which RS verification is TO verification
    (accept ``min(1, p(d)/1) = p(d)``, residual ``max(0, p − 1_d)`` = p with d zeroed)."""
    return torch.zeros_like(q).scatter_(-1, q.argmax(-1, keepdim=True), 1.0)


def accept_length(alpha: Sequence[float] | np.ndarray, prefixes: bool = False) -> np.ndarray:
    """Expected tokens per verify step ``1 + E[A] = 1 + Σ_{j=1..γ} Π_{i≤j} α_i`` over the last axis of ``alpha``
    [..., γ] (DESIGN §3; the correction/bonus token is counted). ``prefixes=True`` returns the value for every
    draft length γ' = 1..γ along the last axis instead (``[..., γ]``), the same sum cut after each term.

    One sequence (1-D) is summed in a plain loop, a batch with array ops; both add the same terms in the same
    order, so they agree bit for bit (the loop serves per-row decisions inside the decode loop)."""
    a = np.asarray(alpha, dtype=np.float64)
    if a.ndim == 1:
        out, run, total = [], 1.0, 1.0
        for x in a.tolist():
            run *= x
            total += run
            out.append(total)
        return np.array(out) if prefixes else np.float64(total)
    if a.shape[-1] == 0:
        return np.ones(a.shape) if prefixes else np.ones(a.shape[:-1])
    terms = np.cumprod(a, axis=-1)
    lengths = np.cumsum(np.concatenate([np.ones((*a.shape[:-1], 1)), terms], axis=-1), axis=-1)[..., 1:]
    return lengths if prefixes else lengths[..., -1]
