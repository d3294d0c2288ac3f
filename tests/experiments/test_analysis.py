"""Analysis and plots: fits, entropy buckets on a tiny model, the RS-vs-TO decision boundary, PNGs, CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import build_tiny_policy
from hypothesis import given, settings
from hypothesis import strategies as st

from bebop.core.sampling import SamplingParams
from bebop.errors import BebopError
from bebop.experiments import analysis, plots, stats
from bebop.models.checkpoint import save_head
from bebop.models.mtp import MTPHead
from bebop.models.policy import save_policy
from bebop.training.samples import policy_samples
from bebop.training.train_mtp import expected_alpha

# ------------------------------------------------------------------------------------------------ fits


def test_linear_fit_recovers_known_slope_and_r():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 2, 2000)
    exact = analysis.linear_fit(x, -1.68 * x + 3.5)
    assert exact["slope"] == pytest.approx(-1.68) and exact["intercept"] == pytest.approx(3.5)
    assert exact["r"] == pytest.approx(-1.0) and exact["n"] == 2000
    # y = a x + b + noise with var(noise) = σ²: r = a·sd(x) / sqrt(a² var(x) + σ²)
    sigma = 0.4
    noisy = analysis.linear_fit(x, -1.68 * x + 3.5 + rng.normal(0, sigma, x.size))
    sd_x = 2 / math.sqrt(12)
    assert noisy["slope"] == pytest.approx(-1.68, abs=0.05)
    assert noisy["r"] == pytest.approx(-1.68 * sd_x / math.hypot(1.68 * sd_x, sigma), abs=0.02)
    scipy_stats = pytest.importorskip("scipy.stats")
    ref = scipy_stats.linregress(x, -1.68 * x + 3.5 + np.sin(7 * x))
    mine = analysis.linear_fit(x, -1.68 * x + 3.5 + np.sin(7 * x))
    assert mine["slope"] == pytest.approx(ref.slope) and mine["r"] == pytest.approx(ref.rvalue)
    assert mine["intercept"] == pytest.approx(ref.intercept)


def test_linear_fit_degenerate_cases_are_json_safe():
    assert analysis.linear_fit([1.0], [2.0]) == {"slope": None, "intercept": None, "r": None, "n": 1}
    assert analysis.linear_fit([1.0, 1.0], [2.0, 3.0])["slope"] is None          # constant x
    flat = analysis.linear_fit([0.0, 1.0, 2.0], [5.0, 5.0, 5.0])                # constant y: slope 0, r undefined
    assert flat["slope"] == 0.0 and flat["r"] is None
    assert analysis.linear_fit([0, 1, float("nan"), 2], [1, 3, 4, 5])["n"] == 3
    json.dumps(flat, allow_nan=False)
    with pytest.raises(BebopError, match="same length"):
        analysis.linear_fit([1, 2], [1])


def test_accept_length_is_one_plus_sum_of_prefix_products():
    assert analysis.accept_length([0.5, 0.5, 0.5]) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert analysis.accept_length([[1, 1, 1], [0, 1, 1]]).tolist() == [4.0, 1.0]


# ------------------------------------------------------------------------------------------------ decision boundary


def _dist(logits):
    return torch.softmax(torch.tensor(logits, dtype=torch.float64) * 3, -1)


_rows = st.tuples(st.integers(1, 8), st.integers(2, 12)).flatmap(lambda nv: st.tuples(
    *[st.lists(st.lists(st.floats(-3, 3), min_size=nv[1], max_size=nv[1]), min_size=nv[0], max_size=nv[0])] * 2))


@settings(max_examples=200, deadline=None)
@given(_rows)
def test_decision_boundary_is_an_identity(pq):
    p, q = _dist(pq[0]), _dist(pq[1])
    res = analysis.decision_boundary(p, q)
    assert res["n"] == p.shape[0]
    assert res["agreement"] in (None, 1.0)
    alpha_rs, alpha_to, tv = analysis.acceptance(p, q)
    assert torch.allclose(alpha_rs, 1 - tv, atol=1e-5)                   # Σ min(p, q) = 1 − ½ Σ |p − q|
    assert bool((alpha_to <= p.max(-1).values + 1e-6).all())             # TO capped by max p
    # the rule with the larger α is the one the boundary names
    decided = (alpha_rs - alpha_to).abs() > 1e-5
    assert torch.equal((tv < 1 - alpha_to)[decided], (alpha_rs > alpha_to)[decided])


def test_decision_boundary_hand_cases():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.9, 0.1, 0.0]])
    q = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.8, 0.0]])
    # row 0: α_RS = 1 > α_TO = 0.5 (RS wins); row 1: α_RS = 0.3 > α_TO = 0.1 (RS wins)
    res = analysis.decision_boundary(p, q)
    assert res == {"n": 2, "ties": 0, "agreement": 1.0, "rs_wins": 1.0, "to_wins": 0.0,
                   "mean_margin": pytest.approx(0.35)}
    # TO wins: p = (0.7, 0.3, 0), q = (0.5, 0.05, 0.45): α_TO = p(0) = 0.7 > α_RS = 0.55, TV = 0.45 > 1 − 0.7
    to = analysis.decision_boundary(torch.tensor([[0.7, 0.3, 0.0]]), torch.tensor([[0.5, 0.05, 0.45]]))
    assert to["to_wins"] == 1.0 and to["agreement"] == 1.0
    # q = one-hot at argmax p: α_RS = max p = α_TO, a tie (excluded from the agreement)
    tie = analysis.decision_boundary(torch.tensor([[0.6, 0.4]]), torch.tensor([[1.0, 0.0]]))
    assert tie["ties"] == 1 and tie["agreement"] is None


# ------------------------------------------------------------------------------------------------ buckets


def test_bucket_by_entropy_on_synthetic_tokens():
    rng = np.random.default_rng(1)
    ent = rng.uniform(0, 2, 5000)
    a_rs = np.clip(0.95 - 0.05 * ent[:, None] + rng.normal(0, 0.01, (5000, 3)), 0, 1)
    a_to = np.clip(0.95 - 0.30 * ent[:, None] + rng.normal(0, 0.01, (5000, 3)), 0, 1)
    res = analysis.bucket_by_entropy(ent, a_rs, a_to, n_buckets=5)
    assert sum(res["count"]) == 5000 and len(res["entropy"]) == 5
    assert res["entropy"] == sorted(res["entropy"])
    for k in range(3):
        assert res["rejection"]["alpha_fits"][k]["slope"] == pytest.approx(-0.05, abs=0.005)
        assert res["target_only"]["alpha_fits"][k]["slope"] == pytest.approx(-0.30, abs=0.005)
    assert res["target_only"]["fit"]["slope"] < res["rejection"]["fit"]["slope"] < 0
    assert res["rejection"]["mean_accept_length"] == pytest.approx(analysis.accept_length(a_rs).mean())
    json.dumps(res, allow_nan=False)
    # α_k fitted against its own step's entropy H(p_k) when given
    ent_k = np.stack([ent, rng.uniform(0, 2, 5000), ent], axis=1)
    a_k = a_rs.copy()
    a_k[:, 1] = 0.9 - 0.2 * ent_k[:, 1]
    res_k = analysis.bucket_by_entropy(ent, a_k, a_to, n_buckets=5, entropy_k=ent_k)
    assert res_k["rejection"]["alpha_fits"][1]["slope"] == pytest.approx(-0.2)
    assert res_k["rejection"]["alpha_fits"][1]["r"] == pytest.approx(-1.0)
    # explicit edges: empty buckets are dropped
    res = analysis.bucket_by_entropy(ent, a_rs, a_to, edges=[0, 1, 2, 3])
    assert len(res["count"]) == 2
    with pytest.raises(BebopError, match="increasing"):
        analysis.bucket_by_entropy(ent, a_rs, a_to, edges=[1, 0])


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer):
    model = build_tiny_policy(tiny_tokenizer, logit_scale=4.0)
    head = MTPHead.from_base(model).eval()
    return model, tiny_tokenizer, head


def test_positions_per_sample_are_the_teacher_forced_positions(tiny):
    """One rule counts each sample's drafting positions: ``token_acceptance`` labels exactly that many per sample."""
    model, tok, head = tiny
    data = [([1, 2, 3, 4, 5, 6, 7], 2), ([1, 2, 3], 2), ([4, 5, 6, 7, 8, 9], 1)]
    assert analysis.positions_per_sample(data, 2) == [3, 0, 3]
    rows = analysis.token_acceptance(model, head, data, 2, SamplingParams(1.0), tok.pad_token_id, batch_size=2)["row"]
    assert rows.tolist() == [0, 0, 0, 2, 2, 2]


def test_token_acceptance_matches_train_mtp_expected_alpha(tiny):
    model, tok, head = tiny
    from bebop.tasks import get_task

    data = policy_samples(model, tok, get_task("arith"), 6, 1.0, 12, seed=0)
    params = SamplingParams(temperature=1.0)
    stats = analysis.token_acceptance(model, head, data, 3, params, tok.pad_token_id, batch_size=4)
    n = stats["entropy"].shape[0]
    assert n > 0 and stats["alpha_rs"].shape == stats["alpha_to"].shape == stats["tv"].shape == (n, 3)
    assert np.allclose(stats["alpha_rs"].mean(0), expected_alpha(model, head, data, 3, params, tok.pad_token_id),
                       atol=1e-5)
    assert np.allclose(stats["alpha_rs"], 1 - stats["tv"], atol=1e-5)
    assert (stats["entropy"] >= 0).all() and np.array_equal(stats["entropy"], stats["entropy_k"][:, 0])
    assert ((stats["alpha_to"] >= 0) & (stats["alpha_to"] <= 1 + 1e-6)).all()


def test_entropy_analysis_and_sweep_on_a_tiny_model(tiny, tmp_path):
    model, tok, head = tiny
    heads = {"a": head, "b": MTPHead.from_base(model).eval()}
    res = analysis.entropy_analysis(model, tok, heads,
                                    analysis.EntropyConfig(samples=6, gamma=2, buckets=3, max_new_tokens=10))
    json.dumps(res, allow_nan=False)
    for row in res["heads"].values():
        assert sum(row["count"]) == row["n_positions"] > 0
        ps = row["per_sample"]  # per-sample sums rebuild the per-token fit (the unit of its interval)
        assert sum(ps["n"]) == row["n_positions"] and 1 < len(ps["n"]) <= 6
        for rule in ("rejection", "target_only"):
            full = stats.pooled_slope_of(ps["n"], ps["sum_h"], ps["sum_h2"], ps[rule]["sum_len"],
                                         ps[rule]["sum_h_len"])(np.arange(len(ps["n"]))[None])[0]
            assert full == pytest.approx(row[rule]["fit"]["slope"])
        assert row["decision_boundary"]["agreement"] in (None, 1.0)
        best = row["best_rule_accept_length"]
        assert best >= max(row["rejection"]["mean_accept_length"], row["target_only"]["mean_accept_length"]) - 1e-9
        assert len(row["decision_boundary_per_step"]) == 2
        for rule in ("rejection", "target_only"):
            assert len(row[rule]["alpha"]) == len(row["count"]) and len(row[rule]["alpha_fits"]) == 2
            assert all(1 <= x <= 3 for x in row[rule]["accept_length"])
    series = analysis.entropy_series(res)
    assert set(series) == {"a RS", "a TO", "b RS", "b TO"}
    assert plots.plot_entropy_accept(series, tmp_path / "e.png").stat().st_size > 0

    sweep = analysis.temperature_sweep(model, tok, {"a": head}, analysis.SweepConfig(
        temperatures=(0.5, 1.0), gamma=2, prompts=3, batch_size=2, max_new_tokens=6))
    json.dumps(sweep, allow_nan=False)
    row = sweep["heads"]["a"]
    for rule in ("rejection", "target_only"):
        assert len(row[rule]["accept_length"]) == 2 and len(row[rule]["alpha"][0]) == 2
        assert all(e > 0 for e in row[rule]["entropy"])
        assert row[rule]["fit"]["n"] == 2
        for i, u in enumerate(row[rule]["units"]):  # one entry per prompt (3 prompts, 2 per engine call)
            assert len(u["steps"]) == 3 and all(len(r) == 2 for r in u["reached"])
            assert 1 + sum(u["accepted"]) / sum(u["steps"]) == pytest.approx(row[rule]["accept_length"][i])
            assert sum(u["entropy_sum"]) / sum(u["tokens"]) == pytest.approx(row[rule]["entropy"][i])
            alpha = [a / r if r else 0.0 for a, r in zip(np.sum(u["accepted_k"], 0), np.sum(u["reached"], 0),
                                                          strict=True)]
            assert alpha == pytest.approx(row[rule]["alpha"][i])
    series = analysis.sweep_series(sweep)
    assert set(series) == {"a RS", "a TO"} and series["a RS"]["accept_length"] == row["rejection"]["accept_length"]


def test_step_series_fits_per_rl_step_records():
    rows = [{"step": s, "entropy": 0.3 - 0.01 * s, "accept_length": 3.0 + 1.68 * 0.01 * s,
             "alpha": [0.9 + 0.001 * s, 0.8]} for s in range(10)]
    runs = {"none": [{"step": 0, "entropy": 0.3}], "rs": rows, "to": [dict(r, alpha=None) for r in rows]}
    series = analysis.step_series(runs)
    assert set(series) == {"rs", "to"}
    assert series["rs"]["fit"]["slope"] == pytest.approx(-1.68) and series["rs"]["fit"]["r"] == pytest.approx(-1.0)
    assert series["rs"]["alpha_fits"][0]["slope"] == pytest.approx(-0.1) and series["rs"]["alpha_fits"][1]["r"] is None
    assert series["to"]["alpha_fits"] == [] and series["to"]["fit"]["n"] == 10


# ------------------------------------------------------------------------------------------------ plots


def _is_png(path):
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_plot_writes_a_png(tmp_path):
    series = {"ce RS": {"entropy": [0.1, 0.5, 1.0], "accept_length": [3.5, 3.0, 2.3], "count": [100, 30, 5]},
              "e2e_tv RS": {"entropy": [0.1, 0.5, 1.0], "accept_length": [3.6, 3.5, 3.5],
                            "fit": analysis.linear_fit([0.1, 0.5, 1.0], [3.6, 3.5, 3.5])},
              "ce TO": {"entropy": [0.1, 0.5], "accept_length": [3.4, 2.8]}}
    sweep = {"temperatures": [0.3, 1.0, 1.5], "gamma": 3, "heads": {
        h: {"rejection": {"accept_length": [3.7, 3.4, 2.9], "entropy": [0.05, 0.2, 0.5]},
            "target_only": {"accept_length": [3.7, 3.3, 2.5], "entropy": [0.05, 0.2, 0.5]}} for h in ("ce", "e2e_tv")}}
    losses = {name: {"alpha_rs": [0.9, 0.85, 0.8], "accept_length_rs": 3.4, "alpha_to": [0.88, 0.8, 0.7],
                     "accept_length_to": 3.2} for name in ("ce", "fkl", "e2e_tv")}
    runs = {m: [{"step": s, "accept_length": None if m == "none" else 3.4 - 0.01 * s, "entropy": 0.3 - 0.01 * s}
                for s in range(5)] for m in ("none", "RS+e2e_tv", "TO+ce")}
    times = {"none": {"mean_step_s": 3.0, "mean_rollout_s": 2.0, "mean_train_s": 1.0, "per_step": []},
             "RS+e2e_tv": {"mean_step_s": 2.0, "mean_rollout_s": 1.0, "mean_train_s": 1.0}}
    paths = [
        plots.plot_entropy_accept(series, tmp_path / "a" / "entropy.png"),
        plots.plot_temperature_sweep(sweep, tmp_path / "sweep.png"),
        plots.plot_alpha_per_step(losses, tmp_path / "alpha.png"),
        plots.plot_rl_accept_length(runs, tmp_path / "rl.png"),
        plots.plot_step_times(times, tmp_path / "times.png"),
    ]
    assert [p.name for p in paths] == ["entropy.png", "sweep.png", "alpha.png", "rl.png", "times.png"]
    assert all(_is_png(p) for p in paths)
    # the bench-losses JSON with extra temperature keys still plots
    losses["ce"]["alpha_rs_t0.7"] = [0.9, 0.9, 0.9]
    assert _is_png(plots.plot_alpha_per_step(losses, tmp_path / "alpha2.png"))
    with pytest.raises(BebopError):
        plots.plot_step_times({"x": {"other": 1.0}}, tmp_path / "bad.png")
    with pytest.raises(BebopError):
        plots.plot_entropy_accept({}, tmp_path / "bad.png")


# ------------------------------------------------------------------------------------------------ CLI


@pytest.mark.slow
def test_cli_analyze_sweep_and_entropy(tiny, tmp_path):
    from typer.testing import CliRunner

    from bebop.cli import app

    model, tok, head = tiny
    save_policy(model, tok, tmp_path / "base")
    save_head(head, tmp_path / "head", model.config)
    common = ["--model", str(tmp_path / "base"), "--mtp", str(tmp_path / "head")]
    runner = CliRunner()
    r = runner.invoke(app, ["analyze", "sweep", *common, "--temperatures", "0.5,1", "--prompts", "2",
                            "--max-new-tokens", "4", "--json", str(tmp_path / "s.json"), "--plot",
                            str(tmp_path / "s.png"), "--entropy-plot", str(tmp_path / "se.png")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "s.json").read_text())["temperatures"] == [0.5, 1.0]
    assert _is_png(tmp_path / "s.png") and _is_png(tmp_path / "se.png") and "accept len RS" in r.output
    r = runner.invoke(app, ["analyze", "entropy", *common, "--samples", "3", "--max-new-tokens", "8", "--buckets",
                            "3", "--json", str(tmp_path / "e.json"), "--plot", str(tmp_path / "e.png")])
    assert r.exit_code == 0, r.output
    assert "head" in json.loads((tmp_path / "e.json").read_text())["heads"] and _is_png(tmp_path / "e.png")
    r = runner.invoke(app, ["analyze", "entropy", "--model", str(tmp_path / "base"), "--mtp", str(tmp_path / "no")])
    assert isinstance(r.exception, BebopError) and "no" in str(r.exception)
    # through the real entry point: one `error: …` line and exit code 2
    r = subprocess.run([sys.executable, "-m", "bebop.cli", "analyze", "sweep", *common, "--temperatures", "1,x"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "1,x" in r.stderr and "Traceback" not in r.stderr
