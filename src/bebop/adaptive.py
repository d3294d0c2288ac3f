"""Adaptive drafting (issue 6, beyond the paper): choose the draft length γ_t per decoding step from the
acceptance predicted for each sequence, and RS vs TO per draft from the decision boundary of DESIGN §3.

Draft length. Before drafting, the head's first draft distribution q_1 is already known (it comes from the
previous step's catch-up forward), and its confidence ``max q_1`` is a local, free predictor of how well the
next drafts will fare (low confidence = high local entropy = low acceptance). ``AdaptiveDraft`` keeps a table
of the mean EXACT expected acceptance of each draft step k given the confidence bin of q_1 (``BINS`` equal
bins of [0, 1]): ``Σ min(p_k, q_k)`` for RS, ``p_k(argmax q_k)`` for TO, measured by every verify at the steps
it reached (k ≤ A + 1, so the table holds α_k given drafts 1..k−1 accepted). It starts from the head's mean
α_k (``prior``, worth ``prior_weight`` observations per bin) and keeps learning from every decoding call that
uses it. For row b, ``α̂_b = table[bin(max q_1,b)]`` and ``1 + E_b[A_γ] = 1 + Σ_{j≤γ} Π_{i≤j} α̂_{b,i}``; the
step's draft length is ``γ_t = argmax_γ Σ_{live b} (1 + E_b[A_γ]) / c(γ)`` — tokens per second. All rows of a
batch share one verify forward, so γ_t is per step (and per sequence at batch 1). The cost ``c(γ)`` is
anchored to measured throughput: ``calibrate`` decodes at every fixed γ and sets ``c(γ) = AL(γ) / tps(γ)``
(its accept length over its kept tokens per second after prefill), so for rows of average predictability the
planner picks the fastest fixed γ — folding in what a per-forward cost model misses: tokens drafted past EOS
or the token budget are discarded (at large γ the last step of a short answer wastes most of its drafts),
finished rows still occupy the batch, per-step overheads — and moves away from it where the confidence table
predicts better or worse acceptance. γ changes only when the best γ is predicted to be ``switch_margin``
faster than the current one: a change of shape costs time of its own (measured on CPU: alternating γ = 4, 5
steps cost 5 % more than their mean) and near-ties are within the estimates' noise. The bookkeeping is a few
numbers per row done on the host in plain Python: the step's one host sync (the EOS check) brings the
confidences, accepted counts and expected α with it.

Rule. RS beats TO on a draft exactly when ``TV(p,q) < 1 − p(argmax q)``, i.e. ``α_RS > α_TO`` (DESIGN §3). p
is unknown while drafting, so ``rule="auto"`` predicts both sides the same way: every verify measures both
``α_RS`` and ``α_TO`` from p and the head's own q, and the table keeps one set of means per rule; a row is
verified with TO for the coming step when its predicted ``1 + E[A_γt]`` under TO is larger (ties go to RS).
TO is run as RS against a one-hot q at ``argmax q``: accept with prob. ``min(1, p(d)/1) = p(d)`` and residual
``max(0, p − 1_d) = p with d zeroed`` — exactly the TO row of DESIGN §3 — so rows can use different rules in
one batch, and while every row uses RS nothing extra runs on the device.

Exactness. Every choice depends only on tokens already emitted and on the draft head — never on the verify
outcome it governs — so the emitted tokens keep the law of plain sampling whatever γ_t and rules are chosen
(each emitted token is either a verified draft or a residual/bonus draw from p).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from bebop.errors import BebopError

AUTO = "auto"
BINS = 10          # confidence bins of max q_1


@dataclass
class AdaptiveDraft:
    """Adaptive γ (module doc): ``step_seconds[γ-1]`` = the cost c(γ) of one draft→verify step at γ (γ =
    1..γ_max; relative values matter) and ``prior[k-1]`` = the head's mean α_k, both from ``calibrate`` (a
    float prior applies to every step). ``tables[rule]`` (per confidence bin of q_1: Σ α_k and counts, prior
    included) are learned by every decoding call that uses this object."""

    step_seconds: Sequence[float]
    prior: float | Sequence[float] = 0.8
    prior_weight: float = 4.0
    switch_margin: float = 0.03
    tables: dict[str, tuple[list[list[float]], list[list[float]]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.step_seconds or any(not (c > 0) for c in self.step_seconds):
            raise BebopError(f"step_seconds must be positive, one per γ = 1..γ_max, got {list(self.step_seconds)}")
        if not self.prior_weight > 0:
            raise BebopError(f"prior_weight must be > 0, got {self.prior_weight}")
        if self.switch_margin < 0:
            raise BebopError(f"switch_margin must be >= 0, got {self.switch_margin}")
        prior = [self.prior] * self.gamma_max if isinstance(self.prior, int | float) else list(self.prior)
        if len(prior) != self.gamma_max or any(not 0 <= a <= 1 for a in prior):
            raise BebopError(f"prior must be in [0, 1], a float or one per γ = 1..{self.gamma_max}, got {self.prior}")
        self.prior = prior

    @property
    def gamma_max(self) -> int:
        return len(self.step_seconds)

    def table(self, rule: str) -> tuple[list[list[float]], list[list[float]]]:
        """(Σ α_k, counts) per confidence bin for ``rule``, created from the prior on first use."""
        if rule not in self.tables:
            w = self.prior_weight
            self.tables[rule] = ([[a * w for a in self.prior] for _ in range(BINS)],
                                 [[w] * self.gamma_max for _ in range(BINS)])
        return self.tables[rule]

    def predicted_alpha(self, rule: str, conf_bin: int) -> list[float]:
        """α̂_1..α̂_γmax under ``rule`` for a row whose q_1 falls in ``conf_bin``."""
        sums, counts = self.table(rule)
        return [s / n for s, n in zip(sums[conf_bin], counts[conf_bin], strict=True)]


def accept_lengths(alpha: Sequence[float]) -> list[float]:
    """Per-step acceptance α_1..α_K → predicted tokens per verify ``1 + E[A_γ]`` for γ = 1..K, with
    ``E[A_γ] = Σ_{j≤γ} Π_{i≤j} α_i`` (DESIGN §3)."""
    out, run, total = [], 1.0, 1.0
    for a in alpha:
        run *= a
        total += run
        out.append(total)
    return out


def step_alphas(p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """Exact expected acceptance at each draft step under both rules: ``p, q [..., K, V]`` →
    (``α_RS = Σ min(p, q) = 1 − TV(p, q)``, ``α_TO = p(argmax q)``), each ``[..., K]``."""
    rs = torch.minimum(p, q).sum(-1)
    to = p.gather(-1, q.argmax(-1, keepdim=True)).squeeze(-1)
    return rs, to


def choose_gamma(rate: Sequence[float], current: int, margin: float) -> int:
    """The γ (1-based) of highest predicted ``rate`` (tokens/s at γ = 1..K), unless it beats the ``current``
    γ by less than ``margin``."""
    best = max(range(len(rate)), key=rate.__getitem__) + 1
    return best if rate[best - 1] > (1 + margin) * rate[current - 1] else current


def one_hot_argmax(q: Tensor) -> Tensor:
    """``1[v = argmax q]`` — the draft distribution under which RS verification is TO verification."""
    return torch.zeros_like(q).scatter_(-1, q.argmax(-1, keepdim=True), 1.0)


class DraftPlanner:
    """Per-call state of adaptive drafting for a batch of ``batch`` rows verified with ``rule`` (module doc).
    ``adaptive`` None keeps γ fixed at ``gamma`` (and keeps the tables for ``auto_rule`` to itself);
    ``auto_rule`` picks RS or TO per row and step, else every row uses ``rule``."""

    def __init__(self, adaptive: AdaptiveDraft | None, gamma: int, batch: int, rule: str, auto_rule: bool,
                 device: torch.device | str) -> None:
        self.fixed = adaptive is None
        self.adaptive = adaptive if adaptive is not None else AdaptiveDraft([1.0] * gamma)
        self.rules = ("rejection", "target_only") if auto_rule else (rule,)
        self.gamma = self.adaptive.gamma_max                      # current γ_t
        self.device = device
        self.bins = [0] * batch                                   # conf bin of each row's q_1 this step
        self.done = [False] * batch                               # rows done at the last sync

    def step(self, done: Tensor, q1: Tensor, accepted: Tensor | None = None,
             alphas: Tensor | None = None) -> tuple[bool, int, Tensor | None]:
        """(all rows done, γ of the next step, its TO rows ``[B]`` bool or None if none) for the step whose
        first draft distributions are ``q1 [B, V]`` — the step's one host sync. After a verify, pass its
        ``accepted`` drafts ``[B]`` and ``alphas`` [B, γ_t · len(rules)]: each rule's expected α per step (rows
        done before it are skipped)."""
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
                for row, b, skip in zip(rows, self.bins, was_done, strict=True):
                    if not skip:
                        s, n = sums[b], counts[b]
                        for k, a in enumerate(row[lo : lo + min(int(row[2]) + 1, G)]):
                            s[k] += a
                            n[k] += 1
        self.bins = [min(int(row[1] * BINS), BINS - 1) for row in rows]
        live: dict[int, int] = {}                                # live rows per confidence bin
        for b, end in zip(self.bins, self.done, strict=True):
            if not end:
                live[b] = live.get(b, 0) + 1
        if not live:
            return True, self.gamma, None
        curves = {b: [accept_lengths(ad.predicted_alpha(r, b)) for r in self.rules] for b in live}
        if not self.fixed:
            tokens = [0.0] * ad.gamma_max                        # Σ over live rows of 1 + E_b[A_γ], best rule
            for b, n in live.items():
                for k, al in enumerate(map(max, *curves[b]) if len(self.rules) > 1 else curves[b][0]):
                    tokens[k] += n * al
            rate = [t / c for t, c in zip(tokens, ad.step_seconds, strict=True)]
            self.gamma = choose_gamma(rate, self.gamma, ad.switch_margin)
        if len(self.rules) == 1:
            return False, self.gamma, None
        k = self.gamma - 1
        use_to = [b in curves and curves[b][1][k] > curves[b][0][k] for b in self.bins]
        if not any(use_to):
            return False, self.gamma, None
        return False, self.gamma, torch.tensor(use_to, device=self.device)


def calibrate(model, head, batches: list[list[list[int]]], params, gamma_max: int, max_new_tokens: int,
              eos_id: int | None, pad_id: int = 0, seed: int = 0, repeats: int = 2, rule: str = "rejection",
              warm_rule: str | None = None, **adaptive_kw) -> AdaptiveDraft:
    """An ``AdaptiveDraft`` for ``head`` at the batch size of ``batches`` (prompt batches, all of one size: the
    costs depend on it): ``c(γ) = AL(γ) / tps(γ)`` from decoding ``batches`` ``repeats`` times (new seeds each
    time, after one warm-up) at every fixed γ = 1..``gamma_max`` — AL its accept length, tps its tokens after
    the first per second of decoding after prefill —, the prior = the head's mean α_k at γ_max (over the rows
    that reached step k), and the confidence tables warmed by one adaptive pass over ``batches`` (with
    ``warm_rule``, default ``rule``; ``"auto"`` warms the RS and the TO table)."""
    from bebop.engine import DecodeMetrics, generate_mtp

    if gamma_max < 1:
        raise BebopError(f"gamma_max must be >= 1, got {gamma_max}")

    def run(g, rep: int, rule: str = rule) -> DecodeMetrics:
        m = DecodeMetrics()
        for i, prompts in enumerate(batches):
            gen = torch.Generator(device=model.device).manual_seed(seed + 1000 * rep + i)
            m.merge(generate_mtp(model, head, prompts, params, max_new_tokens, eos_id, g, rule, pad_id, gen).metrics)
        return m

    rows = sum(len(b) for b in batches)
    costs, prior = [], DecodeMetrics()
    for g in range(1, gamma_max + 1):
        m = DecodeMetrics()
        for rep in range(repeats + 1):                                  # repeat 0 warms up
            mr = run(g, rep)
            if rep:
                m.merge(mr)
            if g == gamma_max:
                prior.merge(mr)
        kept = m.tokens - rows * repeats                                # the first tokens come from prefill
        if not m.steps or kept <= 0:
            raise BebopError(f"calibration at gamma={g} decoded no draft→verify step: use more max_new_tokens "
                             f"(got {max_new_tokens}) or prompts whose answers do not end at once")
        costs.append(m.accept_length * m.decode_seconds / kept)
    adaptive = AdaptiveDraft(step_seconds=costs, prior=prior.expected_alpha, **adaptive_kw)
    run(adaptive, repeats + 1, warm_rule or rule)                       # fills the confidence tables
    return adaptive
