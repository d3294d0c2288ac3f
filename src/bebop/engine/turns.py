"""Native multi-turn rollouts: rows pause at their own tool call, the environment's tokens are prefilled into
the KV caches (target and MTP head), and decoding resumes with MTP drafting — no prefix is ever recomputed.

``generate_turns`` drives one batch through two alternating phases over one shared slot layout (as in
``engine.generate_mtp``: rectangular caches, a per-row validity mask over slots, explicit position ids):

(a) decode: ``engine.generate_mtp``'s draft → verify → accept step over the LIVE rows (``head=None``: one plain
    target forward per step, the γ = 0 case of the same loop). A row's emitted block is cut after its first
    terminator or EOS and at its token budget; the cut behaves exactly like a rejection at that point (the
    slots after it become holes in both caches, the head's state is taken at the cut), so the emitted
    sequence up to the cut keeps the plain-sampling law. Rows that are paused (waiting for the environment)
    or finished ride along in the batched forwards but write only holes and keep their state.
    Runs until no row is live.
(b) environment: every paused row's transcript goes to ``env``; its reply tokens e_1..e_m (ragged m) are
    appended through ONE batched target forward over ``[x, e_1..e_m]`` (x = the pending terminator, not yet
    in the target cache; padding slots are holes) and ONE head catch-up forward over the same slots
    (tokens ``[e_1..e_m, x']``, hiddens of ``[x, e_1..e_m]``, as the head reads prefill). The next model token
    x' is sampled from the target's p after e_m; the head's output at e_m gives the next q_1. Then (a) again.

Returned per row (``TurnRollout``): the transcript after the prompt (model and environment tokens), a mask of
which tokens were sampled by the model, and the target's log p / H(p) on sampled tokens (0 on environment
tokens). ``DecodeMetrics`` count model tokens only; acceptance counters come from verify steps only (before
the terminator/EOS/budget cut, as in ``generate_mtp``), so environment tokens never enter them.
``target_forwards`` counts decode steps and environment prefills (not the prompt prefill).

Batch compaction: at each environment phase the batch (caches, masks, row state) shrinks to the rows that
resume, so finished rows stop costing forwards; within a decode phase, paused and finished rows still ride
along (as done rows do in ``generate``/``generate_mtp``). Outputs are always indexed by the original rows.

Row ends (independently): EOS; ``max_new_tokens`` transcript tokens (model + environment; a reply that
reaches it is still appended, then the row ends); a turn of ``turn_tokens`` model tokens without the
terminator; ``env`` returning None; ``max_turns`` replies already given when the terminator comes. These are
exactly the rules of the re-prefill reference ``bebop.training.multiturn.rollout_multi_turn_reprefill``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from bebop.core.sampling import RULES, SamplingParams, sample
from bebop.engine import decode as engine
from bebop.engine.decode import (
    DecodeMetrics,
    Rollout,
    _accept,
    _count_acceptance,
    _draft,
    _emitted,
    _noise,
    _probs,
    _race,
    left_pad,
)
from bebop.errors import BebopError

Env = Callable[[int, list[int]], "list[int] | None"]
"""``env(row, transcript) -> reply tokens`` (None ends the row); ``transcript`` = the row's tokens after its
prompt so far (model and environment), ending with the terminator."""


@dataclass
class TurnRollout(Rollout):
    """Multi-turn transcripts. ``tokens[b, :lengths[b]]`` is row b's transcript after the prompt;
    ``sampled`` marks model-sampled tokens (False on environment tokens and padding); ``logprobs`` /
    ``entropy`` are the target's log p(token) and H(p) on sampled tokens, 0 elsewhere; ``turns`` counts the
    environment replies appended per row."""

    sampled: torch.Tensor | None = None
    turns: torch.Tensor | None = None


def _pack(events, pad_id: int, batch: int):
    """Transcript tensors from the time-ordered events (rows, tokens, p(token), H(p), emitted, sampled), each
    [b, w] over the original rows ``rows`` (None = all ``batch`` rows, in order): emitted entries in order,
    packed left. Returns (tokens, sampled, logp, entropy, lengths), [batch, ...]."""
    fills = (pad_id, 1.0, 0.0, False, False)

    def widen(rows, fields):
        if rows is None:
            return fields
        return tuple(t.new_full((batch, t.shape[1]), f).index_copy_(0, rows, t) for t, f in zip(fields, fills,
                                                                                                  strict=True))

    toks, probs, ents, emit, smp = (torch.cat(x, dim=1) for x in zip(*(widen(e[0], e[1:]) for e in events),
                                                                        strict=True))
    n = emit.sum(1)
    width = int(n.max()) if n.numel() else 0
    cols = torch.where(emit, emit.long().cumsum(1) - 1, width)           # column ``width`` = discarded
    shape = (toks.shape[0], width + 1)
    out = torch.full(shape, pad_id, dtype=torch.long, device=toks.device).scatter_(1, cols, toks)
    sampled = torch.zeros(shape, dtype=torch.bool, device=toks.device).scatter_(1, cols, smp & emit)
    logp = torch.zeros(shape, device=toks.device).scatter_(1, cols, probs.clamp_min(1e-30).log())
    ent = torch.zeros(shape, device=toks.device).scatter_(1, cols, ents)
    sampled = sampled[:, :width]
    return (out[:, :width], sampled, torch.where(sampled, logp[:, :width], 0.0),
            torch.where(sampled, ent[:, :width], 0.0), n)


@torch.inference_mode()
def generate_turns(
    model: PreTrainedModel,
    head,
    prompts: list[list[int]],
    params: SamplingParams,
    max_new_tokens: int,
    eos_id: int | None,
    stop_id: int,
    env: Env,
    gamma: int = 3,
    rule: str = "rejection",
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    turn_tokens: int | None = None,
    max_turns: int | None = None,
) -> TurnRollout:
    """Multi-turn sampling (module doc): MTP draft→verify with ``head`` (DESIGN §3; exact for ``rejection``
    and ``target_only``, ``greedy`` equals plain τ = 0), plain sampling with ``head=None``. A row pauses when
    it emits ``stop_id``; ``env`` answers; the reply is prefilled and the row resumes."""
    if head is not None:
        if gamma < 1:
            raise BebopError(f"gamma must be >= 1, got {gamma}")
        if rule not in RULES:
            raise BebopError(f"unknown verification rule {rule!r}; expected one of {', '.join(RULES)}")
    if max_new_tokens < 1:
        raise BebopError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    G = gamma if head is not None else 0
    device = model.device
    t0 = time.perf_counter()
    ids, mask = left_pad(prompts, pad_id, device)
    B, P = ids.shape
    valid = torch.zeros((B, P + (2 if G else 1) * (max_new_tokens + G + 1)), dtype=torch.bool, device=device)
    valid[:, :P] = mask.bool()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    target, drafter, lm_head, select = engine.forwards(model, head, B, valid.shape[1])
    B0 = B
    orig: torch.Tensor | None = None                              # batch row -> original row (None = identity)
    orig_host = list(range(B))
    rs_fast = rule == "rejection" and not params.greedy
    turn_cap = turn_tokens if turn_tokens is not None else max_new_tokens
    rows = torch.arange(B, device=device)
    j = torch.arange(G + 1, device=device)
    metrics = DecodeMetrics(gamma=G)
    events: list[tuple[torch.Tensor, ...]] = []
    history: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    metrics.reached, metrics.accepted_k, metrics.expected_k = ([0.0] * G for _ in range(3))

    def flush() -> None:
        """Add the acceptance counters of the steps since the last flush (one batch layout) to ``metrics``."""
        nonlocal history
        if history:
            part = DecodeMetrics(gamma=G)
            _count_acceptance(part, history)
            for name in ("steps", "accepted", "drafted", "target_only_drafts"):
                setattr(metrics, name, getattr(metrics, name) + getattr(part, name))
            for name in ("reached", "accepted_k", "expected_k"):
                setattr(metrics, name, [a + b for a, b in zip(getattr(metrics, name), getattr(part, name),
                                                              strict=True)])
        history = []
    ones = torch.ones((B, 1), dtype=torch.bool, device=device)
    smp_all = torch.ones((B, G + 1), dtype=torch.bool, device=device)
    a_zero = torch.zeros(B, dtype=torch.long, device=device)

    def ensure(n: int) -> None:
        nonlocal valid
        if n > valid.shape[1]:
            grown = torch.zeros((B, max(n, 2 * valid.shape[1])), dtype=torch.bool, device=device)
            grown[:, : valid.shape[1]] = valid
            valid = grown

    # row state: live (decoding), paused (waiting for env); neither = finished
    live = torch.ones(B, dtype=torch.bool, device=device)
    paused = torch.zeros(B, dtype=torch.bool, device=device)
    # model tokens a row may still emit in its current turn: min(transcript budget left, turn budget left)
    room = torch.full((B,), min(max_new_tokens, turn_cap), dtype=torch.long, device=device)
    turns = [0] * B
    pausing = stop_id != eos_id                                   # (an EOS never pauses)

    def advance(count: torch.Tensor, last: torch.Tensor, active: torch.Tensor) -> None:
        """Book ``count`` emitted tokens ending with ``last`` for the ``active`` rows; pause/finish rows."""
        nonlocal live, paused, room
        room = room - count * active
        is_stop = last == stop_id
        end = is_stop | (room <= 0)
        if eos_id is not None:
            end |= last == eos_id
        live = live & ~(active & end)
        if pausing:
            paused = paused | (active & is_stop)

    # ---- prefill: target over the prompt, first token from p_0, then the head over the prompt
    hid = target(ids, positions, valid[:, :P], 0)
    p0 = _probs(lm_head(hid[:, -1]), params)
    x = sample(p0, generator)
    pt, h = _emitted(p0, x)
    events.append((orig, x[:, None], pt[:, None], h[:, None], ones, ones))
    g = None
    if G:
        g = drafter(torch.cat([ids[:, 1:], x[:, None]], dim=1), hid, positions, valid[:, :P], 0)[:, -1]
        metrics.draft_forwards += 1
    length = P                                                    # used slots (both caches)
    pos_x = positions[:, -1] + 1                                  # position of x (not yet in target cache)
    advance(torch.ones_like(pos_x), x, live)
    zero_q = torch.zeros((B, p0.shape[-1]), device=device)

    while True:
        any_live, any_paused = torch.stack([live.any(), paused.any()]).tolist()   # the step's one host sync
        if any_live:
            # ---- (a) one decode step over the live rows
            s = length
            ensure(s + G + 1)
            vpos = pos_x.unsqueeze(1) + j
            valid.narrow(1, s, G + 1).fill_(True)
            noise = _noise((G + 1, *zero_q.shape), zero_q, generator) if rs_fast or not (G or params.greedy) else None
            fast = noise if rs_fast else None
            g, vin, qs = _draft(g, x, vpos, valid, s, G, lm_head, drafter, params, rule, fast, generator, metrics)
            vhid = target(vin, vpos, valid.narrow(1, 0, s + G + 1), s)
            metrics.target_forwards += 1
            p_t = _probs(lm_head(vhid), params)                        # [B, γ+1, V]
            if not G:
                p1 = p_t[:, 0]
                toks = (p1.argmax(-1) if params.greedy else _race(p1, noise[0])).unsqueeze(1)
                a = a_zero
            else:
                a, _, toks, exp_alpha, _ = _accept(p_t, qs, vin, rule, fast, zero_q, j, rows, pad_id, generator)
            if G:
                history.append((a, ~live, exp_alpha, G, None))
                # cut after the first terminator/EOS and at the row's budget; a cut acts as a rejection there
                hit = (toks == stop_id) if eos_id is None else (toks == stop_id) | (toks == eos_id)
                hit &= j <= a.unsqueeze(1)
                first = torch.where(hit.any(1), hit.long().argmax(1), G + 1)
                a_eff = torch.minimum(torch.minimum(a, first), room - 1).clamp_min(0)
                kept = (j <= a_eff.unsqueeze(1)) & live.unsqueeze(1)
                last = toks[rows, a_eff]
            else:                                                      # one token per step: nothing to cut
                a_eff, kept, last = a, live.unsqueeze(1), toks[:, 0]
            pt, h = _emitted(p_t, toks)
            events.append((orig, toks, pt, h, kept, smp_all))
            valid.narrow(1, s, G + 1).copy_(kept)                      # holes: rejected, cut, or not live
            if G:
                gh = drafter(toks, vhid, vpos, valid.narrow(1, 0, s + G + 1), s)
                metrics.draft_forwards += 1
                g = torch.where(live.unsqueeze(1), gh[rows, a_eff], g)
            x = torch.where(live, last, x)
            pos_x = torch.where(live, pos_x + a_eff + 1, pos_x)
            length = s + G + 1
            advance(a_eff + 1, last, live)
            continue
        if not any_paused:
            break
        # ---- (b) environment: replies for every paused row; the rows that go on form the new (compacted)
        #      batch; one batched prefill of the replies, then resume
        out, _, _, _, n = _pack(events, pad_id, B0)
        idx = paused.nonzero().squeeze(1).tolist()                    # batch rows
        n_host = n.tolist()                                           # transcript lengths so far, original rows
        texts = dict(zip(idx, out[[orig_host[c] for c in idx]].tolist(), strict=True))
        replies: dict[int, list[int]] = {}
        resume: list[int] = []
        for c in idx:
            r = orig_host[c]
            if max_turns is not None and turns[r] >= max_turns:
                continue
            reply = env(r, texts[c][: n_host[r]])
            if reply is None:
                continue
            replies[c] = list(reply)
            turns[r] += 1
            if n_host[r] + len(reply) < max_new_tokens:
                resume.append(c)
        paused = torch.zeros_like(paused)
        if not replies:
            continue
        W = max(len(v) for v in replies.values())
        env_tok = torch.full((B, W + 1), pad_id, dtype=torch.long)
        m = torch.zeros(B, dtype=torch.long)
        got = torch.zeros(B, dtype=torch.bool)
        for c, reply in replies.items():
            env_tok[c, : len(reply)] = torch.tensor(reply, dtype=torch.long)
            m[c], got[c] = len(reply), True
        env_tok, m, got = env_tok.to(device), m.to(device), got.to(device)
        jw = torch.arange(W + 1, device=device)
        events.append((orig, env_tok[:, :W], torch.ones((B, W), device=device), torch.zeros((B, W), device=device),
                       (jw[:W] < m.unsqueeze(1)) & got.unsqueeze(1),
                       torch.zeros((B, W), dtype=torch.bool, device=device)))
        if not resume:
            continue
        room = torch.tensor([min(max_new_tokens - n_host[orig_host[c]] - len(replies[c]), turn_cap) for c in resume],
                            dtype=torch.long, device=device)
        if len(resume) < B:                                           # compact: keep the resumed rows only
            flush()
            keep = torch.tensor(resume, dtype=torch.long, device=device)
            select(keep)
            valid, x, pos_x, env_tok, m = valid[keep], x[keep], pos_x[keep], env_tok[keep], m[keep]
            g = g[keep] if G else g
            orig = keep if orig is None else orig[keep]
            orig_host = [orig_host[c] for c in resume]
            B = len(resume)
            rows = torch.arange(B, device=device)
            ones, smp_all, a_zero, zero_q = ones[:B], smp_all[:B], a_zero[:B], zero_q[:B]
        s = length
        ensure(s + W + 1)
        vin = torch.cat([x.unsqueeze(1), env_tok[:, :W]], dim=1)       # [x, e_1..e_m, pad...]
        vpos = pos_x.unsqueeze(1) + jw
        valid.narrow(1, s, W + 1).copy_(jw <= m.unsqueeze(1))
        hid = target(vin, vpos, valid.narrow(1, 0, s + W + 1), s)
        metrics.target_forwards += 1
        p = _probs(lm_head(hid[rows, m]), params)
        x = sample(p, generator)
        pt, h = _emitted(p, x)
        events.append((orig, x[:, None], pt[:, None], h[:, None], ones, ones))
        if G:
            htoks = env_tok.scatter(1, m.unsqueeze(1), x.unsqueeze(1))       # [e_1..e_m, x', pad...]
            g = drafter(htoks, hid, vpos, valid.narrow(1, 0, s + W + 1), s)[rows, m]
            metrics.draft_forwards += 1
        pos_x = pos_x + m + 1
        length = s + W + 1
        live = torch.ones(B, dtype=torch.bool, device=device)
        paused = torch.zeros(B, dtype=torch.bool, device=device)
        advance(torch.ones_like(pos_x), x, live)

    out, sampled, logp, ent, n = _pack(events, pad_id, B0)
    metrics.tokens = int(sampled.sum())
    metrics.seconds = time.perf_counter() - t0
    flush()
    return TurnRollout(out, n, logp, ent, metrics, sampled=sampled, turns=torch.tensor(turns, dtype=torch.long))
