"""Native multi-turn rollouts: rows pause at their own tool call, the environment's tokens are prefilled into
the KV caches (target and MTP head), and decoding resumes with MTP drafting — no prefix is ever recomputed.

``generate_turns`` drives one batch through two alternating phases over one shared slot layout (as in
``engine.generate_mtp``: rectangular caches, a per-row validity mask over slots, explicit position ids):

(a) decode: ``engine.step.spec_step`` (draft → verify → accept → roll back) over the LIVE rows (``head=None``: one plain
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
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from bebop.config import check_gamma
from bebop.core.sampling import RULES, SamplingParams, sample
from bebop.engine.decode import DecodeConfig, Rollout, pack, prefill
from bebop.engine.forwards import check_context, forwards
from bebop.engine.metrics import DecodeMetrics, acceptance_counts
from bebop.engine.slots import compact, longest_row, wasteful
from bebop.engine.step import SpecConfig, SpecState, StepPlan, emitted, spec_step
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

    @property
    def sampled_mask(self) -> torch.Tensor:
        return self.sampled


@dataclass
class Turns:
    """A multi-turn episode's environment: ``env(row, transcript)`` answers when a row emits ``stop_id``;
    ``turn_tokens`` caps the model tokens of one turn and ``max_turns`` the replies (None: no cap)."""

    env: Env
    stop_id: int
    turn_tokens: int | None = None
    max_turns: int | None = None


@dataclass
class TurnLimits:
    """Where a row stops (module doc): ``turns.stop_id`` pauses it for ``turns.env``; EOS ends it;
    ``max_new_tokens`` transcript tokens, ``turns.turn_tokens`` model tokens per turn and ``turns.max_turns``
    replies."""

    turns: Turns
    eos_id: int | None
    max_new_tokens: int

    @property
    def env(self) -> Env:
        return self.turns.env

    @property
    def stop_id(self) -> int:
        return self.turns.stop_id

    @property
    def max_turns(self) -> int | None:
        return self.turns.max_turns

    @property
    def turn_cap(self) -> int:
        return self.turns.turn_tokens if self.turns.turn_tokens is not None else self.max_new_tokens


def _pack(events, pad_id: int, batch: int):
    """Transcript tensors from the time-ordered events (rows, tokens, p(token), H(p), emitted, sampled), each
    [b, w] over the original rows ``rows`` (None = all ``batch`` rows, in order): ``decode.pack`` of the
    emitted entries. Returns (tokens, sampled, logp, entropy, lengths), [batch, ...]."""
    fills = (pad_id, 1.0, 0.0, False, False)

    def widen(rows, fields):
        if rows is None:
            return fields
        return tuple(t.new_full((batch, t.shape[1]), f).index_copy_(0, rows, t) for t, f in zip(fields, fills,
                                                                                                  strict=True))

    toks, probs, ents, emit, smp = (torch.cat(x, dim=1) for x in zip(*(widen(e[0], e[1:]) for e in events),
                                                                        strict=True))
    out, logp, ent, n, cols = pack(toks, probs, ents, emit, pad_id)
    width = out.shape[1]
    sampled = torch.zeros((toks.shape[0], width + 1), dtype=torch.bool, device=toks.device) \
        .scatter_(1, cols, smp & emit)[:, :width]
    return out, sampled, torch.where(sampled, logp, 0.0), torch.where(sampled, ent, 0.0), n


@dataclass
class _Episodes:
    """The batch's row state across turns: live (decoding) or paused (waiting for the environment), neither =
    finished; ``room`` = model tokens a row may still emit in its current turn; ``orig`` maps batch rows to the
    original rows (None = identity) after compaction; ``events`` the output blocks, ``history`` the
    acceptance counters since the last ``flush``."""

    lim: TurnLimits
    B0: int
    live: torch.Tensor
    paused: torch.Tensor
    room: torch.Tensor
    orig: torch.Tensor | None = None
    orig_host: list[int] = field(default_factory=list)
    turns: list[int] = field(default_factory=list)
    events: list[tuple] = field(default_factory=list)
    history: list[tuple] = field(default_factory=list)

    def advance(self, count: torch.Tensor, last: torch.Tensor, active: torch.Tensor) -> None:
        """Book ``count`` emitted tokens ending with ``last`` for the ``active`` rows; pause/finish rows."""
        lim = self.lim
        self.room = self.room - count * active
        is_stop = last == lim.stop_id
        end = is_stop | (self.room <= 0)
        if lim.eos_id is not None:
            end |= last == lim.eos_id
        self.live = self.live & ~(active & end)
        if lim.stop_id != lim.eos_id:                             # (an EOS never pauses)
            self.paused = self.paused | (active & is_stop)

    def flush(self, metrics: DecodeMetrics, tokens: torch.Tensor | None = None) -> None:
        """Add the acceptance counters of the steps since the last flush (one batch layout, rows mapped to the
        original rows by ``orig``) to ``metrics``, per original row too; ``tokens`` per original row at the end."""
        if self.history or tokens is not None:
            metrics.merge(acceptance_counts(metrics.gamma, self.history, self.B0, tokens), same_rows=True)
        self.history = []

    def cut(self, a: torch.Tensor, toks: torch.Tensor) -> torch.Tensor:
        """The last kept index per row: after the first terminator/EOS among the emitted and at the row's budget
        (``spec_step`` treats the cut as a rejection there)."""
        lim, G = self.lim, toks.shape[1] - 1
        j = torch.arange(G + 1, device=toks.device)
        hit = (toks == lim.stop_id) if lim.eos_id is None else (toks == lim.stop_id) | (toks == lim.eos_id)
        hit &= j <= a.unsqueeze(1)
        first = torch.where(hit.any(1), hit.long().argmax(1), G + 1)
        return torch.minimum(torch.minimum(a, first), self.room - 1).clamp_min(0)


def _decode_step(cfg: SpecConfig, st: SpecState, ep: _Episodes, G: int) -> None:
    """Phase (a): one ``spec_step`` over the live rows, its block cut at terminators and budgets."""
    live = ep.live
    step = spec_step(cfg, st, StepPlan(G, G), ep.cut if G else None, live)
    if G:
        ep.history.append((step.accepted, ~live, step.expected_alpha, G, None, ep.orig))
    ep.events.append((ep.orig, step.toks, step.p_tok, step.ent, step.kept, torch.ones_like(step.kept)))
    ep.advance(step.cut + 1, step.toks[st.rows, step.cut], live)


def _replies(ep: _Episodes, st: SpecState, pad_id: int) -> tuple[dict[int, list[int]], list[int], list[int]]:
    """Ask ``env`` for every paused row's reply: (replies by batch row, batch rows that resume, transcript
    lengths so far by original row)."""
    out, _, _, _, n = _pack(ep.events, pad_id, ep.B0)
    idx = ep.paused.nonzero().squeeze(1).tolist()                 # batch rows
    n_host = n.tolist()
    texts = dict(zip(idx, out[[ep.orig_host[c] for c in idx]].tolist(), strict=True))
    replies: dict[int, list[int]] = {}
    resume: list[int] = []
    for c in idx:
        r = ep.orig_host[c]
        if ep.lim.max_turns is not None and ep.turns[r] >= ep.lim.max_turns:
            continue
        reply = ep.lim.env(r, texts[c][: n_host[r]])
        if reply is None:
            continue
        replies[c] = list(reply)
        ep.turns[r] += 1
        if n_host[r] + len(reply) < ep.lim.max_new_tokens:
            resume.append(c)
    ep.paused = torch.zeros_like(ep.paused)
    return replies, resume, n_host


def _environment(cfg: SpecConfig, st: SpecState, ep: _Episodes) -> None:
    """Phase (b): replies for every paused row; the rows that go on form the new (compacted) batch; one batched
    prefill of the replies in both caches, the next model token sampled after each reply; then resume."""
    replies, resume, n_host = _replies(ep, st, cfg.pad_id)
    if not replies:
        return
    B, device, lim = st.x.shape[0], st.x.device, ep.lim
    env_tok, m, block = reply_tokens(replies, B, cfg.pad_id, device)
    ep.events.append((ep.orig, *block))
    if not resume:
        return
    ep.room = torch.tensor([min(lim.max_new_tokens - n_host[ep.orig_host[c]] - len(replies[c]), lim.turn_cap)
                            for c in resume], dtype=torch.long, device=device)
    if len(resume) < B:                                           # compact: keep the resumed rows only
        ep.flush(cfg.metrics)
        keep = torch.tensor(resume, dtype=torch.long, device=device)
        cfg.fw.select(keep)
        st.select(keep)
        env_tok, m = env_tok[keep], m[keep]
        ep.orig = keep if ep.orig is None else ep.orig[keep]
        ep.orig_host = [ep.orig_host[c] for c in resume]
    _prefill_replies(cfg, st, ep, env_tok, m)


def reply_tokens(replies: dict[int, list[int]], B: int, pad_id: int, device) -> tuple:
    """The environment's replies (by batch row) as tensors: ``env_tok`` [B, W+1] (padded with ``pad_id``), their
    lengths ``m`` [B], and their output block (tokens, p = 1, H = 0, emitted, sampled = False), each [B, W]."""
    W = max(len(v) for v in replies.values())
    env_tok = torch.full((B, W + 1), pad_id, dtype=torch.long)
    m = torch.zeros(B, dtype=torch.long)
    got = torch.zeros(B, dtype=torch.bool)
    for c, reply in replies.items():
        env_tok[c, : len(reply)] = torch.tensor(reply, dtype=torch.long)
        m[c], got[c] = len(reply), True
    env_tok, m, got = env_tok.to(device), m.to(device), got.to(device)
    emit = (torch.arange(W, device=device) < m.unsqueeze(1)) & got.unsqueeze(1)
    block = (env_tok[:, :W], torch.ones((B, W), device=device), torch.zeros((B, W), device=device), emit,
             torch.zeros((B, W), dtype=torch.bool, device=device))
    return env_tok, m, block


def prefill_replies(cfg: SpecConfig, st: SpecState, env_tok: torch.Tensor, m: torch.Tensor,
                    res: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One target forward over ``[x, e_1..e_m]`` and one head catch-up over the same slots (tokens
    ``[e_1..e_m, x']``); the next model token x' is sampled from the target's p after e_m. ``res`` [B] bool: the rows
    that resume (None: all); the others write holes and keep their state (x, position, head output, linear state).
    Returns (x' [B], p(x'), H(p)) for every row (meaningful on ``res``)."""
    device, W = st.x.device, env_tok.shape[1] - 1
    s = st.length
    st.ensure(s + W + 1)
    jw = torch.arange(W + 1, device=device)
    vin = torch.cat([st.x.unsqueeze(1), env_tok[:, :W]], dim=1)    # [x, e_1..e_m, pad...]
    vpos = st.pos_x.unsqueeze(1) + jw
    new = jw <= m.unsqueeze(1)
    st.valid.narrow(1, s, W + 1).copy_(new if res is None else new & res.unsqueeze(1))
    hid = cfg.fw.target(vin, vpos, st.valid.narrow(1, 0, s + W + 1), s)
    if cfg.fw.keep is not None:                                       # linear-attention state after e_m
        cfg.fw.keep(m if res is None else torch.where(res, m, -1))
    cfg.metrics.target_forwards += 1
    p = cfg.probs(hid[st.rows, m])
    x = sample(p, cfg.generator)
    pt, h = emitted(p, x)
    if cfg.fw.drafter is not None:
        htoks = env_tok.scatter(1, m.unsqueeze(1), x.unsqueeze(1))   # [e_1..e_m, x', pad...]
        g = cfg.fw.drafter(htoks, hid, vpos, st.valid.narrow(1, 0, s + W + 1), s)[st.rows, m]
        st.g = g if res is None else torch.where(res.unsqueeze(1), g, st.g)
        cfg.metrics.draft_forwards += 1
    st.x = x if res is None else torch.where(res, x, st.x)
    st.pos_x = st.pos_x + m + 1 if res is None else torch.where(res, st.pos_x + m + 1, st.pos_x)
    st.length = s + W + 1
    return x, pt, h


def _prefill_replies(cfg: SpecConfig, st: SpecState, ep: _Episodes, env_tok: torch.Tensor, m: torch.Tensor) -> None:
    """Every row of the (compacted) batch resumes: ``prefill_replies``, then the rows are live again."""
    B, device = st.x.shape[0], st.x.device
    _, pt, h = prefill_replies(cfg, st, env_tok, m)
    ones = torch.ones((B, 1), dtype=torch.bool, device=device)
    ep.events.append((ep.orig, st.x[:, None], pt[:, None], h[:, None], ones, ones))
    ep.live = torch.ones(B, dtype=torch.bool, device=device)
    ep.paused = torch.zeros(B, dtype=torch.bool, device=device)
    ep.advance(torch.ones_like(st.pos_x), st.x, ep.live)


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
    backend: str = "auto",
) -> TurnRollout:
    """``turns_decode`` with the options as arguments (the engine's long-standing call signature)."""
    cfg = DecodeConfig(params, max_new_tokens, eos_id, gamma, rule, pad_id, generator, backend)
    return turns_decode(model, head, prompts, cfg, Turns(env, stop_id, turn_tokens, max_turns))


@torch.inference_mode()
def turns_decode(model: PreTrainedModel, head, prompts: list[list[int]], dc: DecodeConfig,
                 turns: Turns) -> TurnRollout:
    """Multi-turn sampling (module doc): MTP draft→verify with ``head`` (DESIGN §3; exact for ``rejection``
    and ``target_only``, ``greedy`` equals plain τ = 0), plain sampling with ``head=None``. A row pauses when
    it emits ``turns.stop_id``; ``turns.env`` answers; the reply is prefilled and the row resumes."""
    lim = TurnLimits(turns, dc.eos_id, dc.max_new_tokens)
    if head is not None:
        check_gamma(dc.gamma)
        if dc.rule not in RULES:
            raise BebopError(f"unknown verification rule {dc.rule!r}; expected one of {', '.join(RULES)}")
    check_context(model, prompts, lim.max_new_tokens)
    G = dc.gamma if head is not None else 0
    device = model.device
    t0 = time.perf_counter()
    B, P = len(prompts), max(len(p) for p in prompts)
    capacity = P + (2 if G else 1) * (lim.max_new_tokens + G + 1)
    metrics = DecodeMetrics(gamma=G)
    metrics.reached, metrics.accepted_k, metrics.expected_k = ([0.0] * G for _ in range(3))
    cfg = SpecConfig(forwards(model, head, B, capacity, dc.backend, G), dc.params, dc.rule, dc.pad_id, dc.generator,
                     metrics)
    pre = prefill(cfg, prompts, capacity, device)
    st = pre.state
    ep = _Episodes(lim, B, torch.ones(B, dtype=torch.bool, device=device), torch.zeros(B, dtype=torch.bool,
                   device=device), torch.full((B,), min(lim.max_new_tokens, lim.turn_cap), dtype=torch.long,
                                              device=device), orig_host=list(range(B)), turns=[0] * B)
    ones = torch.ones((B, 1), dtype=torch.bool, device=device)
    ep.events.append((None, st.x[:, None], pre.first_p[:, None], pre.first_h[:, None], ones, ones))
    ep.advance(torch.ones_like(st.pos_x), st.x, ep.live)
    t_decode = time.perf_counter()
    while True:
        held = ep.live | ep.paused
        any_live, any_paused, longest = torch.stack([ep.live.any(), ep.paused.any(),   # the step's one host sync
                                                     longest_row(st, held)]).tolist()
        if wasteful(st.length, longest):                               # reuse hole slots (engine.slots)
            compact(cfg.fw, st, held, longest)
        if any_live:
            _decode_step(cfg, st, ep, G)
        elif any_paused:
            _environment(cfg, st, ep)
        else:
            break
    out, sampled, logp, ent, n = _pack(ep.events, dc.pad_id, B)
    ep.flush(metrics, sampled.sum(1))
    metrics.decode_tokens = metrics.tokens - B                  # each row's first token comes from the prefill
    t1 = time.perf_counter()
    metrics.seconds, metrics.decode_seconds = t1 - t0, t1 - t_decode
    return TurnRollout(out, n, logp, ent, metrics, sampled=sampled, turns=torch.tensor(ep.turns, dtype=torch.long))
