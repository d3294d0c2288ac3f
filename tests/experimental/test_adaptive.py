"""Adaptive drafting: the planner's pure pieces, its choices on a known table, and — the part RL depends on —
adaptive γ and per-draft RS/TO keep the engine exact (statistically, greedy token for token, exact log-probs)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from conftest import cli
from laws import P_FALSE_ALARM, chisq_pvalue, exact_logprobs, prompts_for, sequence_law

from bebop.core.acceptance import alpha_rs, alpha_to, one_hot_argmax
from bebop.core.sampling import SamplingParams, verify, verify_rs
from bebop.engine.decode import DecodeConfig, generate, generate_mtp
from bebop.errors import BebopError
from bebop.experimental.adaptive import (
    BINS,
    AdaptiveDraft,
    DraftPlanner,
    accept_lengths,
    as_policy,
    decode_trace,
    draft_confidence,
    monotone_fit,
    replay,
    step_tokens,
    stop_thresholds,
)


def test_accept_lengths_is_one_plus_expected_accepted_drafts():
    assert accept_lengths([0.5, 0.5, 1.0]) == pytest.approx([1.5, 1.75, 2.0])
    assert accept_lengths([0.0, 0.9]) == pytest.approx([1.0, 1.0])


def test_stop_thresholds_weigh_the_tokens_a_longer_draft_adds_against_its_cost():
    costs = [1.0, 1.5, 2.0]                                       # each draft adds 0.5 s to a step
    # rate 1 token/s: drafting on pays iff the tokens it adds exceed 0.5 per further draft
    theta = stop_thresholds([0.9, 0.9, 0.9], costs, 1.0)
    assert theta == pytest.approx([0.5 / 0.9, 0.5 / 0.9, float("inf")])
    assert 0.9 > theta[0]                                         # d_2 adds 0.81 > 0.5: draft on
    assert not 0.3 > theta[1]                                     # d_1, d_2 unlikely both accepted: stop
    theta = stop_thresholds([0.9, 0.4, 0.4], costs, 1.0)          # a weak 2nd step: 0.36 < 0.5 from m = 0.9
    assert theta[0] == pytest.approx(min(0.5 / 0.4, 1.0 / (0.4 + 0.16))) and not 0.9 > theta[0]
    theta = stop_thresholds([0.9, 0.5, 1.0], [1.0, 1.5, 1.8], 1.0)   # d_2 alone pays from m > 0.5 / 0.5, …
    assert theta[0] == pytest.approx(0.8 / (0.5 + 0.5))              # … d_2 and d_3 from m > 0.8 / 1.0
    assert stop_thresholds([0.9], [1.0], 1.0) == [float("inf")]


def test_step_tokens_cut_at_an_accepted_eos_draft():
    assert step_tokens([0.5, 0.5, 1.0], 3) == pytest.approx(accept_lengths([0.5, 0.5, 1.0])[-1])
    # EOS at draft 2: drafts after it are lost, and an accepted EOS ends the row without a bonus token
    assert step_tokens([0.5, 0.5, 1.0], 3, eos=2) == pytest.approx(1 + 0.5 + 0.25 - 0.25)
    assert step_tokens([0.5, 0.5, 1.0], 1, eos=2) == pytest.approx(1.5)         # stopped before the EOS draft
    assert step_tokens([1.0, 1.0], 2, eos=1) == pytest.approx(1.0)              # just the EOS


def test_the_planner_stops_after_an_eos_draft():
    ad = table_for({BINS - 1: (0.95, 1000.0)}, 4, [1.0, 1.1, 1.2, 1.3])     # sure drafts: drafting on pays …
    sure, eos = torch.tensor([0.98, 0.01, 0.01]), torch.tensor([0.01, 0.01, 0.98])   # EOS is token 2
    planner = DraftPlanner(ad, 4, 2, "rejection", False, "cpu", eos_id=2)
    planner.step(torch.zeros(2, dtype=torch.bool), torch.stack([sure, sure]))
    assert planner.extend(1, torch.stack([sure, sure]), torch.tensor([0, 0])) == 4
    assert planner.extend(2, torch.stack([eos, sure]), torch.tensor([2, 0])) == 4   # one row drafted EOS: the
    assert planner.mass[0] == 0.0 and planner.bins[-1] == [BINS - 1] * 2           # other still pays for more …
    assert planner.extend(3, torch.stack([eos, eos]), torch.tensor([2, 2])) == 3   # … until every row has ended
    counts = ad.table("rejection")[1]
    before = [counts[k][BINS - 1] for k in range(3)]
    planner.step(torch.zeros(2, dtype=torch.bool), torch.stack([sure, sure]), torch.tensor([3, 3]),
                 torch.ones(2, 3))
    assert [counts[k][BINS - 1] - before[k] for k in range(3)] == [2, 2, 1]   # row 0 learns nothing past its EOS


def test_a_row_that_drafted_eos_does_not_dilute_the_rows_still_running():
    ad = table_for({BINS - 1: (0.95, 1000.0), 1: (0.1, 1000.0)}, 3, [1.0, 1.3, 1.6])
    planner = DraftPlanner(ad, 3, 3, "rejection", False, "cpu", eos_id=2)
    planner.step(torch.tensor([True, False, False]), torch.full((3, 3), 1 / 3))
    # row 0 is done, row 1 drafts EOS, row 2 a sure draft: only row 2 counts, and it pays for more
    assert planner.decide(1, [0.95, -0.95, 0.95]) == 3 and planner.mass == [1.0, 0.0, pytest.approx(0.95)]
    assert planner.decide(2, [0.95, 0.95, 0.15]) == 2               # row 2 unsure now: stop (row 1 stays ended)
    planner.begin()
    assert planner.decide(1, [0.95, -0.95, -0.95]) == 1             # every live row drafted EOS: stop


def test_the_planner_neither_reads_nor_learns_its_last_draft():
    ad = table_for({BINS - 1: (0.95, 1000.0)}, 2, [1.0, 1.1])
    planner = DraftPlanner(ad, 2, 1, "rejection", False, "cpu")
    sure = torch.tensor([[0.97, 0.03]])
    planner.step(torch.zeros(1, dtype=torch.bool), sure)
    assert planner.extend(1, sure, torch.tensor([0])) == 2
    assert planner.extend(2, None, None) == 2 and planner.bins == [[BINS - 1]]      # q, d never touched
    counts = ad.table("rejection")[1]
    before = [sum(c) for c in counts]
    planner.step(torch.zeros(1, dtype=torch.bool), sure, torch.tensor([2]), torch.ones(1, 2))
    assert [sum(c) - b for c, b in zip(counts, before, strict=True)] == [1, 0]       # d_1 learned, d_2 not


def test_draft_confidence_reads_each_rows_own_draft_on_either_path():
    q = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25]])
    d = torch.tensor([2, 0])
    assert draft_confidence(q, d) == [(pytest.approx(0.3), 2), (pytest.approx(0.5), 0)]          # from memory
    got = draft_confidence(q.to(torch.bfloat16), d)                                             # gather path
    assert [t for _, t in got] == [2, 0] and [c for c, _ in got] == pytest.approx([0.3, 0.5], abs=1e-2)


def test_the_rate_of_the_best_fixed_gamma_comes_from_measured_tokens_when_given():
    ad = AdaptiveDraft([1.0, 2.0], prior=0.9)
    assert ad.best_fixed("rejection") == (1, pytest.approx(1.9))              # predicted: T(1) = 1.9, T(2) = 2.71
    ad = AdaptiveDraft([1.0, 2.0], prior=0.9, step_tokens=[1.5, 3.2])
    assert ad.best_fixed("rejection") == (2, pytest.approx(1.6))              # measured: 1.5 / 1 < 3.2 / 2


def test_at_batch_above_one_drafts_stop_at_the_fixed_gamma_with_the_best_batch_throughput():
    ad = AdaptiveDraft([1.0, 1.1, 1.2, 1.3], prior=0.95, step_tokens=[1.9, 2.8, 3.7, 4.6], throughput=[5, 9, 8, 7])
    assert ad.batch_cap(1) == 4 and ad.batch_cap(8) == 2
    assert AdaptiveDraft([1.0] * 4, throughput=[5, 8.9, 9, 7]).batch_cap(2) == 2    # within 2 %: the shorter one
    assert AdaptiveDraft([1.0] * 4, throughput=[5, 8.7, 9, 7]).batch_cap(2) == 3
    assert AdaptiveDraft([1.0, 1.1], prior=0.9).batch_cap(8) == 2                  # no throughput measured: γ_max
    sure = torch.tensor([[0.98, 0.02]] * 2)
    d = torch.zeros(2, dtype=torch.long)
    planner = DraftPlanner(ad, 4, 2, "rejection", False, "cpu")
    assert planner.step(torch.zeros(2, dtype=torch.bool), sure)[1] == 2          # first plan: the cap
    assert planner.extend(1, sure, d) == 2 and planner.extend(2, sure, d) == 2    # sure drafts, stopped at the cap
    assert len(planner.theta) == 2 and planner.theta[-1] == float("inf")
    planner = DraftPlanner(ad, 4, 1, "rejection", False, "cpu")
    planner.step(torch.zeros(1, dtype=torch.bool), sure[:1])
    assert [planner.extend(k, sure[:1], d[:1]) for k in (1, 2, 3)] == [4, 4, 4]   # batch 1: up to γ_max


def test_monotone_fit_keeps_uneven_steps_and_pools_reordered_neighbours():
    assert monotone_fit([1.0, 1.4, 1.5, 2.0]) == pytest.approx([1.0, 1.4, 1.5, 2.0])   # uneven steps kept
    assert monotone_fit([1.0, 2.1, 1.9, 3.0]) == pytest.approx([1.0, 2.0, 2.0, 3.0])   # a noisy swap pooled
    assert monotone_fit([3.0, 2.0, 1.0]) == pytest.approx([2.0] * 3)                   # never decreasing
    assert monotone_fit([1.5]) == [1.5]


def test_alphas_are_the_rs_and_to_acceptance_of_design_3():
    p = torch.tensor([[0.6, 0.3, 0.1]])
    q = torch.tensor([[0.2, 0.7, 0.1]])
    rs, to = alpha_rs(p, q), alpha_to(p, q)
    assert rs.item() == pytest.approx(0.2 + 0.3 + 0.1)          # Σ min(p, q)
    assert to.item() == pytest.approx(0.3)                       # p(argmax q)


def table_for(alpha_by_bin: dict[int, tuple[float, float]], gamma_max: int, costs: list[float]) -> AdaptiveDraft:
    """An AdaptiveDraft whose RS tables (every step k) hold (α, observations) = ``alpha_by_bin[bin]``."""
    ad = AdaptiveDraft(costs, prior=0.5)
    sums, counts = ad.table("rejection")
    for k in range(gamma_max):
        for b, (a, n) in alpha_by_bin.items():
            sums[k][b], counts[k][b] = a * n, n
    return ad


def test_planner_drafts_while_the_drafts_are_sure_and_stops_after_an_unsure_one():
    costs = [1.0 + 0.2 * g for g in range(1, 6)]                 # each draft adds 20 % to a step
    ad = table_for({BINS - 1: (0.95, 1000.0), 2: (0.2, 100.0)}, 5, costs)   # most drafts are sure
    q = torch.tensor([[0.97, 0.01, 0.02], [0.23, 0.4, 0.37]])     # q(d=0): last bin / bin 2
    sure, unsure = (q[i : i + 1] for i in range(2))
    d = torch.zeros(1, dtype=torch.long)
    done = torch.zeros(1, dtype=torch.bool)
    planner = DraftPlanner(ad, 5, 1, "rejection", False, "cpu")
    assert planner.step(done, sure) == (False, 5, None)           # γ_max until the drafts say otherwise
    assert planner.extend(1, sure, d) == 5 and planner.extend(2, sure, d) == 5
    assert planner.extend(3, unsure, d) == 3                      # d_3 unlikely accepted: no head forward for d_4
    assert planner.bins == [[BINS - 1], [BINS - 1], [2]]
    planner = DraftPlanner(ad, 5, 1, "rejection", False, "cpu")
    planner.step(done, unsure)
    assert planner.extend(1, unsure, d) == 1                      # d_1 unsure: one draft
    assert DraftPlanner(ad, 5, 1, "rejection", False, "cpu").step(torch.ones(1, dtype=torch.bool), sure)[0] is True


def test_the_planner_reads_the_drawn_drafts_own_probability():
    ad = table_for({BINS - 1: (0.95, 1000.0), 3: (0.1, 1000.0)}, 3, [1.0, 1.3, 1.6])
    q = torch.tensor([[0.6, 0.35, 0.05]])                         # max q in bin 6, q(d=1) in bin 3
    planner = DraftPlanner(ad, 3, 1, "rejection", False, "cpu")
    planner.step(torch.zeros(1, dtype=torch.bool), q)
    assert planner.extend(1, q, torch.tensor([1])) == 1 and planner.bins == [[3]]


def test_a_fixed_planner_keeps_gamma_and_reads_no_draft():
    planner = DraftPlanner(None, 3, 1, "rejection", True, "cpu")
    q = torch.tensor([[0.05, 0.95]])
    assert planner.step(torch.zeros(1, dtype=torch.bool), q)[1] == 3
    assert planner.extend(1, q, torch.tensor([0])) == 3 and planner.bins == []
    assert planner.first == [BINS - 1]


def test_planner_learns_only_the_steps_each_live_row_reached_in_the_bins_of_their_own_drafts():
    ad = AdaptiveDraft([1.0, 1.2, 1.4], prior=0.5, prior_weight=2.0)
    planner = DraftPlanner(ad, 3, 2, "rejection", False, "cpu")
    planner.LEARN_EVERY = 1                                       # learn from every verify (cadence: next test)
    d = torch.zeros(2, dtype=torch.long)                          # q_k(d_k) = the first column
    q1 = torch.tensor([[0.95, 0.05], [0.55, 0.45]])               # bins 9 and 5

    def draft_three():
        planner.extend(1, q1, d)
        planner.extend(2, torch.tensor([[0.75, 0.25], [0.65, 0.35]]), d)  # bins 7 and 6
        planner.extend(3, torch.tensor([[0.85, 0.15], [0.15, 0.85]]), d)  # the last draft: not read

    planner.step(torch.zeros(2, dtype=torch.bool), q1)
    draft_three()
    r = torch.tensor([[0.9, 0.8, 0.7], [0.6, 0.5, 0.4]])
    planner.step(torch.tensor([False, True]), q1, torch.tensor([1, 0]), r)
    sums, counts = ad.table("rejection")
    assert (counts[0][9], sums[0][9]) == pytest.approx((3.0, 1.0 + 0.9))      # row 0 reached steps 1 and 2
    assert (counts[1][7], sums[1][7]) == pytest.approx((3.0, 1.0 + 0.8))
    assert (counts[2][8], sums[2][8]) == pytest.approx((2.0, 1.0))            # not step 3
    assert (counts[0][5], sums[0][5]) == pytest.approx((3.0, 1.0 + 0.6))      # row 1 reached step 1 only
    assert (counts[1][6], sums[1][6]) == pytest.approx((2.0, 1.0))
    draft_three()
    planner.step(torch.tensor([True, True]), q1, torch.tensor([3, 3]), r)     # row 1 was done: only row 0 learns
    assert counts[0][5] == 3.0 and counts[0][9] == 4.0
    assert ad.choice == {}                                                    # one rule: no RS/TO choice


def test_the_tables_learn_from_every_fourth_verify_only():
    ad = AdaptiveDraft([1.0, 1.2], prior=0.5)
    planner = DraftPlanner(ad, 2, 1, "rejection", False, "cpu")
    q = torch.tensor([[0.95, 0.05]])
    live, d = torch.zeros(1, dtype=torch.bool), torch.zeros(1, dtype=torch.long)
    planner.step(live, q)
    learned = []
    for _ in range(9):                                            # verifies of steps 1..9
        planner.extend(1, q, d)
        before = sum(ad.table("rejection")[1][0])
        planner.step(live, q, torch.tensor([1]), torch.ones(1, 2))
        learned.append(sum(ad.table("rejection")[1][0]) - before)
    assert learned == [1, 0, 0, 0, 1, 0, 0, 0, 1]


def test_rule_auto_learns_both_rules_alpha_by_the_bin_of_max_q1():
    planner = DraftPlanner(None, 2, 1, "rejection", True, "cpu")
    q1 = torch.tensor([[0.15, 0.85]])                                         # bin 8
    planner.step(torch.zeros(1, dtype=torch.bool), q1)
    alphas = torch.tensor([[0.9, 0.7, 0.6, 0.2]])                             # RS α_1, α_2; TO α_1, α_2
    planner.step(torch.zeros(1, dtype=torch.bool), q1, torch.tensor([0]), torch.tensor([[0.5, 0.5]]), alphas)
    (rs, rs_n), (to, to_n) = (planner.adaptive.choice_table(rule) for rule in ("rejection", "target_only"))
    assert (rs[0][8], rs_n[0][8], to[0][8]) == pytest.approx((0.8 * 2 + 0.9, 3.0, 0.8 * 2 + 0.6))
    assert rs_n[1][8] == 2.0                                                  # step 2 was not reached
    assert planner.adaptive.tables == {}                                      # a fixed planner learns no lengths


def test_replay_scores_fixed_gammas_the_planner_and_an_oracle_on_known_steps():
    """Two kinds of decode steps: drafts that stay sure (q(d) 0.95, accepted with chance 0.95 at every step) and
    ones whose first draft is visibly unsure (q_1(d_1) = 0.15, accepted with chance 0.05). Fixed γ = 3 is the best
    fixed length; the planner drafts three on the first kind and stops after d_1 on the second, ~15 % faster."""
    sure, unsure = ([0.95] * 3, [0.95] * 3), ([0.15, 0.95, 0.95], [0.05, 0.9, 0.9])
    rows = [sure if i % 2 else unsure for i in range(400)]
    conf, accept = [c for c, _ in rows], [a for _, a in rows]
    ad = AdaptiveDraft([1.0, 1.2, 1.4], prior=0.8)
    r = replay(conf, accept, ad)
    t_sure, t_unsure = accept_lengths([0.95] * 3), accept_lengths([0.05, 0.9, 0.9])
    assert r["fixed"] == pytest.approx([(a + b) / 2 / c for a, b, c in zip(t_sure, t_unsure, [1.0, 1.2, 1.4],
                                                                                strict=True)])
    assert r["best_fixed_gamma"] == 3 and r["planner_mean_gamma"] == pytest.approx(2.0)
    assert r["planner"] == pytest.approx((t_sure[2] + t_unsure[0]) / (1.4 + 1.0))
    assert r["planner_vs_best_fixed"] == pytest.approx(r["planner"] / r["fixed"][2])
    assert r["planner_vs_best_fixed"] > 1.1
    assert r["oracle_vs_best_fixed"] >= r["planner_vs_best_fixed"]
    assert r["corr_own_confidence"][1] is None                     # q_2(d_2) is the same everywhere
    assert r["corr_own_confidence"][0] == pytest.approx(1.0) and r["accept_mean"][0] == pytest.approx(0.5)
    assert ad.tables == {}                                        # the caller's tables are left alone
    with pytest.raises(BebopError, match="same N steps"):
        replay(conf, accept[:-1], ad)


def test_replay_counts_tokens_up_to_an_eos_draft_and_the_planner_stops_there():
    conf, accept = [[0.95, -0.95, 0.95]] * 100, [[0.95] * 3] * 100   # every step drafts EOS second
    r = replay(conf, accept, AdaptiveDraft([1.0, 1.2, 1.4], prior=0.9))
    assert r["fixed"] == pytest.approx([1.95 / 1.0, 1.95 / 1.2, 1.95 / 1.4])  # nothing gained past the EOS
    assert r["planner_mean_gamma"] == 2.0 and r["planner"] == pytest.approx(1.95 / 1.2)
    assert r["corr_own_confidence"] == [None] * 3                           # |q(d)| is constant


def test_decode_trace_holds_each_drafts_own_probability_and_acceptance_chance(peaky, tiny_tokenizer):  # noqa: F811
    model, head = peaky
    prompts, _ = prompts_for(tiny_tokenizer, 64)
    params = SamplingParams(temperature=1.0)
    steps: list = []
    r = generate_mtp(model, head, prompts, params, 12, eos_id=None, gamma=3,
                     generator=torch.Generator().manual_seed(0), trace=steps)
    assert len(steps) == r.metrics.target_forwards
    conf = torch.cat([c[live] for c, _, live in steps])
    accept = torch.cat([a[live] for _, a, live in steps])
    assert conf.shape == accept.shape == (r.metrics.steps, 3)
    assert ((conf > 0) & (conf <= 1)).all() and ((accept >= 0) & (accept <= 1)).all()
    # every row judges d_1: its acceptance chances add up to the accepted count, within 5 standard deviations
    n1 = r.metrics.accepted_k[0]
    assert abs(accept[:, 0].sum().item() - n1) < 5 * (accept[:, 0] * (1 - accept[:, 0])).sum().sqrt().item() + 1
    c2, a2 = decode_trace(model, head, [prompts[:4]], DecodeConfig(params, 12, None, 3))
    assert len(c2) == len(a2) and all(len(row) == 3 for row in (*c2, *a2))


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"step_seconds": []}, "step_seconds"),
    ({"step_seconds": [1.0, -1.0]}, "-1.0"),
    ({"step_seconds": [1.0, 2.0], "prior": [0.5]}, "prior"),
    ({"step_seconds": [1.0], "prior": 1.5}, "1.5"),
    ({"step_seconds": [1.0], "prior_weight": 0.0}, "prior_weight"),
    ({"step_seconds": [1.0, 2.0], "step_tokens": [1.5]}, "step_tokens"),
    ({"step_seconds": [1.0, 2.0], "throughput": [900.0, 0.0]}, "throughput"),
])
def test_adaptive_draft_rejects_bad_configuration(kwargs, needle):
    with pytest.raises(BebopError) as e:
        AdaptiveDraft(**kwargs)
    assert needle in str(e.value)


def test_target_only_is_rejection_sampling_against_a_one_hot_draft():
    """One verify step with q = one-hot(argmax q): acceptance rate p(d) and emitted token ~ p (10^5 draws)."""
    torch.manual_seed(0)
    n, V = 100_000, 6
    p = torch.softmax(torch.randn(V) * 1.5, -1)
    q = one_hot_argmax(torch.softmax(torch.randn(V), -1)).expand(n, V)
    d = q.argmax(-1)
    p_t = p.expand(n, 2, V).contiguous()
    q_pad = torch.stack([q, torch.zeros(n, V)], dim=1)
    vin = torch.stack([torch.zeros(n, dtype=torch.long), d], dim=1)
    gen = torch.Generator().manual_seed(1)
    noise = torch.empty(n, V).exponential_(generator=gen)
    a, _, toks, exp_alpha, _ = verify_rs(p_t, q_pad, vin, torch.arange(2), torch.arange(n), -1, noise, gen)
    pd = p[d[0]].item()
    assert exp_alpha[0, 0].item() == pytest.approx(pd)
    assert abs(a.float().mean().item() - pd) < 5 * (pd * (1 - pd) / n) ** 0.5
    first = toks[:, 0].numpy()
    assert chisq_pvalue(first, p.double().numpy()) > P_FALSE_ALARM


def test_a_row_goes_to_target_only_when_its_confidence_bin_favours_it():
    """Rule auto, fixed γ = 2: the tables say TO wins in bin 9 and RS in bin 5; the other rows stay RS."""
    planner = DraftPlanner(None, 2, 2, "rejection", True, "cpu")
    q1 = torch.tensor([[0.95, 0.05], [0.55, 0.45]])                # bins 9 and 5
    assert planner.step(torch.zeros(2, dtype=torch.bool), q1) == (False, 2, None)   # prior: tie → RS
    for rule, a9, a5 in (("rejection", 0.5, 0.9), ("target_only", 0.8, 0.3)):
        sums, counts = planner.adaptive.choice_table(rule)
        for k in range(2):
            sums[k][9], counts[k][9], sums[k][5], counts[k][5] = a9 * 100, 100.0, a5 * 100, 100.0
    all_done, gamma, to = planner.step(torch.zeros(2, dtype=torch.bool), q1)
    assert (all_done, gamma, to.tolist()) == (False, 2, [True, False])


def forcing() -> AdaptiveDraft:
    """An AdaptiveDraft that starts at γ = 3 and, learning fast, moves γ with the confidence bins' acceptance."""
    return AdaptiveDraft([1.0, 1.3, 1.6], prior=0.9, prior_weight=1.0)


@pytest.mark.parametrize("rule", ["rejection", "auto"])
def test_adaptive_logprobs_match_a_full_forward(peaky, tiny_tokenizer, rule):  # noqa: F811
    model, head = peaky
    prompts, _ = prompts_for(tiny_tokenizer, 6)
    params = SamplingParams(temperature=1.0, top_k=20)
    r = generate_mtp(model, head, prompts, params, 24, eos_id=None, gamma=forcing(), rule=rule,
                     generator=torch.Generator().manual_seed(0))
    assert (r.lengths == 24).all() and 1.0 < r.metrics.mean_gamma < 3.0    # γ really varied
    for b, comp in enumerate(r.completions()):
        torch.testing.assert_close(r.logprobs[b], exact_logprobs(model, prompts[b], comp, params), atol=2e-4, rtol=0)


def test_adaptive_greedy_equals_plain_greedy(peaky, tiny_tokenizer):  # noqa: F811
    model, head = peaky
    prompts, _ = prompts_for(tiny_tokenizer, 4)
    params = SamplingParams(temperature=0.0)
    plain = generate(model, prompts, params, 30, eos_id=None)
    mtp = generate_mtp(model, head, prompts, params, 30, eos_id=None, gamma=forcing(), rule="auto")
    assert torch.equal(plain.tokens, mtp.tokens)


def test_stopping_on_the_drawn_drafts_own_probability_keeps_the_law():
    """The planner decides per row, after drawing d_1, whether to draft d_2 — here iff q_1(d_1) > 0.47, which
    depends on d_1 itself (under TO d_1 = argmax q_1 is fixed, so only RS has something to test). Two positions,
    context-dependent p_2(·|x_1) and q_2(·|d_1), deliberately bad drafts (zeros where p > 0): 2·10^5 rows
    verified with ``sampling.verify`` (γ = 2 where it continues, γ = 1 where it stops; a row that emits one token
    draws the second from p_2, as the next step would) give the pairs (x_1, x_2) exactly the law
    p_1(x_1)·p_2(x_2|x_1) (χ² over 16 cells)."""
    g = torch.Generator().manual_seed(3)
    V, n = 4, 200_000
    p1 = torch.tensor([0.1, 0.4, 0.2, 0.3])
    p2 = torch.softmax(torch.randn(V, V, generator=g) * 1.5, -1)            # p_2(·|x_1)
    q1 = torch.tensor([0.5, 0.05, 0.45, 0.0])
    q2 = torch.softmax(torch.randn(V, V, generator=g) * 2.0, -1)            # q_2(·|d_1)
    q_1 = q1.expand(n, V)
    d1 = torch.multinomial(q_1, 1, generator=g).squeeze(1)
    on = q1[d1] > 0.47                                                       # the decision reads d_1
    q_2 = q2[d1]
    d2 = torch.multinomial(q_2, 1, generator=g).squeeze(1)
    first, second = torch.empty(n, dtype=torch.long), torch.full((n,), -1)
    for rows, gamma in ((on, 2), (~on, 1)):
        m = int(rows.sum())
        p = torch.stack([p1.expand(m, V), p2[d1[rows]], torch.full((m, V), 1 / V)], 1)[:, : gamma + 1]
        q = torch.stack([q_1[rows], q_2[rows]], 1)[:, :gamma]
        res = verify(p, q, torch.stack([d1[rows], d2[rows]], 1)[:, :gamma], "rejection", g)
        first[rows] = res.tokens[:, 0]
        second[rows] = torch.where(res.accepted >= 1, res.tokens[:, 1], -1)
    assert 0.2 < on.float().mean() < 0.8                                    # both branches are exercised
    todo = second < 0                                                        # the next step's draw from p_2
    second[todo] = torch.multinomial(p2[first[todo]], 1, generator=g).squeeze(1)
    law = (p1[:, None] * p2).flatten().double().numpy()
    assert chisq_pvalue((first * V + second).numpy(), law) > P_FALSE_ALARM


@pytest.mark.slow
@pytest.mark.parametrize(("gamma", "rule", "temperature"), [("cycle", "rejection", 1.0), ("cycle", "auto", 1.0),
                                                            (2, "auto", 0.7)])
def test_adaptive_sequences_have_the_plain_sampling_law(peaky, tiny_tokenizer, monkeypatch, gamma, rule,  # noqa: F811
                                                        temperature):
    """10^5 sequences of 3 tokens against their exact law under p, with the draft length re-planned after every
    draft — stopping there or running the head on (a cycle 1, 3, 2, … of plans: in one batch of 10^5 rows the
    planner's own choice hardly moves, so a cycle stands in for it; plans that read each row's own draft are
    ``test_stopping_on_the_drawn_drafts_own_probability_keeps_the_law``) and/or
    per-row RS/TO picked from each row's draft confidence (TO iff max q_1 ≥ 0.5: the learned tables need
    more than two steps to move)."""
    model, head = peaky
    n, length = 100_000, 3
    prompts, (pa, pb) = prompts_for(tiny_tokenizer, n)
    params = SamplingParams(temperature=temperature)
    if gamma == "cycle":
        cycle = itertools.cycle([1, 3, 2])
        decide = DraftPlanner.decide

        def cycled(self, k, conf):
            decide(self, k, conf)                                    # records the bins the tables learn from
            return max(k, next(cycle))

        monkeypatch.setattr(DraftPlanner, "decide", cycled)
    if rule == "auto":
        plan = DraftPlanner.step

        def by_confidence(self, *args):
            all_done, g, _ = plan(self, *args)
            return all_done, g, torch.tensor([b >= 5 for b in self.first])

        monkeypatch.setattr(DraftPlanner, "step", by_confidence)
    g = forcing() if gamma == "cycle" else as_policy(gamma, rule)
    r = generate_mtp(model, head, prompts, params, length, eos_id=None, gamma=g, rule=rule,
                     generator=torch.Generator().manual_seed(11))
    if rule == "auto":
        assert 0.0 < r.metrics.target_only_fraction < 1.0             # both rules were used
    if gamma == "cycle":
        assert 1.0 < r.metrics.mean_gamma < 3.0
    V = model.config.vocab_size
    codes = (r.tokens[:, 0] * V * V + r.tokens[:, 1] * V + r.tokens[:, 2]).numpy()
    for parity, prompt in ((0, pa), (1, pb)):
        law = sequence_law(model, prompt, params, length)
        assert chisq_pvalue(codes[parity::2], law) > P_FALSE_ALARM


@pytest.mark.slow
def test_bench_decode_gamma_auto_writes_every_fixed_gamma_and_auto(dirs, tmp_path):  # noqa: F811
    out = tmp_path / "auto.json"
    r = cli("bench", "decode", "--model", str(dirs / "base"), "--mtp", str(dirs / "head"), "--gamma", "auto",
            "--gamma-max", "3", "--rule", "auto", "--batch-sizes", "1,2", "--max-new-tokens", "8", "--repeats", "1",
            "--prompts", "2", "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "vs best fixed" in r.stdout
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"1", "2"}
    for row in res.values():
        assert set(row["fixed"]) == {f"{rule}/{g}" for rule in ("rejection", "target_only") for g in (1, 2, 3)}
        assert len(row["step_seconds"]) == 3 and len(row["prior_alpha"]) == 3
        best = max(v["tokens_per_s"] for v in row["fixed"].values())
        assert row["fixed"][row["best_fixed"]]["tokens_per_s"] == best
        assert row["auto_vs_best_fixed"] == pytest.approx(row["auto"]["tokens_per_s"] / best)
        upto = row["auto_vs_best_fixed_upto"]                     # against the best fixed γ ≤ 1, 2, 3
        assert len(upto) == 3 and upto[-1] == pytest.approx(row["auto_vs_best_fixed"])
        assert upto[0] == pytest.approx(row["auto"]["tokens_per_s"] / max(
            row["fixed"][f"{rule}/1"]["tokens_per_s"] for rule in ("rejection", "target_only")))
        assert upto[0] >= upto[1] >= upto[2]
        assert 1 <= row["gamma_cap"] <= 3 and len(row["calibrated_tokens_per_s"]) == 3
        assert 1.0 <= row["auto"]["mean_gamma"] <= 3.0
        assert np.isfinite(row["plain_tokens_per_s"])
        rp = row["replay"]                                        # decisions scored without timing noise
        assert len(rp["fixed"]) == 3 and rp["best_fixed_gamma"] == 1 + int(np.argmax(rp["fixed"]))
        assert 1.0 <= rp["planner_mean_gamma"] <= 3.0 and rp["steps"] > 0
        assert len(rp["corr_own_confidence"]) == len(rp["corr_first_confidence"]) == len(rp["accept_mean"]) == 3
        assert rp["planner_vs_best_fixed"] == pytest.approx(rp["planner"] / max(rp["fixed"]))


@pytest.mark.slow
@pytest.mark.parametrize(("args", "needle"), [(["--gamma", "five"], "'five'"), (["--gamma", "auto", "--gamma-max",
                                                                                 "0"], "gamma-max"),
                                               (["--rule", "auto"], "'auto'"), (["--threads", "0"], "threads")])
def test_bench_decode_rejects_bad_gamma(dirs, args, needle):  # noqa: F811
    r = cli("bench", "decode", "--model", str(dirs / "base"), "--mtp", str(dirs / "head"), *args)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_generate_with_rule_auto_at_a_fixed_gamma(dirs):  # noqa: F811
    """The CLI builds the drafting policy for rule auto at a fixed γ (the engine leaves the RS/TO choice to one)."""
    r = cli("generate", "--model", str(dirs / "base"), "--mtp", str(dirs / "head"), "--rule", "auto", "--gamma", "2",
            "--n", "2", "--max-new-tokens", "6")
    assert r.returncode == 0, r.stderr
    assert "target_only_fraction" in r.stdout
