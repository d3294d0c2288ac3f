"""Tests for bebop.core.sampling: the logits -> p transforms and exact speculative verification (DESIGN §3).

Statistical tests use fixed seeds, so they are deterministic. Each goodness-of-fit assertion rejects at
p-value < 1e-4, i.e. a correct implementation would fail any single one of them for a fraction 1e-4 of
seeds (with ~85 such assertions here, ~1% for a whole fresh set of seeds); the 5-sigma binomial bounds
have a false-alarm rate of ~6e-7 each. A wrong law is caught with overwhelming power at 10^5 draws.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from bebop.core.sampling import (
    PAD_ID,
    NoiseBank,
    SamplingParams,
    draft_tokens,
    entropy,
    exp_noise,
    probs_fast,
    probs_from_logits,
    race,
    rs_step,
    sample,
    total_variation,
    verify,
    verify_rs,
)
from bebop.errors import BebopError

torch.set_num_threads(1)

P_VALUE_FLOOR = 1e-4
N_DRAWS = 100_000


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_law(observed: np.ndarray, probs: np.ndarray, min_expected: float = 5.0) -> None:
    """Chi-square goodness of fit of category counts ``observed`` against ``probs``.

    Zero-probability categories must never occur; they are then dropped. Categories with expected count
    below ``min_expected`` are merged into one bucket (folded into the smallest regular category if the
    bucket itself is still too small). Fails at p-value < 1e-4.
    """
    observed = np.asarray(observed, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    zero = probs <= 0
    bad = np.flatnonzero(observed * zero)
    assert bad.size == 0, f"zero-probability categories occurred: {bad}"
    obs, pr = observed[~zero], probs[~zero]
    n = obs.sum()
    expected = pr / pr.sum() * n
    small = expected < min_expected
    if small.any():
        obs = np.append(obs[~small], obs[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
        if expected[-1] < min_expected and len(expected) > 2:
            j = int(np.argmin(expected[:-1]))
            obs[j] += obs[-1]
            expected[j] += expected[-1]
            obs, expected = obs[:-1], expected[:-1]
    if len(obs) < 2:
        return
    pval = stats.chisquare(obs, expected).pvalue
    assert pval > P_VALUE_FLOOR, f"chi-square p-value {pval:.3g} (obs {obs}, expected {expected.round(1)})"


def assert_binomial_close(successes: float, n: int, prob: float, sigmas: float = 5.0) -> None:
    rate = successes / n
    bound = sigmas * math.sqrt(max(prob * (1 - prob), 1e-12) / n) + 1e-9
    assert abs(rate - prob) <= bound, f"rate {rate:.5f} vs expected {prob:.5f} (bound {bound:.5f})"


# --------------------------------------------------------------------------------------------------
# SamplingParams validation and error messages
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"temperature": -0.5}, "-0.5"),
        ({"temperature": float("nan")}, "nan"),
        ({"top_p": 0.0}, "0.0"),
        ({"top_p": 1.5}, "1.5"),
        ({"top_p": -0.1}, "-0.1"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": -3}, "-3"),
    ],
)
def test_bad_sampling_params(kwargs: dict, needle: str) -> None:
    with pytest.raises(BebopError) as info:
        SamplingParams(**kwargs)
    msg = str(info.value)
    assert needle in msg
    name = next(iter(kwargs))
    assert name in msg and repr(kwargs[name]) in msg
    assert isinstance(info.value, ValueError)


def test_good_sampling_params() -> None:
    SamplingParams(temperature=0.0)
    SamplingParams(temperature=2, top_k=1, top_p=1.0)
    SamplingParams(top_p=1e-6, top_k=50)
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy


def test_unknown_rule() -> None:
    p = torch.full((2, 3, 4), 0.25)
    q = torch.full((2, 2, 4), 0.25)
    d = torch.zeros(2, 2, dtype=torch.long)
    with pytest.raises(BebopError, match="'foo'"):
        verify(p, q, d, "foo")
    with pytest.raises(BebopError, match="'foo'"):
        draft_tokens(q, "foo")


@pytest.mark.parametrize(
    ("p_shape", "q_shape", "d_shape"),
    [
        ((2, 4, 8), (2, 3, 7), (2, 3)),  # vocab mismatch
        ((2, 4, 8), (3, 3, 8), (2, 3)),  # batch mismatch (q)
        ((2, 4, 8), (2, 3, 8), (3, 3)),  # batch mismatch (drafts)
        ((2, 4, 8), (2, 3, 8), (2, 2)),  # γ mismatch drafts vs q
        ((2, 3, 8), (2, 3, 8), (2, 3)),  # p needs γ+1 positions
        ((2, 5, 8), (2, 3, 8), (2, 3)),  # p has too many positions
        ((4, 8), (2, 3, 8), (2, 3)),  # wrong rank
        ((2, 1, 8), (2, 0, 8), (2, 0)),  # γ = 0
    ],
)
def test_verify_shape_errors(p_shape: tuple, q_shape: tuple, d_shape: tuple) -> None:
    p = torch.rand(p_shape)
    q = torch.rand(q_shape)
    d = torch.zeros(d_shape, dtype=torch.long)
    for rule in ("rejection", "target_only", "greedy"):
        with pytest.raises(BebopError) as info:
            verify(p, q, d, rule)
        msg = str(info.value)
        for shape in (p_shape, q_shape, d_shape):
            assert str(tuple(shape)) in msg


def test_verify_dtype_errors() -> None:
    p = torch.full((1, 2, 3), 1 / 3)
    q = torch.full((1, 1, 3), 1 / 3)
    with pytest.raises(BebopError, match="float32"):
        verify(p, q, torch.zeros(1, 1), "rejection")
    with pytest.raises(BebopError, match="int64"):
        verify(p.long(), q, torch.zeros(1, 1, dtype=torch.long), "rejection")


# --------------------------------------------------------------------------------------------------
# probs_from_logits / entropy / sample
# --------------------------------------------------------------------------------------------------


def test_temperature_scaling_is_softmax() -> None:
    logits = torch.randn(5, 3, 50, generator=_gen(0)) * 3
    for tau in (0.3, 1.0, 1.7):
        p = probs_from_logits(logits, SamplingParams(temperature=tau))
        assert p.dtype == torch.float32 and p.shape == logits.shape
        torch.testing.assert_close(p, torch.softmax(logits / tau, dim=-1))
        torch.testing.assert_close(p.sum(-1), torch.ones(5, 3))


def test_low_precision_inputs() -> None:
    logits = torch.randn(4, 32, generator=_gen(1))
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        p = probs_from_logits(logits.to(dtype), SamplingParams(temperature=0.7, top_k=10, top_p=0.9))
        assert p.dtype == torch.float32
        torch.testing.assert_close(p.sum(-1), torch.ones(4))


def test_greedy_is_one_hot() -> None:
    logits = torch.randn(6, 40, generator=_gen(2))
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=0, top_k=3, top_p=0.5)):
        p = probs_from_logits(logits, params)
        torch.testing.assert_close(p, torch.nn.functional.one_hot(logits.argmax(-1), 40).float())


@pytest.mark.parametrize("k", [1, 2, 5, 40, 100])
def test_top_k_keeps_exactly_k(k: int) -> None:
    logits = torch.randn(8, 40, generator=_gen(3))  # continuous -> no ties
    p = probs_from_logits(logits, SamplingParams(temperature=0.8, top_k=k))
    kept = p > 0
    assert (kept.sum(-1) == min(k, 40)).all()
    top = logits.topk(min(k, 40), dim=-1).indices
    assert kept.gather(-1, top).all()
    ref = torch.softmax((logits / 0.8).masked_fill(~kept, float("-inf")), dim=-1)
    torch.testing.assert_close(p, ref)


@pytest.mark.parametrize("top_p", [1e-6, 0.3, 0.6, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_top_p_keeps_minimal_nucleus(top_p: float, tau: float) -> None:
    logits = torch.randn(16, 30, generator=_gen(4)) * 2
    p = probs_from_logits(logits, SamplingParams(temperature=tau, top_p=top_p))
    base = torch.softmax(logits.double() / tau, dim=-1)
    for row in range(16):
        sorted_p, order = base[row].sort(descending=True)
        cum = sorted_p.cumsum(0)
        n_keep = int((cum < top_p - 1e-9).sum()) + 1 if top_p < 1 else 30
        n_keep = min(n_keep, 30)
        kept = set(order[:n_keep].tolist())
        got = set(torch.nonzero(p[row] > 0).flatten().tolist())
        assert got == kept, (row, n_keep, len(got))
        # minimal: the kept mass reaches top_p, dropping the smallest kept token would not
        assert float(sorted_p[:n_keep].sum()) >= top_p - 1e-6
        assert n_keep == 1 or float(sorted_p[: n_keep - 1].sum()) < top_p
        ref = base[row] * (p[row] > 0)
        torch.testing.assert_close(p[row].double(), ref / ref.sum(), rtol=1e-5, atol=1e-7)


def test_top_k_then_top_p_on_renormalised() -> None:
    # z/τ = log of [0.4, 0.3, 0.2, 0.1]; top-k=2 -> [4/7, 3/7]; top-p 0.5 keeps only the first (4/7 >= 0.5)
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    p = probs_from_logits(logits, SamplingParams(top_k=2, top_p=0.5))
    torch.testing.assert_close(p, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    p = probs_from_logits(logits, SamplingParams(top_k=3, top_p=0.5))  # [4/9, 3/9, 2/9] -> keep 2
    torch.testing.assert_close(p, torch.tensor([[4 / 7, 3 / 7, 0.0, 0.0]]))
    # 0.4 + 0.3 = 0.7 sits exactly on the boundary: float32 rounding decides whether 2 or 3 are kept
    p = probs_from_logits(logits, SamplingParams(top_p=0.7))
    assert int((p > 0).sum()) in (2, 3)
    assert float(p[0, 0]) > float(p[0, 1]) > 0


def test_entropy() -> None:
    v = 17
    assert torch.allclose(entropy(torch.full((v,), 1 / v)), torch.tensor(math.log(v)))
    assert float(entropy(torch.nn.functional.one_hot(torch.tensor(3), v).float())) == 0.0
    p = torch.softmax(torch.randn(4, v, generator=_gen(5)), -1)
    p[0, :5] = 0
    p = p / p.sum(-1, keepdim=True)
    ref = stats.entropy(p.double().numpy(), axis=-1)
    np.testing.assert_allclose(entropy(p).numpy(), ref, rtol=1e-5)
    assert entropy(p.bfloat16()).dtype == torch.float32


def test_total_variation() -> None:
    p = torch.softmax(torch.randn(10, 9, generator=_gen(6)), -1)
    q = torch.softmax(torch.randn(10, 9, generator=_gen(7)), -1)
    torch.testing.assert_close(total_variation(p, q), 0.5 * (p - q).abs().sum(-1))


def test_sample_is_exact() -> None:
    p = torch.tensor([0.0, 0.05, 0.4, 0.0, 0.25, 0.3, 1e-3, 0.0])
    draws = sample(p.expand(N_DRAWS, -1), _gen(8))
    assert draws.shape == (N_DRAWS,) and draws.dtype == torch.long
    assert_law(np.bincount(draws.numpy(), minlength=8), p.numpy())
    # unnormalised rows are fine (exponential race is scale-free)
    draws = sample(3.0 * p.expand(N_DRAWS, -1), _gen(9))
    assert_law(np.bincount(draws.numpy(), minlength=8), p.numpy())


def test_sample_reproducible_and_batched_shape() -> None:
    p = torch.softmax(torch.randn(3, 4, 11, generator=_gen(10)), -1)
    a, b = sample(p, _gen(11)), sample(p, _gen(11))
    assert a.shape == (3, 4) and torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# Single-step verification: marginal law of the first emitted token
# --------------------------------------------------------------------------------------------------

V = 8
GAMMA = 3
BANNED = V - 1  # the target never emits this token (logit -inf), so p always has a zero


def _target_logits() -> torch.Tensor:
    z = torch.randn(GAMMA + 1, V, generator=_gen(100)) * 1.5
    z[:, BANNED] = float("-inf")
    return z


def _draft_logits(kind: str, target: torch.Tensor) -> torch.Tensor:
    finite = target[:GAMMA].clone()
    finite[:, BANNED] = 0.0
    if kind == "far":  # anti-correlated with p and with mass on the p-zero token
        z = -2.0 * finite + torch.randn(GAMMA, V, generator=_gen(101))
        z[:, BANNED] = 3.0
        return z
    if kind == "zeros":  # q = 0 on the two most likely target tokens, where p > 0
        z = finite.clone()
        top2 = target[:GAMMA].topk(2, dim=-1).indices
        return z.scatter(-1, top2, float("-inf"))
    if kind == "onehot_pzero":  # q = one-hot at a token the target never emits
        z = torch.full((GAMMA, V), float("-inf"))
        z[:, BANNED] = 0.0
        return z
    raise AssertionError(kind)


PARAM_VARIANTS = {
    "plain": {},
    "top_k": {"top_k": 4},
    "top_p": {"top_p": 0.7},
    "top_k_p": {"top_k": 5, "top_p": 0.8},
}


@pytest.mark.parametrize("draft_kind", ["far", "zeros", "onehot_pzero"])
@pytest.mark.parametrize("variant", list(PARAM_VARIANTS))
@pytest.mark.parametrize("tau", [0.5, 1.0, 1.5])
@pytest.mark.parametrize("rule", ["rejection", "target_only"])
def test_first_token_marginal(rule: str, tau: float, variant: str, draft_kind: str) -> None:
    params = SamplingParams(temperature=tau, **PARAM_VARIANTS[variant])
    target = _target_logits()
    p = probs_from_logits(target, params)  # [γ+1, V], position-dependent
    q = probs_from_logits(_draft_logits(draft_kind, target), params)  # [γ, V]
    gen = _gen(zlib.crc32(f"{rule}-{tau}-{variant}-{draft_kind}".encode()))
    p_b, q_b = p.expand(N_DRAWS, -1, -1), q.expand(N_DRAWS, -1, -1)
    drafts = draft_tokens(q_b, rule, gen)
    res = verify(p_b, q_b, drafts, rule, gen)
    first = res.tokens[:, 0]
    assert (first >= 0).all()
    assert_law(np.bincount(first.numpy(), minlength=V), p[0].numpy())
    # structural checks on the whole result
    assert ((res.accepted >= 0) & (res.accepted <= GAMMA)).all()
    assert torch.equal(res.num_emitted, res.accepted + 1)
    last = res.last_token
    assert (last >= 0).all() and (last != BANNED).all()
    pos = torch.arange(GAMMA + 1)
    assert ((res.tokens == PAD_ID) == (pos > res.accepted[:, None])).all()


# --------------------------------------------------------------------------------------------------
# Acceptance rates vs the rule's α (DESIGN §3)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.5, 1.0, 1.5])
@pytest.mark.parametrize("rule", ["rejection", "target_only"])
def test_acceptance_rate_matches_alpha(rule: str, tau: float) -> None:
    params = SamplingParams(temperature=tau)
    target = _target_logits()
    p = probs_from_logits(target, params)
    q = probs_from_logits(_draft_logits("far", target) * 0.3 + target[:GAMMA].clamp_min(-5), params)
    if rule == "rejection":
        alpha = torch.minimum(p[:GAMMA], q).sum(-1)
        torch.testing.assert_close(alpha, 1 - total_variation(p[:GAMMA], q))
    else:
        alpha = p[:GAMMA].gather(-1, q.argmax(-1, keepdim=True)).squeeze(-1)
    gen = _gen(200 + int(10 * tau))
    p_b, q_b = p.expand(N_DRAWS, -1, -1), q.expand(N_DRAWS, -1, -1)
    res = verify(p_b, q_b, draft_tokens(q_b, rule, gen), rule, gen)
    torch.testing.assert_close(res.expected_alpha, alpha.expand(N_DRAWS, -1))
    # step 1
    assert_binomial_close(float((res.accepted >= 1).sum()), N_DRAWS, float(alpha[0]))
    # step 2 given step 1 (p_2, q_2 do not depend on the prefix here)
    n1 = int((res.accepted >= 1).sum())
    assert_binomial_close(float((res.accepted >= 2).sum()), n1, float(alpha[1]))
    # E[A] = Σ_j Π_{i<=j} α_i (DESIGN §3), 5 empirical standard errors
    mean_a = float(alpha.cumprod(0).sum())
    se = float(res.accepted.double().std()) / math.sqrt(N_DRAWS)
    assert abs(float(res.accepted.double().mean()) - mean_a) <= 5 * se + 1e-9


def test_accept_prob_values() -> None:
    p = torch.tensor([[[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]])
    q = torch.tensor([[[0.25, 0.25, 0.5]]])
    for d, rs, to in ((0, 1.0, 0.5), (2, 0.0, 0.0)):
        drafts = torch.tensor([[d]])
        res = verify(p, q, drafts, "rejection", _gen(0))
        assert float(res.accept_prob) == rs
        assert float(res.expected_alpha) == pytest.approx(0.5)
        res = verify(p, q, drafts, "target_only", _gen(0))
        assert float(res.accept_prob) == to
        assert float(res.expected_alpha) == 0.0  # p(argmax q) = p(2) = 0
        res = verify(p, q, drafts, "greedy")
        assert float(res.accept_prob) == float(d == 0)  # argmax p ties -> 0
    # q(d) = 0 is guarded: RS accepts iff p(d) > 0, never NaN
    q0 = torch.tensor([[[0.0, 0.0, 1.0]]])
    res = verify(p, q0, torch.tensor([[1]]), "rejection", _gen(0))
    assert float(res.accept_prob) == 1.0 and int(res.accepted) == 1


def test_zero_mass_residual_falls_back_to_p() -> None:
    """p == q and a draft at a zero-probability token: rejected, residual max(0, p − q) = 0 -> sample p."""
    p1 = torch.tensor([0.1, 0.0, 0.6, 0.3, 0.0])
    p = torch.stack([p1, p1]).expand(N_DRAWS, -1, -1)
    q = p1.expand(N_DRAWS, 1, -1)
    drafts = torch.full((N_DRAWS, 1), 4)
    res = verify(p, q, drafts, "rejection", _gen(300))
    assert (res.accepted == 0).all()
    assert_law(np.bincount(res.tokens[:, 0].numpy(), minlength=5), p1.numpy())
    assert (res.tokens[:, 1] == PAD_ID).all()


@pytest.mark.parametrize("rule", ["rejection", "target_only"])
def test_bonus_token_law(rule: str) -> None:
    """Drafts that are always accepted (q = p for RS; p(d) = 1 for TO): the bonus token ~ p_{γ+1}."""
    p_last = torch.tensor([0.05, 0.0, 0.5, 0.15, 0.3, 0.0])
    if rule == "rejection":
        p_draft = torch.softmax(torch.randn(2, 6, generator=_gen(310)), -1)
        q = p_draft
    else:
        p_draft = torch.nn.functional.one_hot(torch.tensor([3, 1]), 6).float()
        q = torch.softmax(torch.randn(2, 6, generator=_gen(311)), -1)
    p = torch.cat([p_draft, p_last[None]]).expand(N_DRAWS, -1, -1)
    q = q.expand(N_DRAWS, -1, -1)
    gen = _gen(312)
    drafts = sample(p_draft.expand(N_DRAWS, -1, -1), gen)
    res = verify(p, q, drafts, rule, gen)
    assert (res.accepted == 2).all() and torch.equal(res.tokens[:, :2], drafts)
    assert_law(np.bincount(res.tokens[:, 2].numpy(), minlength=6), p_last.numpy())


def test_target_only_certain_draft_never_rejects() -> None:
    p = torch.tensor([[[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]]]).expand(1000, -1, -1)
    q = torch.tensor([[[0.1, 0.8, 0.1]]]).expand(1000, -1, -1)
    res = verify(p, q, torch.ones(1000, 1, dtype=torch.long), "target_only", _gen(1))
    assert (res.accepted == 1).all() and (res.tokens[:, 0] == 1).all()


def test_verify_float_dtypes() -> None:
    p = torch.softmax(torch.randn(64, 3, 10, generator=_gen(2)), -1)
    q = torch.softmax(torch.randn(64, 2, 10, generator=_gen(3)), -1)
    d = draft_tokens(q, "rejection", _gen(4))
    ref = verify(p, q, d, "rejection", _gen(5))
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        res = verify(p.to(dtype), q.to(dtype), d, "rejection", _gen(5))
        assert res.accept_prob.dtype == torch.float32 and res.expected_alpha.dtype == torch.float32
        assert res.tokens.dtype == torch.long and res.tokens.shape == (64, 3)
        if dtype == torch.float64:
            assert torch.equal(res.tokens, ref.tokens)


# --------------------------------------------------------------------------------------------------
# Multi-step exactness: the joint law of the first L emitted tokens under a Markov target
# --------------------------------------------------------------------------------------------------

MV = 5  # Markov vocabulary
M_BANNED = MV - 1


def _markov_matrices(draft_kind: str, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Target transition P[prev] and a deliberately bad draft Q[prev], both after the same transforms."""
    zp = torch.randn(MV, MV, generator=_gen(400)) * 1.5
    zp[:, M_BANNED] = float("-inf")
    P = probs_from_logits(zp, params)
    zf = zp.clone()
    zf[:, M_BANNED] = 0.0
    if draft_kind == "far":
        zq = -2.0 * zf + torch.randn(MV, MV, generator=_gen(401))
        zq[:, M_BANNED] = 2.0
    elif draft_kind == "zeros":
        zq = zf.scatter(-1, zp.topk(2, dim=-1).indices, float("-inf"))
    elif draft_kind == "close":  # a good draft: most steps accept all γ drafts, so bonus tokens are common
        zq = zp + 0.3 * torch.randn(MV, MV, generator=_gen(402))
    elif draft_kind == "onehot_pzero":
        zq = torch.full((MV, MV), float("-inf"))
        zq[:, M_BANNED] = 0.0
    else:
        raise AssertionError(draft_kind)
    return P, probs_from_logits(zq, params)


def run_markov(
    P: torch.Tensor,
    Q: torch.Tensor,
    rule: str,
    gamma: int,
    length: int,
    batch: int,
    gen: torch.Generator,
    x0: int = 0,
    draft_rule: str | None = None,
) -> torch.Tensor:
    """Full speculative decoding of a Markov target from ``x0`` until every row has ``length`` tokens.

    Each verify step drafts d_k ~ Q[d_{k-1}] (d_0 = last emitted token), sets p_k = P[prefix token before
    position k] along the draft path (so p is conditioned on the prefix exactly as a real target pass
    is), verifies, appends the emitted tokens and continues from the last one. Returns ``[batch, length]``.
    """
    draft_rule = draft_rule or rule
    last = torch.full((batch,), x0, dtype=torch.long)
    out = torch.full((batch, length + 1), PAD_ID, dtype=torch.long)  # last column is a dump slot
    n = torch.zeros(batch, dtype=torch.long)
    offs = torch.arange(gamma + 1)
    for _ in range(length):  # every step emits >= 1 token
        prev, drafts, qs = last, [], []
        for _k in range(gamma):
            qk = Q[prev]
            prev = draft_tokens(qk, draft_rule, gen)
            qs.append(qk)
            drafts.append(prev)
        d = torch.stack(drafts, 1)
        path = torch.cat([last[:, None], d], 1)
        res = verify(P[path], torch.stack(qs, 1), d, rule, gen)
        pos = n[:, None] + offs
        valid = (offs < res.num_emitted[:, None]) & (pos < length)
        out.scatter_(1, torch.where(valid, pos, length), res.tokens)
        n += res.num_emitted
        last = res.last_token
    assert (n >= length).all()
    return out[:, :length]


def _path_law(P: torch.Tensor, x0: int, length: int) -> np.ndarray:
    """Exact probabilities of all ``V^length`` token paths, flattened in C order (first token major)."""
    Pn = P.double().numpy()
    law = Pn[x0]
    for _ in range(length - 1):
        law = np.einsum("...i,ij->...ij", law, Pn)
    return law.reshape(-1)


MARKOV_CASES = [
    ("rejection", "far", SamplingParams(temperature=1.5)),
    ("rejection", "zeros", SamplingParams(temperature=1.0, top_k=3)),
    ("rejection", "onehot_pzero", SamplingParams(temperature=0.5, top_p=0.9)),
    ("target_only", "far", SamplingParams(temperature=1.0)),
    ("target_only", "zeros", SamplingParams(temperature=1.5, top_p=0.8)),
    ("target_only", "onehot_pzero", SamplingParams(temperature=0.5, top_k=3)),
    ("rejection", "close", SamplingParams(temperature=1.0, top_p=0.95)),
    ("target_only", "close", SamplingParams(temperature=0.5)),
]


@pytest.mark.parametrize(("rule", "draft_kind", "params"), MARKOV_CASES)
def test_markov_joint_law(rule: str, draft_kind: str, params: SamplingParams) -> None:
    """The first L = γ+2 emitted tokens follow the exact path law Π P[x_{i-1}, x_i].

    γ = 2 and L = 4 means paths mix accepted drafts, corrections, bonus tokens and step boundaries.
    """
    gamma, length = 2, 4
    P, Q = _markov_matrices(draft_kind, params)
    seed = 500 + MARKOV_CASES.index((rule, draft_kind, params))
    out = run_markov(P, Q, rule, gamma, length, N_DRAWS, _gen(seed))
    assert (out >= 0).all()
    codes = np.ravel_multi_index(tuple(out.T.numpy()), (MV,) * length)
    assert_law(np.bincount(codes, minlength=MV**length), _path_law(P, 0, length))


def _greedy_path(P: torch.Tensor, x0: int, length: int) -> list[int]:
    path, x = [], x0
    for _ in range(length):
        x = int(P[x].argmax())
        path.append(x)
    return path


@pytest.mark.parametrize("gamma", [1, 3])
def test_greedy_rule_emits_argmax_path(gamma: int) -> None:
    """greedy rule: output is argmax p token for token, whatever the drafts (random drafts here)."""
    zp = torch.randn(MV, MV, generator=_gen(600)) * 2
    P = probs_from_logits(zp, SamplingParams(temperature=1.0))
    Q = torch.softmax(torch.randn(MV, MV, generator=_gen(601)), -1)
    expected = torch.tensor(_greedy_path(P, 0, 6))
    # drafts sampled from Q (draft_rule=rejection) so many of them are wrong; verify with the greedy rule
    out = run_markov(P, Q, "greedy", gamma, 6, 2000, _gen(602), draft_rule="rejection")
    assert (out == expected).all()
    # τ = 0: p, q are one-hot; greedy, RS and TO all reduce to the argmax path
    P0 = probs_from_logits(zp, SamplingParams(temperature=0))
    Q0 = probs_from_logits(torch.randn(MV, MV, generator=_gen(603)), SamplingParams(temperature=0))
    for rule in ("greedy", "rejection", "target_only"):
        out = run_markov(P0, Q0, rule, gamma, 6, 500, _gen(604))
        assert (out == expected).all()


def test_greedy_single_step_tokens() -> None:
    p = torch.softmax(torch.randn(300, 4, 7, generator=_gen(700)) * 2, -1)
    q = torch.softmax(torch.randn(300, 3, 7, generator=_gen(701)), -1)
    drafts = p[:, :3].argmax(-1)
    wrong = torch.rand(300, 3, generator=_gen(702)) < 0.3
    drafts = torch.where(wrong, (drafts + 1) % 7, drafts)
    res = verify(p, q, drafts, "greedy")
    top = p.argmax(-1)
    pos = torch.arange(4)
    emitted = pos <= res.accepted[:, None]
    assert (res.tokens[emitted] == top[emitted]).all()
    first_wrong = torch.where(wrong.any(-1), wrong.long().argmax(-1), 3)
    assert torch.equal(res.accepted, first_wrong)
    torch.testing.assert_close(res.expected_alpha, (q.argmax(-1) == top[:, :3]).float())


# --------------------------------------------------------------------------------------------------
# Property test
# --------------------------------------------------------------------------------------------------


@st.composite
def _verify_case(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int, float, int]:
    b = draw(st.integers(1, 4))
    gamma = draw(st.integers(1, 4))
    v = draw(st.integers(2, 9))
    elems = st.floats(-12, 12, allow_nan=False, width=32)
    zp = draw(hnp.arrays(np.float32, (b, gamma + 1, v), elements=elems))
    zq = draw(hnp.arrays(np.float32, (b, gamma, v), elements=elems))
    tau = draw(st.sampled_from([0.5, 1.0, 2.0]))
    return zp, zq, gamma, tau, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=60, deadline=None)
@given(_verify_case(), st.sampled_from(["rejection", "target_only", "greedy"]))
def test_verify_properties(case: tuple, rule: str) -> None:
    zp, zq, gamma, tau, seed = case
    params = SamplingParams(temperature=tau, top_k=3)
    p = probs_from_logits(torch.from_numpy(zp), params)
    q = probs_from_logits(torch.from_numpy(zq), params)
    gen = _gen(seed)
    drafts = draft_tokens(q, rule, gen)
    res = verify(p, q, drafts, rule, gen)
    b = p.shape[0]
    assert res.accepted.shape == (b,) and res.tokens.shape == (b, gamma + 1)
    assert res.accept_prob.shape == res.expected_alpha.shape == (b, gamma)
    assert ((res.accept_prob >= 0) & (res.accept_prob <= 1)).all()
    assert ((res.expected_alpha >= 0) & (res.expected_alpha <= 1 + 1e-6)).all()
    assert ((res.accepted >= 0) & (res.accepted <= gamma)).all()
    assert torch.equal(res.num_emitted, res.accepted + 1)
    if rule == "rejection":
        tv = 0.5 * (p[:, :gamma] - q).abs().sum(-1)
        torch.testing.assert_close(res.expected_alpha, 1 - tv, atol=1e-5, rtol=0)
    pos = torch.arange(gamma + 1)
    emitted = pos <= res.accepted[:, None]
    assert ((res.tokens == PAD_ID) == ~emitted).all()
    # every emitted token has positive target probability at its position
    p_tok = p.gather(-1, res.tokens.clamp_min(0)[..., None]).squeeze(-1)
    assert (p_tok[emitted] > 0).all()
    # accepted drafts are the drafts
    acc = pos[:gamma] < res.accepted[:, None]
    assert torch.equal(res.tokens[:, :gamma][acc], drafts[acc])


@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(0.7), SamplingParams(0.0),
                                    SamplingParams(0.9, top_k=5), SamplingParams(1.2, top_p=0.8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probs_fast_is_bit_identical_to_probs_from_logits(params: SamplingParams, dtype) -> None:
    logits = (torch.randn(4, 3, 50, generator=_gen(5)) * 3).to(dtype)
    assert torch.equal(probs_fast(logits, params), probs_from_logits(logits, params))


@pytest.mark.parametrize("gamma", [1, 3])
def test_verify_rs_equals_verify_rejection(gamma: int) -> None:
    """The RS fast path draws the same uniforms as ``verify`` (same accepted counts, α and acceptance chances
    from one seed) and its final token is the race over the same residual/bonus distribution."""
    B, V = 64, 12
    g = _gen(2)
    p = torch.softmax(torch.randn(B, gamma + 1, V, generator=g) * 2, -1)
    q = torch.softmax(torch.randn(B, gamma, V, generator=g) * 2, -1)
    drafts = torch.multinomial(q.reshape(-1, V), 1, generator=g).view(B, gamma)
    ref = verify(p, q, drafts, "rejection", _gen(9))
    gen = _gen(9)
    noise = exp_noise((B, V), "cpu")
    vin = torch.cat([torch.zeros(B, 1, dtype=torch.long), drafts], 1)
    q_pad = torch.cat([q, torch.zeros(B, 1, V)], 1)
    a, kept, toks, alpha, ratio = verify_rs(p, q_pad, vin, torch.arange(gamma + 1), torch.arange(B), PAD_ID, noise,
                                            gen)
    assert torch.equal(a, ref.accepted)
    torch.testing.assert_close(alpha, ref.expected_alpha)
    torch.testing.assert_close(ratio.clamp(max=1.0), ref.accept_prob)
    rows = torch.arange(B)
    residual = torch.where((a == gamma)[:, None], p[rows, a], (p[rows, a] - q_pad[rows, a]).clamp_min(0))
    final = race(residual / residual.sum(-1, keepdim=True), noise)
    assert torch.equal(toks[rows, a], final)
    before = torch.arange(gamma + 1)[None, :] < a[:, None]
    assert torch.equal(toks[before], ref.tokens[before])
    assert torch.equal(kept, torch.arange(gamma + 1)[None, :] <= a[:, None])


def test_rs_step_with_drawn_ahead_uniforms_equals_verify_rs() -> None:
    """Uniforms passed in (as the decode loop's ``NoiseBank`` does) give the verdict ``verify_rs`` draws itself
    from the same stream, and the sixth output is the emitted token at index A (the next step's input)."""
    B, gamma, V = 32, 3, 10
    g = _gen(4)
    p = torch.softmax(torch.randn(B, gamma + 1, V, generator=g) * 2, -1)
    q = torch.softmax(torch.randn(B, gamma, V, generator=g) * 2, -1)
    drafts = torch.multinomial(q.reshape(-1, V), 1, generator=g).view(B, gamma)
    vin = torch.cat([torch.zeros(B, 1, dtype=torch.long), drafts], 1)
    q_pad = torch.cat([q, torch.zeros(B, 1, V)], 1)
    noise, j = exp_noise((B, V), "cpu", _gen(5)), torch.arange(gamma + 1)
    ref = verify_rs(p, q_pad, vin, j, torch.arange(B), PAD_ID, noise, _gen(6))
    u = torch.rand((B, gamma), generator=_gen(6))
    out = rs_step(p, q_pad, vin, j, PAD_ID, noise, None, u)
    for a, b in zip(ref, out[:5], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(out[5], out[2].gather(1, out[0][:, None]).squeeze(1))
    assert (out[0] < gamma).any() and (out[0] > 0).any()      # both rejections and acceptances were exercised


def test_noise_bank_chunks_grow_and_every_step_gets_fresh_draws() -> None:
    """Chunks double from ``first`` to ``max_steps`` (capped by ``max_bytes``); no two steps share a draw; the
    draws are Exp(1) and U[0, 1) (Kolmogorov–Smirnov over 40 steps × 600 values)."""
    bank = NoiseBank((3, 200), (200,), "cpu", _gen(7), first=4, max_steps=16)
    exps, us, chunks = [], [], []
    for _ in range(40):
        e, u = bank.next()
        assert e.shape == (3, 200) and u.shape == (200,)
        exps.append(e.clone())
        us.append(u.clone())
        chunks.append(bank.chunk)
    assert chunks[:4] == [4] * 4 and chunks[4:12] == [8] * 8 and set(chunks[12:]) == {16}
    flat_e, flat_u = torch.stack(exps).flatten(), torch.stack(us).flatten()
    assert len({tuple(e[0, :8].tolist()) for e in exps}) == len({tuple(u[:8].tolist()) for u in us}) == 40
    assert stats.kstest(flat_e.double().numpy(), "expon").pvalue > P_VALUE_FLOOR
    assert stats.kstest(flat_u.double().numpy(), "uniform").pvalue > P_VALUE_FLOOR
    capped = NoiseBank((2, 3), None, "cpu", max_bytes=4 * 2 * 3 * 3)       # three steps' worth at most
    assert max((capped.next(), capped.chunk)[1] for _ in range(10)) == 3
    assert capped.next()[1] is None
