"""Batched KV-cache generation on a stock transformers causal LM: plain sampling, and MTP draft→verify.

Shape of one MTP decoding step (DESIGN §3), per row of the batch:
  draft (MTP head, γ recursive steps) → verify (one target forward over γ+1 tokens) → accept (sampling.verify)
  → roll back: rejected cache slots become holes in the attention mask of both caches.
Rows accept ragged counts; the caches stay rectangular, with a per-row validity mask over cache slots and
explicit per-row position ids, so no row's prefix is ever recomputed.

Forwards: both ``generate`` and ``generate_mtp`` run the target (and the head) through the same backend —
``bebop.models.lean`` (static KV slots written in place, fused projections over the model's own weights, same math
as transformers) when the model is a supported Qwen3 decoder, transformers' own modules with a
``DynamicCache`` otherwise (or when ``USE_LEAN`` is False). Plain and MTP decoding are thus always compared
on equal forwards. Target and head caches share one slot layout (head slot s pairs with target slot s), so
one validity mask serves both.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from bebop.core.sampling import RULES, SamplingParams, draft_tokens, probs_from_logits, sample, verify
from bebop.errors import BebopError
from bebop.experimental.adaptive import AUTO, AdaptiveDraft, DraftPlanner, one_hot_argmax, step_alphas
from bebop.models.lean import StaticKV, lean_decoder, lean_head

USE_LEAN = True
"""Run supported models through ``bebop.models.lean``; False forces transformers' forwards (tests compare both)."""


@dataclass
class DecodeMetrics:
    """One metrics object for a generation call (DESIGN §3, "report both α_k and accept length").

    ``accept_length`` = tokens emitted per target verify forward = 1 + mean accepted drafts, i.e. it COUNTS
    the correction/bonus token. ``alpha`` is the empirical per-step acceptance α_k = P(draft k accepted |
    drafts 1..k-1 accepted); ``expected_alpha`` the rule's α_k computed from p and q (Σ min(p, q) for RS),
    averaged over the rows that reached step k. ``mean_gamma`` = drafts per row-step (γ unless adaptive),
    ``target_only_fraction`` = share of those drafts verified with TO (``rule="auto"``), ``decode_seconds`` =
    ``seconds`` without prefill.
    """

    gamma: int = 0
    tokens: int = 0                 # tokens emitted (sampled), all rows
    seconds: float = 0.0
    decode_seconds: float = 0.0     # seconds after prefill
    target_forwards: int = 0        # batched target forwards after prefill
    draft_forwards: int = 0         # batched MTP-head forwards
    steps: int = 0                  # row-steps of draft→verify (one per active row per verify)
    accepted: int = 0               # accepted drafts, summed over row-steps
    drafted: int = 0                # drafts verified, summed over row-steps
    target_only_drafts: int = 0     # drafts verified with TO (rule "auto")
    reached: list[float] = field(default_factory=list)    # per step k: row-steps where draft k was judged
    accepted_k: list[float] = field(default_factory=list)  # per step k: row-steps where draft k was accepted
    expected_k: list[float] = field(default_factory=list)  # per step k: Σ of expected α_k over reached rows

    def merge(self, other: DecodeMetrics) -> DecodeMetrics:
        """Sum of two runs' counters (same γ); rates and α are then recomputed from the sums."""
        if not self.reached:
            self.gamma = other.gamma
            self.reached, self.accepted_k, self.expected_k = ([0.0] * other.gamma for _ in range(3))
        for name in ("tokens", "seconds", "decode_seconds", "target_forwards", "draft_forwards", "steps", "accepted",
                     "drafted", "target_only_drafts"):
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

    @property
    def mean_gamma(self) -> float:
        return self.drafted / self.steps if self.steps else 0.0

    @property
    def target_only_fraction(self) -> float:
        return self.target_only_drafts / self.drafted if self.drafted else 0.0

    def to_dict(self) -> dict:
        return {
            "gamma": self.gamma, "mean_gamma": self.mean_gamma, "target_only_fraction": self.target_only_fraction,
            "tokens": self.tokens, "seconds": self.seconds, "decode_seconds": self.decode_seconds,
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
    """Last hidden states of the target (after its final norm, as the LM head sees them), transformers path."""
    return model.get_decoder()(
        input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
    ).last_hidden_state


def forwards(model: PreTrainedModel, head, batch: int, capacity: int):
    """``(target, drafter, lm_head, select)`` callables over explicit cache slots, lean when supported (module doc):

    ``target(ids [B, T], pos [B, T], valid [B, start+T] bool, start) -> hidden [B, T, H]`` and
    ``drafter(ids, hidden, pos, valid, start) -> h^k [B, T, H]`` (None without a head) write slots
    ``start..start+T-1`` of their own cache (anything at or after ``start`` is overwritten/dropped) and attend
    to the slots marked valid; ``lm_head(hidden) -> logits``; ``select(rows)`` keeps only batch rows ``rows`` in
    every cache (so finished rows can leave the batch). ``capacity`` is a first allocation; lean caches grow on
    demand."""
    lean = lean_decoder(model) if USE_LEAN else None
    if lean is not None:
        tcache = lean.new_cache(batch, capacity)

        def target(ids, pos, valid, start):
            return lean(ids, pos, valid, tcache, start)
    else:
        tcache = DynamicCache(config=model.config)

        def target(ids, pos, valid, start):
            _crop_to(tcache, start)
            return target_forward(model, ids, valid.long(), pos, tcache)

    caches = [tcache]
    drafter = None
    if head is not None:
        lhead = lean_head(head, model, lean) if lean is not None else None
        if lhead is not None:
            mcache = lhead.new_cache(batch, capacity)

            def drafter(ids, hidden, pos, valid, start):
                return lhead(ids, hidden, pos, valid, mcache, start)
        else:
            mcache = head.new_cache()

            def drafter(ids, hidden, pos, valid, start):
                _crop_to(mcache, start)
                return head(ids, hidden, pos, valid.long(), mcache)
        caches.append(mcache)

    def select(rows: torch.Tensor) -> None:
        for c in caches:
            if isinstance(c, StaticKV):
                c.k, c.v = c.k[:, rows], c.v[:, rows]
                c.layers = list(zip(c.k.unbind(0), c.v.unbind(0), strict=True))
            else:
                c.batch_select_indices(rows)

    return target, drafter, _lm_head(model, lean), select


def median_seconds(fn, repeats: int) -> float:
    """Median wall-clock seconds of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def forward_costs(model, head, prompt_ids: list[list[int]], gamma: int, repeats: int = 20) -> dict[str, float]:
    """Measured seconds of one plain target forward (c_1), one over γ+1 tokens (c_verify) and one MTP step
    (c_draft) at the batch size of ``prompt_ids``, with a KV cache holding the prompt — through the same
    forwards the engine uses (``engine.forwards``: lean when supported)."""
    device = model.device
    ids, mask = left_pad(prompt_ids, 0, device)
    B, P = ids.shape
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    valid = torch.ones((B, P + gamma + 1), dtype=torch.bool, device=device)
    valid[:, :P] = mask.bool()
    target, drafter, _, _ = forwards(model, head, B, P + gamma + 1)
    hid = target(ids, pos, valid[:, :P], 0)
    drafter(ids, hid, pos, valid[:, :P], 0)

    def run_target(n_tok: int) -> float:
        x = ids[:, -1:].repeat(1, n_tok)
        p = pos[:, -1:] + 1 + torch.arange(n_tok, device=device)

        def once():
            target(x, p, valid[:, : P + n_tok], P)   # writes slots P.., which the next call overwrites

        once()
        return median_seconds(once, repeats)

    c1, cv = run_target(1), run_target(gamma + 1)

    def draft_once():
        drafter(ids[:, -1:], hid[:, -1:], pos[:, -1:] + 1, valid[:, : P + 1], P)

    draft_once()
    cd = median_seconds(draft_once, repeats)
    return {"c_1": c1, "c_verify": cv, "c_draft": cd}


def _draft(g, x, vpos, valid, s: int, G: int, lm_head, drafter, params, rule: str, noise, generator, metrics,
           to_rows=None, raw=None, q1=None, planner=None):
    """Up to ``G`` recursive head steps from head state ``g`` (q_1 comes from ``g``; each further draft costs one
    head forward, writing the temporary slots s..s+γ−2). ``noise`` (given only on the RS fast path: rule
    ``rejection``, τ > 0) drives the drafts' exponential races, else ``draft_tokens``. Rows in ``to_rows`` [B]
    bool draft and verify with TO (q replaced by the one-hot at argmax q, ``adaptive`` module doc); the head's
    own q's go to ``raw``. ``q1``: q_1 when already computed from ``g``. ``planner`` (adaptive drafting) sees
    every drawn d_k with its raw q_k and re-plans the draft length (``DraftPlanner.extend``): whether the head
    runs again; ``G`` is then its first plan, and ``vpos``, ``noise`` and the valid slots must cover γ_max.
    Returns (the head state after drafting, ``[x, d_1..d_γ]`` [B, γ+1], [q_1..q_γ] as verified)."""
    qs, drafts = [], [x]
    k = 0
    while k < G:
        q = q1 if k == 0 and q1 is not None else _probs(lm_head(g), params)
        if raw is not None:
            raw.append(q)
        qv = q if to_rows is None else torch.where(to_rows.unsqueeze(1), one_hot_argmax(q), q)
        d = _race(qv, noise[k]) if noise is not None else draft_tokens(qv, rule, generator)
        qs.append(qv)
        drafts.append(d)
        k += 1
        if planner is not None:
            G = planner.extend(k, q, d)                       # after d_k is drawn: run the head again?
        if k < G:
            g = drafter(d.unsqueeze(1), g.unsqueeze(1), vpos.narrow(1, k - 1, 1), valid.narrow(1, 0, s + k),
                        s + k - 1).squeeze(1)
            metrics.draft_forwards += 1
    return g, torch.stack(drafts, dim=1), qs


def _accept(p_t, qs, vin, rule: str, noise, zero_q, j, rows, pad_id: int, generator):
    """The rule's verdict on drafts ``vin[:, 1:]`` against ``p_t`` [B, γ+1, V] (``_verify_rs`` with the RS
    fast path's ``noise``, else ``sampling.verify``): (accepted a [B], kept slots
    [B, γ+1], emitted tokens (pad after the correction/bonus token), expected α [B, γ], each draft's acceptance
    chance [B, γ] — for RS the raw ratio ``p(d)/q(d)``, which may exceed 1)."""
    if noise is not None:
        return _verify_rs(p_t, torch.stack([*qs, zero_q], dim=1), vin, j, rows, pad_id, noise[len(qs)], generator)
    res = verify(p_t, torch.stack(qs, dim=1), vin[:, 1:], rule, generator)
    kept = j <= res.accepted.unsqueeze(1)                              # [B, γ+1] emitted slots
    return res.accepted, kept, torch.where(kept, res.tokens, pad_id), res.expected_alpha, res.accept_prob


def _crop_to(cache: DynamicCache, length: int) -> None:
    n = cache.get_seq_length()
    if n > length:
        cache.crop(length - n)


def _lm_head(model: PreTrainedModel, lean):
    """The LM head as a function: the lean one when available, a plain ``F.linear`` when it is an
    ``nn.Linear`` (no module-call overhead), else the module."""
    if lean is not None and lean.lm_t is not None:
        return lean.logits
    lm = model.get_output_embeddings()
    if type(lm) is torch.nn.Linear:
        w, b = lm.weight, lm.bias
        return lambda h: F.linear(h, w, b)
    return lm


_TINY = torch.finfo(torch.float32).tiny


def _probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """``sampling.probs_from_logits``; for plain temperature sampling (no top-k/top-p) the same ops inline,
    skipping the division at τ = 1 (``z / 1.0 == z`` exactly), so the result is bit-identical."""
    if params.top_k is not None or params.top_p is not None or params.temperature == 0:
        return probs_from_logits(logits, params)
    z = logits if logits.dtype == torch.float32 else logits.float()
    return torch.softmax(z if params.temperature == 1 else z / params.temperature, dim=-1)


def _noise(shape, like: torch.Tensor, generator) -> torch.Tensor:
    """i.i.d. Exp(1) noise for ``_race`` (drawn in one call for several draws at once)."""
    return torch.empty(shape, dtype=torch.float32, device=like.device).exponential_(1.0, generator=generator) \
        .clamp_min_(_TINY)


def _race(p: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``argmax_v p(v) / E_v`` with ``E_v ~ Exp(1)`` i.i.d.: an exact draw from ``p / Σp`` (``sampling.sample``)."""
    return (p / e).argmax(dim=-1)


def _emitted(p: torch.Tensor, tok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p(tok), H(p)) for the log-prob and entropy outputs; the log is taken once at the end."""
    return p.gather(-1, tok.unsqueeze(-1)).squeeze(-1), torch.special.entr(p).sum(dim=-1)


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
    valid = torch.ones((B, P + max_new_tokens), dtype=torch.bool, device=device)
    valid[:, :P] = mask.bool()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    target, _, lm_head, _ = forwards(model, None, B, P + max_new_tokens)
    hidden = target(ids, positions, valid[:, :P], 0)[:, -1]
    pos = positions[:, -1:]
    t_decode = time.perf_counter()
    toks, probs, ents = [], [], []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    metrics = DecodeMetrics()
    for step in range(max_new_tokens):
        p = _probs(lm_head(hidden), params)
        tok = p.argmax(-1) if params.greedy else _race(p, _noise(p.shape, p, generator))
        pt, h = _emitted(p, tok)
        toks.append(tok)
        probs.append(pt)
        ents.append(h)
        if eos_id is not None:
            done |= tok == eos_id
            if bool(done.all()):  # the step's one host sync
                break
        if step == max_new_tokens - 1:
            break
        pos = pos + 1
        hidden = target(tok.unsqueeze(1), pos, valid.narrow(1, 0, P + step + 1), P + step).squeeze(1)
        metrics.target_forwards += 1
    steps = len(toks)
    out, logp, ent = torch.stack(toks, 1), torch.stack(probs, 1).clamp_min(1e-30).log(), torch.stack(ents, 1)
    if eos_id is not None:
        is_eos = out == eos_id
        lengths = torch.where(is_eos.any(1), is_eos.long().argmax(1) + 1, steps)
    else:
        lengths = torch.full((B,), steps, dtype=torch.long, device=device)
    if steps < max_new_tokens:
        out, logp, ent = (torch.nn.functional.pad(t, (0, max_new_tokens - steps)) for t in (out, logp, ent))
    keep = torch.arange(max_new_tokens, device=device)[None, :] < lengths[:, None]
    out = torch.where(keep, out, pad_id)
    logp = torch.where(keep, logp, 0.0)
    ent = torch.where(keep, ent, 0.0)
    metrics.tokens = int(lengths.sum())
    t1 = time.perf_counter()
    metrics.seconds, metrics.decode_seconds = t1 - t0, t1 - t_decode
    return Rollout(out, lengths, logp, ent, metrics)


def _count_acceptance(metrics: DecodeMetrics, history: list[tuple]) -> None:
    """Fill the acceptance counters of ``metrics`` from per-step (accepted [B], done before the step [B],
    expected α [B, γ_t], γ_t, TO drafts per row [B] or None), over rows live at that step (drafter quality, before
    EOS/max-token truncation); γ_t ≤ ``metrics.gamma``."""
    if not history:
        metrics.reached = metrics.accepted_k = metrics.expected_k = [0.0] * metrics.gamma
        return
    G = metrics.gamma
    a, done = torch.stack([h[0] for h in history]), torch.stack([h[1] for h in history])   # [S, B]
    exp = torch.stack([F.pad(h[2], (0, G - h[3])) for h in history])                        # [S, B, γ]
    gam = torch.tensor([h[3] for h in history], device=a.device)                            # [S]
    to = torch.stack([h[4] if h[4] is not None else torch.zeros_like(a[0]) for h in history])
    live = ~done
    k = torch.arange(G, device=a.device)
    reached = (a[..., None] >= k) & (k < gam[:, None, None]) & live[..., None]  # draft k+1 was judged
    metrics.steps = int(live.sum())
    metrics.accepted = int((a * live).sum())
    metrics.drafted = int((gam[:, None] * live).sum())
    metrics.target_only_drafts = int((to * live).sum())
    metrics.reached = reached.sum((0, 1)).float().tolist()
    metrics.accepted_k = ((a[..., None] > k) & live[..., None]).sum((0, 1)).float().tolist()
    metrics.expected_k = (exp * reached).sum((0, 1)).tolist()


def _verify_rs(p_t: torch.Tensor, q_pad: torch.Tensor, vin: torch.Tensor, j: torch.Tensor, rows: torch.Tensor,
               pad_id: int, noise: torch.Tensor, generator) -> tuple[torch.Tensor, ...]:
    """``sampling.verify(p, q, drafts, "rejection")`` (DESIGN §3, RS row) in fewer ops, for the engine's loop.

    ``p_t`` [B, γ+1, V]; ``q_pad`` [B, γ+1, V] = q_1..q_γ and a ZERO row at index γ; ``vin`` = [x, d_1..d_γ]
    with every d_k drawn from q_k (so q_k(d_k) > 0); ``noise`` [B, V] fresh Exp(1) noise for the final draw.
    Draft k is accepted iff ``u_k < p_k(d_k) / q_k(d_k)`` (= ``u_k < min(1, p/q)`` as u < 1); A = number of
    leading acceptances. The token at index A is drawn from ``max(0, p_{A+1} − q_{A+1})``, which at A = γ is
    ``p_{γ+1}`` itself thanks to the zero row (the bonus token); a residual without mass (a float-rounding
    event) falls back to ``p_{A+1}``, as in ``sampling.verify``. Sampling uses the exponential race, which does
    not need the residual normalised. Returns (A [B], emitted slots [B, γ+1] = (j ≤ A), tokens [B, γ+1] =
    [d_1..d_A, token, pad...], expected α [B, γ] = Σ min(p_k, q_k), the ratios p_k(d_k)/q_k(d_k) [B, γ])."""
    G = q_pad.shape[1] - 1
    drafts = vin.narrow(1, 1, G)
    idx = drafts.unsqueeze(-1)
    p_steps, q_steps = p_t.narrow(1, 0, G), q_pad.narrow(1, 0, G)
    ratio = p_steps.gather(-1, idx) / q_steps.gather(-1, idx)                   # [B, γ, 1]
    ok = torch.rand(ratio.shape, generator=generator, device=ratio.device) < ratio
    a = ok.long().cumprod(dim=1).sum(dim=(1, 2))
    exp_alpha = torch.minimum(p_steps, q_steps).sum(dim=-1)
    p_at = p_t[rows, a]
    res = (p_at - q_pad[rows, a]).clamp_min_(0.0)
    res = torch.where(res.sum(dim=-1, keepdim=True) > _TINY, res, p_at)
    final = _race(res, noise).unsqueeze(1)
    a_col = a.unsqueeze(1)
    toks = torch.cat([drafts, final], dim=1).scatter_(1, a_col, final)
    kept = j <= a_col
    return a, kept, torch.where(kept, toks, pad_id), exp_alpha, ratio.squeeze(-1)


def _assemble(x0, first_p, first_h, blocks, max_new_tokens: int, eos_id: int | None, pad_id: int):
    """Rollout tensors from the first token and the per-step blocks (tokens, p(token), H(p), emitted slots,
    row done before the step): emitted entries of live rows in order, cut after each row's first EOS and at
    ``max_new_tokens``, packed left."""
    B, device = x0.shape[0], x0.device
    toks = torch.cat([x0.unsqueeze(1), *(b[0] for b in blocks)], dim=1)
    probs = torch.cat([first_p.unsqueeze(1), *(b[1] for b in blocks)], dim=1)
    ents = torch.cat([first_h.unsqueeze(1), *(b[2] for b in blocks)], dim=1)
    emit = torch.cat([torch.ones((B, 1), dtype=torch.bool, device=device),
                      *(b[3] & ~b[4].unsqueeze(1) for b in blocks)], dim=1)
    if eos_id is not None:
        is_eos = (emit & (toks == eos_id)).long()
        emit &= (is_eos.cumsum(1) - is_eos) == 0                      # nothing after the first EOS
    rank = emit.long().cumsum(1) - 1
    emit &= rank < max_new_tokens
    cols = torch.where(emit, rank, max_new_tokens)                     # column max_new_tokens = discarded
    width = (B, max_new_tokens + 1)
    out = torch.full(width, pad_id, dtype=torch.long, device=device).scatter_(1, cols, toks)
    logp = torch.zeros(width, device=device).scatter_(1, cols, probs.clamp_min(1e-30).log())
    ent = torch.zeros(width, device=device).scatter_(1, cols, ents)
    return out[:, :max_new_tokens], logp[:, :max_new_tokens], ent[:, :max_new_tokens], emit.sum(1)


@torch.inference_mode()
def generate_mtp(
    model: PreTrainedModel,
    head,
    prompts: list[list[int]],
    params: SamplingParams,
    max_new_tokens: int,
    eos_id: int | None,
    gamma: int | AdaptiveDraft = 3,
    rule: str = "rejection",
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    trace: list | None = None,
) -> Rollout:
    """MTP speculative sampling (DESIGN §3). Emitted tokens are distributed exactly as ``generate``
    (for ``rejection``, ``target_only`` and ``auto``; ``greedy`` equals plain τ = 0 decoding).

    ``trace``: a list that receives, per step, (each draft's own probability ``q_k(d_k)`` under the head's raw
    q_k, negated where d_k is EOS [B, γ_t], its acceptance chance r_k given d_k [B, γ_t], rows live at the step
    [B]) as device tensors — the data ``adaptive.replay`` scores drafting decisions on.

    ``gamma``: a fixed draft length, or an ``AdaptiveDraft`` choosing γ_t ∈ 1..γ_max per step; ``rule="auto"``
    verifies each row with RS or TO, whichever its predicted accept length favours (``bebop.experimental.adaptive``; at
    τ = 0 it is ``greedy``).

    Per step, with x the last emitted token at position t+1 (cache slot s) and g the head's output at t:
      draft:   q_1 = probs(LMHead(g)); d_1 ~ q_1; for k = 2..γ the head consumes (d_{k-1}, g_{k-1}) at
               position t+k-1 (temporary head slots s..s+γ-2) giving q_k, d_k.
      verify:  one target forward over [x, d_1..d_γ] (target slots s..s+γ) gives p_1..p_{γ+1};
               ``sampling.verify`` accepts a.
      rollback: slots s..s+a stay valid in both caches, s+a+1..s+γ become holes; the head overwrites its
               slots s..s+γ, re-reading positions t+1..t+a+1 with the TRUE target hiddens of [x, d_1..d_a] and
               the tokens [d_1..d_a, e] (e = correction/bonus token); its output at slot s+a is the next g.
    """
    adaptive = gamma if isinstance(gamma, AdaptiveDraft) else None
    G = adaptive.gamma_max if adaptive is not None else gamma
    if G < 1:
        raise BebopError(f"gamma must be >= 1, got {gamma}")
    if rule not in RULES and rule != AUTO:
        raise BebopError(f"unknown verification rule {rule!r}; expected one of {', '.join((*RULES, AUTO))}")
    auto_rule = rule == AUTO and not params.greedy
    if rule == AUTO:
        rule = "greedy" if params.greedy else "rejection"
    device = model.device
    t0 = time.perf_counter()
    ids, mask = left_pad(prompts, pad_id, device)
    B, P = ids.shape
    valid = torch.zeros((B, P + (max_new_tokens + 1) * (G + 1)), dtype=torch.bool, device=device)  # both caches
    valid[:, :P] = mask.bool()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    target, drafter, lm_head, _ = forwards(model, head, B, P + 2 * (max_new_tokens + G + 1))
    rs_fast = rule == "rejection" and not params.greedy

    # Prefill: target over the prompt, first token from p_0, then the head over the prompt.
    hid = target(ids, positions, valid[:, :P], 0)
    p0 = _probs(lm_head(hid[:, -1]), params)
    x = sample(p0, generator)
    x0 = x
    first_p, first_h = _emitted(p0, x)
    g = drafter(torch.cat([ids[:, 1:], x[:, None]], dim=1), hid, positions, valid[:, :P], 0)[:, -1]
    length = P                                                    # used slots (both caches)
    pos_x = positions[:, -1] + 1                                  # position of x (not yet in target cache)

    done = (x == eos_id) if eos_id is not None else torch.zeros(B, dtype=torch.bool, device=device)
    n = torch.ones(B, dtype=torch.long, device=device)           # tokens produced per row (before truncation)
    done |= n >= max_new_tokens
    j = torch.arange(G + 1, device=device)
    rows = torch.arange(B, device=device)
    zero_q = torch.zeros((B, p0.shape[-1]), device=device)
    # per step: (accepted a [B], done [B], expected α [B, γ_t], γ_t, TO drafts per row) for the metrics;
    # (tokens, p(token), H(p), kept, done) for the output
    history: list[tuple] = []
    blocks: list[tuple[torch.Tensor, ...]] = []
    metrics = DecodeMetrics(gamma=G)
    metrics.draft_forwards = 1
    planner = DraftPlanner(adaptive, G, B, rule, auto_rule, device, eos_id) if adaptive is not None or auto_rule \
        else None
    to_rows, q1 = None, None
    if planner is None:
        all_done, Gt = bool(done.all()), G
    else:
        q1 = _probs(lm_head(g), params)                                 # the planner reads max q_1
        all_done, Gt, to_rows = planner.step(done, q1)
    t_decode = time.perf_counter()
    while not all_done:
        s = length
        Gm = G if planner is not None else Gt                          # drafting may run up to γ_max
        vpos = pos_x.unsqueeze(1) + j.narrow(0, 0, Gm + 1)             # positions of [x, d_1..d_γ]
        # ---- draft: γ recursive head steps (γ-1 forwards; q_1 comes from the previous catch-up call)
        noise = _noise((Gm + 1, *zero_q.shape), zero_q, generator) if rs_fast else None  # γ drafts + final
        valid.narrow(1, s, Gm + 1).fill_(True)
        raw = [] if auto_rule else None
        g, vin, qs = _draft(g, x, vpos, valid, s, Gt, lm_head, drafter, params, rule, noise, generator, metrics,
                            to_rows, raw, q1, planner)
        Gt = len(qs)
        jt = j.narrow(0, 0, Gt + 1)
        vpos = vpos.narrow(1, 0, Gt + 1)
        # ---- verify: one target forward over [x, d_1..d_γ]
        vhid = target(vin, vpos, valid.narrow(1, 0, s + Gt + 1), s)
        metrics.target_forwards += 1
        p_t = _probs(lm_head(vhid), params)                            # [B, γ+1, V]
        a, kept, toks, exp_alpha, ratio = _accept(p_t, qs, vin, rule, noise, zero_q, jt, rows, pad_id, generator)
        # ---- emit: keep the block; per-row EOS / max-token truncation is resolved once at the end
        pt, h = _emitted(p_t, toks)
        blocks.append((toks, pt, h, kept, done))
        history.append((a, done, exp_alpha, Gt, None if to_rows is None else to_rows * Gt))
        if trace is not None:                                          # each draft's q_k(d_k) and chance r_k
            d = vin.narrow(1, 1, Gt)
            conf = torch.stack(raw or qs, dim=1).gather(-1, d.unsqueeze(-1)).squeeze(-1)
            trace.append((conf if eos_id is None else torch.where(d == eos_id, -conf, conf), ratio.clamp(max=1.0),
                          ~done))
        a1 = a + 1
        if eos_id is not None:  # (pad_id fills the slots after the emitted ones)
            hit = toks == eos_id if pad_id != eos_id else (toks == eos_id) & kept
            done = done | hit.any(1)
        n = n + a1
        done = done | (n >= max_new_tokens)
        # ---- roll back: holes in both caches; the head re-reads the accepted positions with true hiddens
        valid.narrow(1, s, Gt + 1).copy_(kept)
        gh = drafter(toks, vhid, vpos, valid.narrow(1, 0, s + Gt + 1), s)
        metrics.draft_forwards += 1
        g = gh[rows, a]
        x = toks[rows, a]                                              # the correction/bonus token
        pos_x = pos_x + a1
        length = s + Gt + 1
        if planner is not None:                                        # the step's one host sync
            alphas = torch.cat(step_alphas(p_t[:, :Gt], torch.stack(raw, dim=1)), dim=1) \
                if auto_rule and planner.learning else None
            q1 = _probs(lm_head(g), params)
            all_done, Gt, to_rows = planner.step(done, q1, a, ratio, alphas)
        else:
            all_done = bool(done.all())

    out, logp, ent, n = _assemble(x0, first_p, first_h, blocks, max_new_tokens, eos_id, pad_id)
    metrics.tokens = int(n.sum())
    t1 = time.perf_counter()
    metrics.seconds, metrics.decode_seconds = t1 - t0, t1 - t_decode
    _count_acceptance(metrics, history)
    return Rollout(out, n, logp, ent, metrics)
