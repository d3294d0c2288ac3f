"""Adaptive drafting (issue 6, beyond the paper): choose the draft length γ_t per decoding step — draft by draft,
from the confidence of each new draft distribution — and RS vs TO per row from the decision boundary of DESIGN §3.

Signal. Drafting is sequential: q_k is known before d_k is drawn, and its confidence ``max q_k`` is a free, local
predictor of the acceptance α_k of that very draft (arith, e2e-TV head, 1,323 decode steps at γ = 5, batch 1:
correlation 0.43–0.55 at every step k; ``max q_1`` predicts α_1 as well but nothing about α_2..α_5, correlation
−0.05 to −0.01 — so the length is decided as the draft goes, not once per step from q_1; ``replay`` reports both).
``AdaptiveDraft`` keeps, per rule and per draft step k, a table of the mean EXACT expected acceptance of draft k
given the confidence bin of its own q_k (``BINS`` equal bins of [0, 1]): ``Σ min(p_k, q_k)`` for RS,
``p_k(argmax q_k)`` for TO, measured by every verify at the steps it reached (k ≤ A + 1, so the table holds
α_k given drafts 1..k−1 accepted). It starts from the head's mean α_k (``prior``, worth ``prior_weight``
observations per bin) and keeps learning from every decoding call that uses it.

Choice. With q_1..q_k drawn, row b's acceptance estimates are ``α̂_{b,i} = table[i][bin(max q_{b,i})]`` for i ≤ k
and the step's mean ``ᾱ_i`` (over bins) for the drafts not yet seen; its predicted tokens for a step of γ
drafts are ``T_b(γ) = 1 + Σ_{j≤γ} Π_{i≤j} α̂_{b,i}`` (DESIGN §3). Tokens per second are maximised in the long run
by the policy that maximises, step by step, ``T(γ) − R·c(γ)`` (renewal-reward: a step is worth its tokens less
what its time would have earned at the rate R), with ``T`` the mean of ``T_b`` over live rows, ``c(γ)`` the
measured cost of a step of γ drafts and ``R = max_γ T̄(γ)/c(γ)`` the rate of the best fixed γ for average rows
(so on average rows the choice IS the best fixed γ). At each draft step k the planner picks the best
``γ ∈ [k−1, γ_max]`` (k ≥ 2; ``[1, γ_max]`` at k = 1): below k it stops before drawing d_k, equal to k it draws
d_k and stops, above k it runs the head once more. ``c(γ)`` is anchored to measured throughput: ``calibrate``
decodes at every fixed γ and sets ``c(γ) = AL(γ) / tps(γ)`` (seconds per row-step at that γ) — folding in what a
per-forward cost model misses: drafts past EOS or the token budget, finished rows still in the batch, per-step
overheads. All rows of a batch share one verify forward, so γ_t is per step (per sequence at batch 1). The
bookkeeping is a few numbers per row on the host: one ``.tolist()`` per draft step (at batch 1 on a CPU a few
µs; the step's EOS sync carries the verify's numbers).

Rule. RS beats TO on a draft exactly when ``TV(p,q) < 1 − p(argmax q)``, i.e. ``α_RS > α_TO`` (DESIGN §3). p
is unknown while drafting, so ``rule="auto"`` predicts both sides the same way: every verify measures both
``α_RS`` and ``α_TO`` from p and the head's own q, and the tables keep one set of means per rule; at the start of
a step a row is verified with TO when its predicted ``T(γ)`` under TO, from its q_1, is larger (ties go to RS).
TO is run as RS against a one-hot q at ``argmax q``: accept with prob. ``min(1, p(d)/1) = p(d)`` and residual
``max(0, p − 1_d) = p with d zeroed`` — exactly the TO row of DESIGN §3 — so rows can use different rules in
one batch, and while every row uses RS nothing extra runs on the device.

Exactness. Every choice depends only on tokens already emitted, on drafts already drawn and on the head's draft
DISTRIBUTIONS — whether d_k is drawn at all is decided from q_k before d_k is drawn, never from d_k itself (a
rule "verify d_k only if q_k(d_k) is large" would bias the output) and never from the verify outcome it governs.
So, given its prefix, every emitted token is a verified draft d_k ~ q_k or a residual/bonus draw from p: the
emitted tokens keep the law of plain sampling whatever γ_t and rules are chosen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from bebop.errors import BebopError

AUTO = "auto"
BINS = 10          # confidence bins of max q_k


@dataclass
class AdaptiveDraft:
    """Adaptive γ (module doc): ``step_seconds[γ-1]`` = the cost c(γ) of one draft→verify step at γ (γ =
    1..γ_max; relative values matter) and ``prior[k-1]`` = the head's mean α_k, both from ``calibrate`` (a
    float prior applies to every step), ``draft_seconds`` = one head forward (what stopping after a drawn q_k
    still pays). ``tables[rule]`` = (Σ α_k, counts) per draft step k and confidence bin
    of q_k, prior included, learned by every decoding call that uses this object."""

    step_seconds: Sequence[float]
    prior: float | Sequence[float] = 0.8
    prior_weight: float = 2.0
    draft_seconds: float = 0.0
    tables: dict[str, tuple[list[list[float]], list[list[float]]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.step_seconds or any(not (c > 0) for c in self.step_seconds):
            raise BebopError(f"step_seconds must be positive, one per γ = 1..γ_max, got {list(self.step_seconds)}")
        if not self.prior_weight > 0:
            raise BebopError(f"prior_weight must be > 0, got {self.prior_weight}")
        if not self.draft_seconds >= 0:
            raise BebopError(f"draft_seconds must be >= 0, got {self.draft_seconds}")
        prior = [self.prior] * self.gamma_max if isinstance(self.prior, int | float) else list(self.prior)
        if len(prior) != self.gamma_max or any(not 0 <= a <= 1 for a in prior):
            raise BebopError(f"prior must be in [0, 1], a float or one per γ = 1..{self.gamma_max}, got {self.prior}")
        self.prior = prior

    @property
    def gamma_max(self) -> int:
        return len(self.step_seconds)

    def table(self, rule: str) -> tuple[list[list[float]], list[list[float]]]:
        """(Σ α_k, counts) ``[k-1][bin]`` for ``rule``, created from the prior on first use."""
        if rule not in self.tables:
            w = self.prior_weight
            self.tables[rule] = ([[a * w] * BINS for a in self.prior], [[w] * BINS for _ in self.prior])
        return self.tables[rule]

    def step_means(self, rule: str) -> list[float]:
        """ᾱ_1..ᾱ_γmax under ``rule``: each step's mean acceptance over all confidence bins."""
        sums, counts = self.table(rule)
        return [sum(s) / sum(n) for s, n in zip(sums, counts, strict=True)]


def confidence_bin(conf: float) -> int:
    """The table bin of a draft distribution's confidence ``max q`` ∈ [0, 1]."""
    return min(int(conf * BINS), BINS - 1)


def affine_fit(costs: Sequence[float]) -> list[float]:
    """Least-squares ``a + b·γ`` through measured step costs c(γ = 1..K), slope ≥ 0 and values > 0. A step at γ
    is one verify over γ + 1 tokens and γ − 1 head forwards, close to affine in γ; on a shared machine single
    measurements scatter by several percent, enough to reorder neighbouring γ's, and the fit keeps the planner
    from chasing that noise."""
    K = len(costs)
    if K == 1:
        return list(costs)
    mx, my = (K + 1) / 2, sum(costs) / K
    slope = max(0.0, sum((g + 1 - mx) * (c - my) for g, c in enumerate(costs)) / sum((g + 1 - mx) ** 2
                                                                                         for g in range(K)))
    fit = [my + slope * (g + 1 - mx) for g in range(K)]
    return fit if min(fit) > 0 else list(costs)


def accept_lengths(alpha: Sequence[float]) -> list[float]:
    """Per-step acceptance α_1..α_K → predicted tokens per verify ``1 + E[A_γ]`` for γ = 1..K, with
    ``E[A_γ] = Σ_{j≤γ} Π_{i≤j} α_i`` (DESIGN §3)."""
    out, run, total = [], 1.0, 1.0
    for a in alpha:
        run *= a
        total += run
        out.append(total)
    return out


def plan_gamma(mass: float, means: Sequence[float], costs: Sequence[float], rate: float, k: int,
               sunk: float = 0.0) -> int:
    """The draft length γ ∈ [k−1, K] (``[1, K]`` at k = 1) maximising ``T(γ) − rate·c(γ)`` (module doc) at draft
    step k, given ``mass`` = the live rows' mean ``Π_{i≤k} α̂_i`` (the chance that drafts 1..k are all accepted,
    q_k's own confidence included), ``means`` = ᾱ_1..ᾱ_K for the drafts not seen yet and ``costs`` = c(1..K).
    Drafting past k adds ``mass · (1 + ᾱ_{k+1} + ᾱ_{k+1}ᾱ_{k+2} + …)`` tokens over stopping at k − 1; stopping at
    k − 1 still pays ``sunk`` (the head forward that produced q_k). Ties go to the shorter γ."""
    K = len(costs)
    best, best_value = k, None
    if k >= 2:
        best, best_value = k - 1, -rate * (costs[k - 2] + sunk)
    gain, run = 0.0, mass
    for g in range(k, K + 1):
        gain += run
        value = gain - rate * costs[g - 1]
        if best_value is None or value > best_value:
            best, best_value = g, value
        if g < K:
            run *= means[g]
    return best


def step_alphas(p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """Exact expected acceptance at each draft step under both rules: ``p, q [..., K, V]`` →
    (``α_RS = Σ min(p, q) = 1 − TV(p, q)``, ``α_TO = p(argmax q)``), each ``[..., K]``."""
    rs = torch.minimum(p, q).sum(-1)
    to = p.gather(-1, q.argmax(-1, keepdim=True)).squeeze(-1)
    return rs, to


def one_hot_argmax(q: Tensor) -> Tensor:
    """``1[v = argmax q]`` — the draft distribution under which RS verification is TO verification."""
    return torch.zeros_like(q).scatter_(-1, q.argmax(-1, keepdim=True), 1.0)


class DraftPlanner:
    """Per-call state of adaptive drafting for a batch of ``batch`` rows verified with ``rule`` (module doc).
    ``adaptive`` None keeps γ fixed at ``gamma`` (and keeps the tables for ``auto_rule`` to itself);
    ``auto_rule`` picks RS or TO per row and step, else every row uses ``rule``.

    Per decoding step the engine calls ``step`` once (at its host sync, with q_1 and the last verify's
    outcome) and, while drafting, ``extend`` once per new q_k (k ≥ 2)."""

    def __init__(self, adaptive: AdaptiveDraft | None, gamma: int, batch: int, rule: str, auto_rule: bool,
                 device: torch.device | str) -> None:
        self.fixed = adaptive is None
        self.adaptive = adaptive if adaptive is not None else AdaptiveDraft([1.0] * gamma)
        self.rules = ("rejection", "target_only") if auto_rule else (rule,)
        self.gamma = self.adaptive.gamma_max                      # the draft length planned for this step
        self.device = device
        self.bins: list[list[int]] = []                           # per drafted step k: conf bin of each row's q_k
        self.row_rule = [0] * batch                               # index into rules, per row, this step
        self.done = [False] * batch                               # rows done at the last sync
        self.mass = [1.0] * batch                                 # Π_{i≤k} α̂_i per row
        self.means: list[float] = []                              # ᾱ_1..ᾱ_γmax (first rule), this step
        self.rate = 0.0

    def _observe(self, k: int, conf: list[float]) -> float:
        """Record the rows' q_k confidences; return the live rows' mean Π_{i≤k} α̂_i."""
        bins = [confidence_bin(c) for c in conf]
        self.bins.append(bins)
        tables = [self.adaptive.table(rule) for rule in self.rules]
        total, live = 0.0, 0
        for b, end in enumerate(self.done):
            if not end:
                sums, counts = tables[self.row_rule[b]]
                self.mass[b] *= sums[k - 1][bins[b]] / counts[k - 1][bins[b]]
                total += self.mass[b]
                live += 1
        return total / max(live, 1)

    def step(self, done: Tensor, q1: Tensor, accepted: Tensor | None = None,
             alphas: Tensor | None = None) -> tuple[bool, int, Tensor | None]:
        """(all rows done, γ planned from q_1 — ``extend`` may change it —, TO rows ``[B]`` bool or None if none)
        for the step whose first draft distributions are ``q1 [B, V]`` — the step's one host sync. After a
        verify, pass its ``accepted`` drafts ``[B]`` and ``alphas`` [B, γ_t · len(rules)]: each rule's expected α
        per step (rows done before it are skipped)."""
        cols = [done.unsqueeze(1), q1.amax(-1, keepdim=True)]
        if accepted is not None:
            cols += [accepted.unsqueeze(1), alphas]
        rows = torch.cat(cols, dim=1).tolist()                   # [done, max q_1, (A, α...)] per row
        ad = self.adaptive
        was_done, self.done = self.done, [row[0] > 0 for row in rows]
        if accepted is not None:                                 # learn: α_k at the steps each row reached
            G = (len(rows[0]) - 3) // len(self.rules)
            for rule_i, rule in enumerate(self.rules):
                sums, counts = ad.table(rule)
                lo = 3 + rule_i * G
                for b, (row, skip) in enumerate(zip(rows, was_done, strict=True)):
                    if not skip:
                        for k, a in enumerate(row[lo : lo + min(int(row[2]) + 1, G)]):
                            sums[k][self.bins[k][b]] += a
                            counts[k][self.bins[k][b]] += 1
        if all(self.done):
            return True, self.gamma, None
        self.begin([row[1] for row in rows])
        if not any(self.row_rule):
            return False, self.gamma, None
        return False, self.gamma, torch.tensor([r == 1 for r in self.row_rule], device=self.device)

    def begin(self, conf: list[float]) -> int:
        """Start a step from the rows' q_1 confidences ``max q_1``: pick each row's rule (rule auto) and return
        the draft length planned from q_1."""
        ad = self.adaptive
        self.bins, self.mass = [], [1.0] * len(conf)
        means = [ad.step_means(rule) for rule in self.rules]
        self.means = means[0]
        self.rate = max(t / c for t, c in zip(accept_lengths(self.means), ad.step_seconds, strict=True))
        if len(self.rules) > 1:                                  # TO where its predicted T(γ) is larger
            for b, (c, end) in enumerate(zip(conf, self.done, strict=True)):
                t = []
                for rule, m in zip(self.rules, means, strict=True):
                    sums, counts = ad.table(rule)
                    i = confidence_bin(c)
                    t.append(accept_lengths([sums[0][i] / counts[0][i], *m[1:]])[self.gamma - 1])
                self.row_rule[b] = int(not end and t[1] > t[0])
        mass = self._observe(1, conf)
        if not self.fixed:
            self.gamma = plan_gamma(mass, self.means, ad.step_seconds, self.rate, 1)
        return self.gamma

    def extend(self, k: int, q: Tensor) -> int:
        """The draft length planned now that the rows' raw q_k ``[B, V]`` (k ≥ 2) is known: ``k − 1`` = stop
        before drawing d_k, ``k`` = draw d_k and stop, more = run the head again. Reads q_k only, never d_k.
        A fixed planner (rule auto at a fixed γ) only records q_k's confidence for its tables."""
        return self.decide(k, q.amax(-1).tolist())

    def decide(self, k: int, conf: list[float]) -> int:
        """``extend`` from the rows' confidences ``max q_k``."""
        mass = self._observe(k, conf)
        if not self.fixed:
            ad = self.adaptive
            self.gamma = plan_gamma(mass, self.means, ad.step_seconds, self.rate, k, ad.draft_seconds)
        return self.gamma


def decode_trace(model, head, batches: list[list[list[int]]], params, gamma: int, max_new_tokens: int,
                 eos_id: int | None, pad_id: int = 0, seed: int = 0) -> tuple[list[list[float]], list[list[float]]]:
    """(``max q_k``, exact expected α_k) [S, γ] of every live row-step of decoding ``batches`` at the fixed draft
    length ``gamma`` with RS — real decode steps, starting where the accept process starts them, as the planner
    meets them (teacher-forced positions would weight every position alike)."""
    from bebop.engine import generate_mtp

    conf: list[list[float]] = []
    alpha: list[list[float]] = []
    for i, prompts in enumerate(batches):
        steps: list = []
        gen = torch.Generator(device=model.device).manual_seed(seed + i)
        generate_mtp(model, head, prompts, params, max_new_tokens, eos_id, gamma, "rejection", pad_id, gen, steps)
        for c, a, live in steps:
            conf += c[live].tolist()
            alpha += a[live].tolist()
    return conf, alpha


def replay(confidence, alpha, adaptive: AdaptiveDraft, train_fraction: float = 0.5) -> dict:
    """Noise-free decision quality of adaptive drafting: replay drafting decisions over recorded draft steps
    instead of timing them. ``confidence`` / ``alpha`` [N, K] = ``max q_k`` and the exact expected α_k of draft k
    at N decode steps (``decode_trace``; Π_{i≤j} α_i along a step's drafts is the chance its first j drafts are
    all accepted). The first ``train_fraction`` of the steps fill fresh tables (``adaptive``'s prior, costs and
    head-forward cost; its own tables are left alone); on the rest every fixed γ, the planner (one row at a time,
    as at batch 1) and an oracle that knows each step's α (best ``T(γ) − R·c(γ)``) are scored in predicted
    tokens per second under the costs ``adaptive.step_seconds`` — the same cost model for all, so only the
    decisions differ. Returns rates (tokens per modelled second), the planner's mean γ, both ratios to the best
    fixed γ, and over all steps the mean α_k and its correlation with ``max q_k`` and with ``max q_1``."""
    conf, alpha = [list(map(float, r)) for r in confidence], [list(map(float, r)) for r in alpha]
    K = adaptive.gamma_max
    if len(conf) != len(alpha) or any(len(r) < K for r in (*conf, *alpha)):
        raise BebopError(f"replay needs confidence and alpha of the same N steps with ≥ {K} drafts each")
    n_train = int(len(conf) * train_fraction)
    if not 0 < n_train < len(conf):
        raise BebopError(f"replay needs steps on both sides of train_fraction={train_fraction}, got {len(conf)}")
    ad = AdaptiveDraft(adaptive.step_seconds, adaptive.prior, adaptive.prior_weight, adaptive.draft_seconds)
    sums, counts = ad.table("rejection")
    for c_row, a_row in zip(conf[:n_train], alpha[:n_train], strict=True):
        for k in range(K):
            b = confidence_bin(c_row[k])
            sums[k][b] += a_row[k]
            counts[k][b] += 1
    test = list(zip(conf[n_train:], alpha[n_train:], strict=True))
    costs, sunk = ad.step_seconds, ad.draft_seconds
    fixed = [sum(accept_lengths(a[:g])[-1] for _, a in test) / (len(test) * costs[g - 1]) for g in range(1, K + 1)]
    planner = DraftPlanner(ad, K, 1, "rejection", False, "cpu")
    tokens = seconds = drafted = 0.0
    for c_row, a_row in test:
        g, k, extra = planner.begin([c_row[0]]), 1, 0.0
        while g > k:
            k += 1
            g = planner.decide(k, [c_row[k - 1]])
            extra = sunk if g < k else 0.0
        tokens += accept_lengths(a_row[:g])[-1]
        seconds += costs[g - 1] + extra
        drafted += g
    rate = max(fixed)
    oracle_t = oracle_s = 0.0
    for _, a_row in test:
        curve = accept_lengths(a_row[:K])
        g = max(range(K), key=lambda i: curve[i] - rate * costs[i])
        oracle_t += curve[g]
        oracle_s += costs[g]
    best = max(range(K), key=fixed.__getitem__)
    c_all, a_all = torch.tensor(conf, dtype=torch.float64)[:, :K], torch.tensor(alpha, dtype=torch.float64)[:, :K]

    def corr(x: Tensor, y: Tensor) -> float | None:
        if len(x) < 2 or min(float(x.std()), float(y.std())) < 1e-9:   # a constant column has no correlation
            return None
        return float(torch.corrcoef(torch.stack([x, y]))[0, 1])

    signal = {"alpha_mean": a_all.mean(0).tolist(),
              "corr_own_confidence": [corr(c_all[:, k], a_all[:, k]) for k in range(K)],
              "corr_first_confidence": [corr(c_all[:, 0], a_all[:, k]) for k in range(K)]}
    return {"steps": len(test), "train_steps": n_train, **signal, "fixed": fixed, "best_fixed_gamma": best + 1,
            "planner": tokens / seconds, "planner_mean_gamma": drafted / len(test), "oracle": oracle_t / oracle_s,
            "planner_vs_best_fixed": tokens / seconds / fixed[best], "oracle_vs_best_fixed": oracle_t / oracle_s
            / fixed[best]}


def calibrate(model, head, batches: list[list[list[int]]], params, gamma_max: int, max_new_tokens: int,
              eos_id: int | None, pad_id: int = 0, seed: int = 0, repeats: int = 3, rule: str = "rejection",
              warm_rule: str | None = None, warm_passes: int = 3, **adaptive_kw) -> AdaptiveDraft:
    """An ``AdaptiveDraft`` for ``head`` at the batch size of ``batches`` (prompt batches, all of one size: the
    costs depend on it): ``c(γ) = AL(γ) / tps(γ)`` from decoding ``batches`` ``repeats`` times (new seeds each
    time, after one warm-up) at every fixed γ = 1..``gamma_max``, the γ's interleaved within each repeat — AL its
    accept length, tps its tokens after the first per second of decoding after prefill —, smoothed by
    ``affine_fit``; ``draft_seconds`` = one measured head forward (``engine.forward_costs``); the prior = the
    head's mean α_k at γ_max (over the rows that reached step k), and the confidence tables warmed by
    ``warm_passes`` adaptive passes over ``batches`` (with ``warm_rule``, default ``rule``; ``"auto"`` warms the RS
    and the TO table)."""
    from bebop.engine import DecodeMetrics, forward_costs, generate_mtp

    if gamma_max < 1:
        raise BebopError(f"gamma_max must be >= 1, got {gamma_max}")

    def run(g, rep: int, rule: str = rule) -> DecodeMetrics:
        m = DecodeMetrics()
        for i, prompts in enumerate(batches):
            gen = torch.Generator(device=model.device).manual_seed(seed + 1000 * rep + i)
            m.merge(generate_mtp(model, head, prompts, params, max_new_tokens, eos_id, g, rule, pad_id, gen).metrics)
        return m

    rows = sum(len(b) for b in batches)
    runs, prior = [DecodeMetrics() for _ in range(gamma_max)], DecodeMetrics()
    for rep in range(repeats + 1):            # repeat 0 warms up; γ's interleaved: a drifting machine hits all alike
        for g in range(1, gamma_max + 1):
            mr = run(g, rep)
            if rep:
                runs[g - 1].merge(mr)
            if g == gamma_max:
                prior.merge(mr)
    costs = []
    for g, m in enumerate(runs, start=1):
        kept = m.tokens - rows * repeats                                # the first tokens come from prefill
        if not m.steps or kept <= 0:
            raise BebopError(f"calibration at gamma={g} decoded no draft→verify step: use more max_new_tokens "
                             f"(got {max_new_tokens}) or prompts whose answers do not end at once")
        costs.append(m.accept_length * m.decode_seconds / kept)
    draft = forward_costs(model, head, batches[0], 1)["c_draft"]
    adaptive = AdaptiveDraft(step_seconds=affine_fit(costs), prior=prior.expected_alpha, draft_seconds=draft,
                             **adaptive_kw)
    for rep in range(warm_passes):                                      # fills the confidence tables
        run(adaptive, repeats + 1 + rep, warm_rule or rule)
    return adaptive
