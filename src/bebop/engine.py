"""Batched KV-cache generation on a stock transformers causal LM: plain sampling, and MTP draft→verify.

Shape of one MTP decoding step (DESIGN §3), per row of the batch:
  draft (MTP head, γ recursive steps) → verify (one target forward over γ+1 tokens) → accept (sampling.verify)
  → roll back: rejected cache slots become holes in the attention mask of both caches.
Rows accept ragged counts; the caches stay rectangular, with a per-row validity mask over cache slots and
explicit per-row position ids, so no row's prefix is ever recomputed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

from bebop.errors import BebopError
from bebop.sampling import SamplingParams, draft_tokens, entropy, probs_from_logits, sample, verify


@dataclass
class DecodeMetrics:
    """One metrics object for a generation call (DESIGN §3, "report both α_k and accept length").

    ``accept_length`` = tokens emitted per target verify forward = 1 + mean accepted drafts, i.e. it COUNTS
    the correction/bonus token. ``alpha`` is the empirical per-step acceptance α_k = P(draft k accepted |
    drafts 1..k-1 accepted); ``expected_alpha`` the rule's α_k computed from p and q (Σ min(p, q) for RS),
    averaged over the rows that reached step k.
    """

    gamma: int = 0
    tokens: int = 0                 # tokens emitted (sampled), all rows
    seconds: float = 0.0
    target_forwards: int = 0        # batched target forwards after prefill
    draft_forwards: int = 0         # batched MTP-head forwards
    steps: int = 0                  # row-steps of draft→verify (one per active row per verify)
    accepted: int = 0               # accepted drafts, summed over row-steps
    reached: list[float] = field(default_factory=list)    # per step k: row-steps where draft k was judged
    accepted_k: list[float] = field(default_factory=list)  # per step k: row-steps where draft k was accepted
    expected_k: list[float] = field(default_factory=list)  # per step k: Σ of expected α_k over reached rows

    def merge(self, other: DecodeMetrics) -> DecodeMetrics:
        """Sum of two runs' counters (same γ); rates and α are then recomputed from the sums."""
        if not self.reached:
            self.gamma = other.gamma
            self.reached, self.accepted_k, self.expected_k = ([0.0] * other.gamma for _ in range(3))
        for name in ("tokens", "seconds", "target_forwards", "draft_forwards", "steps", "accepted"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("reached", "accepted_k", "expected_k"):
            setattr(self, name, [a + b for a, b in zip(getattr(self, name), getattr(other, name), strict=True)])
        return self

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def alpha(self) -> list[float]:
        return [a / r if r else 0.0 for a, r in zip(self.accepted_k, self.reached, strict=True)]

    @property
    def expected_alpha(self) -> list[float]:
        return [e / r if r else 0.0 for e, r in zip(self.expected_k, self.reached, strict=True)]

    @property
    def accept_length(self) -> float:
        """Mean tokens emitted per verify step per row (accepted drafts + 1 correction/bonus token)."""
        return 1.0 + self.accepted / self.steps if self.steps else 1.0

    def to_dict(self) -> dict:
        return {
            "gamma": self.gamma, "tokens": self.tokens, "seconds": self.seconds,
            "tokens_per_s": self.tokens_per_s, "target_forwards": self.target_forwards,
            "draft_forwards": self.draft_forwards, "alpha": self.alpha, "expected_alpha": self.expected_alpha,
            "accept_length": self.accept_length, "accept_length_counts_bonus": True,
        }


@dataclass
class Rollout:
    """Generated completions. ``tokens[b, :lengths[b]]`` are row b's sampled tokens (EOS included if hit);
    ``logprobs``/``entropy`` are the target's log p(token) and H(p) at the sampling transforms; entries
    past ``lengths`` are padding (``pad_id`` / 0)."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor
    metrics: DecodeMetrics

    def completions(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths.tolist(), strict=True)]

    @property
    def mask(self) -> torch.Tensor:
        steps = torch.arange(self.tokens.shape[1], device=self.tokens.device)
        return steps[None, :] < self.lengths[:, None]


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``(ids [B, P], mask [B, P])``."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def target_forward(model: PreTrainedModel, ids, mask, positions, cache) -> torch.Tensor:
    """Last hidden states of the target (after its final norm, as the LM head sees them)."""
    return model.get_decoder()(
        input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
    ).last_hidden_state


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    prompts: list[list[int]],
    params: SamplingParams,
    max_new_tokens: int,
    eos_id: int | None,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Plain autoregressive sampling from p (DESIGN §1) with a KV cache; one target forward per token."""
    device = model.device
    t0 = time.perf_counter()
    ids, mask = left_pad(prompts, pad_id, device)
    B, P = ids.shape
    full_mask = torch.cat([mask, torch.ones((B, max_new_tokens), dtype=torch.long, device=device)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    hidden = target_forward(model, ids, mask, positions, cache)[:, -1]
    pos = positions[:, -1]
    lm_head = model.get_output_embeddings()
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logp = torch.zeros((B, max_new_tokens), device=device)
    ent = torch.zeros((B, max_new_tokens), device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    metrics = DecodeMetrics()
    for step in range(max_new_tokens):
        p = probs_from_logits(lm_head(hidden), params)
        tok = sample(p, generator)
        live = ~done
        out[:, step] = torch.where(live, tok, out[:, step])
        logp[:, step] = torch.where(live, p.gather(-1, tok[:, None]).squeeze(-1).clamp_min(1e-30).log(), 0.0)
        ent[:, step] = torch.where(live, entropy(p), 0.0)
        lengths += live.long()
        if eos_id is not None:
            done |= tok == eos_id
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        pos = pos + 1
        hidden = target_forward(model, tok[:, None], full_mask[:, : P + step + 1], pos[:, None], cache)[:, -1]
        metrics.target_forwards += 1
    metrics.tokens = int(lengths.sum())
    metrics.seconds = time.perf_counter() - t0
    return Rollout(out, lengths, logp, ent, metrics)


def _count_acceptance(metrics: DecodeMetrics, history: list[tuple[torch.Tensor, ...]]) -> None:
    """Fill the acceptance counters of ``metrics`` from per-step (accepted [B], live [B], expected α [B, γ]),
    over rows live at that step (drafter quality, before EOS/max-token truncation)."""
    if not history:
        metrics.reached = metrics.accepted_k = metrics.expected_k = [0.0] * metrics.gamma
        return
    a, live, exp = (torch.stack(x) for x in zip(*history, strict=True))     # [S, B], [S, B], [S, B, γ]
    k = torch.arange(metrics.gamma, device=a.device)
    reached = (a[..., None] >= k) & live[..., None]                          # draft k+1 was judged
    metrics.steps = int(live.sum())
    metrics.accepted = int((a * live).sum())
    metrics.reached = reached.sum((0, 1)).float().tolist()
    metrics.accepted_k = ((a[..., None] > k) & live[..., None]).sum((0, 1)).float().tolist()
    metrics.expected_k = (exp * reached).sum((0, 1)).tolist()


def _valid_slots(n_new: int, accepted: torch.Tensor) -> torch.Tensor:
    """[B, n_new] long: slot j of a verify/catch-up call is kept iff j ≤ accepted[b]."""
    j = torch.arange(n_new, device=accepted.device)
    return (j[None, :] <= accepted[:, None]).long()


@torch.inference_mode()
def generate_mtp(
    model: PreTrainedModel,
    head,
    prompts: list[list[int]],
    params: SamplingParams,
    max_new_tokens: int,
    eos_id: int | None,
    gamma: int = 3,
    rule: str = "rejection",
    pad_id: int = 0,
    generator: torch.Generator | None = None,
) -> Rollout:
    """MTP speculative sampling (DESIGN §3). Emitted tokens are distributed exactly as ``generate``
    (for ``rejection`` and ``target_only``; ``greedy`` equals plain τ = 0 decoding).

    Per step, with x the last emitted token at position t+1 and g the head's output at position t:
      draft:   q_1 = probs(LMHead(g)); d_1 ~ q_1; for k = 2..γ the head consumes (d_{k-1}, g_{k-1}) at
               position t+k-1 (temporary slots in the head's cache) giving q_k, d_k.
      verify:  one target forward over [x, d_1..d_γ] gives p_1..p_{γ+1}; ``sampling.verify`` accepts a.
      rollback: target slots of [x, d_1..d_a] stay valid, the rest become holes; the head's temporary
               slots are dropped and it re-reads positions t+1..t+a+1 with the TRUE target hiddens and
               tokens [d_1..d_a, e] (e = correction/bonus token), whose last output is the next g.
    """
    if gamma < 1:
        raise BebopError(f"gamma must be >= 1, got {gamma}")
    device = model.device
    t0 = time.perf_counter()
    ids, mask = left_pad(prompts, pad_id, device)
    B, P = ids.shape
    G = gamma
    cap = P + (max_new_tokens + 1) * (G + 1)
    tmask = torch.zeros((B, cap), dtype=torch.long, device=device)   # validity of target cache slots
    mmask = torch.zeros((B, cap), dtype=torch.long, device=device)   # validity of head cache slots
    tmask[:, :P] = mask
    mmask[:, :P] = mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    tcache, mcache = DynamicCache(config=model.config), head.new_cache()
    lm_head = model.get_output_embeddings()

    # Prefill: target over the prompt, first token from p_0, then the head over the prompt.
    hid = target_forward(model, ids, mask, positions, tcache)
    p0 = probs_from_logits(lm_head(hid[:, -1]), params)
    x = sample(p0, generator)
    head_ids = torch.cat([ids[:, 1:], x[:, None]], dim=1)
    g = head(head_ids, hid, positions, mask, mcache)[:, -1]
    t_len = m_len = P
    pos_x = positions[:, -1] + 1                                  # position of x (not yet in target cache)

    width = max_new_tokens + G + 2
    trash = width - 1
    out = torch.full((B, width), pad_id, dtype=torch.long, device=device)
    logp = torch.zeros((B, width), device=device)
    ent = torch.zeros((B, width), device=device)
    out[:, 0] = x
    logp[:, 0] = p0.gather(-1, x[:, None]).squeeze(-1).clamp_min(1e-30).log()
    ent[:, 0] = entropy(p0)
    n = torch.ones(B, dtype=torch.long, device=device)           # tokens emitted per row
    done = (x == eos_id) if eos_id is not None else torch.zeros(B, dtype=torch.bool, device=device)
    done |= n >= max_new_tokens
    j = torch.arange(G + 1, device=device)
    history: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (accepted, live, expected α) per step
    metrics = DecodeMetrics(gamma=G)
    metrics.draft_forwards = 1

    all_done = bool(done.all())
    while not all_done:
        # ---- draft: γ recursive head steps (γ-1 forwards; q_1 comes from the previous catch-up call)
        qs, drafts = [], []
        for k in range(G):
            q = probs_from_logits(head.logits(g), params)
            d = draft_tokens(q, rule, generator)
            qs.append(q)
            drafts.append(d)
            if k < G - 1:
                mmask[:, m_len + k] = 1
                g = head(d[:, None], g[:, None], (pos_x + k)[:, None], mmask[:, : m_len + k + 1], mcache)[:, -1]
                metrics.draft_forwards += 1
        drafts_t = torch.stack(drafts, dim=1)                          # [B, γ]
        q_t = torch.stack(qs, dim=1)                                   # [B, γ, V]
        # ---- verify: one target forward over [x, d_1..d_γ]
        vin = torch.cat([x[:, None], drafts_t], dim=1)
        vpos = pos_x[:, None] + j[None, :]
        tmask[:, t_len : t_len + G + 1] = 1
        vhid = target_forward(model, vin, tmask[:, : t_len + G + 1], vpos, tcache)
        metrics.target_forwards += 1
        p_t = probs_from_logits(lm_head(vhid), params)                 # [B, γ+1, V]
        res = verify(p_t, q_t, drafts_t, rule, generator)
        a = res.accepted
        toks = torch.where(j[None, :] <= a[:, None], res.tokens, pad_id)
        # ---- emit, with per-row EOS and max-token truncation
        live = ~done
        keep = (j[None, :] <= a[:, None]) & live[:, None]
        if eos_id is not None:
            is_eos = (toks == eos_id) & keep
            first_eos = torch.where(is_eos.any(1), is_eos.long().argmax(1), G + 1)
            keep &= j[None, :] <= first_eos[:, None]
        keep &= (n[:, None] + j[None, :]) < max_new_tokens
        cols = torch.where(keep, n[:, None] + j[None, :], trash)
        out.scatter_(1, cols, torch.where(keep, toks, pad_id))
        lp = p_t.gather(-1, toks.clamp_min(0)[..., None]).squeeze(-1).clamp_min(1e-30).log()
        logp.scatter_(1, cols, torch.where(keep, lp, 0.0))
        ent.scatter_(1, cols, torch.where(keep, entropy(p_t), 0.0))
        emitted = keep.sum(1)
        n = n + emitted
        if eos_id is not None:
            done |= (is_eos & keep).any(1)
        done |= n >= max_new_tokens
        history.append((a, live, res.expected_alpha))
        # ---- roll back: holes in the target cache, drop the head's temporary slots, catch the head up
        tmask[:, t_len : t_len + G + 1] = _valid_slots(G + 1, a)
        if G > 1:
            mcache.crop(-(G - 1))
            mmask[:, m_len : m_len + G - 1] = 0
        mmask[:, m_len : m_len + G + 1] = _valid_slots(G + 1, a)
        e = res.last_token
        gh = head(toks, vhid, vpos, mmask[:, : m_len + G + 1], mcache)
        metrics.draft_forwards += 1
        g = gh.gather(1, a[:, None, None].expand(-1, 1, gh.shape[-1])).squeeze(1)
        t_len += G + 1
        m_len += G + 1
        x = e
        pos_x = pos_x + a + 1
        # drop trailing slots that are holes in every row
        all_done, max_a = torch.stack([done.all().long(), a.max()]).tolist()  # the step's one host sync
        n_drop = G - max_a
        if n_drop > 0:
            tcache.crop(-n_drop)
            mcache.crop(-n_drop)
            tmask[:, t_len - n_drop : t_len] = 0
            mmask[:, m_len - n_drop : m_len] = 0
            t_len -= n_drop
            m_len -= n_drop

    metrics.tokens = int(n.sum())
    metrics.seconds = time.perf_counter() - t0
    _count_acceptance(metrics, history)
    return Rollout(out[:, :max_new_tokens], n, logp[:, :max_new_tokens], ent[:, :max_new_tokens], metrics)
