"""Adaptive drafting (beyond the paper): choose the draft length γ_t per decoding step — draft by draft, from the
head's own probability of each draft it has drawn — and RS vs TO per row from the decision boundary of DESIGN §3.
It plugs into the engine as a drafting policy (``engine.drafting``): ``AdaptiveDraft`` and ``FixedDraft`` start a
``DraftPlanner`` per decoding call.

Signal. Drafting is sequential, and after drawing d_k ~ q_k the head has to decide whether to run once more (for
q_{k+1}, d_{k+1}) or stop and verify. The chance that d_k is accepted, given d_k, is ``r_k = min(1,
p_k(d_k)/q_k(d_k))`` under RS (``p_k(d_k)`` under TO, where d_k = argmax q_k), and the draft's own probability
``q_k(d_k)`` is a free, local predictor of it (``replay`` reports how well it correlates). ``AdaptiveDraft.tables``
keep, per rule and draft step k, the mean r_k per confidence bin of ``q_k(d_k)`` (``BINS`` equal bins of [0, 1]),
learned from every ``DraftPlanner.LEARN_EVERY``-th verify at the steps each row reached (k ≤ A + 1, so a table
holds r_k given drafts 1..k−1 accepted). They start from the head's mean α_k (``prior``, worth ``prior_weight``
observations per bin) and keep learning from every decoding call that uses them.

Choice. With d_1..d_k drawn, row b's chance of having all k accepted is predicted as ``m_b = Π_{i≤k}
table[i][bin(q_i(d_i))]`` (0 once a d_i is EOS: later drafts would be cut off); each further draft j adds ``m_b ·
ᾱ_{k+1} ⋯ ᾱ_j`` expected tokens (``ᾱ`` the step means over bins, for drafts not drawn yet; the accept length
``1 + Σ_{j≤γ} Π_{i≤j} α_i`` of DESIGN §3). Tokens per second are maximised in the long run by the policy that
maximises, step by step, ``T(γ) − R·c(γ)`` (renewal-reward: a step is worth its tokens less what its time would
have earned at the rate R), with ``c(γ)`` the cost of a step of γ drafts and R the rate of the best fixed γ (so on
average rows the choice IS the best fixed γ). After each draft k the planner picks the best ``γ ∈ [k, γ_max]`` — k
stops drafting, more runs the head again —, which reduces to a threshold on m (``stop_thresholds``). A drawn q_k
always gets its draft: stopping before d_k would waste the head forward that gave q_k. At batch > 1, m is the mean
over the live rows that have not drafted EOS: a static batch ends with its last row, so what counts is the
progress of whichever live row turns out the longest, and the mean is a random live row's — but not of a row that
has just drafted its EOS, which is about to end and would otherwise cut the drafts of the rows still running; and
it never drafts past ``AdaptiveDraft.batch_cap``, because a static batch waits for its slowest row and longer drafts
spread the rows' progress. c(γ) and R are measured: ``calibrate`` decodes at every fixed γ; c(γ) is its seconds per
step (made non-decreasing by ``monotone_fit``) and R the best tokens a live row keeps per step over c — cut at EOS
and the token budget, which the tables' α's (accepted drafts, past EOS too) would overstate. All rows of a batch
share one verify forward, so γ_t is per step (per sequence at batch 1). The bookkeeping is a few numbers per row on
the host: one read of (q_k(d_k), d_k) per draft but the last (``draft_confidence``; the step's EOS sync carries the
verify's numbers); every read is a device sync inside the draft loop, so the planner reads as little as it can.

Rule. RS beats TO on a draft exactly when ``TV(p,q) < 1 − p(argmax q)``, i.e. ``α_RS > α_TO`` (DESIGN §3). p
is unknown while drafting, so ``rule="auto"`` predicts both sides the same way: every verify measures both
``α_RS`` and ``α_TO`` from p and the head's own q, and ``AdaptiveDraft.choice`` keeps, per rule, the mean α_k per
confidence bin of ``max q_1``; at the start of a step a row is verified with TO when its predicted ``T(γ)`` under
TO, from its q_1, is larger at the step's expected length (the best fixed γ; ties go to RS). TO is run as RS
against a one-hot q at ``argmax q``: accept with prob. ``min(1, p(d)/1) = p(d)`` and residual ``max(0, p − 1_d) =
p with d zeroed`` — exactly the TO row of DESIGN §3 — so rows can use different rules in one batch, and while
every row uses RS nothing extra runs on the device.

Exactness. Every choice depends only on tokens already emitted, on drafts already drawn and on the head's draft
distributions, never on the verify outcome it governs. Whether the head runs again after d_k may depend on d_k
(continuing or stopping only decides whether position k+1 is drafted or left to the bonus draw from p; both give
p at k+1), but a draft once drawn is always verified: a rule "verify d_k only if q_k(d_k) is large" would bias the
output. So, given its prefix, every emitted token is a verified draft d_k ~ q_k or a residual/bonus draw from p:
the emitted tokens keep the law of plain sampling whatever γ_t and rules are chosen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from bebop.config import check_gamma
from bebop.core.acceptance import accept_length
from bebop.core.fits import linear_fit
from bebop.engine.decode import DecodeConfig, DecodeMetrics, mtp_decode
from bebop.engine.drafting import AUTO, DraftPolicy
from bebop.errors import BebopError

__all__ = ["AUTO", "AdaptiveDraft", "DraftPlanner", "FixedDraft", "as_policy", "calibrate", "decode_trace", "replay"]

BINS = 10          # confidence bins of q_k(d_k) (drafting) and max q_1 (rule choice)
CAP_TOLERANCE = 0.02  # batch > 1: the shortest γ within this fraction of the best batch throughput caps drafting


@dataclass
class AdaptiveDraft:
    """Adaptive γ (module doc): ``step_seconds[γ-1]`` = the cost c(γ) of one draft→verify step at γ (γ = 1..γ_max;
    relative values matter), ``prior[k-1]`` = the head's mean α_k, ``step_tokens[γ-1]`` = the tokens a live row
    keeps per step at γ (cut at EOS and the token budget) and ``throughput[γ-1]`` = the whole batch's tokens per
    second at γ (``batch_cap``; ``calibrate`` models it as the tokens the batch keeps per verify, counted, over a
    straight-line fit of c, which ranks the γ's more steadily than timing each), all from ``calibrate`` (a float
    prior applies to every step; without ``step_tokens`` the rate of the best fixed γ is predicted from the tables).
    ``tables[rule]`` = (Σ r_k, counts) per draft step k and confidence bin of ``q_k(d_k)`` — the drafting decisions;
    ``choice[rule]`` = (Σ α_k, counts) per step k and confidence bin of ``max q_1`` — the per-row RS/TO choice of
    rule auto; both start from the prior and are learned by every decoding call that uses this object."""

    step_seconds: Sequence[float]
    prior: float | Sequence[float] = 0.8
    prior_weight: float = 2.0
    step_tokens: Sequence[float] | None = None
    throughput: Sequence[float] | None = None
    tables: dict[str, tuple[list[list[float]], list[list[float]]]] = field(default_factory=dict, repr=False)
    choice: dict[str, tuple[list[list[float]], list[list[float]]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.step_seconds or any(not (c > 0) for c in self.step_seconds):
            raise BebopError(f"step_seconds must be positive, one per γ = 1..γ_max, got {list(self.step_seconds)}")
        if not self.prior_weight > 0:
            raise BebopError(f"prior_weight must be > 0, got {self.prior_weight}")
        prior = [self.prior] * self.gamma_max if isinstance(self.prior, int | float) else list(self.prior)
        if len(prior) != self.gamma_max or any(not 0 <= a <= 1 for a in prior):
            raise BebopError(f"prior must be in [0, 1], a float or one per γ = 1..{self.gamma_max}, got {self.prior}")
        self.prior = prior
        for name in ("step_tokens", "throughput"):
            v = getattr(self, name)
            if v is not None and (len(v) != self.gamma_max or any(not t > 0 for t in v)):
                raise BebopError(f"{name} must be > 0, one per γ = 1..{self.gamma_max}, got {v}")

    @property
    def gamma_max(self) -> int:
        return len(self.step_seconds)

    def _new(self, store: dict, rule: str) -> tuple[list[list[float]], list[list[float]]]:
        if rule not in store:
            w = self.prior_weight
            store[rule] = ([[a * w] * BINS for a in self.prior], [[w] * BINS for _ in self.prior])
        return store[rule]

    def table(self, rule: str) -> tuple[list[list[float]], list[list[float]]]:
        """(Σ r_k, counts) ``[k-1][bin of q_k(d_k)]`` for ``rule``, created from the prior on first use."""
        return self._new(self.tables, rule)

    def choice_table(self, rule: str) -> tuple[list[list[float]], list[list[float]]]:
        """(Σ α_k, counts) ``[k-1][bin of max q_1]`` for ``rule``, created from the prior on first use."""
        return self._new(self.choice, rule)

    def step_means(self, rule: str) -> list[float]:
        """ᾱ_1..ᾱ_γmax under ``rule``: each step's mean acceptance over all confidence bins."""
        sums, counts = self.table(rule)
        return [sum(s) / sum(n) for s, n in zip(sums, counts, strict=True)]

    def best_fixed(self, rule: str, upto: int | None = None) -> tuple[int, float]:
        """(γ, a row's tokens per second) of the best fixed γ ≤ ``upto`` (default γ_max): from the measured
        ``step_tokens`` when given, else predicted from ``rule``'s step means."""
        tokens = self.step_tokens or accept_lengths(self.step_means(rule))
        rates = [t / c for t, c in zip(tokens, self.step_seconds, strict=True)][: upto or self.gamma_max]
        best = max(range(len(rates)), key=rates.__getitem__)
        return best + 1, rates[best]

    def start(self, batch: int, rule: str, auto_rule: bool, device: torch.device | str,
              eos_id: int | None = None) -> DraftPlanner:
        """The engine's drafting state for one call (``engine.drafting.DraftPolicy``): an adaptive planner."""
        return DraftPlanner(self, self.gamma_max, batch, rule, auto_rule, device, eos_id)

    def batch_cap(self, batch: int) -> int:
        """The longest draft a planner for ``batch`` rows runs: γ_max at batch 1; at batch > 1, when
        ``throughput`` (the whole batch's tokens per second at each fixed γ) is given, the shortest γ within
        ``CAP_TOLERANCE`` of the best. A static batch waits for its slowest row, and longer drafts spread the rows'
        progress, so a shorter γ can win on the whole batch's throughput while each live row's rate ties; and
        calibration on other prompts ranks neighbouring γ's only roughly, so the cap is the shortest γ within a
        tolerance of the best rather than the best itself."""
        if batch <= 1 or self.throughput is None:
            return self.gamma_max
        best = max(self.throughput)
        return next(g + 1 for g, t in enumerate(self.throughput) if t >= (1 - CAP_TOLERANCE) * best)


@dataclass(frozen=True)
class FixedDraft:
    """A fixed draft length γ as a drafting policy: what rule ``auto`` (RS or TO per row, from each row's
    ``max q_1``) needs when γ does not adapt."""

    gamma: int

    @property
    def gamma_max(self) -> int:
        return self.gamma

    def start(self, batch: int, rule: str, auto_rule: bool, device: torch.device | str,
              eos_id: int | None = None) -> DraftPlanner:
        return DraftPlanner(None, self.gamma, batch, rule, auto_rule, device, eos_id)


def as_policy(gamma: int | DraftPolicy, rule: str) -> int | DraftPolicy:
    """What to pass the engine as ``gamma`` for ``rule``: a fixed γ under rule ``auto`` becomes a
    :class:`FixedDraft` (the engine leaves the per-row RS/TO choice to a policy); anything else is unchanged."""
    return FixedDraft(gamma) if rule == AUTO and isinstance(gamma, int) else gamma


def confidence_bin(conf: float) -> int:
    """The table bin of a confidence (a draft's ``q_k(d_k)``, or ``max q_1``) in [0, 1]."""
    return min(int(conf * BINS), BINS - 1)


def monotone_fit(costs: Sequence[float]) -> list[float]:
    """The least-squares non-decreasing fit of measured step costs c(γ = 1..K) (isotonic regression, pool adjacent
    violators): a longer draft never costs less, and neighbouring γ's that noise has reordered are pooled. It keeps
    uneven per-γ cost steps (small matrix products need not grow smoothly with γ) that a straight line would
    flatten, so a planner does not pay for γ's that cost more than a line predicts."""
    blocks: list[list[float]] = []                           # [sum, count] per pooled block
    for c in costs:
        blocks.append([c, 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s_, n_ = blocks.pop()
            blocks[-1][0] += s_
            blocks[-1][1] += n_
    return [s_ / n_ for s_, n_ in blocks for _ in range(int(n_))]


def accept_lengths(alpha: Sequence[float]) -> list[float]:
    """Per-step acceptance α_1..α_K → predicted tokens per verify for γ = 1..K (``core.acceptance.accept_length``
    for every draft length)."""
    return accept_length(alpha, prefixes=True).tolist() if len(alpha) else []


def step_tokens(accept: Sequence[float], gamma: int, eos: int = 0) -> float:
    """Expected tokens a step of ``gamma`` drafts emits, given each draft's acceptance chance ``accept`` (r_1..)
    and ``eos`` = the 1-based index of the first draft that is EOS (0: none): ``accept_lengths``, cut at an
    accepted EOS draft (it ends the row: no correction or bonus token after it, and later drafts are lost)."""
    if eos and eos <= gamma:
        return accept_lengths(accept[:eos])[-1] - math.prod(accept[:eos])
    return accept_lengths(accept[:gamma])[-1]


def first_eos(confidence: Sequence[float]) -> int:
    """The 1-based index of the first EOS draft in a trace row of ``q_k(d_k)`` (negative at EOS), 0 if none."""
    return next((k + 1 for k, c in enumerate(confidence) if c < 0), 0)


def stop_thresholds(means: Sequence[float], costs: Sequence[float], rate: float) -> list[float]:
    """θ_1..θ_K: with drafts 1..k drawn, drafting on pays iff the live rows' mean predicted chance m that all k
    are accepted exceeds θ_k (θ_K = ∞: γ_max is reached). Drafting on to γ > k adds ``m · S_γ`` expected tokens,
    ``S_γ = ᾱ_{k+1} + ᾱ_{k+1}ᾱ_{k+2} + … + ᾱ_{k+1}⋯ᾱ_γ`` (``means`` = ᾱ_1..ᾱ_K for drafts not drawn yet), for
    ``c(γ) − c(k)`` more seconds (``costs`` = c(1..K)); at the rate R (module doc) the step's ``T − R·c`` grows iff
    ``m · S_γ > R·(c(γ) − c(k))`` for some γ > k, i.e. iff ``m > θ_k = min_γ R·(c(γ) − c(k)) / S_γ``. Ties stop."""
    K = len(costs)
    out = []
    for k in range(1, K):
        best, gain, run = float("inf"), 0.0, 1.0
        for g in range(k + 1, K + 1):
            run *= means[g - 1]
            gain += run
            if gain > 0:
                best = min(best, rate * (costs[g - 1] - costs[k - 1]) / gain)
        out.append(best)
    return [*out, float("inf")]


def draft_confidence(q: Tensor, d: Tensor) -> list[tuple[float, int]]:
    """(q(d), d) per row on the host for drafts ``d`` [B] drawn from ``q`` [B, V], read once per draft while
    drafting: on the CPU straight from q's memory (a ``gather`` there costs more in the decode loop than the
    read itself), on an accelerator in one transfer."""
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64):
        qn = q.numpy()
        return [(float(qn[b, t]), t) for b, t in enumerate(d.tolist())]
    return [(c, int(t)) for c, t in host_rows([q.gather(1, d.unsqueeze(1)), d.unsqueeze(1)])]


def host_rows(cols: list[Tensor]) -> list[list[float]]:
    """Columns ``[B, n_i]`` (any dtypes, one device) as B host lists, in one transfer: one ``cat`` and ``tolist``
    on an accelerator (one sync); on the CPU the ``cat`` would cost more than the copies it saves."""
    if cols[0].device.type != "cpu":
        return torch.cat([c.float() for c in cols], dim=1).tolist()
    parts = [c.tolist() for c in cols]
    return [sum(row, []) for row in zip(*parts, strict=True)]


class DraftPlanner:
    """Per-call state of adaptive drafting for a batch of ``batch`` rows verified with ``rule`` (module doc).
    ``adaptive`` None keeps γ fixed at ``gamma`` (and keeps the rule-choice tables for ``auto_rule`` to itself);
    ``auto_rule`` picks RS or TO per row and step, else every row uses ``rule``.

    Per decoding step the engine calls ``step`` once (at its host sync, with q_1 and the last verify's
    outcome) and, while drafting, ``extend`` once per drawn draft d_k (an adaptive planner only). The tables
    learn from the verify of every ``LEARN_EVERY``-th step (1st, 5th, …: the others read only which rows are
    done, as a fixed γ does), and the table means and stop thresholds it decides with are refreshed from them
    every ``REFRESH`` steps."""

    REFRESH = 8
    LEARN_EVERY = 4

    def __init__(self, adaptive: AdaptiveDraft | None, gamma: int, batch: int, rule: str, auto_rule: bool,
                 device: torch.device | str, eos_id: int | None = None) -> None:
        self.fixed = adaptive is None
        self.eos_id = eos_id
        self.adaptive = adaptive if adaptive is not None else AdaptiveDraft([1.0] * gamma)
        self.rules = ("rejection", "target_only") if auto_rule else (rule,)
        self.gamma = self.adaptive.batch_cap(batch)               # γ_max (capped), or the fixed γ: first plan
        self.device = device
        self.bins: list[list[int]] = []                           # per drawn draft k: bin of each row's q_k(d_k)
        self.first: list[int] = [0] * batch                       # bin of each row's max q_1, this step (rule auto)
        self.row_rule = [0] * batch                               # index into rules, per row, this step
        self.done = [False] * batch                               # rows done at the last sync
        self.mass = [1.0] * batch                                 # predicted Π_{i≤k} r_i per row
        self.ended = [self.gamma + 1] * batch                     # per row: its first EOS draft k, this step
        self.steps = 0
        self.means: list[list[list[float]]] = []                  # per rule: table means [k][bin] (refreshed)
        self.theta: list[float] = []                              # stop thresholds θ_1..θ_γmax (refreshed)
        self.horizon = self.gamma                                 # the step's expected γ, for the RS/TO choice

    def refresh(self) -> None:
        """Table means, stop thresholds and the best fixed γ from the tables as learned so far (a fixed planner
        decides no lengths and keeps its γ as the horizon)."""
        if self.fixed:
            return
        ad = self.adaptive
        self.means = [[[x / n for x, n in zip(*kb, strict=True)] for kb in zip(*ad.table(rule), strict=True)]
                      for rule in self.rules]
        horizon, rate = ad.best_fixed(self.rules[0], self.gamma)
        self.theta = stop_thresholds(ad.step_means(self.rules[0])[: self.gamma], ad.step_seconds[: self.gamma], rate)
        self.horizon = horizon

    def step(self, done: Tensor, q1: Tensor, accepted: Tensor | None = None, accept: Tensor | None = None,
             alphas: Tensor | None = None) -> tuple[bool, int, Tensor | None]:
        """(all rows done, the step's first plan of γ — ``extend`` cuts it —, TO rows ``[B]`` bool or None if
        none) for the step whose first draft distributions are ``q1 [B, V]`` — the step's one host sync. After a
        verify, pass its ``accepted`` drafts ``[B]``, the drafts' acceptance chances ``accept`` [B, γ_t] (r_k,
        learned by an adaptive planner; RS may pass the raw ratio p(d)/q(d), counted as at most 1) and, for rule
        auto, ``alphas`` [B, 2·γ_t] (each rule's expected α per step); rows done before the verify are skipped."""
        auto = len(self.rules) > 1
        learn = accepted is not None and self.learning
        cols = [done.unsqueeze(1)] + ([q1.amax(-1, keepdim=True)] if auto else [])
        if learn:
            cols += [accepted.unsqueeze(1), accept] + ([alphas] if auto else [])
        rows = host_rows(cols)                                   # [done, (max q_1), (A, r..., α...)] per row
        ad, off = self.adaptive, 1 + auto
        was_done, self.done = self.done, [row[0] > 0 for row in rows]
        if learn:                                                # learn at the steps each row reached
            G = accept.shape[1]
            tables = [ad.table(rule) for rule in self.rules] if not self.fixed else []
            choice = [ad.choice_table(rule) for rule in self.rules] if auto else []
            for b, (row, skip) in enumerate(zip(rows, was_done, strict=True)):
                if skip:
                    continue
                reached = min(int(row[off]) + 1, G)
                if not self.fixed:      # drafts after an EOS draft teach nothing, nor a draft that was not read
                    sums, counts = tables[self.row_rule[b]]
                    for k, r in enumerate(row[off + 1 : off + 1 + min(reached, self.ended[b], len(self.bins))]):
                        sums[k][self.bins[k][b]] += min(r, 1.0)         # RS passes the raw ratio p(d)/q(d)
                        counts[k][self.bins[k][b]] += 1
                for rule_i, (sums, counts) in enumerate(choice):
                    lo = off + 1 + G * (1 + rule_i)
                    for k, a in enumerate(row[lo : lo + reached]):
                        sums[k][self.first[b]] += a
                        counts[k][self.first[b]] += 1
        if all(self.done):
            return True, self.gamma, None
        self.begin([row[1] for row in rows] if auto else None)
        if not any(self.row_rule):
            return False, self.gamma, None
        return False, self.gamma, torch.tensor([r == 1 for r in self.row_rule], device=self.device)

    @property
    def learning(self) -> bool:
        """Whether the verify of the current step is learned from (every ``LEARN_EVERY``-th: 1st, 5th, …); the
        engine skips what only learning reads (rule auto's per-rule α) on the other steps."""
        return (self.steps - 1) % self.LEARN_EVERY == 0

    def begin(self, conf: list[float] | None = None) -> int:
        """Start a step; with rule auto, pick each row's rule from its confidence ``max q_1`` (``conf``). Returns
        the step's first plan of γ (γ_max for an adaptive planner: ``extend`` cuts it as the drafts come)."""
        if self.steps % self.REFRESH == 0:
            self.refresh()
        self.steps += 1
        self.bins, self.mass, self.ended = [], [1.0] * len(self.mass), [self.gamma + 1] * len(self.mass)
        if conf is not None and len(self.rules) > 1:             # TO where its predicted T(γ) is larger
            self.first = [confidence_bin(c) for c in conf]
            choice = [self.adaptive.choice_table(rule) for rule in self.rules]
            by_bin: dict[int, list[float]] = {}                  # each rule's T(horizon), per bin of max q_1
            for b, (i, end) in enumerate(zip(self.first, self.done, strict=True)):
                if i not in by_bin:
                    by_bin[i] = [float(accept_length([s[i] / n[i] for s, n in zip(*c, strict=True)][: self.horizon]))
                                 for c in choice]
                t = by_bin[i]
                self.row_rule[b] = int(not end and t[1] > t[0])
        return self.gamma

    def extend(self, k: int, q: Tensor, d: Tensor) -> int:
        """The draft length planned now that the rows' draft d_k ``[B]`` is drawn from their raw q_k ``[B, V]``:
        k = stop drafting, γ_max = run the head again (and decide again after d_{k+1}). A fixed planner keeps γ
        and reads nothing. The planner's last draft (γ_max, or its batch cap) is not read either: nothing is left
        to decide, and its table is not learned (the thresholds use only that table's mean, which the calibrated
        prior gives), so its host read is saved."""
        if self.fixed:
            return self.gamma
        if k == self.gamma:
            return k
        eos = self.eos_id
        return self.decide(k, [-c if t == eos else c for c, t in draft_confidence(q, d)])

    def decide(self, k: int, conf: list[float]) -> int:
        """``extend`` from the rows' confidences ``q_k(d_k)``, negated where d_k is EOS (drafts after an EOS are
        worth nothing: that row's chance of gaining from more drafts drops to 0, and a row about to end cannot
        be the one its batch waits for): stop iff the mean, over the live rows that have not drafted EOS, of the
        predicted chance that d_1..d_k are all accepted is at most θ_k (``stop_thresholds``); with none left,
        stop."""
        bins = [min(int(abs(c) * BINS), BINS - 1) for c in conf]  # confidence_bin, inline: once per draft
        self.bins.append(bins)
        total, live = 0.0, 0
        for b, end in enumerate(self.done):
            if end:
                continue
            if conf[b] < 0:
                self.ended[b] = min(self.ended[b], k)
            if self.ended[b] <= k:
                self.mass[b] = 0.0
                continue
            self.mass[b] *= self.means[self.row_rule[b]][k - 1][bins[b]]
            total += self.mass[b]
            live += 1
        return k if not live or total <= self.theta[k - 1] * live else self.gamma   # θ_γmax = ∞: ∞·0 would be NaN


def decode_trace(model, head, batches: list[list[list[int]]], dc: DecodeConfig,
                 seed: int = 0) -> tuple[list[list[float]], list[list[float]]]:
    """(``q_k(d_k)``, negated where d_k is EOS, and the acceptance chance r_k of d_k) [S, γ] of every live row-step
    of decoding ``batches`` at the fixed draft length ``dc.gamma`` with RS (batch i seeded ``seed + i``) — real
    decode steps, starting where the accept process starts them, as the planner meets them (teacher-forced
    positions would weight every position alike)."""
    conf: list[list[float]] = []
    accept: list[list[float]] = []
    for i, prompts in enumerate(batches):
        steps: list = []
        gen = torch.Generator(device=model.device).manual_seed(seed + i)
        mtp_decode(model, head, prompts, replace(dc, rule="rejection", generator=gen), steps)
        for c, r, live in steps:
            conf += c[live].tolist()
            accept += r[live].tolist()
    return conf, accept


def replay(confidence, accept, adaptive: AdaptiveDraft, train_fraction: float = 0.5) -> dict:
    """Noise-free decision quality of adaptive drafting: replay drafting decisions over recorded draft steps
    instead of timing them. ``confidence`` / ``accept`` [N, K] = ``q_k(d_k)`` (negative where d_k is EOS) and the
    acceptance chance r_k of draft k at N decode steps (``decode_trace``; Π_{i≤j} r_i is the chance that a step's
    first j drafts are all accepted, and drafts are drawn the same whatever is decided later, so any γ ≤ K can be
    scored on them, in tokens cut at an accepted EOS: ``step_tokens``). The
    first ``train_fraction`` of the steps fill fresh tables (``adaptive``'s prior and costs; its own tables are
    left alone); on the rest every fixed γ, the planner (one row at a time, as at batch 1) and an oracle that
    knows each step's r (best ``T(γ) − R·c(γ)``) are scored in expected tokens per second under the costs
    ``adaptive.step_seconds`` — the same cost model for all, so only the decisions differ. Returns rates (tokens
    per modelled second), the planner's mean γ, both ratios to the best fixed γ, and over all steps the mean r_k
    and its correlation with ``q_k(d_k)`` and with ``q_1(d_1)``."""
    conf, acc = [list(map(float, r)) for r in confidence], [list(map(float, r)) for r in accept]
    K = adaptive.gamma_max
    if len(conf) != len(acc) or any(len(r) < K for r in (*conf, *acc)):
        raise BebopError(f"replay needs confidence and accept of the same N steps with ≥ {K} drafts each")
    n_train = int(len(conf) * train_fraction)
    if not 0 < n_train < len(conf):
        raise BebopError(f"replay needs steps on both sides of train_fraction={train_fraction}, got {len(conf)}")
    ad = AdaptiveDraft(adaptive.step_seconds, adaptive.prior, adaptive.prior_weight, adaptive.step_tokens)
    sums, counts = ad.table("rejection")
    for c_row, a_row in zip(conf[:n_train], acc[:n_train], strict=True):
        for k in range(first_eos(c_row[:K]) or K):                      # up to the first EOS draft
            b = confidence_bin(c_row[k])
            sums[k][b] += a_row[k]
            counts[k][b] += 1
    test = [(c, a, first_eos(c[:K])) for c, a in zip(conf[n_train:], acc[n_train:], strict=True)]
    costs = ad.step_seconds
    fixed = [sum(step_tokens(a, g, e) for _, a, e in test) / (len(test) * costs[g - 1]) for g in range(1, K + 1)]
    planner = DraftPlanner(ad, K, 1, "rejection", False, "cpu")
    tokens = seconds = drafted = 0.0
    for c_row, a_row, eos in test:
        planner.begin()
        k, g = 1, planner.decide(1, [c_row[0]])
        while g > k:
            k += 1
            g = planner.decide(k, [c_row[k - 1]])
        tokens += step_tokens(a_row, g, eos)
        seconds += costs[g - 1]
        drafted += g
    rate = max(fixed)
    oracle_t = oracle_s = 0.0
    for _, a_row, eos in test:
        curve = [step_tokens(a_row, g, eos) for g in range(1, K + 1)]
        g = max(range(K), key=lambda i: curve[i] - rate * costs[i])
        oracle_t += curve[g]
        oracle_s += costs[g]
    best = max(range(K), key=fixed.__getitem__)
    c_all = torch.tensor(conf, dtype=torch.float64)[:, :K].abs()
    a_all = torch.tensor(acc, dtype=torch.float64)[:, :K]

    def corr(x: Tensor, y: Tensor) -> float | None:
        if len(x) < 2 or min(float(x.std()), float(y.std())) < 1e-9:   # a constant column has no correlation
            return None
        return float(torch.corrcoef(torch.stack([x, y]))[0, 1])

    signal = {"accept_mean": a_all.mean(0).tolist(),
              "corr_own_confidence": [corr(c_all[:, k], a_all[:, k]) for k in range(K)],
              "corr_first_confidence": [corr(c_all[:, 0], a_all[:, k]) for k in range(K)]}
    return {"steps": len(test), "train_steps": n_train, **signal, "fixed": fixed, "best_fixed_gamma": best + 1,
            "planner": tokens / seconds, "planner_mean_gamma": drafted / len(test), "oracle": oracle_t / oracle_s,
            "planner_vs_best_fixed": tokens / seconds / fixed[best], "oracle_vs_best_fixed": oracle_t / oracle_s
            / fixed[best]}


def calibrate(model, head, batches: list[list[list[int]]], dc: DecodeConfig, gamma_max: int, seed: int = 0,
              repeats: int = 3, warm_rule: str | None = None, warm_passes: int = 3, **adaptive_kw) -> AdaptiveDraft:
    """An ``AdaptiveDraft`` for ``head`` at the batch size of ``batches`` (prompt batches, all of one size: the costs
    depend on it): c(γ) = seconds per step (after prefill), the tokens a live row keeps per step (the first token,
    from prefill, left out) and the whole batch's tokens per second (``batch_cap``) from decoding ``batches``
    ``repeats`` times (new seeds each time, after one warm-up) at every fixed γ = 1..``gamma_max``, the γ's
    interleaved batch by batch; c made non-decreasing by ``monotone_fit``; the prior = the head's mean α_k at
    γ_max (over the rows that reached step k), and the tables warmed by ``warm_passes`` adaptive passes over
    ``batches`` (with ``warm_rule``, default ``dc.rule``; ``"auto"`` also warms the RS/TO choice). ``dc`` gives
    the sampling transforms, token budget, EOS, padding and backend (its γ and generator are set per run)."""
    check_gamma(gamma_max, "gamma_max")

    def decode(g, rep: int, i: int, rule: str = dc.rule) -> DecodeMetrics:          # batch i, seeded per repeat
        gen = torch.Generator(device=model.device).manual_seed(seed + 1000 * rep + i)
        return mtp_decode(model, head, batches[i], replace(dc, gamma=as_policy(g, rule), rule=rule,
                                                           generator=gen)).metrics

    rows = sum(len(b) for b in batches)
    runs, prior = [DecodeMetrics() for _ in range(gamma_max)], DecodeMetrics()
    gammas = list(range(1, gamma_max + 1))
    for rep in range(repeats + 1):            # repeat 0 warms up; the γ's run back to back on each batch, in a
        for i in range(len(batches)):          # rotating order: a drifting machine hits them all alike
            turn = (rep * len(batches) + i) % gamma_max
            for g in gammas[turn:] + gammas[:turn]:
                mr = decode(g, rep, i)
                if rep:
                    runs[g - 1].merge(mr)
                if g == gamma_max:
                    prior.merge(mr)
    costs, tokens, per_verify = [], [], []
    for g, m in enumerate(runs, start=1):
        kept = m.tokens - rows * repeats                                # the first tokens come from prefill
        if not m.steps or kept <= 0:
            raise BebopError(f"calibration at gamma={g} decoded no draft→verify step: use more max_new_tokens "
                             f"(got {dc.max_new_tokens}) or prompts whose answers do not end at once")
        costs.append(m.decode_seconds / m.target_forwards)
        tokens.append(kept / m.steps)
        per_verify.append(kept / m.target_forwards)                    # the whole batch's, counted
    line = linear_fit(gammas, costs)           # batch_cap ranks the γ's on a line: steadier than each γ's timing
    fit = [line["intercept"] + line["slope"] * g for g in gammas] if line["slope"] else costs
    fit = fit if min(fit) > 0 else costs
    adaptive = AdaptiveDraft(step_seconds=monotone_fit(costs), prior=prior.expected_alpha, step_tokens=tokens,
                             throughput=[t / c for t, c in zip(per_verify, fit, strict=True)], **adaptive_kw)
    for rep in range(warm_passes):                                      # fills the confidence tables
        for i in range(len(batches)):
            decode(adaptive, repeats + 1 + rep, i, warm_rule or dc.rule)
    return adaptive
