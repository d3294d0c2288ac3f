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
* **compact**: holes accumulate (rejected drafts, finished rows' contexts, a joiner's unused columns). When the longest
  live row's holes pass :data:`COMPACT_WASTE` of the columns, every cache is compacted (``Forwards.compact``): each
  row's valid slots move left, in order. Attention over a row's valid slots does not depend on where they sit
  (positions are explicit), so outputs keep their law.

Outputs come back in request order, as ``Rollout`` rows of ``max_new_tokens`` columns. Per step there is one host sync
(which slots are free, the longest row), plus the drafting policy's own when one is given.
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
from bebop.engine.step import SpecConfig, SpecState, StepPlan, spec_step
from bebop.errors import BebopError

__all__ = ["COMPACT_WASTE", "continuous_decode"]

COMPACT_WASTE = 0.1
"""Compact the caches when the longest live row's holes pass this share of the columns."""
COMPACT_MIN = 16
"""…and number at least this many columns (a gather of a tiny cache is not worth it)."""


class _Slots:
    """Which request each slot holds (``req`` [B], −1 before any), the tokens it has emitted (``n``) and whether the
    slot is free (``done``). Tensors are replaced, never written in place: the output events keep references."""

    def __init__(self, req: Tensor, n: Tensor, done: Tensor, eos_id: int | None, max_new_tokens: int) -> None:
        self.req, self.n, self.done = req, n, done
        self.eos_id, self.max_new_tokens = eos_id, max_new_tokens

    def cut(self, a: Tensor, toks: Tensor) -> Tensor:
        """The last kept index of each row's block: after its first EOS among the emitted, and at its budget."""
        G = toks.shape[1] - 1
        last = torch.minimum(a, self.max_new_tokens - self.n - 1)
        if self.eos_id is not None:
            j = torch.arange(G + 1, device=toks.device)
            hit = (toks == self.eos_id) & (j <= a.unsqueeze(1))
            last = torch.minimum(last, torch.where(hit.any(1), hit.long().argmax(1), G + 1))
        return last.clamp_min(0)

    def finished(self, x: Tensor) -> Tensor:
        """Rows whose last emitted token ``x`` is EOS or whose budget is used up."""
        out = self.n >= self.max_new_tokens
        return out | (x == self.eos_id) if self.eos_id is not None else out


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
    sl.n = sl.n.index_put((r,), torch.ones_like(req))
    sl.done = sl.done.index_put((r,), sl.finished(st.x)[r])
    ones = torch.ones((len(ids), 1), dtype=torch.bool, device=device)
    events.append((req, pre.first_x[:, None], pre.first_p[:, None], pre.first_h[:, None], ones))


def _compact(fw, st: SpecState, sl: _Slots, longest: int) -> None:
    """Move every live row's valid slots to columns 0..count−1 (in order) and forget the free rows' slots; the used
    length becomes the longest row's count."""
    valid = st.valid.narrow(1, 0, st.length) & ~sl.done.unsqueeze(1)
    order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices[:, :longest]
    fw.compact(order, longest)
    counts = valid.sum(1, keepdim=True)
    st.valid.zero_()
    st.valid.narrow(1, 0, longest).copy_(torch.arange(longest, device=valid.device) < counts)
    st.length = longest


def _by_request(events: list, n_requests: int, width: int, pad_id: int) -> tuple[Tensor, ...]:
    """Output tensors [N, width] in request order from the time-ordered events (request of each row [b], tokens,
    p(token), H(p), emitted [b, w]): (tokens padded with ``pad_id``, log p, H(p), emitted count [N])."""
    rid = torch.cat([e[0].unsqueeze(1).expand_as(e[4]).reshape(-1) for e in events])
    emit = torch.cat([e[4].reshape(-1) for e in events])
    fields = [torch.cat([e[k].reshape(-1) for e in events])[emit] for k in (1, 2, 3)]
    rid = rid[emit]
    order = torch.sort(rid, stable=True).indices                  # a request's tokens stay in time order
    rid = rid[order]
    toks, p, h = (f[order] for f in fields)
    counts = torch.bincount(rid, minlength=n_requests)
    col = torch.arange(rid.shape[0], device=rid.device) - (counts.cumsum(0) - counts)[rid]
    out = torch.full((n_requests, width), pad_id, dtype=torch.long, device=rid.device).index_put_((rid, col), toks)
    logp = torch.zeros((n_requests, width), device=rid.device).index_put_((rid, col), p.clamp_min(1e-30).log())
    ent = torch.zeros((n_requests, width), device=rid.device).index_put_((rid, col), h.float())
    return out, logp, ent, counts


@torch.inference_mode()
def continuous_decode(model: PreTrainedModel, head, prompts: list[list[int]], dc: DecodeConfig,
                      slots: int) -> Rollout:
    """Decode ``prompts`` with at most ``slots`` rows in flight (module doc): plain sampling with ``head=None``, else
    MTP speculative sampling with a fixed γ or a drafting policy, as ``decode.mtp_decode``. Each request's output has
    the law it would have decoded alone; rows come back in request order."""
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise BebopError(f"slots (the rollout batch) must be an integer >= 1, got {slots!r}")
    if head is None:
        G, rule, auto_rule, policy = 0, dc.rule, False, False
    else:
        G, rule, auto_rule, policy = _policy(dc.gamma, dc.rule, dc.params)
    check_context(model, prompts, dc.max_new_tokens)
    device = model.device
    t0 = time.perf_counter()
    N = len(prompts)
    B = min(slots, N)
    metrics = DecodeMetrics(gamma=G)
    P = max(len(p) for p in prompts)
    G_fw = G if head is not None else 0

    def new_forwards(rows: int, capacity: int):
        return forwards(model, head, rows, capacity, dc.backend, G_fw)

    fw = new_forwards(B, P + 2 * (min(dc.max_new_tokens, 512) + G + 1))
    cfg = SpecConfig(fw, dc.params, rule, dc.pad_id, dc.generator, metrics)
    pre = prefill(cfg, prompts[:B], P + (G + 1), device)
    metrics.prefills += 1
    st = pre.state
    sl = _Slots(torch.arange(B, device=device), torch.ones(B, dtype=torch.long, device=device), None, dc.eos_id,
                dc.max_new_tokens)
    sl.done = sl.finished(st.x)
    ones = torch.ones((B, 1), dtype=torch.bool, device=device)
    events: list = [(sl.req, pre.first_x[:, None], pre.first_p[:, None], pre.first_h[:, None], ones)]
    waiting = B                                                   # the next request to admit
    planner = dc.gamma.start(B, rule, auto_rule, device, dc.eos_id) if policy else None
    plan = StepPlan(G, G, planner=planner)
    history: list = []
    acc = torch.zeros(4, dtype=torch.long, device=device)        # slot, live, cache and kept slot counters
    step = None
    t_decode = time.perf_counter()
    while True:
        valid = st.valid.narrow(1, 0, st.length) & ~sl.done.unsqueeze(1)
        host = torch.cat([sl.done.long(), valid.sum(1).max().unsqueeze(0)]).tolist()   # the step's host sync
        free, longest = [b for b in range(B) if host[b]], host[B]
        if longest and st.length - longest > max(COMPACT_MIN, COMPACT_WASTE * st.length):
            _compact(fw, st, sl, longest)
        if free and waiting < N:
            take = free[: N - waiting]
            _admit(cfg, st, sl, take, list(range(waiting, waiting + len(take))), prompts, new_forwards, events)
            waiting += len(take)
        elif len(free) == B:
            break
        live = ~sl.done
        if planner is not None:
            plan.q1 = cfg.probs(st.g)
            alphas = None
            if step is not None and auto_rule and planner.learning:
                alphas = torch.cat([alpha_rs(step.p[:, : step.gamma], torch.stack(step.raw, 1)),
                                    alpha_to(step.p[:, : step.gamma], torch.stack(step.raw, 1))], dim=1)
            _, plan.gamma, plan.to_rows = planner.step(sl.done, plan.q1, *(() if step is None else
                                                                            (step.accepted, step.ratio, alphas)))
        step = spec_step(cfg, st, plan, sl.cut if G else None, live)
        events.append((sl.req, step.toks, step.p_tok, step.ent, step.kept))
        if G:
            to = None if plan.to_rows is None else plan.to_rows * step.gamma
            history.append((step.accepted, sl.done, step.expected_alpha, step.gamma, to))
        kept_now = (st.valid.narrow(1, 0, st.length) & live.unsqueeze(1)).sum()
        n_live = live.sum()
        acc += torch.stack([torch.full_like(n_live, B), n_live, n_live * st.length, kept_now])
        sl.n = sl.n + (step.cut + 1) * live
        sl.done = sl.done | (live & sl.finished(step.toks[st.rows, step.cut]))
    out, logp, ent, n = _by_request(events, N, dc.max_new_tokens, dc.pad_id)
    metrics.slot_steps, metrics.live_steps, metrics.cache_slots, metrics.kept_slots = acc.tolist()
    metrics.tokens = int(n.sum())
    t1 = time.perf_counter()
    metrics.seconds, metrics.decode_seconds = t1 - t0, t1 - t_decode
    metrics.merge(acceptance_counts(G, history))
    return Rollout(out, n, logp, ent, metrics)
