"""Training objectives for the MTP head (DESIGN §4). p (the frozen target) is always detached.

Shapes: ``z`` draft logits [N, V] (or [N, γ, V]), ``p`` target probabilities [N, V] at the training
temperature, ``y`` data tokens [N]. Per-position values are returned; callers mask and average.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bebop.core.acceptance import alpha_rs
from bebop.errors import BebopError

LOSSES = ("ce", "fkl", "rkl", "tv", "e2e_tv")


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64, for gradcheck)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def tv_grad_logits(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Closed-form ∂TV(p, q)/∂z for q = softmax(z) (DESIGN §4): −q_j (1[q_j ≤ p_j] − S), S = Σ_v 1[q_v ≤ p_v] q_v."""
    below = (q <= p).to(q.dtype)
    return -q * (below - (q * below).sum(-1, keepdim=True))


class TotalVariation(torch.autograd.Function):
    """TV(p, q) = 1 − Σ_v min(p_v, q_v) with q = softmax(z), per row, with the closed-form backward of
    DESIGN §4: ∂TV/∂z_j = −q_j (1[q_j ≤ p_j] − S), S = Σ_v 1[q_v ≤ p_v] q_v.

    Only q is recomputed in backward (no autograd graph over the [N, V] softmax is kept)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        q = torch.softmax(_wide(z), dim=-1)
        tv = 1.0 - alpha_rs(p, q)
        ctx.save_for_backward(z, p)
        return tv

    @staticmethod
    def backward(ctx, grad_tv: torch.Tensor):
        z, p = ctx.saved_tensors
        grad = tv_grad_logits(torch.softmax(_wide(z), dim=-1), p)
        return (grad * grad_tv[..., None]).to(z.dtype), None


def tv(z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Per-row total variation TV(p, softmax(z)) (closed-form gradient)."""
    return TotalVariation.apply(z, _wide(p.detach()))


def ce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """−log q(y) on the data token."""
    return F.cross_entropy(z.float(), y, reduction="none")


def fkl(z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) = Σ p (log p − log q) (same gradient as CE against soft p)."""
    p = p.detach().float()
    return (torch.special.xlogy(p, p) - p * torch.log_softmax(z.float(), -1)).sum(-1)


def rkl(z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """KL(q‖p) = Σ q (log q − log p); tokens with p = 0 are floored at log(1e-30)."""
    logq = torch.log_softmax(z.float(), -1)
    return (logq.exp() * (logq - p.detach().float().clamp_min(1e-30).log())).sum(-1)


def e2e_tv_from_tvs(tvs: torch.Tensor) -> torch.Tensor:
    """L = 1 − (1/γ) Σ_{j=1..γ} Π_{i≤j} (1 − TV_i) over the last dim (γ steps) of ``tvs`` [..., γ]:
    one minus the normalised expected accept length (DESIGN §4)."""
    return 1.0 - torch.cumprod(1.0 - tvs, dim=-1).mean(-1)


def step_losses(name: str, z: torch.Tensor, p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-position, per-step values [N, γ] of loss ``name`` for draft logits z [N, γ, V], target p
    [N, γ, V] and data tokens y [N, γ]. For ``e2e_tv`` these are the TVs (combine with ``e2e_tv_from_tvs``)."""
    if name == "ce":
        return ce(z.flatten(0, 1), y.flatten()).view(y.shape)
    if name == "fkl":
        return fkl(z, p)
    if name == "rkl":
        return rkl(z, p)
    if name in ("tv", "e2e_tv"):
        return tv(z, p)
    raise BebopError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}")


def mtp_loss(name: str, z: torch.Tensor, p: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over positions of loss ``name`` (mean over steps for ce/fkl/rkl/tv; e2e_tv combines
    the steps as 1 − (1/γ) Σ_j Π_{i≤j}(1 − TV_i)). ``mask`` [N] is 1 where all γ targets exist."""
    per_step = step_losses(name, z, p, y)
    per_pos = e2e_tv_from_tvs(per_step) if name == "e2e_tv" else per_step.mean(-1)
    return _masked_mean(per_pos, mask)


class ChunkedTotalVariation(torch.autograd.Function):
    """Memory-bounded TV for large vocabularies (DESIGN §4): rows of draft hidden states ``hq`` [M, H] and
    target hidden states ``hp`` [M, H] (detached) are projected through the shared LM head ``weight`` [V, H]
    ``chunk`` rows at a time: q = softmax(hq Wᵀ / τ), p = softmax(hp Wᵀ / τ), TV = 1 − Σ min(p, q).
    Nothing of size M × V is kept: backward recomputes each chunk and applies the closed form
    ∂TV/∂z_j = −q_j (1[q_j ≤ p_j] − S) (z = hq Wᵀ / τ), so the extra peak memory is O(chunk × V).
    The LM head is shared with the frozen base model and gets no gradient."""

    @staticmethod
    def forward(ctx, hq: torch.Tensor, hp: torch.Tensor, weight: torch.Tensor, temperature: float,
                chunk: int) -> torch.Tensor:
        tvs = []
        for i in range(0, hq.shape[0], chunk):
            q = torch.softmax(_wide(hq[i : i + chunk] @ weight.T) / temperature, -1)
            p = torch.softmax(_wide(hp[i : i + chunk] @ weight.T) / temperature, -1)
            tvs.append(1.0 - alpha_rs(p, q))
        ctx.save_for_backward(hq, hp, weight)
        ctx.temperature, ctx.chunk = temperature, chunk
        return torch.cat(tvs)

    @staticmethod
    def backward(ctx, grad_tv: torch.Tensor):
        hq, hp, weight = ctx.saved_tensors
        tau, chunk = ctx.temperature, ctx.chunk
        grad_hq = torch.empty_like(hq)
        for i in range(0, hq.shape[0], chunk):
            q = torch.softmax(_wide(hq[i : i + chunk] @ weight.T) / tau, -1)
            p = torch.softmax(_wide(hp[i : i + chunk] @ weight.T) / tau, -1)
            grad_z = tv_grad_logits(q, p) * grad_tv[i : i + chunk, None]
            grad_hq[i : i + chunk] = ((grad_z / tau).to(weight.dtype) @ weight).to(hq.dtype)
        return grad_hq, None, None, None, None


def chunked_tvs(hq: torch.Tensor, hp: torch.Tensor, weight: torch.Tensor, temperature: float,
                chunk: int = 1024) -> torch.Tensor:
    """TV(p_k, q_k) [N, γ] from hidden states ``hq``/``hp`` [N, γ, H] through the shared LM head ``weight``
    [V, H], ``chunk`` rows at a time (see ``ChunkedTotalVariation``)."""
    if temperature <= 0:
        raise BebopError(f"temperature must be > 0 for training losses, got {temperature}")
    if chunk < 1:
        raise BebopError(f"chunk must be >= 1, got {chunk}")
    n, gamma, h = hq.shape
    flat = ChunkedTotalVariation.apply(hq.reshape(n * gamma, h), hp.detach().reshape(n * gamma, h), weight.detach(),
                                       temperature, chunk)
    return flat.view(n, gamma)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.float()
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def e2e_tv_loss_chunked(hq: torch.Tensor, hp: torch.Tensor, weight: torch.Tensor, temperature: float,
                        mask: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """``e2e_tv`` from hidden states without materialising [N, γ, V]: ``hq`` [N, γ, H] draft hidden states
    (step k's head output), ``hp`` [N, γ, H] the target hidden states whose distribution p_k is the target
    of step k, ``weight`` the shared LM head [V, H], ``mask`` [N]. Equals ``mtp_loss("e2e_tv", …)`` on the
    full logits."""
    return _masked_mean(e2e_tv_from_tvs(chunked_tvs(hq, hp, weight, temperature, chunk)), mask)


def mtp_loss_from_hidden(name: str, hq: torch.Tensor, hp: torch.Tensor, weight: torch.Tensor, temperature: float,
                         y: torch.Tensor, mask: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Loss ``name`` from hidden states through the shared LM head ``weight`` [V, H] at the training
    temperature: draft logits z = hq Wᵀ / τ, target p = softmax(hp Wᵀ / τ). ``e2e_tv`` and ``tv`` run
    memory-bounded (chunks of positions, closed-form backward); ce/fkl/rkl form the full logits."""
    if name == "e2e_tv":
        return e2e_tv_loss_chunked(hq, hp, weight, temperature, mask, chunk)
    if name == "tv":
        return _masked_mean(chunked_tvs(hq, hp, weight, temperature, chunk).mean(-1), mask)
    if temperature <= 0:
        raise BebopError(f"temperature must be > 0 for training losses, got {temperature}")
    with torch.no_grad():
        p = torch.softmax(_wide(hp @ weight.T) / temperature, -1)
    return mtp_loss(name, (hq @ weight.T) / temperature, p, y, mask)
