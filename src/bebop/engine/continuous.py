"""Continuous batching: B batch slots, each holding one live row; when a row finishes (EOS or its token limit), the
next waiting prompt takes its slot at the next step.

Why: RL rollouts vary widely in length within a group. A static batch waits for its slowest row, so most of its slots
idle through the tail; here a freed slot is refilled at once, and the forwards keep B live rows while prompts wait.

How (each row's law is DESIGN §3's, unchanged):

* **join**: the rows admitted at one step are prefilled together, in one forward over fresh caches of their own
  (``decode.prefill`` on ``forwards`` of that many rows), then put into their slots' rows of the batch caches
  (``Forwards.put``: slots 0..W−1, W = their widest prompt; a hybrid model's linear-attention state too). Their other
  slots become holes;
* **step**: ``step.spec_step`` over every slot with ``live`` = the rows still decoding (plain decoding is its γ = 0
  case). A row's block is cut after its first EOS and at its token budget; the cut acts as a rejection there, so the
  emitted prefix keeps the plain-sampling law. Free slots ride along and write holes;
* **compact**: holes accumulate (rejected drafts, finished rows' contexts, a joiner's unused columns); ``slots``
  compacts every cache when the longest held row's holes pass ``slots.COMPACT_WASTE`` of the columns, checked at
  every step's sync.

Outputs come back in request order, as ``Rollout`` rows of ``max_new_tokens`` columns. Per step there is one host sync
(which slots are free, the longest row), plus the drafting policy's own when one is given.
``DecodeMetrics.decode_seconds`` is the decode phase alone, as in static decoding: it starts after the first
prefill and leaves out every admission (from the sync before a join to the sync after it: the joiners' prefill and
first token), so its rate compares with the per-step forward costs of DESIGN §8.
``DecodeMetrics.utilization`` (live rows ÷ slots per decode forward) and ``slots_per_token`` (cache columns a live
row attends to per slot of its own context) say how well the slots and the cache are used.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor
from transformers import PreTrainedModel

from bebop.core.acceptance import alpha_rs, alpha_to
from bebop.engine.decode import DecodeConfig, Rollout, _policy, prefill
from bebop.engine.forwards import check_context, forwards
from bebop.engine.metrics import DecodeMetrics, acceptance_counts
from bebop.engine.slots import COMPACT_MIN, COMPACT_WASTE, compact, wasteful
from bebop.engine.step import SpecConfig, SpecState, StepPlan, spec_step
from bebop.engine.turns import TurnRollout, Turns, prefill_replies, reply_tokens
from bebop.errors import BebopError

__all__ = ["ADMIT_FRACTION", "COMPACT_MIN", "COMPACT_WASTE", "continuous_decode"]

ADMIT_FRACTION = 0.25
"""Waiting rows join once this share of the slots is free (or nothing is left live, or the last rows fit): each
admission is one prefill forward, so admitting one row at a time would cost a forward per row."""


class _Slots:
    """Per slot: the request it holds (``req`` [B]), its transcript tokens so far (``n``), the model tokens it may still
    emit in its current turn (``room``), and whether it is ``paused`` (waiting for the environment, multi-turn) or
    free (``done``: finished, or never filled). Tensors are replaced, never written in place: the output events keep
    references to them."""

    def __init__(self, B: int, device, eos_id: int | None, max_new_tokens: int, stop_id: int | None = None,
                 turn_cap: int | None = None, pad_id: int | None = None) -> None:
        self.req = torch.arange(B, device=device)
        self.n = torch.zeros(B, dtype=torch.long, device=device)
        self.room = torch.zeros(B, dtype=torch.long, device=device)
        self.done = torch.zeros(B, dtype=torch.bool, device=device)
        self.paused = torch.zeros(B, dtype=torch.bool, device=device)
        self.eos_id, self.max_new_tokens, self.stop_id = eos_id, max_new_tokens, stop_id
        self.turn_cap = max_new_tokens if turn_cap is None else turn_cap
        self.terms = tuple(dict.fromkeys(t for t in (eos_id, stop_id) if t is not None))
        self.pad_ends = pad_id in self.terms       # padding after a block's emitted tokens would read as an end
        self._offsets: Tensor | None = None

    def offsets(self, n: int) -> Tensor:
        """``arange(n)`` on the slots' device, made once per call."""
        if self._offsets is None or self._offsets.shape[0] != n:
            self._offsets = torch.arange(n, device=self.req.device)
        return self._offsets

    def ends(self, toks: Tensor) -> Tensor | None:
        """Tokens that end a row's block: EOS, and the environment's terminator in multi-turn (None: no such
        token)."""
        hit = None
        for t in self.terms:
            hit = toks == t if hit is None else hit | (toks == t)
        return hit

    def cut(self, a: Tensor, toks: Tensor) -> Tensor:
        """The last kept index of each row's block: after its first EOS (or terminator) among the emitted, and at its
        room (``spec_step`` treats the cut as a rejection there). A block index ≥ room − 1 counts as an end too;
        the cut is the first end's index (the count of indices before it), at most a."""
        j = self.offsets(toks.shape[1])
        stop = j >= (self.room - 1).unsqueeze(1)
        hit = self.ends(toks)
        if hit is not None:
            if self.pad_ends:                       # only the emitted tokens (index ≤ a) may end the block
                hit = hit & (j <= a.unsqueeze(1))
            stop = stop | hit
        return torch.minimum(a, (stop.cumsum(1) == 0).sum(1))

    def advance(self, rows: Tensor, count: Tensor | None, last: Tensor) -> None:
        """Book ``count`` tokens (None: one) ending with ``last`` for the rows marked in ``rows``; a row whose token
        is the terminator pauses, one that hit EOS or its room finishes."""
        booked = rows.long() if count is None else count * rows
        self.room = self.room - booked
        end = self.room <= 0
        hit = self.ends(last)
        if hit is not None:
            end = end | hit
        if self.stop_id is None:                     # single-turn: nothing pauses, the transcript length is unused
            self.done = self.done | (rows & end)
            return
        self.n = self.n + booked
        is_stop = last == self.stop_id if self.stop_id != self.eos_id else torch.zeros_like(rows)
        end = rows & end
        self.paused = self.paused | (end & is_stop)
        self.done = self.done | (end & ~is_stop)


def _admit(cfg: SpecConfig, st: SpecState, sl: _Slots, rows: list[int], ids: list[int], prompts: list[list[int]],
           new_forwards, events: list) -> None:
    """Prefill requests ``ids`` together over ``new_forwards(rows, capacity)`` and put them into slots ``rows``
    (module doc, "join")."""
    device = st.x.device
    jp = [prompts[i] for i in ids]
    W = max(len(p) for p in jp)
    sub = new_forwards(len(ids), W)
    pre = prefill(SpecConfig(sub, cfg.params, cfg.rule, cfg.pad_id, cfg.generator, cfg.metrics), jp, W, device)
    cfg.metrics.prefills += 1
    r = torch.tensor(rows, dtype=torch.long, device=device)
    st.valid.narrow(1, st.length, st.valid.shape[1] - st.length).zero_()   # nothing beyond the used columns
    if W > st.length:
        st.ensure(W)
        st.length = W
    cfg.fw.put(r, sub, W)
    fresh = torch.zeros((len(rows), st.valid.shape[1]), dtype=torch.bool, device=device)
    fresh[:, :W] = pre.state.valid[:, :W]
    st.valid = st.valid.index_put((r,), fresh)
    st.x = st.x.index_put((r,), pre.state.x)
    st.pos_x = st.pos_x.index_put((r,), pre.state.pos_x)
    if st.g is not None:
        st.g = st.g.index_put((r,), pre.state.g)
    req = torch.tensor(ids, dtype=torch.long, device=device)
    sl.req = sl.req.index_put((r,), req)
    zero = torch.zeros_like(req)
    sl.n, sl.done, sl.paused = sl.n.index_put((r,), zero), sl.done.index_put((r,), zero.bool()), \
        sl.paused.index_put((r,), zero.bool())
    sl.room = sl.room.index_put((r,), torch.full_like(req, min(sl.max_new_tokens, sl.turn_cap)))
    joined = torch.zeros_like(sl.done).index_put((r,), torch.ones_like(req, dtype=torch.bool))
    sl.advance(joined, joined.long(), st.x)
    ones = torch.ones((len(ids), 1), dtype=torch.bool, device=device)
    events.append((req, pre.first_x[:, None], pre.first_p[:, None], pre.first_h[:, None], ones, None))


def _compact(fw, st: SpecState, sl: _Slots, longest: int) -> None:
    """``slots.compact`` over the held rows (free slots' contexts are forgotten)."""
    compact(fw, st, ~sl.done, longest)


class _Transcripts:
    """Each request's transcript on the host, brought up to date from the events not read yet (multi-turn: the
    environment reads them), so every event is copied to the host once."""

    def __init__(self) -> None:
        self.read = 0
        self.tokens: dict[int, list[int]] = {}

    def update(self, events: list) -> None:
        new = events[self.read:]
        self.read = len(events)
        if not new:
            return
        rid = torch.cat([e[0].unsqueeze(1).expand_as(e[4]).reshape(-1) for e in new])
        emit = torch.cat([e[4].reshape(-1) for e in new])
        toks = torch.cat([e[1].reshape(-1) for e in new])
        pairs = torch.stack([rid[emit], toks[emit]], 1).tolist()
        for r, t in pairs:
            self.tokens.setdefault(r, []).append(t)


def _environment(cfg: SpecConfig, st: SpecState, sl: _Slots, turns, events: list, seen: _Transcripts,
                 turns_taken: list[int]) -> None:
    """Multi-turn: every paused slot's transcript goes to ``turns.env``; the replies of the rows that go on are
    prefilled in one forward over all slots (the others write holes and keep their state), and the next model token
    is sampled after each reply (as ``engine.turns``, whose stopping rules these are)."""
    device, B = st.x.device, st.x.shape[0]
    paused = sl.paused.nonzero().squeeze(1).tolist()
    seen.update(events)
    req_host = sl.req.tolist()
    replies: dict[int, list[int]] = {}
    resume: list[int] = []
    for b in paused:
        r = req_host[b]
        reply = None
        transcript = seen.tokens[r]
        if turns.max_turns is None or turns_taken[r] < turns.max_turns:
            reply = turns.env(r, list(transcript))
        if reply is None:
            continue
        replies[b] = list(reply)
        turns_taken[r] += 1
        if len(transcript) + len(reply) < sl.max_new_tokens:
            resume.append(b)
    sl.done = sl.done | sl.paused                                    # rows that do not resume end here
    sl.paused = torch.zeros_like(sl.paused)
    if not replies:
        return
    env_tok, m, block = reply_tokens(replies, B, cfg.pad_id, device)
    events.append((sl.req, *block))
    if not resume:
        return
    res = torch.zeros(B, dtype=torch.bool)
    res[resume] = True
    res = res.to(device)
    sl.done = sl.done & ~res
    _prefill_replies(cfg, st, sl, env_tok, m, res, events)


def _prefill_replies(cfg: SpecConfig, st: SpecState, sl: _Slots, env_tok: Tensor, m: Tensor, res: Tensor,
                     events: list) -> None:
    """``turns.prefill_replies`` for the resuming rows ``res`` (holes elsewhere); their budgets are renewed."""
    x, pt, h = prefill_replies(cfg, st, env_tok, m, res)
    events.append((sl.req, x[:, None], pt[:, None], h[:, None], res[:, None], res[:, None]))
    sl.n = sl.n + m * res
    sl.room = torch.where(res, torch.clamp(sl.max_new_tokens - sl.n, max=sl.turn_cap), sl.room)
    sl.advance(res, res.long(), st.x)


def _by_request(events: list, n_requests: int, width: int | None, pad_id: int) -> tuple[Tensor, ...]:
    """Output tensors [N, width] in request order from the time-ordered events (request of each row [b], tokens,
    p(token), H(p), emitted [b, w], sampled [b, w] or None = all emitted): (tokens padded with ``pad_id``, log p,
    H(p), emitted count [N], sampled mask). ``width`` None: the longest request's."""
    rid = torch.cat([e[0].unsqueeze(1).expand_as(e[4]).reshape(-1) for e in events])
    emit = torch.cat([e[4].reshape(-1) for e in events])
    smp = torch.cat([(e[5] if e[5] is not None else e[4]).reshape(-1) for e in events])[emit]
    fields = [torch.cat([e[k].reshape(-1) for e in events])[emit] for k in (1, 2, 3)]
    rid = rid[emit]
    order = torch.sort(rid, stable=True).indices                  # a request's tokens stay in time order
    rid, smp = rid[order], smp[order]
    toks, p, h = (f[order] for f in fields)
    counts = torch.bincount(rid, minlength=n_requests)
    if width is None:
        width = int(counts.max()) if counts.numel() else 0
    col = torch.arange(rid.shape[0], device=rid.device) - (counts.cumsum(0) - counts)[rid]
    shape, dev = (n_requests, width), rid.device
    out = torch.full(shape, pad_id, dtype=torch.long, device=dev).index_put_((rid, col), toks)
    sampled = torch.zeros(shape, dtype=torch.bool, device=dev).index_put_((rid, col), smp)
    logp = torch.zeros(shape, device=dev).index_put_((rid, col), torch.where(smp, p.clamp_min(1e-30).log(), 0.0))
    ent = torch.zeros(shape, device=dev).index_put_((rid, col), torch.where(smp, h.float(), 0.0))
    return out, logp, ent, counts, sampled


def _slot_counts(lives: list, B: int) -> tuple[int, int, int, int]:
    """(batch slots, live rows, cache columns live rows attended to, their own valid slots), summed over the steps
    (``lives``: per step the live rows [B], the used columns and each row's valid slots after the step [B]); one
    host read."""
    if not lives:
        return 0, 0, 0, 0
    live = torch.stack([x[0] for x in lives]).long()               # [S, B]
    length = torch.tensor([x[1] for x in lives], device=live.device)
    kept = torch.stack([x[2] for x in lives])
    n_live = live.sum(1)
    out = torch.stack([n_live.sum(), (n_live * length).sum(), (live * kept).sum()]).tolist()
    return B * len(lives), out[0], out[1], out[2]


@torch.inference_mode()
def continuous_decode(model: PreTrainedModel, head, prompts: list[list[int]], dc: DecodeConfig, slots: int,
                      turns: Turns | None = None) -> Rollout:
    """Decode ``prompts`` with at most ``slots`` rows in flight (module doc): plain sampling with ``head=None``, else
    MTP speculative sampling with a fixed γ or a drafting policy, as ``decode.mtp_decode``; with ``turns``,
    multi-turn episodes as ``turns.turns_decode`` (fixed γ), returned as a ``TurnRollout``. Each request's output
    has the law it would have decoded alone; rows come back in request order."""
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise BebopError(f"slots (the rollout batch) must be an integer >= 1, got {slots!r}")
    if head is None:
        G, rule, auto_rule, policy = 0, dc.rule, False, False
    else:
        G, rule, auto_rule, policy = _policy(dc.gamma, dc.rule, dc.params)
        if turns is not None and policy:
            raise BebopError("multi-turn decoding drafts a fixed gamma; pass an integer gamma with turns")
    check_context(model, prompts, dc.max_new_tokens)
    device = model.device
    t0 = time.perf_counter()
    N = len(prompts)
    B = min(slots, N)
    metrics = DecodeMetrics(gamma=G)
    metrics.reached, metrics.accepted_k, metrics.expected_k = ([0.0] * G for _ in range(3))
    P = max(len(p) for p in prompts)

    def new_forwards(rows: int, capacity: int):
        return forwards(model, head, rows, capacity, dc.backend, G)

    fw = new_forwards(B, P + 2 * (min(dc.max_new_tokens, 512) + G + 1))
    cfg = SpecConfig(fw, dc.params, rule, dc.pad_id, dc.generator, metrics)
    sl = _Slots(B, device, dc.eos_id, dc.max_new_tokens, turns.stop_id if turns else None,
                turns.turn_tokens if turns else None, dc.pad_id)
    events: list = []
    pre = prefill(cfg, prompts[:B], P + G + 1, device)
    metrics.prefills += 1
    st = pre.state
    everyone = torch.ones(B, dtype=torch.bool, device=device)
    sl.room = torch.full_like(sl.room, min(dc.max_new_tokens, sl.turn_cap))
    sl.advance(everyone, everyone.long(), st.x)
    events.append((sl.req, pre.first_x[:, None], pre.first_p[:, None], pre.first_h[:, None], everyone[:, None], None))
    waiting = B                                                   # the next request to admit
    turns_taken = [0] * N
    seen = _Transcripts()
    planner = dc.gamma.start(B, rule, auto_rule, device, dc.eos_id) if policy else None
    plan = StepPlan(G, G, planner=planner)
    history: list = []
    lives: list = []                                             # per step: live rows, used columns, then row counts
    counted = 0
    step = None
    t_decode, t_join, join_seconds = None, None, 0.0
    while True:
        counts = st.valid.narrow(1, 0, st.length).sum(1)          # each row's valid slots
        held = counts.masked_fill(sl.done, -1)                    # -1: a free slot
        flags = (held if turns is None else torch.cat([held, sl.paused.long()])).tolist()   # the step's one sync
        now = time.perf_counter()
        t_decode = now if t_decode is None else t_decode
        if t_join is not None:                                     # the admission just synced: a prefill phase
            join_seconds, t_join = join_seconds + now - t_join, None
        if len(lives) > counted:                                   # the slots each row holds after that step
            lives[-1], counted = (*lives[-1], counts), len(lives)
        free, longest = [b for b in range(B) if flags[b] < 0], max(flags[:B])
        any_paused = turns is not None and any(flags[B:])
        if any_paused:
            _environment(cfg, st, sl, turns, events, seen, turns_taken)
            continue
        if wasteful(st.length, longest):
            _compact(fw, st, sl, longest)
        live_left = len(free) < B and not (turns is not None and all(flags[b] < 0 or flags[B + b] for b in range(B)))
        if free and waiting < N and (len(free) >= ADMIT_FRACTION * B or N - waiting <= len(free) or not live_left):
            take = free[: N - waiting]
            t_join = now
            _admit(cfg, st, sl, take, list(range(waiting, waiting + len(take))), prompts, new_forwards, events)
            waiting += len(take)
            continue                                               # a joiner may pause or end at its first token
        if len(free) == B:
            break
        dead = sl.done if turns is None else sl.done | sl.paused
        live = ~dead
        if planner is not None:
            plan.q1 = cfg.probs(st.g)
            alphas = None
            if step is not None and auto_rule and planner.learning:
                alphas = torch.cat([alpha_rs(step.p[:, : step.gamma], torch.stack(step.raw, 1)),
                                    alpha_to(step.p[:, : step.gamma], torch.stack(step.raw, 1))], dim=1)
            _, plan.gamma, plan.to_rows = planner.step(dead, plan.q1, *(() if step is None else
                                                                        (step.accepted, step.ratio, alphas)))
        step = spec_step(cfg, st, plan, sl.cut if G else None, live)
        events.append((sl.req, step.toks, step.p_tok, step.ent, step.kept, None))
        if G:
            to = None if plan.to_rows is None else plan.to_rows * step.gamma
            history.append((step.accepted, dead, step.expected_alpha, step.gamma, to, sl.req))
        lives.append((live, st.length))
        sl.advance(live, step.cut + 1 if G else None, st.x)       # st.x: the token at each live row's cut
    out, logp, ent, n, sampled = _by_request(events, N, None if turns else dc.max_new_tokens, dc.pad_id)
    metrics.slot_steps, metrics.live_steps, metrics.cache_slots, metrics.kept_slots = _slot_counts(lives, B)
    t1 = time.perf_counter()                                    # after the closing sync; counting is bookkeeping
    metrics.seconds, metrics.decode_seconds = t1 - t0, t1 - t_decode - join_seconds
    metrics.merge(acceptance_counts(G, history, N, sampled.sum(1)))   # per request: slots mapped by sl.req
    metrics.decode_tokens = metrics.tokens - N                  # each request's first token comes from its prefill
    if turns is not None:
        return TurnRollout(out, n, logp, ent, metrics, sampled=sampled, turns=torch.tensor(turns_taken))
    return Rollout(out, n, logp, ent, metrics)
