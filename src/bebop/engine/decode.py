"""Batched KV-cache generation on a stock transformers causal LM: plain sampling, and MTP draft→verify.

``generate`` samples one token per target forward; ``generate_mtp`` runs ``engine.step.spec_step`` (draft →
verify → accept → roll back, DESIGN §3) until every row is done. Both decode through the same forwards
(``engine.forwards``: lean when supported, or transformers' with ``backend="transformers"``). A drafting policy
(``engine.drafting.DraftPolicy``, e.g. adaptive drafting) may be passed as ``gamma`` to choose the draft length per
step and RS or TO per row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from bebop.config import check_gamma
from bebop.core.acceptance import alpha_rs, alpha_to
from bebop.core.sampling import RULES, NoiseBank, SamplingParams, probs_fast, race, sample
from bebop.engine.drafting import AUTO, Drafting, DraftPolicy
from bebop.engine.forwards import (
    BACKENDS,
    check_context,
    forward_costs,
    forwards,
    left_pad,
    median_seconds,
    target_forward,
)
from bebop.engine.metrics import DecodeMetrics, acceptance_counts
from bebop.engine.slots import compact, longest_row, wasteful
from bebop.engine.step import DRAWS_AHEAD, SpecConfig, SpecState, Step, StepPlan, emitted, spec_step
from bebop.errors import BebopError

__all__ = ["BACKENDS", "DecodeConfig", "DecodeMetrics", "Rollout", "forward_costs", "forwards", "generate",
           "generate_mtp", "left_pad", "median_seconds", "mtp_decode", "pack", "target_forward"]


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

    @property
    def sampled_mask(self) -> torch.Tensor:
        """Tokens the model sampled: every token within ``lengths`` (multi-turn rollouts exclude the
        environment's)."""
        return self.mask


def pack(toks: torch.Tensor, probs: torch.Tensor, ents: torch.Tensor, emit: torch.Tensor, pad_id: int,
         eos_id: int | None = None, width: int | None = None) -> tuple[torch.Tensor, ...]:
    """Output tensors from per-slot blocks [B, N] in time order: the ``emit``-ted entries of each row packed
    left, cut after its first emitted ``eos_id`` and at ``width`` tokens (default: the longest row). Returns
    (tokens [B, width] padded with ``pad_id``, log p(token), H(p) (0 on padding), emitted count [B], the
    column of every slot (``width`` = dropped) for packing further per-slot fields)."""
    if eos_id is not None:
        is_eos = (emit & (toks == eos_id)).long()
        emit = emit & ((is_eos.cumsum(1) - is_eos) == 0)               # nothing after the first EOS
    rank = emit.long().cumsum(1) - 1
    if width is None:
        width = int(emit.sum(1).max()) if emit.numel() else 0
    emit = emit & (rank < width)
    cols = torch.where(emit, rank, width)                              # column ``width`` = discarded
    shape = (toks.shape[0], width + 1)
    out = torch.full(shape, pad_id, dtype=torch.long, device=toks.device).scatter_(1, cols, toks)
    logp = torch.zeros(shape, device=toks.device).scatter_(1, cols, probs.clamp_min(1e-30).log())
    ent = torch.zeros(shape, device=toks.device).scatter_(1, cols, ents)
    return out[:, :width], logp[:, :width], ent[:, :width], emit.sum(1), cols


CHECK_EVERY = 64
"""``mtp_decode`` reads the longest row's valid slots (a host sync) once per this many new cache columns, to decide
whether compacting the caches pays (``engine.slots``)."""


@dataclass
class DecodeConfig:
    """How to decode: the sampling transforms, the token budget per row, the EOS token (None: none), the draft
    length or a drafting policy and the verification rule (MTP only), the padding token, the random generator
    and the forwards' backend (``"auto"``: lean when supported, or ``"transformers"``)."""

    params: SamplingParams
    max_new_tokens: int
    eos_id: int | None
    gamma: int | DraftPolicy = 3
    rule: str = "rejection"
    pad_id: int = 0
    generator: torch.Generator | None = None
    backend: str = "auto"


@dataclass
class _Prefill:
    """The state right after prefill: target over the prompt, the first token x from p_0 (its p(x), H(p_0)), the
    head over the prompt (g), and the slot/position bookkeeping for ``spec_step``."""

    state: SpecState
    p0: torch.Tensor
    first_x: torch.Tensor
    first_p: torch.Tensor
    first_h: torch.Tensor
    prompt_len: int


def prefill(cfg: SpecConfig, prompts: list[list[int]], capacity: int, device) -> _Prefill:
    """Prefill both caches over the left-padded ``prompts`` and sample the first token (DESIGN §3, step 1)."""
    ids, mask = left_pad(prompts, cfg.pad_id, device)
    B, P = ids.shape
    valid = torch.zeros((B, capacity), dtype=torch.bool, device=device)
    valid[:, :P] = mask.bool()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    hid = cfg.fw.target(ids, positions, valid[:, :P], 0)
    p0 = cfg.probs(hid[:, -1])
    x = sample(p0, cfg.generator)
    first_p, first_h = emitted(p0, x)
    g = None
    if cfg.fw.drafter is not None:
        g = cfg.fw.drafter(torch.cat([ids[:, 1:], x[:, None]], dim=1), hid, positions, valid[:, :P], 0)[:, -1]
        cfg.metrics.draft_forwards += 1
    zero_q = torch.zeros((B, p0.shape[-1]), device=device)
    state = SpecState(x, positions[:, -1] + 1, g, valid, P, zero_q)
    return _Prefill(state, p0, x, first_p, first_h, P)


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    prompts: list[list[int]],
    params: SamplingParams,
    max_new_tokens: int,
    eos_id: int | None,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> Rollout:
    """Plain autoregressive sampling from p (DESIGN §1) with a KV cache; one target forward per token.

    The first token is sampled from the prefill's last position before the decode clock starts, as in
    ``mtp_decode``, so both report the same phase in ``DecodeMetrics.decode_seconds`` / ``decode_tokens``. Each
    further token costs one target forward and one host sync (whether every row has hit EOS)."""
    check_context(model, prompts, max_new_tokens)
    device = model.device
    t0 = time.perf_counter()
    ids, mask = left_pad(prompts, pad_id, device)
    B, P = ids.shape
    valid = torch.ones((B, P + max_new_tokens), dtype=torch.bool, device=device)
    valid[:, :P] = mask.bool()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    fw = forwards(model, None, B, P + max_new_tokens, backend)
    metrics = DecodeMetrics()
    bank: list[NoiseBank] = []                    # the token races' noise, drawn ahead (made at the first draw)

    def draw(hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        p = probs_fast(fw.lm_head(hidden), params)
        if params.greedy:
            tok = p.argmax(-1)
        else:
            if not bank:
                bank.append(NoiseBank(tuple(p.shape), None, device, generator, max_steps=DRAWS_AHEAD))
            tok = race(p, bank[0].next()[0])
        return (tok, *emitted(p, tok))

    tok, pt, h = draw(fw.target(ids, positions, valid[:, :P], 0).select(1, P - 1))
    toks, probs, ents = [tok], [pt], [h]
    pos = positions[:, -1:]
    done = tok == eos_id if eos_id is not None else None
    t_decode = time.perf_counter()
    for step in range(1, max_new_tokens):
        if done is not None and bool(done.all()):  # the step's one host sync
            break
        pos = pos + 1
        hidden = fw.target(tok.unsqueeze(1), pos, valid.narrow(1, 0, P + step), P + step - 1).squeeze(1)
        metrics.target_forwards += 1
        tok, pt, h = draw(hidden)
        toks.append(tok)
        probs.append(pt)
        ents.append(h)
        if done is not None:
            done = done | (tok == eos_id)
    out, logp, ent, n, _ = pack(torch.stack(toks, 1), torch.stack(probs, 1), torch.stack(ents, 1),
                                torch.ones((B, len(toks)), dtype=torch.bool, device=device), pad_id, eos_id,
                                max_new_tokens)
    n.sum().item()                                  # the call's closing sync: the clock stops when the work has
    t1 = time.perf_counter()                        # run (counting below is bookkeeping, outside it)
    metrics.seconds, metrics.decode_seconds = t1 - t0, t1 - t_decode
    metrics.merge(acceptance_counts(0, [], tokens=n))                 # the tokens, totals and per row
    metrics.decode_tokens = metrics.tokens - B
    # each decode forward gives every live row one token: live row-steps = decode tokens
    metrics.slot_steps, metrics.live_steps = B * metrics.target_forwards, metrics.decode_tokens
    return Rollout(out, n, logp, ent, metrics)


def _policy(gamma: int | DraftPolicy, rule: str, params: SamplingParams) -> tuple[int, str, bool, bool]:
    """(γ_max, the verification rule, whether rows pick RS/TO (rule auto at τ > 0), whether a policy plans)."""
    policy = not isinstance(gamma, int)
    G = check_gamma(gamma.gamma_max if policy else gamma)
    if rule not in RULES and rule != AUTO:
        raise BebopError(f"unknown verification rule {rule!r}; expected one of {', '.join((*RULES, AUTO))}")
    auto_rule = rule == AUTO and not params.greedy
    if auto_rule and not policy:
        raise BebopError("rule 'auto' picks RS or TO per row: pass a drafting policy as gamma "
                         "(bebop.experimental.adaptive.as_policy)")
    if rule == AUTO:
        rule = "greedy" if params.greedy else "rejection"
    return G, rule, auto_rule, policy


def _trace_entry(step: Step, done: torch.Tensor, eos_id: int | None) -> tuple[torch.Tensor, ...]:
    """Each draft's own probability q_k(d_k) under the head's raw q_k (negated where d_k is EOS), its acceptance
    chance r_k given d_k, and the rows live at the step."""
    d = step.vin.narrow(1, 1, step.gamma)
    conf = torch.stack(step.raw, dim=1).gather(-1, d.unsqueeze(-1)).squeeze(-1)
    return (conf if eos_id is None else torch.where(d == eos_id, -conf, conf), step.ratio.clamp(max=1.0), ~done)


@torch.inference_mode()
def generate_mtp(
    model: PreTrainedModel,
    head,
    prompts: list[list[int]],
    params: SamplingParams,
    max_new_tokens: int,
    eos_id: int | None,
    gamma: int | DraftPolicy = 3,
    rule: str = "rejection",
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    trace: list | None = None,
    backend: str = "auto",
) -> Rollout:
    """``mtp_decode`` with the options as arguments (the engine's long-standing call signature)."""
    cfg = DecodeConfig(params, max_new_tokens, eos_id, gamma, rule, pad_id, generator, backend)
    return mtp_decode(model, head, prompts, cfg, trace)


@torch.inference_mode()
def mtp_decode(model: PreTrainedModel, head, prompts: list[list[int]], dc: DecodeConfig,
               trace: list | None = None) -> Rollout:
    """MTP speculative sampling (DESIGN §3). Emitted tokens are distributed exactly as ``generate``
    (for ``rejection``, ``target_only`` and ``auto``; ``greedy`` equals plain τ = 0 decoding).

    ``dc.gamma``: a fixed draft length, or a ``DraftPolicy`` (``engine.drafting``) that plans γ_t ≤ γ_max per step
    and, with rule ``auto``, verifies each row with RS or TO (at τ = 0 auto is ``greedy``). ``trace``: a list
    that receives, per step, (each draft's ``q_k(d_k)`` under the head's raw q_k, negated where d_k is EOS
    [B, γ_t], its acceptance chance r_k given d_k [B, γ_t], rows live at the step [B]) as device tensors."""
    params, max_new_tokens, eos_id, pad_id, gamma = dc.params, dc.max_new_tokens, dc.eos_id, dc.pad_id, dc.gamma
    G, rule, auto_rule, policy = _policy(gamma, dc.rule, params)
    check_context(model, prompts, max_new_tokens)
    device = model.device
    t0 = time.perf_counter()
    B = len(prompts)
    P = max(len(p) for p in prompts)
    metrics = DecodeMetrics(gamma=G)
    cfg = SpecConfig(forwards(model, head, B, P + 2 * (max_new_tokens + G + 1), dc.backend, G), params, rule, pad_id,
                     dc.generator, metrics)
    pre = prefill(cfg, prompts, P + (max_new_tokens + 1) * (G + 1), device)
    st = pre.state
    done = (st.x == eos_id) if eos_id is not None else torch.zeros(B, dtype=torch.bool, device=device)
    # a row has produced max_new_tokens once its next token's position reaches pos_lim (no separate count)
    pos_lim = st.pos_x + (max_new_tokens - 1)
    done |= st.pos_x >= pos_lim
    planner = gamma.start(B, rule, auto_rule, device, eos_id) if policy else None
    history, blocks = [], []      # per step: acceptance counters; (tokens, p(token), H(p), kept) for output
    plan = StepPlan(G, G, planner=planner)
    if planner is None:
        all_done = bool(done.all())
    else:
        plan.q1 = cfg.probs(st.g)                                        # the planner reads max q_1
        all_done, plan.gamma, plan.to_rows = planner.step(done, plan.q1)
    t_decode = time.perf_counter()
    check_at = st.length + CHECK_EVERY
    while not all_done:
        step = spec_step(cfg, st, plan)
        blocks.append((step.toks, step.p_tok, step.ent, step.kept))
        to = None if plan.to_rows is None else plan.to_rows * step.gamma
        history.append((step.accepted, done, step.expected_alpha, step.gamma, to, None))
        if trace is not None:
            trace.append(_trace_entry(step, done, eos_id))
        done = done | (st.pos_x >= pos_lim)
        if eos_id is not None:  # (pad_id fills the slots after the emitted ones)
            hit = step.toks == eos_id if pad_id != eos_id else (step.toks == eos_id) & step.kept
            done = done | hit.any(1)
        all_done = _plan_next(cfg, st, plan, planner, step, done, auto_rule)
        if not all_done and st.length >= check_at:     # hole slots reused (engine.slots): one read per CHECK_EVERY
            longest = int(longest_row(st, ~done))
            if wasteful(st.length, longest):
                compact(cfg.fw, st, ~done, longest)
            check_at = st.length + CHECK_EVERY
    # a finished row's later blocks need no masking: pack drops everything after a row's first EOS and past
    # max_new_tokens, the only two ways a row finishes
    emit = [torch.ones((B, 1), dtype=torch.bool, device=device), *(b[3] for b in blocks)]
    out, logp, ent, n, _ = pack(torch.cat([pre.first_x.unsqueeze(1), *(b[0] for b in blocks)], dim=1),
                                torch.cat([pre.first_p.unsqueeze(1), *(b[1] for b in blocks)], dim=1),
                                torch.cat([pre.first_h.unsqueeze(1), *(b[2] for b in blocks)], dim=1),
                                torch.cat(emit, dim=1), pad_id, eos_id, max_new_tokens)
    n.sum().item()                                  # the call's closing sync: the clock stops when the work has
    t1 = time.perf_counter()                        # run (counting below is bookkeeping, outside it)
    metrics.seconds, metrics.decode_seconds = t1 - t0, t1 - t_decode
    metrics.merge(acceptance_counts(G, history, tokens=n))           # totals and per row (rows keep their order)
    metrics.decode_tokens = metrics.tokens - B
    metrics.slot_steps, metrics.live_steps = B * metrics.target_forwards, metrics.steps
    return Rollout(out, n, logp, ent, metrics)


def _plan_next(cfg: SpecConfig, st: SpecState, plan: StepPlan, planner: Drafting | None, step: Step,
               done: torch.Tensor, auto_rule: bool) -> bool:
    """The step's one host sync: whether every row is done; a planner also plans the next step into ``plan``
    from the verify it just saw (both rules' α only on the steps it learns from, rule auto)."""
    if planner is None:
        return bool(done.all())
    alphas = None
    if auto_rule and planner.learning:
        p, q = step.p[:, : step.gamma], torch.stack(step.raw, dim=1)
        alphas = torch.cat([alpha_rs(p, q), alpha_to(p, q)], dim=1)
    plan.q1 = cfg.probs(st.g)
    all_done, plan.gamma, plan.to_rows = planner.step(done, plan.q1, step.accepted, step.ratio, alphas)
    return all_done
