"""Sampling transforms and exact speculative verification (DESIGN.md §1 and §3).

Everything here is a small pure function on batched tensors: no Python loop over the batch, no
``.item()`` / ``.cpu()`` / data-dependent branching, so it runs on any device without a host sync
(the caller decides when to read ``VerifyResult`` back). Probabilities are computed in float32
whatever the input float dtype.

Conventions
-----------
* ``p`` is the target distribution and ``q`` the draft distribution, both produced by
  :func:`probs_from_logits` with the *same* :class:`SamplingParams` (DESIGN §1).
* ``γ`` (``gamma``) is the number of draft tokens per verification step.
* Verification rules (DESIGN §3 table)::

      rule          draft pick   accept prob.        residual on reject       α (acceptance)
      rejection     d ~ q        min(1, p(d)/q(d))   norm(max(0, p − q))      Σ min(p, q) = 1 − TV(p, q)
      target_only   d = argmax q p(d)                norm(p with d zeroed)    p(argmax q)
      greedy        d = argmax q 1[d = argmax p]     argmax p                 1[argmax q = argmax p]

  If all γ drafts are accepted, a bonus token is drawn from ``p_{γ+1}`` (``argmax p_{γ+1}`` for greedy).
  One step emits between 1 and γ+1 tokens, distributed exactly as plain sampling from ``p`` for
  ``rejection`` and ``target_only``.
* ``VerifyResult.tokens`` is ``[B, γ+1]``; entries after the last emitted token hold :data:`PAD_ID` (−1).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Final, Literal

import torch
from torch import Tensor

from bebop.core.acceptance import alpha_rs, alpha_to
from bebop.errors import BebopError

__all__ = [
    "PAD_ID",
    "RULES",
    "Rule",
    "SamplingParams",
    "VerifyResult",
    "draft_tokens",
    "entropy",
    "NoiseBank",
    "exp_noise",
    "probs_fast",
    "probs_from_logits",
    "race",
    "rs_step",
    "sample",
    "total_variation",
    "verify",
    "verify_rs",
]

Rule = Literal["rejection", "target_only", "greedy"]
RULES: Final[tuple[str, ...]] = ("rejection", "target_only", "greedy")
PAD_ID: Final[int] = -1
"""Fill value in ``VerifyResult.tokens`` after the correction/bonus token (never a valid token id)."""

_TINY: Final[float] = torch.finfo(torch.float32).tiny


# --------------------------------------------------------------------------------------------------
# Sampling parameters and the logits -> p transform
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingParams:
    """Temperature τ, then optional top-k, then optional top-p (nucleus), as in DESIGN §1.

    ``temperature == 0`` means greedy (one-hot at the argmax). ``top_k=None`` / ``top_p=None`` are off.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or math.isnan(t) or t < 0 or math.isinf(t):
            raise BebopError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1):
            raise BebopError(f"top_k must be None (off) or an integer >= 1, got {k!r}")
        tp = self.top_p
        if tp is not None and (
            isinstance(tp, bool) or not isinstance(tp, numbers.Real) or math.isnan(tp) or not 0 < tp <= 1
        ):
            raise BebopError(f"top_p must be None (off) or in (0, 1], got {tp!r}")

    @property
    def greedy(self) -> bool:
        """True when τ = 0 (p is one-hot at the argmax)."""
        return self.temperature == 0


def probs_from_logits(logits: Tensor, params: SamplingParams) -> Tensor:
    """Map logits ``[..., V]`` to float32 probabilities ``[..., V]`` (DESIGN §1).

    * τ = 0: ``p = onehot(argmax z)`` (top-k / top-p are then irrelevant).
    * τ > 0: ``z ← z / τ``; top-k keeps the tokens whose logit is ≥ the k-th largest (ties at the k-th
      value are all kept); top-p then keeps, on the renormalised top-k distribution sorted in decreasing
      order, the smallest prefix whose cumulative mass is ≥ top_p, i.e. token j is kept iff the mass
      strictly before it is < top_p (so the top token is always kept); finally ``p = norm(kept)``.

    The same function must be applied to target and draft logits so that p and q live in the same
    transformed space; RS/TO verification is then exact for the transformed target.
    """
    z = logits.float()
    vocab = z.shape[-1]
    if params.greedy:
        return torch.zeros_like(z).scatter_(-1, z.argmax(dim=-1, keepdim=True), 1.0)
    z = z / params.temperature
    if params.top_k is not None and params.top_k < vocab:
        kth = torch.topk(z, params.top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    probs = torch.softmax(z, dim=-1)
    if params.top_p is not None and params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p
        drop_sorted = mass_before >= params.top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def probs_fast(logits: Tensor, params: SamplingParams) -> Tensor:
    """:func:`probs_from_logits`, bit-identical, for the decode loop: plain temperature sampling (no top-k /
    top-p) runs the same ops inline and skips the division at τ = 1 (``z / 1.0 == z`` exactly)."""
    if params.top_k is not None or params.top_p is not None or params.temperature == 0:
        return probs_from_logits(logits, params)
    z = logits if logits.dtype == torch.float32 else logits.float()
    return torch.softmax(z if params.temperature == 1 else z / params.temperature, dim=-1)


# --------------------------------------------------------------------------------------------------
# Distribution helpers
# --------------------------------------------------------------------------------------------------


def entropy(probs: Tensor) -> Tensor:
    """``H(p) = −Σ_v p(v) log p(v)`` over the last dim, with ``0 log 0 = 0`` (DESIGN §1). float32."""
    return torch.special.entr(probs.float()).sum(dim=-1)


def total_variation(p: Tensor, q: Tensor) -> Tensor:
    """``TV(p, q) = ½ Σ_v |p(v) − q(v)| = 1 − Σ_v min(p(v), q(v))`` over the last dim (DESIGN §1)."""
    return 1.0 - alpha_rs(p.float(), q.float())


def sample(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One categorical draw per row: ``[..., V] -> [...]`` long, exactly ``P(v) = p(v) / Σ p``.

    Exponential race (as in gpt-fast / vLLM): with ``E_v ~ Exp(1)`` i.i.d., ``E_v / p(v) ~ Exp(p(v))``
    and the index of the minimum of independent exponentials is ``v`` with probability
    ``p(v) / Σ_u p(u)``; so ``argmax_v p(v) / E_v`` is an exact draw. Rows need not be normalised;
    zero-probability tokens are never drawn (``E`` is clamped away from 0 so ``0 / E = 0``). No host
    sync. A row with no positive mass returns index 0 (callers must not pass such rows).
    """
    p = probs.float()
    return race(p, exp_noise(p.shape, p.device, generator))


def exp_noise(shape: tuple[int, ...], device: torch.device | str, generator: torch.Generator | None = None) -> Tensor:
    """i.i.d. Exp(1) noise for :func:`race`, clamped away from 0 (so ``0 / E = 0``); drawn in one call for
    several races at once by callers that sample many positions per step. ``E = −log(1 − U)`` with U ~ U[0, 1)
    (finite: 1 − U > 0): on a CPU four passes over uniforms take a third of the time of ``exponential_``."""
    u = torch.rand(shape, dtype=torch.float32, device=device, generator=generator)
    return u.neg_().log1p_().neg_().clamp_min_(_TINY)


class NoiseBank:
    """The decode loop's random draws, made ahead in chunks: per step, i.i.d. Exp(1) noise of shape ``exp_shape``
    (for :func:`race`) and, if ``u_shape`` is given, i.i.d. U[0, 1) uniforms of that shape (RS acceptance tests).
    Chunks double from ``first`` steps up to ``max_steps`` (and at most ``max_bytes``), so a short call draws little
    more than it uses and a long one makes a handful of random-number calls; a step then costs two tensor views.
    Each step's draws are fresh and independent of every other step's, so the law of what is sampled is
    unchanged (only which stream values land where)."""

    def __init__(self, exp_shape: tuple[int, ...], u_shape: tuple[int, ...] | None, device: torch.device | str,
                 generator: torch.Generator | None = None, first: int = 4, max_steps: int = 64,
                 max_bytes: int = 32 << 20) -> None:
        per_step = 4 * (math.prod(exp_shape) + (math.prod(u_shape) if u_shape is not None else 0))
        self.cap = max(1, min(max_steps, max_bytes // max(per_step, 1)))
        self.chunk = min(first, self.cap) // 2
        self.exp_shape, self.u_shape, self.device, self.generator = exp_shape, u_shape, device, generator
        self.used = self.chunk
        self.exp: Tensor | None = None
        self.u: Tensor | None = None

    def next(self) -> tuple[Tensor, Tensor | None]:
        """(Exp(1) noise of ``exp_shape``, uniforms of ``u_shape`` or None) for one step."""
        if self.used == self.chunk:
            self.chunk = min(max(2 * self.chunk, 1), self.cap)
            self.exp = exp_noise((self.chunk, *self.exp_shape), self.device, self.generator)
            if self.u_shape is not None:
                self.u = torch.rand((self.chunk, *self.u_shape), generator=self.generator, device=self.device)
            self.used = 0
        i = self.used
        self.used += 1
        return self.exp.select(0, i), (self.u.select(0, i) if self.u is not None else None)


def race(p: Tensor, e: Tensor) -> Tensor:
    """The exponential race ``argmax_v p(v) / E_v`` with ``E_v ~ Exp(1)`` i.i.d. (``e`` from :func:`exp_noise`):
    an exact draw from ``p / Σ p`` (see :func:`sample`), ``[..., V] -> [...]``."""
    return (p / e).argmax(dim=-1)


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise BebopError(f"unknown verification rule {rule!r}; expected one of {', '.join(RULES)}")


def draft_tokens(q: Tensor, rule: str, generator: torch.Generator | None = None) -> Tensor:
    """Pick draft tokens from draft probabilities ``q [..., V]`` (DESIGN §3, "draft pick" column).

    ``rejection``: ``d ~ q`` (via :func:`sample`); ``target_only`` and ``greedy``: ``d = argmax q``.
    """
    _check_rule(rule)
    if rule == "rejection":
        return sample(q, generator)
    return q.argmax(dim=-1)


# --------------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------------


@dataclass
class VerifyResult:
    """Outcome of one verification step for a batch of B sequences with γ drafts each.

    * ``accepted``: ``[B]`` long, number of accepted drafts ``A ∈ {0..γ}``.
    * ``tokens``: ``[B, γ+1]`` long; ``tokens[b, :A]`` are the accepted drafts, ``tokens[b, A]`` is the
      correction (``A < γ``) or bonus (``A = γ``) token, and ``tokens[b, A+1:] = PAD_ID`` (−1).
    * ``num_emitted``: ``[B]`` long, ``A + 1``.
    * ``accept_prob``: ``[B, γ]`` float32, the acceptance probability of each draft under the rule
      (``min(1, p/q)`` for RS, ``p(d)`` for TO, ``1[d = argmax p]`` for greedy), for every step, also past
      the first rejection.
    * ``expected_alpha``: ``[B, γ]`` float32, the rule's α at each step given p and q:
      ``Σ min(p, q)`` (RS), ``p(argmax q)`` (TO), ``1[argmax q = argmax p]`` (greedy).
    """

    accepted: Tensor
    tokens: Tensor
    num_emitted: Tensor
    accept_prob: Tensor
    expected_alpha: Tensor

    @property
    def last_token(self) -> Tensor:
        """``[B]`` the last emitted token per row (``tokens[b, accepted[b]]``): the next verify input."""
        return self.tokens.gather(-1, self.accepted.unsqueeze(-1)).squeeze(-1)


def _check_verify_inputs(p: Tensor, q: Tensor, drafts: Tensor) -> None:
    shapes = f"p {tuple(p.shape)}, q {tuple(q.shape)}, drafts {tuple(drafts.shape)}"
    if p.dim() != 3 or q.dim() != 3 or drafts.dim() != 2:
        raise BebopError(f"verify expects p [B, γ+1, V], q [B, γ, V], drafts [B, γ]; got {shapes}")
    if not (p.is_floating_point() and q.is_floating_point()):
        raise BebopError(f"p and q must be float probabilities, got dtypes {p.dtype} and {q.dtype}")
    if drafts.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise BebopError(f"drafts must be integer token ids, got dtype {drafts.dtype}")
    b, gamma = drafts.shape
    if gamma < 1:
        raise BebopError(f"need at least one draft token (γ >= 1): {shapes}")
    if p.shape[0] != b or q.shape[0] != b:
        raise BebopError(f"batch size mismatch: {shapes}")
    if q.shape[1] != gamma or p.shape[1] != gamma + 1:
        raise BebopError(f"γ mismatch (need q with γ and p with γ+1 positions, γ = {gamma}): {shapes}")
    if p.shape[2] != q.shape[2]:
        raise BebopError(f"vocabulary size mismatch between p and q: {shapes}")


def _accept_probs(p_steps: Tensor, q: Tensor, drafts: Tensor, rule: str) -> tuple[Tensor, Tensor]:
    """Per-step acceptance probability of the given drafts and the rule's α, both ``[B, γ]`` (DESIGN §3).

    RS: ``min(1, p(d)/q(d))`` with ``q(d)`` clamped away from 0 (a draft with ``q(d) = 0`` cannot be drawn
    by RS; if it is passed anyway it is accepted iff ``p(d) > 0``), α = ``Σ min(p, q)``.
    TO: ``p(d)``, α = ``p(argmax q)``. Greedy: ``1[d = argmax p]``, α = ``1[argmax q = argmax p]``.
    """
    idx = drafts.long().unsqueeze(-1)
    p_d = p_steps.gather(-1, idx).squeeze(-1)
    if rule == "rejection":
        q_d = q.gather(-1, idx).squeeze(-1)
        accept = (p_d / q_d.clamp_min(_TINY)).clamp(max=1.0)
        alpha = alpha_rs(p_steps, q)
    elif rule == "target_only":
        accept = p_d
        alpha = alpha_to(p_steps, q)
    else:
        target_top = p_steps.argmax(dim=-1)
        accept = (drafts.long() == target_top).float()
        alpha = (q.argmax(dim=-1) == target_top).float()
    return accept, alpha


def _final_distribution(p: Tensor, q: Tensor, drafts: Tensor, accepted: Tensor, rule: str) -> Tensor:
    """Distribution ``[B, V]`` of the token at index ``A = accepted`` (DESIGN §3, "residual" column).

    ``A = γ``: bonus, ``p_{γ+1}``. ``A < γ``: residual at step ``A+1`` — RS ``norm(max(0, p − q))``,
    TO ``norm(p with d zeroed)``. A residual with no mass (probability-0 event in exact arithmetic, e.g.
    ``p == q`` up to rounding) falls back to ``p`` at that position. Greedy returns ``p`` (caller takes
    the argmax).
    """
    batch, gamma = drafts.shape
    rows = torch.arange(batch, device=p.device)
    p_at = p[rows, accepted]
    if rule == "greedy":
        return p_at
    step = accepted.clamp(max=gamma - 1)
    if rule == "rejection":
        residual = (p_at - q[rows, step]).clamp_min(0.0)
    else:
        residual = p_at.scatter(-1, drafts[rows, step].long().unsqueeze(-1), 0.0)
    mass = residual.sum(dim=-1, keepdim=True)
    residual = torch.where(mass > _TINY, residual / mass.clamp_min(_TINY), p_at)
    return torch.where((accepted == gamma).unsqueeze(-1), p_at, residual)


def verify(p: Tensor, q: Tensor, drafts: Tensor, rule: str, generator: torch.Generator | None = None) -> VerifyResult:
    """Verify γ drafts per row and emit 1..γ+1 tokens, following DESIGN §3 exactly.

    Args:
        p: ``[B, γ+1, V]`` target probabilities at the γ draft positions plus the bonus position.
        q: ``[B, γ, V]`` draft probabilities the drafts were picked from.
        drafts: ``[B, γ]`` draft token ids.
        rule: ``"rejection"`` (RS), ``"target_only"`` (TO) or ``"greedy"``.
        generator: optional ``torch.Generator`` on ``p.device`` for reproducible draws.

    With ``u_k ~ U[0, 1)`` drawn for all γ steps at once, draft k is accepted iff ``u_k < a_k`` (``a_k``
    the rule's acceptance probability; greedy uses ``a_k ∈ {0, 1}`` directly and draws nothing);
    ``A = Σ_j Π_{k≤j} 1[accepted_k]`` is the index of the first rejection (γ if none). The token at
    index A is drawn, in one batched draw, from the residual at step A+1 (correction) or from
    ``p_{γ+1}`` (bonus); greedy takes the argmax instead. For RS this yields, per position,
    ``P(emit v) = q(v) min(1, p(v)/q(v)) + (1 − Σ min(p, q)) · max(0, p(v) − q(v)) / Σ max(0, p − q) = p(v)``;
    for TO ``P(emit v) = p(d) 1[v = d] + (1 − p(d)) · p(v) 1[v ≠ d] / (1 − p(d)) = p(v)``.
    """
    _check_rule(rule)
    _check_verify_inputs(p, q, drafts)
    p = p.float()
    q = q.float()
    drafts = drafts.long()
    batch, gamma = drafts.shape

    accept_prob, expected_alpha = _accept_probs(p[:, :gamma], q, drafts, rule)
    if rule == "greedy":
        ok = accept_prob > 0.5
    else:
        u = torch.rand((batch, gamma), generator=generator, device=p.device)
        ok = u < accept_prob
    accepted = ok.long().cumprod(dim=-1).sum(dim=-1)

    final_dist = _final_distribution(p, q, drafts, accepted, rule)
    final = final_dist.argmax(dim=-1) if rule == "greedy" else sample(final_dist, generator)

    pos = torch.arange(gamma + 1, device=p.device)
    padded = torch.cat([drafts, drafts.new_full((batch, 1), PAD_ID)], dim=-1)
    acc = accepted.unsqueeze(-1)
    tokens = torch.where(pos < acc, padded, torch.where(pos == acc, final.unsqueeze(-1), PAD_ID))
    return VerifyResult(
        accepted=accepted,
        tokens=tokens,
        num_emitted=accepted + 1,
        accept_prob=accept_prob,
        expected_alpha=expected_alpha,
    )


def verify_rs(p: Tensor, q_pad: Tensor, vin: Tensor, j: Tensor, rows: Tensor, pad_id: int, noise: Tensor,
              generator: torch.Generator | None = None, u: Tensor | None = None) -> tuple[Tensor, ...]:
    """:func:`verify` with rule ``rejection`` (DESIGN §3, RS row) in fewer ops, for the engine's decode loop.

    ``p`` [B, γ+1, V]; ``q_pad`` [B, γ+1, V] = q_1..q_γ and a ZERO row at index γ; ``vin`` = [x, d_1..d_γ] with
    every d_k drawn from q_k (so q_k(d_k) > 0); ``j`` = ``arange(γ+1)``; ``rows`` is unused (kept for callers that
    pass ``arange(B)``); ``noise`` [B, V] fresh :func:`exp_noise` for the final draw. Draft k is accepted iff ``u_k <
    p_k(d_k) / q_k(d_k)`` (= ``u_k < min(1, p/q)`` as u < 1); the uniforms ``u`` [B, γ] are drawn from
    ``generator`` exactly as :func:`verify` draws them unless the caller passes them (drawn ahead, independent of
    everything else in the step). A = number of leading acceptances. The token at index A is drawn from ``max(0,
    p_{A+1} − q_{A+1})``, which at A = γ is ``p_{γ+1}`` itself thanks to the zero row (the bonus token); a residual
    without mass (a float-rounding event) falls back to ``p_{A+1}``, as in :func:`verify`. The exponential race does
    not need the residual normalised. Returns (A [B], emitted slots [B, γ+1] = (j ≤ A), tokens [B, γ+1] = [d_1..d_A,
    token, pad...], expected α [B, γ] = Σ min(p_k, q_k), the ratios p_k(d_k)/q_k(d_k) [B, γ])."""
    return rs_step(p, q_pad, vin, j, pad_id, noise, generator, u)[:5]


def rs_step(p: Tensor, q_pad: Tensor, vin: Tensor, j: Tensor, pad_id: int, noise: Tensor,
            generator: torch.Generator | None = None, u: Tensor | None = None) -> tuple[Tensor, ...]:
    """:func:`verify_rs` (same arguments, without ``rows``) that also returns the token at index A [B] (the next
    step's input), as a sixth output. Rows are picked with ``gather`` (one small kernel each) rather than advanced
    indexing, and the ratios and residuals share one index: the decode loop runs this once per verify."""
    B, G1, V = p.shape
    G = G1 - 1
    drafts = vin.narrow(1, 1, G)
    idx = drafts.unsqueeze(-1)
    p_steps, q_steps = p.narrow(1, 0, G), q_pad.narrow(1, 0, G)
    ratio = (p_steps.gather(-1, idx) / q_steps.gather(-1, idx)).squeeze(-1)          # [B, γ]
    if u is None:
        u = torch.rand((B, G), generator=generator, device=ratio.device)
    a = (u < ratio).cumprod(dim=1).sum(dim=1)
    exp_alpha = alpha_rs(p_steps, q_steps)
    at = a.view(B, 1, 1).expand(B, 1, V)
    p_at = p.gather(1, at)                                                          # [B, 1, V]
    res = (p_at - q_pad.gather(1, at)).clamp_min_(0.0)
    res = torch.where(res.sum(dim=-1, keepdim=True) > _TINY, res, p_at)
    final = (res.view(B, V) / noise).argmax(dim=-1)
    a_col, f_col = a.unsqueeze(1), final.unsqueeze(1)
    kept = j <= a_col
    toks = torch.where(kept, torch.cat([drafts, f_col], dim=1).scatter_(1, a_col, f_col), pad_id)
    return a, kept, toks, exp_alpha, ratio, final
