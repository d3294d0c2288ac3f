"""Acceptance measured through the engine: the units are prompts (the engine's per-request counters), in prompt
order, whatever the engine batch, and every figure is recomputed from their sums."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_tiny_policy

from bebop.experiments.measure import UNIT_KEYS, Probe, measure_acceptance
from bebop.models.mtp import MTPHead


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer):
    model = build_tiny_policy(tiny_tokenizer)
    head = MTPHead.from_base(model).eval()
    torch.manual_seed(0)
    with torch.no_grad():                        # a rougher head: drafts rejected at varied steps, prompts differ
        for p in head.parameters():
            if p.dim() >= 2:
                p.add_(p.std() * torch.randn_like(p))
    return model, tiny_tokenizer, head


def _figures(units: dict) -> tuple:
    """Accept length, α_k and entropy from the units' sums (as the demo's claims recompute them)."""
    alpha = [a / r if r else 0.0 for a, r in zip(np.sum(units["accepted_k"], 0), np.sum(units["reached"], 0),
                                                  strict=True)]
    return 1 + sum(units["accepted"]) / sum(units["steps"]), alpha, sum(units["entropy_sum"]) / sum(units["tokens"])


@pytest.mark.parametrize("rule", ["rejection", "target_only"])
def test_units_are_prompts_and_rebuild_every_figure(tiny, rule):
    model, tok, head = tiny
    r = measure_acceptance(model, tok, head, Probe("arith", rule, 1.0, 2, prompts=5, batch_size=2, max_new_tokens=8))
    u = r["units"]
    assert set(u) == set(UNIT_KEYS) and all(len(v) == 5 for v in u.values())         # 3 engine calls, 5 prompts
    assert all(len(k) == 2 for k in u["reached"]) and sum(u["steps"]) > 0
    length, alpha, entropy = _figures(u)
    assert length == pytest.approx(r["accept_length"]) and alpha == pytest.approx(r["alpha"])
    assert entropy == pytest.approx(r["entropy"])


def test_units_do_not_depend_on_the_engine_batch_at_temperature_zero(tiny):
    """τ = 0 (deterministic): prompt i's unit is the same whether decoded alone, 2 or 5 per engine call."""
    model, tok, head = tiny
    runs = [measure_acceptance(model, tok, head, Probe("arith", "rejection", 0.0, 3, prompts=5, batch_size=b,
                                                       max_new_tokens=16))["units"] for b in (1, 2, 5)]
    assert len(set(runs[0]["steps"])) > 1                       # prompts differ, so an order mix-up would show
    for other in runs[1:]:
        for key in ("steps", "accepted", "reached", "accepted_k", "tokens"):
            assert other[key] == runs[0][key], key
        assert other["entropy_sum"] == pytest.approx(runs[0]["entropy_sum"], abs=1e-4)
