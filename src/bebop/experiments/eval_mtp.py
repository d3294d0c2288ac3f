"""``bebop eval-mtp``: what a head's acceptance would be on a user's own rollouts, measured teacher-forced along
the policy's samples (no speculative decoding is run).

Two averages of the per-position, per-step acceptance α_k(t) (``analysis.token_acceptance``, DESIGN §3) are
reported, under RS and under TO:

* ``alpha``: the engine's α_k in expectation, P(draft k accepted | drafts 1..k−1 accepted) over the verify steps
  that decoding this sample would take. The engine does not draft from every position: a verify step that accepts
  a drafts starts the next one a + 1 tokens later, and which positions start a step depends on the acceptances,
  which depend on the tokens. Given the sample, the chance that step k at a start was an acceptance is
  ``analysis.acceptance_given_token`` (r_k), so the chance π(s) that s starts a verify step follows by a forward
  pass over the positions: π(first) = 1 and a start s moves to s + a + 1 with probability
  Π_{i≤a} r_i (1 − r_{a+1}) (the last factor absent when a = γ). Step k at s is reached with weight
  w_k(s) = π(s) Π_{i<k} r_i(s) and accepted with chance α_k(s) there, so α_k = Σ w_k α_k / Σ w_k, summed over all
  samples. This is exact in expectation (the sample is distributed as the engine's output, and the engine's
  coins given its output are these r's), and ``accept_length(alpha)`` is then the engine's accept length.
* ``position_alpha``: the plain mean of α_k(t) over positions — what ``train-mtp`` reports as held-out α and what
  its losses average. On a policy whose acceptance varies along the sequence the two differ (the engine starts
  steps where drafts were just rejected more often than where they were accepted).

The head's q_k come from ``MTPHead.unroll``, whose attention context is the engine's head cache (step-1 slots of
the context, then the draft's own chain), so they are the q_k decoding draws from. Measured on the default arith
head with a 16-token budget (no sample reaches EOS): ``alpha`` 0.964 0.951 0.963 against the engine's 0.964 0.956
0.959 over 512 samples.

Counted like the engine (``DecodeMetrics``): verify steps start while fewer than ``max_new_tokens`` tokens have
been produced, and the drafts of the last step may run past that budget, so exact figures need samples
``max_new_tokens + γ − 1`` tokens long (:func:`sample_length`). A step whose drafts run past an EOS that ended the
sample is left out: the engine still judges drafts after an accepted EOS draft, against a context the sample does
not have, and counts them in its α_k. Those drafts change no emitted token, so leaving them out is the acceptance
that matters, but it reads higher than the engine's counters wherever many steps cross an EOS: on the arith
task's 25-token answers (about seven verify steps each, the last of which can cross the EOS) ``alpha`` read
0.962 0.964 0.974 against the engine's 0.948 0.924 0.943. On rollouts much longer than γ the difference vanishes.

Standard errors treat sequences as the independent units (positions within a sequence are correlated): for a
ratio Σ a_i / Σ b_i over sequences i, se = sqrt(n/(n−1) Σ (a_i − α b_i)²) / Σ b_i (the delta method)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bebop.config import check_gamma
from bebop.core.acceptance import accept_length
from bebop.errors import BebopError

__all__ = ["RULES", "eval_mtp", "ratio_se", "sample_length", "verify_weights"]

RULES = {"rejection": ("alpha_rs", "accepted_rs"), "target_only": ("alpha_to", "accepted_to")}


def sample_length(max_new_tokens: int, gamma: int) -> int:
    """Completion tokens to sample so that every draft of every verify step within ``max_new_tokens`` has its
    target token: the last step starts after ``max_new_tokens − 1`` tokens and drafts γ more."""
    return max_new_tokens + gamma - 1


def verify_weights(accepted: np.ndarray) -> np.ndarray:
    """``w`` [n, γ]: the chance that decoding one sample starts a verify step at each of its n drafting positions
    and reaches draft step k there, from ``accepted`` [n, γ] = r_k at each position (the chance that step k was
    an acceptance given the sample's token). Position j + a + 1 follows a step at j that accepted a drafts;
    chances that leave the sample are dropped (the row ended there)."""
    r = np.asarray(accepted, dtype=np.float64)
    n, gamma = r.shape
    reach = np.cumprod(np.concatenate([np.ones((n, 1)), r], axis=1), axis=1)  # [n, γ+1]: Π_{i≤a} r_i, a = 0..γ
    stop = reach.copy()
    stop[:, :gamma] *= 1.0 - r  # P(exactly a accepted)
    start = np.zeros(n + gamma + 1)
    start[0] = 1.0 if n else 0.0
    for j in range(n):
        if start[j]:
            start[j + 1 : j + gamma + 2] += start[j] * stop[j]
    return start[:n, None] * reach[:, :gamma]


def ratio_se(num: np.ndarray, den: np.ndarray) -> tuple[list[float | None], list[float | None]]:
    """``(Σ num / Σ den, its standard error)`` per column of ``num``, ``den`` [units, k] summed over independent
    units (rows), by the delta method; ``None`` where Σ den = 0 or, for the error, under two units."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    n, tot = num.shape[0], den.sum(axis=0)
    safe = np.where(tot > 0, tot, 1.0)
    ratio = num.sum(axis=0) / safe
    se = np.sqrt(n / max(n - 1, 1) * ((num - ratio * den) ** 2).sum(axis=0)) / safe
    return ([float(r) if t > 0 else None for r, t in zip(ratio, tot, strict=True)],
            [float(e) if t > 0 and n >= 2 else None for e, t in zip(se, tot, strict=True)])


def eval_mtp(model, head, rows: Sequence[tuple[list[int], int]], gamma: int, params, pad_id: int,
             n_buckets: int = 10, max_new_tokens: int | None = None, batch_size: int = 64) -> dict:
    """Acceptance of ``head`` along the policy samples ``rows`` (``(ids, prompt_len)``) at γ = ``gamma`` under
    ``params`` (the rollout's sampling transforms; p and q both go through them).

    ``max_new_tokens``: the rollout budget the engine would decode with (steps start only while fewer tokens
    have been produced; see :func:`sample_length`); ``None`` counts every position whose γ targets exist.

    Returns (JSON-able) ``{"temperature", "gamma", "max_new_tokens", "n_rows", "n_sequences", "n_positions",
    "mean_entropy", "rejection": R, "target_only": R, "buckets"}`` with, per rule, ``R = {"alpha": [α_k],
    "alpha_se": [...], "accept_length", "verify_steps", "position_alpha": [...], "position_alpha_se": [...],
    "position_accept_length"}`` (module docstring; ``verify_steps`` = the expected verify steps over all rows),
    ``n_sequences`` the rows with at least one drafting position, ``n_positions`` the drafting positions
    evaluated and ``buckets`` = ``analysis.bucket_by_entropy`` over those positions (by H(p_1))."""
    from bebop.experiments.analysis import bucket_by_entropy, positions_per_sample, token_acceptance

    check_gamma(gamma)
    if max_new_tokens is not None and max_new_tokens < 1:
        raise BebopError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    counts = positions_per_sample(rows, gamma)
    kept_rows = [r for r, c in zip(rows, counts, strict=True) if c > 0]
    if not kept_rows:
        raise BebopError(f"no sample has more than gamma = {gamma} completion tokens: nothing to evaluate "
                         f"({len(rows)} samples)")
    stats = token_acceptance(model, head, kept_rows, gamma, params, pad_id, batch_size, given_token=True)
    counts = [c for c in counts if c > 0]
    if sum(counts) != stats["entropy"].shape[0]:
        raise BebopError(f"internal: {stats['entropy'].shape[0]} teacher-forced positions, expected {sum(counts)}")
    limit = None if max_new_tokens is None else max_new_tokens - 1  # positions j (j + 1 tokens produced) < budget
    keep, per_rule = [], {rule: ([], [], [], []) for rule in RULES}
    start = 0
    for c in counts:
        sl = slice(start, start + (c if limit is None else min(c, limit)))
        start += c
        keep.append(np.arange(sl.start, sl.stop))
        for rule, (alpha_key, given_key) in RULES.items():
            a = stats[alpha_key][sl]
            w = verify_weights(stats[given_key][sl])
            num, den, pnum, pden = per_rule[rule]
            num.append((w * a).sum(0))
            den.append(w.sum(0))
            pnum.append(a.sum(0))
            pden.append(np.full(gamma, float(a.shape[0])))
    idx = np.concatenate(keep)
    if not idx.size:
        raise BebopError(f"max_new_tokens {max_new_tokens} leaves no verify step to evaluate")
    ent = stats["entropy"][idx]
    out: dict = {
        "temperature": float(params.temperature), "gamma": gamma, "max_new_tokens": max_new_tokens,
        "n_rows": len(rows), "n_sequences": len(kept_rows), "n_positions": int(idx.size),
        "mean_entropy": float(ent.mean()), "accept_length_counts_bonus": True,
    }
    for rule, (num, den, pnum, pden) in per_rule.items():
        alpha, alpha_se = ratio_se(np.stack(num), np.stack(den))
        position_alpha, position_se = ratio_se(np.stack(pnum), np.stack(pden))
        out[rule] = {
            "alpha": alpha, "alpha_se": alpha_se,
            "accept_length": float(accept_length([a or 0.0 for a in alpha])),  # None: step never reached → 0
            "verify_steps": float(np.stack(den)[:, 0].sum()),
            "position_alpha": position_alpha, "position_alpha_se": position_se,
            "position_accept_length": float(accept_length(stats[RULES[rule][0]][idx]).mean()),
        }
    out["buckets"] = bucket_by_entropy(ent, stats["alpha_rs"][idx], stats["alpha_to"][idx], n_buckets,
                                       entropy_k=stats["entropy_k"][idx])
    return out
