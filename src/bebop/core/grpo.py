"""GRPO maths (DESIGN §5), as small pure functions testable without a model.

For a prompt with G sampled completions o_1..o_G and rewards R_1..R_G:
  advantage      A_i = (R_i − mean_G R) / (std_G R + ε)        (std over the group, unbiased; A = 0 if all equal)
  ratio          r_{i,t} = exp(log π_θ(o_{i,t} | ·) − log π_behaviour(o_{i,t} | ·))
  surrogate      L_{i,t} = −min(r A_i, clip(r, 1 − ε_lo, 1 + ε_hi) A_i)  [+ β · KL_{i,t}]
  loss           mean over sequences of the mean over each sequence's completion tokens of L_{i,t}.
The behaviour log-probs are the ones the rollout engine returned (from the verifying target pass, exact under
RS/TO), so with asynchronous (stale) rollouts the ratio is against the policy that actually sampled.
KL to a reference policy uses the non-negative k3 estimator exp(ref − θ) − (ref − θ) − 1 (off by default).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bebop.errors import BebopError


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """``rewards`` [N·G] laid out group by group → advantages [N·G], (R − mean_G) / (std_G + eps)."""
    if group_size < 2:
        raise BebopError(f"group_size must be >= 2 for group-normalised advantages, got {group_size}")
    if rewards.numel() % group_size:
        raise BebopError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)
    return adv.view(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p_τ(tokens) from ``logits`` [..., V] at temperature τ > 0 (the rollout's sampling transform)."""
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


@dataclass
class GRPOStats:
    loss: float
    clip_fraction: float    # fraction of completion tokens whose ratio was clipped
    ratio_mean: float
    kl: float               # mean k3 KL to the reference (0 when no reference)


def grpo_loss(
    logp: torch.Tensor,
    behaviour_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    kl_coef: float = 0.0,
    ref_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, GRPOStats]:
    """Clipped-ratio GRPO loss over completion tokens. ``logp``/``behaviour_logp``/``ref_logp``/``mask``:
    [B, T] (mask 1 on completion tokens), ``advantages`` [B]. Returns (scalar loss, stats)."""
    m = mask.float()
    ratio = torch.exp(logp - behaviour_logp)
    a = advantages[:, None]
    unclipped = ratio * a
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * a
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logp)
    if kl_coef and ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1.0
        per_token = per_token + kl_coef * kl
    n_tok = m.sum(1).clamp_min(1.0)
    loss = ((per_token * m).sum(1) / n_tok).mean()
    with torch.no_grad():
        total = m.sum().clamp_min(1.0)
        stats = GRPOStats(
            loss=float(loss),
            clip_fraction=float(((unclipped != clipped).float() * m).sum() / total),
            ratio_mean=float((ratio * m).sum() / total),
            kl=float((kl * m).sum() / total),
        )
    return loss, stats


def completion_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, completion_mask: torch.Tensor,
                        temperature: float = 1.0) -> torch.Tensor:
    """Per-token log p_τ of each next token under ``model`` for right-padded ``ids`` [B, T]; returns
    [B, T−1] aligned with ``ids[:, 1:]`` (entries outside ``completion_mask[:, 1:]`` are zeroed)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    lp = token_logprobs(logits, ids[:, 1:], temperature)
    return lp * completion_mask[:, 1:].to(lp.dtype)

