"""Decode metrics per request: ``acceptance_counts`` maps batch rows to requests, ``merge`` concatenates calls and adds
one call's parts, and every decoding path (static, continuous, multi-turn) keeps counters per request, in request
order, that sum to its totals and equal those of the request decoded alone (τ = 0)."""

from __future__ import annotations

import pytest
import torch
from test_continuous import GREEDY, an_eos, lively_policy, multi_turn_rows, varied_prompts

import bebop.engine.turns as turns_module
from bebop.core.sampling import SamplingParams
from bebop.engine.continuous import continuous_decode
from bebop.engine.decode import DecodeConfig, generate, mtp_decode
from bebop.engine.metrics import ROW_KEYS, DecodeMetrics, acceptance_counts
from bebop.engine.turns import Turns, turns_decode

COUNTS = ("tokens", "steps", "accepted", "drafted")
PER_K = ("reached", "accepted_k", "expected_k")


def _step(accepted, done, expected, gamma, rows=None):
    return (torch.tensor(accepted), torch.tensor(done), torch.tensor(expected), gamma, None,
            None if rows is None else torch.tensor(rows))


def test_acceptance_counts_per_request_follow_the_row_map():
    """Two steps of a 2-slot batch whose slot 1 holds request 2, then request 1: each step is counted for the
    request its slot held, done rows not at all; requests that never ran have zeros."""
    hist = [_step([2, 0], [False, False], [[0.9, 0.8], [0.1, 0.2]], 2, [0, 2]),
            _step([1, 1], [False, False], [[0.7], [0.5]], 1, [0, 1]),
            _step([2, 2], [True, False], [[0.3, 0.3], [0.4, 0.4]], 2, [0, 1])]
    m = acceptance_counts(2, hist, n_rows=4, tokens=torch.tensor([5, 6, 7, 0]))
    r = m.per_row
    assert r["steps"] == [2, 2, 1, 0] and r["accepted"] == [3, 3, 0, 0] and r["drafted"] == [3, 3, 2, 0]
    assert r["tokens"] == [5, 6, 7, 0] and m.tokens == 18
    assert r["reached"] == [[2.0, 1.0], [2.0, 1.0], [1.0, 0.0], [0.0, 0.0]]        # step 2's γ_t = 1
    assert r["accepted_k"] == [[2.0, 1.0], [2.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
    assert torch.tensor(r["expected_k"]).allclose(torch.tensor([[1.6, 0.8], [0.9, 0.4], [0.1, 0.0], [0.0, 0.0]]))
    assert (m.steps, m.accepted, m.drafted) == (5, 6, 8)
    assert m.reached == [5.0, 2.0] and m.accepted_k == [4.0, 2.0] and m.expected_k == pytest.approx([2.6, 1.2])


def test_acceptance_counts_without_steps_keep_tokens_per_row():
    m = acceptance_counts(0, [], tokens=torch.tensor([3, 1]))
    assert m.per_row == {"steps": [0, 0], "accepted": [0, 0], "drafted": [0, 0], "reached": [[], []],
                         "accepted_k": [[], []], "expected_k": [[], []], "tokens": [3, 1]}
    assert m.tokens == 4 and m.steps == 0


def test_merge_concatenates_calls_and_adds_parts_of_one_call():
    a = acceptance_counts(1, [_step([1, 0], [False, False], [[0.5], [0.2]], 1)], tokens=torch.tensor([2, 1]))
    b = acceptance_counts(1, [_step([0], [False], [[0.3]], 1)], tokens=torch.tensor([4]))
    calls = DecodeMetrics().merge(a).merge(b)
    assert calls.per_row["steps"] == [1, 1, 1] and calls.per_row["tokens"] == [2, 1, 4]
    assert calls.per_row["reached"] == [[1.0], [1.0], [1.0]] and calls.steps == 3 and calls.tokens == 7
    part = acceptance_counts(1, [_step([1], [False], [[0.4]], 1, [1])], n_rows=2)   # more steps of request 1
    one = DecodeMetrics().merge(a).merge(part, same_rows=True)
    assert one.per_row["accepted"] == [1, 1] and one.per_row["steps"] == [1, 2] and one.per_row["tokens"] == [2, 1]
    assert torch.tensor(one.per_row["expected_k"]).allclose(torch.tensor([[0.5], [0.6]]))
    assert a.to_dict().keys() == DecodeMetrics().to_dict().keys()            # per_row stays out of to_dict


def _check_sums(m: DecodeMetrics, n: int) -> None:
    """Every per-row counter has one value per request and sums to its total."""
    r = m.per_row
    assert set(r) == set(ROW_KEYS) and all(len(v) == n for v in r.values())
    for key in COUNTS:
        assert sum(r[key]) == getattr(m, key)
    for key in PER_K:
        assert [sum(c) for c in zip(*r[key], strict=True)] == pytest.approx(getattr(m, key))


@pytest.fixture(scope="module")
def lively(tiny_tokenizer):
    return lively_policy("qwen3", tiny_tokenizer)


@pytest.mark.parametrize("rule", ["rejection", "target_only"])
def test_per_row_counters_sum_to_the_totals_at_temperature_one(lively, tiny_tokenizer, rule):
    model, head = lively
    prompts = varied_prompts(tiny_tokenizer, 7)
    eos = an_eos(model, prompts)
    dc = DecodeConfig(SamplingParams(1.0), 24, eos, 3, rule, generator=torch.Generator().manual_seed(0))
    for r in (mtp_decode(model, head, prompts, dc), continuous_decode(model, head, prompts, dc, slots=3),
              generate(model, prompts, SamplingParams(1.0), 24, eos)):
        _check_sums(r.metrics, 7)
        assert r.metrics.per_row["tokens"] == r.lengths.tolist()


def _static(model, head, prompts, dc, turns):
    return mtp_decode(model, head, prompts, dc) if turns is None else turns_decode(model, head, prompts, dc, turns)


def _continuous(model, head, prompts, dc, turns):
    return continuous_decode(model, head, prompts, dc, slots=3, turns=turns)


@pytest.mark.parametrize("multi_turn", [False, True])
@pytest.mark.parametrize("path", [_static, _continuous])
def test_per_row_counters_equal_the_request_decoded_alone(lively, tiny_tokenizer, path, multi_turn, monkeypatch):
    """τ = 0: request b's counters in a batch (slots reused, rows compacted away after their last turn) are those of
    request b decoded alone by the same path, in request order."""
    model, head = lively
    n = 9
    prompts, replies = multi_turn_rows(tiny_tokenizer, n)
    ref0 = generate(model, prompts, GREEDY, 30, eos_id=None).tokens
    stop = int(ref0[1, 3])
    eos = an_eos(model, prompts) if not multi_turn else (int(ref0[0, 9]) if int(ref0[0, 9]) != stop else None)
    flushes: list = []
    real_flush = turns_module._Episodes.flush
    monkeypatch.setattr(turns_module._Episodes, "flush", lambda ep, *a: (flushes.append(1), real_flush(ep, *a)))

    def turns_for(rows):
        return Turns(lambda i, t: replies[rows[i]], stop, turn_tokens=12, max_turns=2) if multi_turn else None

    dc = DecodeConfig(GREEDY, 30, eos, 3, "rejection")
    batch = path(model, head, prompts, dc, turns_for(list(range(n))))
    _check_sums(batch.metrics, n)
    if multi_turn and path is _static:
        assert len(flushes) >= 2                                   # the batch was compacted between turns
    assert len(set(batch.metrics.per_row["steps"])) >= 3          # requests differ: the check can see a mix-up
    for b in range(n):
        alone = path(model, head, [prompts[b]], dc, turns_for([b])).metrics.per_row
        for key in ("tokens", "steps", "accepted", "drafted", "reached", "accepted_k"):
            assert batch.metrics.per_row[key][b] == alone[key][0], (key, b)
        assert batch.metrics.per_row["expected_k"][b] == pytest.approx(alone["expected_k"][0], abs=1e-5), b
