"""The acceptance formulas of DESIGN §3 (``bebop.core.acceptance``): α_RS, α_TO, the one-hot draft, and the
accept length, whose one-sequence loop must equal its batched form bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bebop.core.acceptance import accept_length, alpha_rs, alpha_to, one_hot_argmax
from bebop.core.sampling import total_variation


def test_alphas_follow_design_3():
    p = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    q = torch.tensor([[0.2, 0.7, 0.1], [0.1, 0.8, 0.1]])
    torch.testing.assert_close(alpha_rs(p, q), torch.tensor([0.6, 0.4]))           # Σ min(p, q)
    torch.testing.assert_close(alpha_rs(p, q), 1 - total_variation(p, q))          # = 1 − TV(p, q)
    torch.testing.assert_close(alpha_to(p, q), torch.tensor([0.3, 0.2]))           # p(argmax q)
    torch.testing.assert_close(alpha_rs(p, one_hot_argmax(q)), alpha_to(p, q))     # TO = RS against one-hot q


def test_accept_length_counts_the_bonus_token():
    assert accept_length([0.5, 0.5, 0.5]) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert accept_length([0.5, 0.5, 1.0], prefixes=True).tolist() == pytest.approx([1.5, 1.75, 2.0])
    assert accept_length([]) == 1.0
    assert accept_length(np.zeros((2, 0))).tolist() == [1.0, 1.0]


def test_accept_length_one_sequence_equals_the_batched_form_bit_for_bit():
    alpha = np.random.default_rng(0).random((50, 6))
    batched, prefixes = accept_length(alpha), accept_length(alpha, prefixes=True)
    for row, total, pre in zip(alpha, batched, prefixes, strict=True):
        assert accept_length(row) == total
        assert np.array_equal(accept_length(list(row), prefixes=True), pre)
