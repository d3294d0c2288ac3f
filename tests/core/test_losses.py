"""MTP objectives (DESIGN §4): closed-form TV gradient equals autograd, minima at q = p, e2e_tv weighting."""

from __future__ import annotations

import pytest
import torch

from bebop.core.losses import LOSSES, TotalVariation, e2e_tv_from_tvs, mtp_loss, step_losses
from bebop.errors import BebopError


def _p(n, v, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 2, -1)


def test_tv_closed_form_gradient_equals_autograd_gradcheck():
    z = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    p = _p(5, 7)
    assert torch.autograd.gradcheck(lambda z: TotalVariation.apply(z, p), (z,))


def test_tv_closed_form_matches_autograd_of_the_formula():
    z = torch.randn(6, 11, dtype=torch.float64, requires_grad=True)
    p = _p(6, 11, 1)
    w = torch.rand(6, dtype=torch.float64)
    (TotalVariation.apply(z, p) * w).sum().backward()
    g_closed = z.grad.clone()
    z.grad = None
    ((1 - torch.minimum(p, torch.softmax(z, -1)).sum(-1)) * w).sum().backward()
    torch.testing.assert_close(g_closed, z.grad)


def test_e2e_tv_gradcheck_through_the_product():
    gamma, v = 3, 6
    z = torch.randn(4, gamma, v, dtype=torch.float64, requires_grad=True)
    p = torch.softmax(torch.randn(4, gamma, v, dtype=torch.float64), -1)
    y = torch.zeros(4, gamma, dtype=torch.long)
    mask = torch.ones(4)
    assert torch.autograd.gradcheck(lambda z: mtp_loss("e2e_tv", z, p, y, mask), (z,))


@pytest.mark.parametrize("name", ["fkl", "rkl", "tv", "e2e_tv"])
def test_loss_is_at_its_minimum_iff_q_equals_p(name):
    p = _p(8, 9).float().view(4, 2, 9)
    y = torch.zeros(4, 2, dtype=torch.long)
    mask = torch.ones(4)
    at_p = mtp_loss(name, p.log(), p, y, mask)
    assert at_p.abs() < 1e-5
    other = mtp_loss(name, p.log() + torch.randn(4, 2, 9), p, y, mask)
    assert other > 1e-3


def test_ce_is_minimised_by_the_data_distribution():
    y = torch.tensor([[1], [1], [1], [2]])
    mask = torch.ones(4)
    best = torch.tensor([0.0, 0.75, 0.25]).log().expand(4, 1, 3)
    worse = torch.tensor([0.1, 0.6, 0.3]).log().expand(4, 1, 3)
    assert mtp_loss("ce", best, None, y, mask) < mtp_loss("ce", worse, None, y, mask)


def test_e2e_tv_weights_early_steps_more_than_late_steps():
    base = torch.full((3,), 0.1)
    early, late = base.clone(), base.clone()
    early[0] += 0.2
    late[2] += 0.2
    assert e2e_tv_from_tvs(early) > e2e_tv_from_tvs(late)
    # L = 1 - normalised expected accept length
    tvs = torch.tensor([0.1, 0.2, 0.3])
    expected = 1 - (0.9 + 0.9 * 0.8 + 0.9 * 0.8 * 0.7) / 3
    assert e2e_tv_from_tvs(tvs).item() == pytest.approx(expected)


def test_masked_positions_do_not_contribute():
    p = _p(4, 5).float().view(4, 1, 5)
    z = torch.randn(4, 1, 5)
    y = torch.zeros(4, 1, dtype=torch.long)
    full = mtp_loss("tv", z[:2], p[:2], y[:2], torch.ones(2))
    masked = mtp_loss("tv", z, p, y, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(full, masked)


def test_unknown_loss_names_the_value():
    with pytest.raises(BebopError, match="'l2'"):
        step_losses("l2", torch.zeros(1, 1, 2), torch.ones(1, 1, 2) / 2, torch.zeros(1, 1, dtype=torch.long))
    assert set(LOSSES) == {"ce", "fkl", "rkl", "tv", "e2e_tv"}


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_e2e_tv_equals_full_logits_version(chunk):
    torch.manual_seed(0)
    n, gamma, h, v, tau = 7, 3, 8, 50, 0.8
    weight = torch.randn(v, h, dtype=torch.float64)
    hp = torch.randn(n, gamma, h, dtype=torch.float64)
    hq = (hp + 0.5 * torch.randn(n, gamma, h, dtype=torch.float64)).requires_grad_()
    mask = torch.tensor([1.0, 1, 0, 1, 1, 1, 0])
    from bebop.core.losses import e2e_tv_loss_chunked

    chunked = e2e_tv_loss_chunked(hq, hp, weight, tau, mask, chunk=chunk)
    chunked.backward()
    g_chunked = hq.grad.clone()
    hq.grad = None
    p = torch.softmax(hp @ weight.T / tau, -1)
    full = mtp_loss("e2e_tv", hq @ weight.T / tau, p, torch.zeros(n, gamma, dtype=torch.long), mask)
    full.backward()
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(g_chunked, hq.grad)


def test_chunked_tv_gradcheck():
    from bebop.core.losses import ChunkedTotalVariation

    weight = torch.randn(13, 4, dtype=torch.float64)
    hp = torch.randn(5, 4, dtype=torch.float64)
    hq = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ChunkedTotalVariation.apply(x, hp, weight, 1.3, 2), (hq,))


@pytest.mark.parametrize("name", LOSSES)
def test_loss_from_hidden_equals_loss_on_full_logits(name):
    from bebop.core.losses import mtp_loss_from_hidden

    torch.manual_seed(1)
    n, gamma, h, v, tau = 6, 2, 8, 30, 1.3
    weight = torch.randn(v, h, dtype=torch.float64)
    hp = torch.randn(n, gamma, h, dtype=torch.float64)
    hq = torch.randn(n, gamma, h, dtype=torch.float64)
    y = torch.randint(v, (n, gamma))
    mask = torch.tensor([1.0, 0, 1, 1, 1, 0])
    p = torch.softmax(hp @ weight.T / tau, -1)
    full = mtp_loss(name, hq @ weight.T / tau, p, y, mask)
    torch.testing.assert_close(mtp_loss_from_hidden(name, hq, hp, weight, tau, y, mask, chunk=4), full)
