"""Entropy–acceptance analysis (DESIGN §3, §6): fits, per-token entropy buckets, the RS-vs-TO decision
boundary and temperature sweeps. Everything returned is JSON-able (floats, ints, lists, dicts, ``None``).

Quantities (DESIGN §1, §3), per drafted position t and draft step k = 1..γ, with p_k the target's and q_k
the head's distribution after the same sampling transforms:
  α_RS,k = Σ_v min(p_k(v), q_k(v)) = 1 − TV(p_k, q_k)        (rejection sampling, draft d ~ q)
  α_TO,k = p_k(argmax q_k)                                    (target-only, greedy draft)
  accept length = 1 + Σ_{j=1..γ} Π_{i≤j} α_i                  (tokens per target forward, COUNTS the bonus token)
  RS beats TO  ⇔  TV(p, q) < 1 − p(argmax q)                  (an identity: both sides say α_RS > α_TO)
The per-token figures are teacher-forced and chained as in ``train_mtp.expected_alpha``: step k's q_k is the
head's recursive unroll fed with the *sampled* tokens, so α_k is the acceptance at step k given that drafts
1..k−1 matched the policy's own continuation; the accept length above is then the expected accept length of
one verify step under that proxy (no sampling noise). The engine's empirical α_k (``DecodeMetrics.alpha``)
is what :func:`temperature_sweep` reports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from bebop.config import check_gamma
from bebop.core.acceptance import accept_length, alpha_rs, alpha_to
from bebop.core.fits import linear_fit
from bebop.core.sampling import SamplingParams, entropy, probs_from_logits
from bebop.errors import BebopError
from bebop.experiments.measure import Probe, measure_acceptance
from bebop.experiments.names import DEFAULT_TEMPERATURES, RULE_NAMES
from bebop.experiments.options import EntropyConfig, SweepConfig
from bebop.experiments.series import entropy_series, step_series, sweep_series
from bebop.tasks import get_task
from bebop.training.samples import policy_samples
from bebop.training.train_mtp import pad_batch, teacher_forced

__all__ = [
    "DEFAULT_TEMPERATURES",
    "RULE_NAMES",
    "EntropyConfig",
    "SweepConfig",
    "accept_length",
    "acceptance",
    "acceptance_given_token",
    "bucket_by_entropy",
    "decision_boundary",
    "boundary_agreement",
    "entropy_analysis",
    "entropy_series",
    "sweep_series",
    "linear_fit",
    "positions_per_sample",
    "step_series",
    "temperature_sweep",
    "token_acceptance",
]



# --------------------------------------------------------------------------------------------------
# Fits and pure per-position formulas
# --------------------------------------------------------------------------------------------------


def acceptance(p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(α_RS, α_TO, TV)`` over the last (vocabulary) dim of target ``p`` and draft ``q`` [..., V].

    α_RS = Σ min(p, q), α_TO = p(argmax q), TV = ½ Σ |p − q| (computed from the definition, independently
    of α_RS, so :func:`boundary_agreement` checks the identity rather than restating it). float32."""
    p, q = p.float(), q.float()
    return alpha_rs(p, q), alpha_to(p, q), 0.5 * (p - q).abs().sum(dim=-1)


def acceptance_given_token(p: torch.Tensor, q: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r_RS, r_TO)``: the chance that a draft step was an acceptance given the token ``y`` [...] the verify
    step emitted there, for target ``p`` and draft ``q`` [..., V]. RS emits v as an accepted draft with
    probability min(p(v), q(v)) and emits v at all with probability p(v), so r_RS = min(p(y), q(y)) / p(y)
    (0 where p(y) = 0); TO accepts exactly when the emitted token is the greedy draft, r_TO = 1[y = argmax q].
    Averaged over y ~ p these are α_RS and α_TO; along a sample they give the verify steps the engine would
    take on it. float32."""
    p, q = p.float(), q.float()
    y = y.unsqueeze(-1)
    p_y, q_y = p.gather(-1, y).squeeze(-1), q.gather(-1, y).squeeze(-1)
    r_rs = torch.where(p_y > 0, torch.minimum(p_y, q_y) / p_y.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    return r_rs, (q.argmax(dim=-1) == y.squeeze(-1)).float()


def boundary_agreement(tv, alpha_rs, alpha_to, tol: float = 1e-5) -> dict:
    """Per-sample check of DESIGN §3's decision boundary: predicted "RS wins" iff ``TV < 1 − α_TO``, actual
    "RS wins" iff ``α_RS > α_TO``. Samples with ``|α_RS − α_TO| ≤ tol`` (``tol`` covers float32 rounding) are
    ties (either rule is as good) and are excluded from ``agreement``, which is 1.0 whenever the identity
    TV = 1 − Σ min(p, q) holds.

    Returns ``{"n", "ties", "agreement", "rs_wins", "to_wins", "mean_margin"}`` (fractions of all samples;
    ``mean_margin`` = mean of α_RS − α_TO)."""
    tv, a_rs, a_to = (np.asarray(v, dtype=np.float64).ravel() for v in (tv, alpha_rs, alpha_to))
    n = int(tv.size)
    if n == 0:
        return {"n": 0, "ties": 0, "agreement": None, "rs_wins": None, "to_wins": None, "mean_margin": None}
    margin = a_rs - a_to
    tie = np.abs(margin) <= tol
    predicted = tv < 1.0 - a_to
    actual = margin > 0
    decided = ~tie
    agreement = float((predicted == actual)[decided].mean()) if decided.any() else None
    return {
        "n": n,
        "ties": int(tie.sum()),
        "agreement": agreement,
        "rs_wins": float((margin > tol).mean()),
        "to_wins": float((margin < -tol).mean()),
        "mean_margin": float(margin.mean()),
    }


def decision_boundary(p: torch.Tensor, q: torch.Tensor, tol: float = 1e-5) -> dict:
    """:func:`boundary_agreement` for distributions ``p`` (target) and ``q`` (draft), [..., V]."""
    alpha_rs, alpha_to, tv = acceptance(p, q)
    return boundary_agreement(tv.cpu().numpy(), alpha_rs.cpu().numpy(), alpha_to.cpu().numpy(), tol)


# --------------------------------------------------------------------------------------------------
# Per-token data and entropy buckets
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def token_acceptance(model, head, data: Sequence[tuple[list[int], int]], gamma: int, params: SamplingParams,
                     pad_id: int, batch_size: int = 64, given_token: bool = False) -> dict[str, np.ndarray]:
    """Per drafted position t of the policy samples ``data`` (``(ids, prompt_len)`` as from
    ``samples.policy_samples``), teacher-forced through ``train_mtp.teacher_forced`` (positions in row order,
    then t ascending):

    ``entropy`` [N] = H(p_1(t)) (the target at the first draft position), ``entropy_k`` [N, γ] = H(p_k(t)),
    ``alpha_rs`` / ``alpha_to`` / ``tv`` [N, γ] per draft step (see :func:`acceptance`), ``row`` [N] the index in
    ``data`` of each position's sample; with ``given_token`` also ``accepted_rs`` / ``accepted_to`` [N, γ] (see
    :func:`acceptance_given_token`, at the sample's tokens)."""
    check_gamma(gamma)
    lm_head = model.get_output_embeddings()
    keys = ("entropy_k", "alpha_rs", "alpha_to", "tv") + (("accepted_rs", "accepted_to") if given_token else ())
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    rows: list[np.ndarray] = []
    for i in range(0, len(data), batch_size):
        chunk = list(data[i : i + batch_size])
        ids, mask, prompt_lens = pad_batch(chunk, pad_id, model.device)
        hq, hp, y = teacher_forced(model, head, ids, mask, prompt_lens, gamma)
        rows.append(_position_rows(chunk, gamma, i, hq.shape[0]))
        p, q = probs_from_logits(lm_head(hp), params), probs_from_logits(lm_head(hq), params)
        alpha_rs, alpha_to, tv = acceptance(p, q)
        vals = (entropy(p), alpha_rs, alpha_to, tv) + (acceptance_given_token(p, q, y) if given_token else ())
        for key, val in zip(parts, vals, strict=True):
            parts[key].append(val.cpu())
    out = {k: torch.cat(v).double().numpy() if v else np.zeros((0, gamma)) for k, v in parts.items()}
    out["entropy"] = out["entropy_k"][:, 0]
    out["row"] = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    return out


def positions_per_sample(rows: Sequence[tuple[list[int], int]], gamma: int) -> list[int]:
    """Drafting positions per sample (``(ids, prompt_len)``), as ``train_mtp.teacher_forced`` lays them out:
    t = prompt_len − 1 .. while the γ targets after t all exist, i.e. max(0, completion length − γ) of them."""
    return [max(0, len(ids) - n - gamma) for ids, n in rows]


def _position_rows(chunk: Sequence[tuple[list[int], int]], gamma: int, first: int, n: int) -> np.ndarray:
    """The sample index of each of the ``n`` positions ``teacher_forced`` returned for ``chunk`` (row order, t
    ascending; :func:`positions_per_sample` counts them per sample)."""
    counts = positions_per_sample(chunk, gamma)
    if sum(counts) != n:
        raise BebopError(f"internal: {n} teacher-forced positions, expected {sum(counts)}")
    return np.repeat(np.arange(first, first + len(chunk)), counts)


def bucket_by_entropy(entropy: np.ndarray, alpha_rs: np.ndarray, alpha_to: np.ndarray, n_buckets: int = 10,
                      edges: Sequence[float] | None = None, entropy_k: np.ndarray | None = None) -> dict:
    """Bucket positions by entropy (equal-width buckets over [min, max], or the given ``edges``; empty buckets
    are dropped) and fit per-token lines against entropy. With ``entropy_k`` [N, γ] (H(p_k) per step), α_k is
    fitted against its own step's entropy H(p_k) instead of ``entropy``.

    Returns ``{"entropy": [...], "count": [...], "edges": [...], "rejection": R, "target_only": R}`` with, per
    rule, ``R = {"alpha": [[α_1..α_γ] per bucket], "accept_length": [...per bucket], "fit": linear_fit(entropy,
    accept length) over tokens, "alpha_fits": [linear_fit(entropy or H(p_k), α_k) over tokens per k], "mean_alpha",
    "mean_accept_length"}``. Bucket accept length is the mean over its tokens of 1 + Σ_j Π_{i≤j} α_i(t)."""
    ent = np.asarray(entropy, dtype=np.float64).ravel()
    alphas = {"rejection": np.asarray(alpha_rs, dtype=np.float64), "target_only": np.asarray(alpha_to, np.float64)}
    n = ent.size
    for name, a in alphas.items():
        if a.ndim != 2 or a.shape[0] != n:
            raise BebopError(f"{name} α must be [N, γ] with N = {n} entropies, got shape {a.shape}")
    if edges is None:
        if n_buckets < 1:
            raise BebopError(f"n_buckets must be >= 1, got {n_buckets}")
        lo, hi = (float(ent.min()), float(ent.max())) if n else (0.0, 1.0)
        edges = np.linspace(lo, hi if hi > lo else lo + 1e-9, n_buckets + 1)
    edges = np.asarray(edges, dtype=np.float64)
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise BebopError(f"bucket edges must be increasing with at least 2 values, got {edges.tolist()}")
    idx = np.clip(np.searchsorted(edges, ent, side="right") - 1, 0, edges.size - 2)
    used = [b for b in range(edges.size - 1) if np.any(idx == b)]
    out: dict = {
        "entropy": [float(ent[idx == b].mean()) for b in used],
        "count": [int((idx == b).sum()) for b in used],
        "edges": edges.tolist(),
    }
    for name, a in alphas.items():
        length = accept_length(a)
        out[name] = {
            "alpha": [a[idx == b].mean(axis=0).tolist() for b in used],
            "accept_length": [float(length[idx == b].mean()) for b in used],
            "fit": linear_fit(ent, length),
            "alpha_fits": [linear_fit(ent if entropy_k is None else entropy_k[:, k], a[:, k])
                           for k in range(a.shape[1])],
            "mean_alpha": a.mean(axis=0).tolist() if n else [],
            "mean_accept_length": float(length.mean()) if n else None,
        }
    return out


def entropy_analysis(model, tokenizer, heads: Mapping[str, object], cfg: EntropyConfig | None = None) -> dict:
    """Per-token entropy buckets, per-token fits and the decision-boundary check for each head on the same
    ``cfg.samples`` policy samples at ``cfg.temperature`` (prompts seeded by ``cfg.seed``). JSON-able:
    ``{"config": {...}, "heads": {name: bucket_by_entropy(...) + {"decision_boundary": {...},
    "decision_boundary_per_step": [...], "n_positions": N, "mean_entropy": H̄, "best_rule_accept_length",
    "per_sample": sums per policy sample for intervals}}}``;
    the last is the mean accept length if every draft step used the rule with the larger α (an upper bound
    on choosing RS vs TO from the boundary: the boundary needs p, which the drafter does not have)."""
    cfg = cfg or EntropyConfig()
    params = SamplingParams(temperature=cfg.temperature)
    data = policy_samples(model, tokenizer, get_task(cfg.task), cfg.samples, cfg.temperature, cfg.max_new_tokens,
                          cfg.seed)
    config = {"task": cfg.task, "samples": cfg.samples, "temperature": cfg.temperature, "gamma": cfg.gamma,
              "n_buckets": cfg.buckets, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed,
              "entropy_of": "buckets and accept-length fit: H(p_1); alpha_fits[k]: H(p_k)",
              "accept_length_counts_bonus": True}
    result: dict = {"config": config, "heads": {}}
    for name, head in heads.items():
        stats = token_acceptance(model, head, data, cfg.gamma, params, tokenizer.pad_token_id, cfg.batch_size)
        result["heads"][name] = _entropy_row(stats, cfg)
    return result


def _entropy_row(stats: Mapping[str, np.ndarray], cfg: EntropyConfig) -> dict:
    """One head's entry of :func:`entropy_analysis` from its :func:`token_acceptance` arrays."""
    row = bucket_by_entropy(stats["entropy"], stats["alpha_rs"], stats["alpha_to"], cfg.buckets,
                            entropy_k=stats["entropy_k"])
    row["n_positions"] = int(stats["entropy"].size)
    row["mean_entropy"] = float(stats["entropy"].mean()) if stats["entropy"].size else None
    row["decision_boundary"] = boundary_agreement(stats["tv"], stats["alpha_rs"], stats["alpha_to"])
    row["per_sample"] = _per_sample_sums(stats)
    # headroom for choosing the rule per draft step from the boundary (needs p, so an upper bound)
    best = np.maximum(stats["alpha_rs"], stats["alpha_to"])
    row["best_rule_accept_length"] = float(accept_length(best).mean()) if best.size else None
    row["decision_boundary_per_step"] = [
        boundary_agreement(stats["tv"][:, k], stats["alpha_rs"][:, k], stats["alpha_to"][:, k])
        for k in range(cfg.gamma)
    ]
    return row


def _per_sample_sums(stats: Mapping[str, np.ndarray]) -> dict:
    """Per policy sample (the unit an interval resamples), the sums that rebuild the per-token accept-length fit
    against H(p_1) over any resample of samples: ``{"n", "sum_h", "sum_h2", "rejection": {"sum_len", "sum_h_len"},
    "target_only": {...}}`` (lists; samples without drafted positions are dropped)."""
    row, h = stats["row"], stats["entropy"]
    used, inv = np.unique(row, return_inverse=True)

    def per(x: np.ndarray) -> list[float]:
        return np.bincount(inv, weights=x, minlength=used.size).tolist()

    out: dict = {"n": per(np.ones_like(h)), "sum_h": per(h), "sum_h2": per(h * h)}
    for rule, key in (("rejection", "alpha_rs"), ("target_only", "alpha_to")):
        length = accept_length(stats[key]) if h.size else np.zeros(0)
        out[rule] = {"sum_len": per(length), "sum_h_len": per(h * length)}
    return out


# --------------------------------------------------------------------------------------------------
# Temperature sweep through the engine
# --------------------------------------------------------------------------------------------------


def temperature_sweep(model, tokenizer, heads: Mapping[str, object], cfg: SweepConfig | None = None) -> dict:
    """RS and TO acceptance of every head at every τ, measured through the real engine
    (``measure.measure_acceptance``: empirical α_k and accept length incl. the bonus token, plus the policy's
    mean per-token entropy at τ) on the same held-out prompts and seeds for every (head, τ, rule).

    Returns ``{"temperatures": [...], "gamma": γ, "config": {...}, "heads": {name: {"rejection": S,
    "target_only": S}}}`` with ``S = {"accept_length": [per τ], "alpha": [[α_k] per τ], "expected_alpha":
    [[...] per τ], "entropy": [per τ], "units": [per τ], "fit": linear_fit(entropy, accept length) over τ}``;
    ``units`` are ``measure_acceptance``'s per-engine-call counters, the same prompts in the same calls at every
    (head, τ, rule), so an interval resamples them jointly."""
    cfg = cfg or SweepConfig()
    config = {"task": cfg.task, "n_prompts": cfg.prompts, "batch_size": cfg.batch_size,
              "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed, "accept_length_counts_bonus": True}
    result: dict = {"temperatures": list(cfg.temperatures), "gamma": cfg.gamma, "config": config, "heads": {}}
    for name, head in heads.items():
        row: dict = {}
        for rule in RULE_NAMES:
            s: dict[str, list] = {"accept_length": [], "alpha": [], "expected_alpha": [], "entropy": [], "units": []}
            for t in cfg.temperatures:
                r = measure_acceptance(model, tokenizer, head, Probe(cfg.task, rule, t, cfg.gamma, cfg.prompts,
                                                                     cfg.batch_size, cfg.max_new_tokens, cfg.seed))
                for key in s:
                    s[key].append(r.get(key))
            s["fit"] = linear_fit(s["entropy"], s["accept_length"])
            row[rule] = s
        result["heads"][name] = row
    return result
