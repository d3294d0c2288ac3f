"""One speculative decoding step (DESIGN §3): draft → verify → accept → roll back, for a batch of rows.

Rows accept ragged counts; the caches stay rectangular, with a per-row validity mask over cache slots and
explicit per-row position ids, so no row's prefix is ever recomputed. Per step, with x the last emitted token at
position t+1 (cache slot s) and g the head's output at t:

  draft:    q_1 = probs(LMHead(g)); d_1 ~ q_1; for k = 2..γ the head consumes (d_{k-1}, g_{k-1}) at position
            t+k-1 with MTP layer (k−1) mod L (``forwards`` module doc) giving q_k, d_k.
  verify:   one target forward over [x, d_1..d_γ] (target slots s..s+γ) gives p_1..p_{γ+1}; the rule accepts
            a drafts and draws the correction/bonus token e.
  roll back: slots s..s+a stay valid in both caches, s+a+1..s+γ become holes (a hybrid model's linear-attention
            layers keep their state after slot s+a, ``Forwards.keep``); the head overwrites its slots
            s..s+γ, re-reading positions t+1..t+a+1 with the TRUE target hiddens of [x, d_1..d_a] and the tokens
            [d_1..d_a, e]; its output at slot s+a is the next g.

With γ = 0 (no head) the same step is one plain target forward that samples one token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from bebop.core.acceptance import one_hot_argmax
from bebop.core.sampling import NoiseBank, SamplingParams, draft_tokens, probs_fast, race, rs_step, verify
from bebop.engine.drafting import Drafting
from bebop.engine.forwards import Forwards
from bebop.engine.metrics import DecodeMetrics

DRAWS_AHEAD = 1
"""Steps of random draws the decode loops make at once (``sampling.NoiseBank``'s chunk cap). One step keeps every
call's random stream exactly what it was before draws could be made ahead: a multi-turn hybrid law test
(``test_hybrid_engine``, qwen3_5, seed 0) fails its log-prob check on the trajectory that 64-step chunks sample while
passing on eight other seeds, and until that trajectory is understood the engine keeps the draws it is tested with.
A larger value saves about four small ops per step."""


@dataclass
class SpecConfig:
    """What every step of one decoding call shares: the forwards, the sampling transforms, the verification
    ``rule`` (``rejection``, ``target_only`` or ``greedy``), the padding token, the random generator and the
    metrics the step counts forwards into."""

    fw: Forwards
    params: SamplingParams
    rule: str
    pad_id: int
    generator: torch.Generator | None
    metrics: DecodeMetrics

    @property
    def rs_fast(self) -> bool:
        """RS at τ > 0 runs ``sampling.verify_rs`` with the drafts' exponential races drawn up front."""
        return self.rule == "rejection" and not self.params.greedy

    def probs(self, hidden: Tensor) -> Tensor:
        return probs_fast(self.fw.lm_head(hidden), self.params)


@dataclass
class SpecState:
    """Per-row state between steps: ``x`` [B] the last emitted token (not yet in the target cache) at position
    ``pos_x`` [B]; ``g`` [B, H] the head's output at the slot before x (None without a head); ``valid`` [B, S]
    the slot validity of both caches and ``length`` the slots used; ``zero_q`` a zero [B, V] row (the RS fast
    path's q at the bonus position)."""

    x: Tensor
    pos_x: Tensor
    g: Tensor | None
    valid: Tensor
    length: int
    zero_q: Tensor
    rows: Tensor = field(init=False)
    _offsets: Tensor | None = field(default=None, init=False, repr=False)
    _zeros: Tensor | None = field(default=None, init=False, repr=False)
    _ones: Tensor | None = field(default=None, init=False, repr=False)
    _bank: NoiseBank | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.rows = torch.arange(self.x.shape[0], device=self.x.device)

    def offsets(self, n: int) -> Tensor:
        """``arange(n)`` on the state's device, made once per call (every step needs it)."""
        if self._offsets is None or self._offsets.shape[0] != n:
            self._offsets = torch.arange(n, device=self.x.device)
        return self._offsets

    def zeros(self) -> Tensor:
        """A zero index per row (a plain step's accepted count and cut), made once per batch."""
        if self._zeros is None or self._zeros.shape[0] != self.x.shape[0]:
            self._zeros = torch.zeros_like(self.x)
        return self._zeros

    def ones(self) -> Tensor:
        """[B, 1] True: a plain step's kept slot when every row is live, made once per batch."""
        if self._ones is None or self._ones.shape[0] != self.x.shape[0]:
            self._ones = torch.ones((self.x.shape[0], 1), dtype=torch.bool, device=self.x.device)
        return self._ones

    def draws(self, n: int, uniforms: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor | None]:
        """One step's fresh random draws: Exp(1) noise [n, B, V] (the step's exponential races) and, when
        ``uniforms`` > 0, U[0, 1) [B, uniforms] (RS acceptance tests), from a ``NoiseBank`` drawn ahead in chunks."""
        B, V = self.zero_q.shape
        u_shape = (B, uniforms) if uniforms else None
        bank = self._bank
        if bank is None or bank.exp_shape != (n, B, V) or bank.u_shape != u_shape or bank.generator is not generator:
            bank = self._bank = NoiseBank((n, B, V), u_shape, self.x.device, generator, max_steps=DRAWS_AHEAD)
        return bank.next()

    def ensure(self, n: int) -> None:
        """Grow ``valid`` to at least ``n`` slots."""
        if n > self.valid.shape[1]:
            grown = self.valid.new_zeros((self.valid.shape[0], max(n, 2 * self.valid.shape[1])))
            grown[:, : self.valid.shape[1]] = self.valid
            self.valid = grown

    def select(self, keep: Tensor) -> None:
        """Keep only batch rows ``keep`` (the caches are compacted by ``Forwards.select``)."""
        self.x, self.pos_x, self.valid, self.zero_q = self.x[keep], self.pos_x[keep], self.valid[keep], \
            self.zero_q[keep]
        self.g = self.g[keep] if self.g is not None else None
        self.rows = torch.arange(self.x.shape[0], device=self.x.device)
        self._bank = None


@dataclass
class StepPlan:
    """How one step drafts: ``gamma`` drafts (the first plan when a ``planner`` re-plans after each draft, up to
    ``gamma_max``), ``to_rows`` [B] bool rows verified with TO (None: none), ``q1`` q_1 if already computed."""

    gamma: int
    gamma_max: int
    to_rows: Tensor | None = None
    q1: Tensor | None = None
    planner: Drafting | None = None


@dataclass
class Step:
    """One step's outcome: ``toks`` [B, γ+1] (pad after the emitted ones), ``kept`` [B, γ+1] emitted slots,
    ``p_tok`` / ``ent`` [B, γ+1] = p(token) and H(p), ``accepted`` [B] accepted drafts, ``cut`` [B] the index of
    the last kept token, ``expected_alpha`` / ``ratio`` [B, γ] the rule's α and each draft's acceptance chance,
    ``p`` [B, γ+1, V] the target's distributions, ``qs`` the drafts' q as verified and ``raw`` the head's own."""

    gamma: int
    vin: Tensor
    toks: Tensor
    kept: Tensor
    p_tok: Tensor
    ent: Tensor
    accepted: Tensor
    cut: Tensor
    expected_alpha: Tensor | None
    ratio: Tensor | None
    p: Tensor
    qs: list[Tensor]
    raw: list[Tensor]


def emitted(p: Tensor, tok: Tensor) -> tuple[Tensor, Tensor]:
    """(p(tok), H(p)) for the log-prob and entropy outputs; the log is taken once at the end."""
    return p.gather(-1, tok.unsqueeze(-1)).squeeze(-1), torch.special.entr(p).sum(dim=-1)


def spec_step(cfg: SpecConfig, st: SpecState, plan: StepPlan,
              cut: Callable[[Tensor, Tensor], Tensor] | None = None, live: Tensor | None = None) -> Step:
    """One draft → verify → accept → roll back step on ``st`` (module doc), updating it in place. ``cut(a,
    toks) -> a'`` ends a row's block early at index a' ≤ a (a terminator or a budget: the slots after it become
    holes, exactly like a rejection there); rows outside ``live`` [B] bool write only holes and keep their
    state.

    No host synchronisation: every choice inside the step is a tensor op (the caller's one sync per step decides
    whether to go on). Row picks are ``gather``s, and the step's random draws (the drafts' and final token's
    exponential races, the RS uniforms) are views into chunks drawn ahead (``SpecState.draws``)."""
    s, fw = st.length, cfg.fw
    j = st.offsets(plan.gamma_max + 1)
    vpos = st.pos_x.unsqueeze(1) + j                                  # positions of [x, d_1..d_γ]
    st.ensure(s + plan.gamma_max + 1)
    noise = u = None
    if cfg.rs_fast or not (plan.gamma_max or cfg.params.greedy):     # drafts' races + the final draw
        noise, u = st.draws(plan.gamma_max + 1, plan.gamma_max if cfg.rs_fast else 0, cfg.generator)
    st.valid.narrow(1, s, plan.gamma_max + 1).fill_(True)
    vin, qs, raw = _draft(cfg, st, vpos, plan, noise if cfg.rs_fast else None)
    G = len(qs)
    jt = j
    if G < plan.gamma_max:                                            # a planner stopped drafting early
        jt, vpos = j.narrow(0, 0, G + 1), vpos.narrow(1, 0, G + 1)
    vhid = fw.target(vin, vpos, st.valid.narrow(1, 0, s + G + 1), s)
    cfg.metrics.target_forwards += 1
    p_t = cfg.probs(vhid)                                             # [B, γ+1, V]
    last = None                                                       # the token at index a, when known
    if G:
        a, kept, toks, exp_alpha, ratio, last = _accept(cfg, st, p_t, qs, vin, jt, noise, u)
    else:                                                             # plain sampling: one token
        p1 = p_t.select(1, 0)
        last = p1.argmax(-1) if cfg.params.greedy else race(p1, noise.select(0, 0))
        toks = last.unsqueeze(1)
        a, exp_alpha, ratio = st.zeros(), None, None
        kept = st.ones() if live is None else live.unsqueeze(1)
    a_cut = a
    if cut is not None:
        a_cut = cut(a, toks)
        kept = jt <= a_cut.unsqueeze(1)
        last = None
    if live is not None and (G or cut is not None):
        kept = kept & live.unsqueeze(1)
    pt, h = emitted(p_t, toks)
    _roll_back(cfg, st, toks, vhid, vpos, kept, a_cut, live, last)
    return Step(G, vin, toks, kept, pt, h, a, a_cut, exp_alpha, ratio, p_t, qs, raw)


def _draft(cfg: SpecConfig, st: SpecState, vpos: Tensor, plan: StepPlan, noise: Tensor | None):
    """Up to ``plan.gamma`` recursive head steps from ``st.g`` (q_1 comes from g; each further draft costs one
    head forward with layer k mod L after draft k). ``noise`` (RS fast path) drives the drafts' exponential races,
    else ``draft_tokens``. Rows in ``plan.to_rows`` draft and verify with TO (q replaced by the one-hot at
    argmax q); a ``plan.planner`` sees every drawn d_k with its raw q_k and re-plans whether the head runs again.
    Returns (``[x, d_1..d_γ]`` [B, γ+1], [q_1..q_γ] as verified, the head's raw q's); ``st.g`` is left as is."""
    fw, G, g = cfg.fw, plan.gamma, st.g
    qs, raw, drafts = [], [], [st.x]
    used = [0] * fw.layers                          # forwards per MTP layer in this draft
    k = 0
    while k < G:
        q = plan.q1 if k == 0 and plan.q1 is not None else cfg.probs(g)
        raw.append(q)
        qv = q if plan.to_rows is None else torch.where(plan.to_rows.unsqueeze(1), one_hot_argmax(q), q)
        d = race(qv, noise.select(0, k)) if noise is not None else draft_tokens(qv, cfg.rule, cfg.generator)
        qs.append(qv)
        drafts.append(d)
        k += 1
        if plan.planner is not None:
            G = plan.planner.extend(k, q, d)                          # after d_k is drawn: run the head again?
        if k < G:
            layer = k % fw.layers
            if layer == 0:                                            # next to the accepted context
                start = st.length + used[0]
                valid = st.valid.narrow(1, 0, start + 1)
            else:                                                     # its own scratch slots of this draft
                start = used[layer]
                valid = torch.ones((d.shape[0], start + 1), dtype=torch.bool, device=d.device)
            g = fw.drafter(d.unsqueeze(1), g.unsqueeze(1), vpos.narrow(1, k - 1, 1), valid, start, layer).squeeze(1)
            used[layer] += 1
            cfg.metrics.draft_forwards += 1
    return torch.stack(drafts, dim=1), qs, raw


def _accept(cfg: SpecConfig, st: SpecState, p_t: Tensor, qs: list[Tensor], vin: Tensor, j: Tensor,
            noise: Tensor | None, u: Tensor | None):
    """The rule's verdict on drafts ``vin[:, 1:]`` against ``p_t`` [B, γ+1, V] (``sampling.rs_step`` on the
    RS fast path, else ``sampling.verify``): (accepted a [B], kept slots [B, γ+1], emitted tokens (pad after the
    correction/bonus token), expected α [B, γ], each draft's acceptance chance [B, γ] — for RS the raw ratio
    ``p(d)/q(d)``, which may exceed 1 — and the token at index a [B], or None where not at hand)."""
    if cfg.rs_fast:
        q_pad = torch.stack([*qs, st.zero_q], dim=1)
        G = len(qs)
        return rs_step(p_t, q_pad, vin, j, cfg.pad_id, noise.select(0, G), cfg.generator,
                       u if u.shape[1] == G else u.narrow(1, 0, G))
    res = verify(p_t, torch.stack(qs, dim=1), vin[:, 1:], cfg.rule, cfg.generator)
    kept = j <= res.accepted.unsqueeze(1)                              # [B, γ+1] emitted slots
    return res.accepted, kept, torch.where(kept, res.tokens, cfg.pad_id), res.expected_alpha, res.accept_prob, None


def _pick(t: Tensor, idx: Tensor) -> Tensor:
    """``t[b, idx[b]]`` for ``t`` [B, T, ...] and ``idx`` [B] (one ``gather``: cheaper than advanced indexing)."""
    B = idx.shape[0]
    if t.dim() == 2:
        return t.gather(1, idx.view(B, 1)).squeeze(1)
    return t.gather(1, idx.view(B, 1, 1).expand(B, 1, t.shape[2])).squeeze(1)


def _roll_back(cfg: SpecConfig, st: SpecState, toks: Tensor, vhid: Tensor, vpos: Tensor, kept: Tensor,
               a: Tensor, live: Tensor | None, last: Tensor | None = None) -> None:
    """Holes in both caches after each row's last kept slot; the head re-reads the kept positions with the
    target's hiddens (its output at slot s+a is the next g); x (``last`` when the caller has it), its position and
    the used length move on."""
    s, G = st.length, toks.shape[1] - 1
    st.valid.narrow(1, s, G + 1).copy_(kept)
    if cfg.fw.keep is not None:                                       # linear-attention state: the same cut
        cfg.fw.keep(kept.sum(1) - 1)
    if G:
        gh = cfg.fw.drafter(toks, vhid, vpos, st.valid.narrow(1, 0, s + G + 1), s)
        cfg.metrics.draft_forwards += 1
        g = _pick(gh, a)
        st.g = g if live is None else torch.where(live.unsqueeze(1), g, st.g)
    x = last if last is not None else _pick(toks, a)
    st.x = x if live is None else torch.where(live, x, st.x)
    if not G:                                                         # one token: a = 0
        st.pos_x = st.pos_x + (1 if live is None else live)
    else:
        st.pos_x = st.pos_x + (a + 1) if live is None else torch.where(live, st.pos_x + a + 1, st.pos_x)
    st.length = s + G + 1
