"""`bebop demo --quick`: every promised file is written, the claims have figures and verdicts, stages are cached,
and ``--model`` skips SFT. The quick numbers are meaningless; only the plumbing is checked."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import cli
from matplotlib.image import imread

from bebop.experiments.demo import CLAIMS, PLOTS, evaluate_claims, quick_config, run_demo
from bebop.experiments.demo.claims import claim_headline

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FILES = ("report.md", "summary.json", "losses.json", "sweep.json", "entropy.json", "rl/bench_rl.json",
         "policy/sft_summary.json", "heads/fkl_init/train_mtp_summary.json", "heads/ce/train_mtp_summary.json",
         "heads/e2e_tv/train_mtp_summary.json")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    run_demo(quick_config(out=str(out)))
    return out


@pytest.mark.slow
def test_quick_demo_writes_every_file(demo_dir):
    for name in FILES:
        assert (demo_dir / name).stat().st_size > 0, name
    for name in PLOTS.values():
        path = demo_dir / "plots" / name
        assert path.read_bytes()[:8] == PNG_MAGIC, name
        img = imread(path)
        assert img.shape[0] > 100 and img.shape[1] > 100, name
    report = (demo_dir / "report.md").read_text()
    for name in PLOTS.values():
        assert f"plots/{name}" in report
    rl = json.loads((demo_dir / "rl" / "bench_rl.json").read_text())["results"]
    assert list(rl) == ["none", "to-ce", "rs-ce", "rs-e2e_tv", "rs-online-ce"]


@pytest.mark.slow
def test_summary_has_five_claims_with_figures_and_verdicts(demo_dir):
    summary = json.loads((demo_dir / "summary.json").read_text())
    claims = summary["claims"]
    assert [c["id"] for c in claims] == [1, 2, 3, 4, 5]
    for c in claims:
        assert c["claim"] == CLAIMS[c["id"]]
        assert c["figures"] and c["rule"]
        assert c["held"] == (c["verdict"] == "held")
        assert c["verdict"] in ("held", "not held", "inconclusive")
        assert c["parts"] and all("ci" in p and p["verdict"] in ("held", "not held", "inconclusive")
                                  for p in c["parts"])
    report = (demo_dir / "report.md").read_text()
    assert sum(report.count(f"**{v}**") for v in ("held", "not held", "inconclusive")) == 5
    assert "Verdict rules:" in report
    sweep = json.loads((demo_dir / "sweep.json").read_text())
    units = sweep["heads"]["ce"]["rejection"]["units"]
    assert len(units) == len(sweep["temperatures"]) and len(units[0]["steps"]) == 8  # one per prompt
    assert "units_rs" in json.loads((demo_dir / "losses.json").read_text())["ce"]
    assert set(summary["stages"]) >= {"sft", "head_init", "head_ce", "head_e2e_tv", "losses", "sweep", "entropy", "rl",
                                      "rl_heldout"}
    heldout = json.loads((demo_dir / "rl_heldout.json").read_text())
    assert list(heldout) == ["to-ce", "rs-ce", "rs-e2e_tv", "rs-online-ce"]   # every method that drafts
    assert heldout["to-ce"]["tag"] == "to" and heldout["rs-online-ce"]["head"] == "ce"
    assert len(heldout["rs-ce"]["units"]["steps"]) == 8    # the losses stage's prompts, one unit each
    assert "rl_drift_heldout" in claims[1]["figures"] and "accept_length_after_rl" in claims[3]["figures"]


@pytest.mark.slow
def test_cli_rerun_reuses_every_stage_and_model_skips_sft(demo_dir, tmp_path):
    r = cli("demo", "--quick", "--out", str(demo_dir))
    assert r.returncode == 0, r.stderr
    stages = json.loads((demo_dir / "summary.json").read_text())["stages"]
    assert all(s["cached"] for s in stages.values()), stages

    other = tmp_path / "other"
    r = cli("demo", "--quick", "--model", str(demo_dir / "policy"), "--out", str(other))
    assert r.returncode == 0, r.stderr
    assert not (other / "policy").exists()
    summary = json.loads((other / "summary.json").read_text())
    assert summary["policy"]["dir"] == str(demo_dir / "policy")
    assert not summary["stages"]["head_init"]["cached"]


@pytest.mark.slow
def test_cli_demo_rejects_a_missing_model(tmp_path):
    r = cli("demo", "--quick", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "d"))
    assert r.returncode == 2
    assert "model directory not found" in r.stderr


def _rl(step_s: dict, accept: dict, drift: dict, steps: int = 12, noise: float = 0.002) -> dict:
    """RL benchmark results as ``bench_rl.summarize_run`` writes them: per method, ``steps`` per-step records whose
    accept length sits at ``accept[m]`` over the first five steps and moves by ``drift[m]`` (relative) over the last
    five, with step times around ``step_s[m]`` (half rollout)."""
    from bebop.experiments.bench_rl import summarize_run

    rng = np.random.default_rng(0)

    def rows(m):
        out = []
        for i in range(steps):
            t = step_s[m] * (1 + rng.normal(0, 0.02))
            r = {"step": i, "reward": 0.5, "entropy": 0.2 + 0.01 * i, "step_s": t, "rollout_s": t / 2,
                 "train_s": t / 2}
            if m in accept:
                ramp = min(max((i - 4) / (steps - 9), 0.0), 1.0)
                r["accept_length"] = accept[m] * (1 + drift.get(m, 0.0) * ramp) * (1 + rng.normal(0, noise))
            out.append(r)
        return out

    return {m: summarize_run(rows(m), {}) for m in step_s}


def _units(accept_length: float, entropy: float = 0.3, alpha=None, n: int = 24, noise: float = 0.01,
           seed: int = 0) -> dict:
    """Per-engine-call counters (``measure.UNIT_KEYS``) of ``n`` calls whose accept length, entropy and α_k sit at
    the given values, each call off by relative noise ``noise``."""
    rng = np.random.default_rng(seed)
    alpha = alpha or [0.8, 0.8, 0.8]
    e = 1 + rng.normal(0, noise, (n, 1 + len(alpha)))
    return {"steps": [100.0] * n, "accepted": list(100 * (accept_length - 1) * e[:, 0]),
            "reached": [[100.0] * len(alpha)] * n, "accepted_k": (100 * np.asarray(alpha) * e[:, 1:]).tolist(),
            "entropy_sum": list(200 * entropy * e[:, 0] ** 0), "tokens": [200] * n}


def _sweep(slopes: dict, at: dict | None = None, noise: float = 0.01) -> dict:
    """A temperature sweep whose accept length per (head, rule) is ``3 + slope · H`` at entropies 0.1–0.3 (or the
    given per-τ values ``at[head][rule]``) up to the noise of its units, and the figures measured on them."""
    from bebop.core.fits import linear_fit

    temps = [0.5, 1.0, 1.5]
    ent = [0.1, 0.2, 0.3]
    heads: dict = {}
    for i, (name, (rs, to)) in enumerate(slopes.items()):
        heads[name] = {}
        for j, (rule, s) in enumerate((("rejection", rs), ("target_only", to))):
            acc = (at or {}).get(name, {}).get(rule) or [3 + s * e for e in ent]
            units = [_units(a, e, noise=noise, seed=10 * i + 3 * j + k)
                     for k, (a, e) in enumerate(zip(acc, ent, strict=True))]
            acc = [1 + sum(u["accepted"]) / sum(u["steps"]) for u in units]  # as measured on the units
            heads[name][rule] = {"accept_length": acc, "entropy": ent, "units": units, "fit": linear_fit(ent, acc)}
    return {"temperatures": temps, "heads": heads}


def _losses(alphas: dict, noise: float = 0.01, n: int = 24) -> dict:
    return {k: {"alpha_rs": a, "accept_length_rs": 1 + sum(np.cumprod(a)),
                "units_rs": _units(1 + sum(np.cumprod(a)), alpha=a, noise=noise, n=n, seed=i)}
            for i, (k, a) in enumerate(alphas.items())}


def _paper_shaped(noise: float = 0.01, n: int = 24):
    losses = _losses({"fkl (warm start)": [0.8] * 3, "ce": [0.85, 0.8, 0.8], "e2e_tv": [0.9, 0.85, 0.85]}, noise, n)
    rl = _rl({"none": 2.0, "to-ce": 1.3, "rs-ce": 1.3, "rs-e2e_tv": 1.2, "rs-online-ce": 1.3},
             {"to-ce": 2.8, "rs-ce": 3.0, "rs-e2e_tv": 3.5, "rs-online-ce": 2.9},
             {"to-ce": -0.05, "rs-ce": -0.04, "rs-e2e_tv": 0.0, "rs-online-ce": -0.08})
    sweep = _sweep({"ce": (-1.7, -1.7), "e2e_tv": (-0.06, -1.7)},
                   {"ce": {"rejection": [3.2, 3.1, 3.0]}, "e2e_tv": {"rejection": [3.3, 3.3, 3.3]}}, noise)
    return losses, sweep, rl


def test_claims_built_to_hold_are_held():
    """Numbers shaped like the paper's, measured with little noise, give five 'held'; every record carries CIs
    around its point figures and a verdict per tested part."""
    losses, sweep, rl = _paper_shaped()
    claims = evaluate_claims(losses, sweep, {"heads": {}}, rl)
    assert [c["verdict"] for c in claims] == ["held"] * 5, [(c["id"], c["parts"]) for c in claims]
    assert all(c["held"] is True for c in claims)
    for c in claims:
        for p in c["parts"]:
            lo, hi = p["ci"]
            assert lo <= hi and p["verdict"] == "held", p
    f1 = claims[0]["figures"]
    lo, hi = f1["slope_per_nat_sweep_ci"]["ce RS"]
    assert lo < -1.0 and hi > -1.2 and lo < hi  # ce RS falls 3.2 → 3.0 over 0.2 nats: slope −1
    lo, hi = claims[2]["figures"]["e2e_tv_minus_ce_points_ci"]
    assert lo < claims[2]["figures"]["e2e_tv_minus_ce_points"] < hi


def test_claims_built_to_fail_are_not_held():
    """A CE head whose acceptance does not fall, RS below TO, no RL drift, equal losses and slow MTP: every claim
    is not held."""
    rl = _rl({"none": 1.0, "to-ce": 1.0, "rs-ce": 1.0, "rs-e2e_tv": 1.0, "rs-online-ce": 1.0},
             {"to-ce": 3.0, "rs-ce": 3.0, "rs-e2e_tv": 3.0, "rs-online-ce": 3.3},
             {"rs-e2e_tv": -0.1})
    sweep = _sweep({"ce": (-0.1, -0.1), "e2e_tv": (-0.1, -0.1)},
                   {h: {"rejection": [2.9, 2.9, 2.9], "target_only": [3.0, 3.0, 3.0]} for h in ("ce", "e2e_tv")})
    claims = evaluate_claims(_losses({"ce": [0.9] * 3, "e2e_tv": [0.9] * 3}), sweep, {"heads": {}}, rl)
    assert [c["verdict"] for c in claims] == ["not held"] * 5, [(c["id"], c["parts"]) for c in claims]
    assert [c["held"] for c in claims] == [False] * 5


def test_noisy_claims_are_inconclusive_and_missing_units_give_no_interval():
    """The paper-shaped numbers measured on 6 very noisy engine calls: the CIs straddle the thresholds, so claims
    1 and 3 are inconclusive rather than held. Outputs without units (an old run) have no CI: inconclusive."""
    losses, sweep, rl = _paper_shaped(noise=0.3, n=6)
    claims = evaluate_claims(losses, sweep, {"heads": {}}, rl)
    assert claims[0]["verdict"] == "inconclusive" and claims[2]["verdict"] == "inconclusive"
    assert all(p["ci"] is not None for c in (claims[0], claims[2]) for p in c["parts"])
    for v in losses.values():
        del v["units_rs"]
    for h in sweep["heads"].values():
        for r in h.values():
            del r["units"]
    claims = evaluate_claims(losses, sweep, {"heads": {}}, rl)
    assert claims[0]["verdict"] == claims[2]["verdict"] == "inconclusive"
    assert claims[2]["figures"]["e2e_tv_minus_ce_points"] == pytest.approx(5.0)


HELDOUT_SPEC = {"to-ce": ("ce", "target_only", "to"), "rs-ce": ("ce", "rejection", "rs"),
                "rs-e2e_tv": ("e2e_tv", "rejection", "rs"), "rs-online-ce": ("ce", "rejection", "rs")}


def _heldout(losses: dict, drift: dict, noise: float = 0.01, n: int = 24) -> dict:
    """``rl_heldout.json`` for ``losses`` (built by :func:`_losses`, given CE's TO figures here): per method its
    counters on the same prompts after RL, with the same per-prompt noise as before (the prompts are the same), at
    accept length before × (1 + ``drift[m]``)."""
    seeds = {k: i for i, k in enumerate(losses)}   # the seeds _losses gave each head's units
    ce_to = 0.85 * losses["ce"]["accept_length_rs"]
    losses["ce"].update(accept_length_to=ce_to, alpha_to=[0.7] * 3, units_to=_units(ce_to, n=n, noise=noise, seed=99))
    for v in losses.values():   # the point figures as the engine reports them: from the same counters
        for tag in ("rs", "to"):
            if f"units_{tag}" in v:
                v[f"accept_length_{tag}"] = 1 + sum(v[f"units_{tag}"]["accepted"]) / sum(v[f"units_{tag}"]["steps"])
    out = {}
    for m, (head, rule, tag) in HELDOUT_SPEC.items():
        before = losses[head][f"accept_length_{tag}"]
        u = _units(before * (1 + drift[m]), alpha=losses[head][f"alpha_{tag}"], n=n, noise=noise,
                   seed=99 if tag == "to" else seeds[head])
        out[m] = {"head": head, "rule": rule, "tag": tag, "accept_length": 1 + sum(u["accepted"]) / sum(u["steps"]),
                  "entropy": 0.3, "units": u, "before": {"accept_length": before, "entropy": 0.3}}
    return out


def test_claims_2_and_4_judge_rl_drift_on_the_heldout_prompts_before_and_after():
    """With ``rl_heldout.json`` the RL drift of claims 2 and 4 is acceptance on the same held-out prompts after vs
    before RL, its CI paired by prompt; the per-step drift (new prompts every step) is shown, not judged. Per-step
    records without drift but a held-out drift shaped like the paper's hold both claims; the reverse fails them."""
    losses, sweep, _ = _paper_shaped()
    flat_steps = _rl({"none": 2.0, "to-ce": 1.3, "rs-ce": 1.3, "rs-e2e_tv": 1.2, "rs-online-ce": 1.3},
                     {"to-ce": 2.8, "rs-ce": 3.0, "rs-e2e_tv": 3.5, "rs-online-ce": 2.9}, {})
    paper = {"to-ce": -0.05, "rs-ce": -0.04, "rs-e2e_tv": 0.0, "rs-online-ce": -0.08}
    heldout = _heldout(losses, paper)
    assert evaluate_claims(losses, sweep, {"heads": {}}, flat_steps)[1]["verdict"] == "not held"
    claims = evaluate_claims(losses, sweep, {"heads": {}}, flat_steps, heldout=heldout)
    c2, c4 = claims[1], claims[3]
    assert (c2["verdict"], c4["verdict"]) == ("held", "held"), (c2["parts"], c4["parts"])
    f2 = c2["figures"]
    for m, d in paper.items():
        if m in f2["rl_drift_heldout"]:
            lo, hi = f2["rl_drift_heldout_ci"][m]
            assert lo <= f2["rl_drift_heldout"][m] <= hi and abs(f2["rl_drift_heldout"][m] - d) < 0.01, m
    assert abs(f2["rl_drift_last5_vs_first5"]["rs-ce"]) < 0.01            # shown, not judged
    assert "held-out prompts" in c2["rule"] and "held-out prompts" in c4["rule"]
    assert "held-out" in claim_headline(c2) and "after RL" in claim_headline(c4)
    assert c4["figures"]["online_ce_minus_frozen_ce"] < 0 < c4["figures"]["e2e_tv_minus_online_ce"]
    reverse = _heldout(losses, {"to-ce": 0.0, "rs-ce": 0.0, "rs-e2e_tv": -0.06, "rs-online-ce": 0.0})
    claims = evaluate_claims(losses, sweep, {"heads": {}}, _paper_shaped()[2], heldout=reverse)
    assert (claims[1]["verdict"], claims[3]["verdict"]) == ("not held", "not held")


def test_claim_1_shows_the_per_token_slope_with_its_interval_over_samples():
    """``entropy.json``'s per-sample sums give the per-token slope a CI over policy samples (shown, not judged)."""
    rng = np.random.default_rng(1)
    h = [rng.uniform(0, 1, 20) for _ in range(30)]
    length = [3 - 1.5 * x + rng.normal(0, 0.2, x.size) for x in h]
    sums = {"rejection": {"sum_len": [float(y.sum()) for y in length],
                          "sum_h_len": [float((x * y).sum()) for x, y in zip(h, length, strict=True)]}}
    ps = {"n": [20.0] * 30, "sum_h": [float(x.sum()) for x in h], "sum_h2": [float((x * x).sum()) for x in h], **sums}
    ent = {"heads": {"ce": {"per_sample": ps, "rejection": {"fit": {"slope": -1.5}}, "target_only": {}}}}
    losses, sweep, rl = _paper_shaped()
    f = evaluate_claims(losses, sweep, ent, rl)[0]["figures"]
    lo, hi = f["slope_per_nat_tokens_ci"]["ce RS"]
    assert lo < -1.5 < hi and f["slope_per_nat_tokens_ci"]["ce TO"] is None


def test_claim_5_reports_rollout_share_amdahl_bound_and_a_labelled_gpu_projection():
    from bebop.core.speed import rl_step_speedup, speedup_limit

    losses, sweep, rl = _paper_shaped()
    f = evaluate_claims(losses, sweep, {"heads": {}}, rl)[4]["figures"]
    assert f["rollout_share_none"] == pytest.approx(0.5)
    s = f["median_speedup"]["rs-e2e_tv"]["rollout"]
    assert f["amdahl_step_bound"] == pytest.approx(rl_step_speedup(0.5, s))
    assert "gpu_projection" not in f
    costs = {"device": "H100", "dtype": "bfloat16", "inputs": {"gamma": 3, "rollout_share": None},
             "rows": [{"shape": "qwen3-8b", "batch": 8, "context": 1024, "c_1": 1.0, "c_verify": 1.2, "c_draft": 0.1},
                      {"shape": "qwen3-8b", "batch": 256, "context": 1024, "skipped": "needs 200 GiB"}]}
    c5 = evaluate_claims(losses, sweep, {"heads": {}}, rl, costs)[4]
    p = c5["figures"]["gpu_projection"]
    length = p["inputs"]["accept_length"]
    assert p["label"].startswith("projection") and len(p["rows"]) == 1
    assert p["rows"][0]["projected_rl_step_speedup"] == pytest.approx(
        rl_step_speedup(f["rollout_share_none"], speedup_limit(length, 1.0, 1.2, 0.1, 3)))
    assert "projected GPU step speedup (projection" in claim_headline(c5)


def test_demo_stages_use_the_default_recipes_without_a_wall_clock_cap():
    """The demo's SFT and head stages are the same step recipes as `bebop sft` and `bebop train-mtp`."""
    from bebop.experiments.demo import DemoConfig
    from bebop.training.sft import sft_recipe
    from bebop.training.train_mtp import TrainMTPConfig

    cfg, head = DemoConfig(), TrainMTPConfig()
    assert cfg.sft_minutes is None and cfg.sft_steps == sft_recipe(cfg.task).steps
    assert DemoConfig(task="agent").sft_steps == sft_recipe("agent").steps
    assert (cfg.init_loss, cfg.init_steps, cfg.init_lr) == (head.warm_loss, head.warm_steps, head.warm_lr)
    assert (cfg.head_lr, cfg.data_samples) == (head.lr, head.data_samples)
    # the fine-tuning budget is larger than train-mtp's fixed run, and every head stage stops early on held-out α
    assert cfg.head_steps >= head.steps and cfg.head_patience > 0 and cfg.head_eval_every < cfg.head_steps
    assert 0 < cfg.head_min_steps < cfg.head_steps // 2  # the budget ablation's half budget still watches


# ------------------------------------------------------------------------------------------------ stage configs


def _hand_built(cfg, policy, dirs, out):
    """The stage configs written out field by field: what :mod:`bebop.experiments.demo.config` derives by name."""
    from bebop.experiments.bench_rl import RLBenchConfig
    from bebop.rl.config import RLConfig
    from bebop.training.sft import SFTConfig
    from bebop.training.train_mtp import TrainMTPConfig

    sft = SFTConfig(task=cfg.task, out=str(policy), steps=cfg.sft_steps, max_minutes=cfg.sft_minutes,
                    eval_samples=cfg.sft_eval_samples, seed=cfg.seed, model=cfg.policy)
    common = dict(model=str(policy), task=cfg.task, gamma_train=cfg.gamma_train, temperature=cfg.temperature,
                  data_samples=cfg.data_samples, heldout_samples=cfg.heldout_samples,
                  max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, eval_every=cfg.head_eval_every,
                  patience=cfg.head_patience, min_delta=cfg.head_min_delta, min_steps=cfg.head_min_steps)
    init_dir = dirs[f"{cfg.init_loss} (warm start)"]
    heads = {"head_init": TrainMTPConfig(out=str(init_dir), loss=cfg.init_loss, steps=cfg.init_steps, lr=cfg.init_lr,
                                         warm_steps=0, **common)}
    for loss in cfg.loss_list():
        heads[f"head_{loss}"] = TrainMTPConfig(out=str(dirs[loss]), loss=loss, steps=cfg.head_steps, lr=cfg.head_lr,
                                               init=str(init_dir), **common)
    rl = RLBenchConfig(
        model=str(policy), mtp=str(dirs["e2e_tv"]), mtp_ce=str(dirs["ce"]), task=cfg.task, out=str(out),
        methods=cfg.rl_methods, steps=cfg.rl_steps, eval_samples=cfg.rl_eval_samples,
        rl=RLConfig(mtp_strategy="none", task=cfg.task, gamma=cfg.gamma, prompts_per_step=cfg.rl_prompts,
                    group_size=cfg.rl_group, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                    lr=cfg.rl_lr, rollout_batch=cfg.rl_rollout_batch, online_every=cfg.online_every,
                    online_steps=cfg.online_steps, checkpoint_every=cfg.rl_steps, eval_samples=cfg.rl_eval_samples,
                    steps=cfg.rl_steps, seed=cfg.seed))
    return sft, heads, rl


@pytest.mark.parametrize("quick", [False, True])
def test_stage_configs_derive_every_demo_field_by_name(tmp_path, quick):
    """Every demo setting reaches its stage: the derived configs equal the ones spelled out by hand, including
    non-default values (a changed demo field must change the stage config)."""
    from bebop.experiments.demo import DemoConfig
    from bebop.experiments.demo.config import head_configs, head_dirs, rl_config, sft_config

    overrides = dict(seed=7, temperature=0.8, max_new_tokens=40, sft_minutes=2.5, init_lr=4e-3, head_steps=9,
                     data_samples=99, rl_prompts=3, rl_group=5, rl_lr=1e-4, online_steps=6, extra_losses="tv",
                     head_eval_every=7, head_patience=3, head_min_delta=0.01, head_min_steps=5)
    cfg = quick_config(**overrides) if quick else DemoConfig(**overrides)
    policy, dirs = tmp_path / "policy", head_dirs(cfg, tmp_path / "heads")
    sft, heads, rl = _hand_built(cfg, policy, dirs, tmp_path / "rl")
    assert sft_config(cfg, policy) == sft
    derived = head_configs(cfg, policy, dirs)
    assert derived == heads
    assert {(h.eval_every, h.patience, h.min_delta, h.min_steps) for h in derived.values()} == {(7, 3, 0.01, 5)}
    assert rl_config(cfg, policy, dirs, tmp_path / "rl") == rl


def test_derive_prefers_fixed_then_alias_then_prefix_then_shared():
    from dataclasses import dataclass

    from bebop.errors import BebopError
    from bebop.experiments.demo import DemoConfig
    from bebop.experiments.demo.config import derive

    @dataclass
    class Stage:
        steps: int = 1        # from <prefix>steps
        seed: int = -1        # shared
        prompts: int = -1     # alias
        lr: float = -1.0      # fixed wins over rl_lr
        warmup: int = 123     # no demo field: keeps its default

    cfg = DemoConfig(seed=5, rl_steps=11, rl_prompts=4, rl_lr=3e-4)
    assert derive(Stage, cfg, "rl_", {"prompts": "rl_prompts"}, lr=0.5) == Stage(11, 5, 4, 0.5, 123)
    with pytest.raises(BebopError, match="no field 'nope'"):
        derive(Stage, cfg, "rl_", nope=1)


def test_report_renders_every_section_from_results_alone():
    """report.md is rendered from the stage outputs and the claims, no model: every section, every plot link,
    one verdict per claim, and ``–`` for a figure that was not measured."""
    from bebop.experiments.demo import DemoConfig
    from bebop.experiments.demo.report import Results, render_report

    losses = {"fkl (warm start)": {"alpha_rs": [0.8] * 3, "accept_length_rs": 3.0, "alpha_to": [0.7] * 3,
                                   "accept_length_to": 2.5},
              "ce": {"alpha_rs": [0.85] * 3, "accept_length_rs": 3.1, "alpha_to": [0.7] * 3, "accept_length_to": 2.6},
              "e2e_tv": {"alpha_rs": [0.9] * 3, "accept_length_rs": 3.4, "alpha_to": [0.7] * 3,
                         "accept_length_to": 2.6}}
    rl = _rl({"none": 2.0, "rs-e2e_tv": 1.2}, {"rs-e2e_tv": 3.5}, {"rs-e2e_tv": 0.0})
    for r in rl.values():
        r["reward_last5"] = 0.6
    heldout = {"rs-e2e_tv": {"head": "e2e_tv", "rule": "rejection", "tag": "rs", "accept_length": 3.3,
                             "entropy": 0.31, "before": {"accept_length": 3.4, "entropy": 0.3}}}
    res = Results(losses, _sweep({"ce": (-1.7, -1.7), "e2e_tv": (-0.06, -1.7)}), {"heads": {}}, rl, heldout=heldout)
    claims = evaluate_claims(res.losses, res.sweep, res.ent, res.rl, heldout=res.heldout)
    summary = {"claims": claims, "policy": {"dir": "p", "sft_steps": 10, "eval": None},
               "heads": {"ce": {"budget": 10, "kept_step": 9, "curve": [[9, 0.8]]}},
               "stages": {"sft": {"seconds": 1.0, "cached": False}}, "total_seconds": 2.0,
               "plots": {k: f"plots/{v}" for k, v in PLOTS.items()}}
    report = render_report(summary, res, DemoConfig())
    for title in ("## Claims", "## Head training", "## Accept length vs policy entropy",
                  "## RS vs TO over temperature", "## α per draft step per loss", "## RL"):
        assert title in report
    assert all(f"plots/{v}" in report for v in PLOTS.values())
    assert sum(report.count(f"**{v}**") for v in ("held", "not held", "inconclusive")) == 5
    assert "Verdict rules:" in report and "| # | figure | point | CI | test | part verdict |" in report
    assert "accuracy τ=1 –" in report
    assert "| rs-e2e_tv | e2e_tv, RS | 3.400 → 3.300 | -2.9% [–] | 0.300 → 0.310 |" in report
    assert "the policy's entropy runs from 0.100 (τ = 0.5) to 0.300 (τ = 1.5) nats/token" in report


def test_demo_arch_reaches_the_sft_stage(tmp_path):
    """`arch = "llama"` in the demo's TOML trains the demo policy in that family."""
    from bebop.experiments.demo import DemoConfig
    from bebop.experiments.demo.config import sft_config

    assert sft_config(DemoConfig(arch="llama"), tmp_path / "p").arch == "llama"
    assert sft_config(DemoConfig(), tmp_path / "p").arch == "qwen3"


# ------------------------------------------------------------------------------------------------ ablations, gpu_costs


def test_demo_settings_reject_bad_ablations_gpu_costs_and_early_stopping(tmp_path):
    from bebop.errors import BebopError
    from bebop.experiments.demo import ABLATIONS, DemoConfig

    assert DemoConfig().ablation_list() == []
    assert DemoConfig(ablations="all").ablation_list() == list(ABLATIONS)
    assert DemoConfig(ablations=" temperature,budget ").ablation_list() == ["budget", "temperature"]
    with pytest.raises(BebopError, match="unknown ablation 'depth'"):
        DemoConfig(ablations="budget,depth")
    with pytest.raises(BebopError, match="nope.json"):
        DemoConfig(gpu_costs=str(tmp_path / "nope.json"))
    (tmp_path / "costs.json").write_text("{}")
    assert DemoConfig(gpu_costs=str(tmp_path / "costs.json")).gpu_costs == str(tmp_path / "costs.json")
    with pytest.raises(BebopError, match="head_patience"):
        DemoConfig(head_patience=-1)
    with pytest.raises(BebopError, match="head_eval_every"):
        DemoConfig(head_eval_every=0)
    with pytest.raises(BebopError, match="head_min_steps"):
        DemoConfig(head_min_steps=-5)


def test_ablation_variants_change_one_head_setting_each(tmp_path):
    from bebop.experiments.demo import DemoConfig
    from bebop.experiments.demo.ablations import variant_config, variants
    from bebop.experiments.demo.config import head_configs, head_dirs

    cfg = DemoConfig(ablations="all", extra_losses="tv", head_steps=400)
    vs = {v.key: v for v in variants(cfg)}
    assert list(vs) == ["head_layers2", "gamma_train5", "head_steps200", "head_steps800", "data_tau0.7",
                        "data_tau1.3", "seed1", "seed2", "rl_steps48"]
    assert [v.key for v in variants(DemoConfig(ablations="layers", head_layers=2))] == ["head_layers1"]
    assert not vs["head_steps200"].own_init and vs["data_tau0.7"].own_init
    assert [v.key for v in variants(DemoConfig(ablations="gamma_train", gamma_train=5))] == ["gamma_train3"]
    main = head_configs(cfg, tmp_path / "p", head_dirs(cfg, tmp_path / "h"))
    for v in vs.values():
        vcfg = variant_config(cfg, v)
        assert vcfg.loss_list() == ["ce", "e2e_tv"] and vcfg.ablation_list() == []
        heads = head_configs(vcfg, tmp_path / "p", head_dirs(cfg, tmp_path / "h"))
        changed = {f for h in ("head_init", "head_ce") for f in vars(heads[h]) if
                   getattr(heads[h], f) != getattr(main[h], f)}
        assert changed == {"head_steps": {"steps"}, "gamma_train": {"gamma_train"}, "head_layers": {"head_layers"},
                           "temperature": {"temperature"}, "seed": {"seed"},
                           "rl_steps": set()}[next(iter(v.overrides))], (v.key, changed)   # rl: the main heads


def test_ablation_summary_pairs_variants_with_the_main_run_on_the_same_prompts():
    """A variant identical to the main run differs from it by exactly 0 (paired CI [0, 0]); one built with a larger
    e2e_tv − ce gap shows a positive change whose CI excludes 0."""
    from bebop.experiments.demo.ablations import Variant, ablation_summary

    main = _losses({"ce": [0.8] * 3, "e2e_tv": [0.82] * 3})
    better = _losses({"ce": [0.8] * 3, "e2e_tv": [0.9] * 3})
    runs = {"same": {"variant": Variant("same", "same", "budget", {"head_steps": 1}), "losses": main, "seconds": 1.0},
            "better": {"variant": Variant("better", "better", "temperature", {"temperature": 0.7}),
                       "losses": better, "seconds": 2.0}}
    abl = ablation_summary(main, runs)
    assert abl["main"]["e2e_tv_minus_ce_points"]["value"] == pytest.approx(2.0, abs=0.5)
    same = abl["variants"]["same"]["vs_main"]
    assert same["e2e_tv_minus_ce_points"] == {"value": 0.0, "ci": [0.0, 0.0]}
    assert same["e2e_tv_accept_length"]["ci"] == [0.0, 0.0]
    gain = abl["variants"]["better"]["vs_main"]["e2e_tv_minus_ce_points"]
    assert gain["value"] == pytest.approx(8.0, abs=0.5) and gain["ci"][0] > 5
    assert abl["variants"]["better"]["settings"] == {"temperature": 0.7}
    ci = abl["variants"]["better"]["e2e_tv"]["mean_alpha"]["ci"]
    assert ci[0] < 0.9 < ci[1]


def test_ablation_summary_gives_each_variants_rs_slope_over_tau_paired_with_the_main_runs():
    """A variant's sweep gives its RS accept-length slope per nat with a CI and its paired change against the main
    run's sweep: a variant with the main run's sweep differs by exactly 0, one whose e2e-TV RS slope is flat (main:
    −1.7) shows a change near +1.7 whose CI excludes 0."""
    from bebop.experiments.demo.ablations import Variant, ablation_summary

    main_losses = _losses({"ce": [0.8] * 3, "e2e_tv": [0.82] * 3})
    main_sweep = _sweep({"ce": (-1.7, -1.7), "e2e_tv": (-1.7, -1.7)})
    flat = _sweep({"ce": (-1.7, -1.7), "e2e_tv": (0.0, -1.7)})
    runs = {k: {"variant": Variant(k, k, "temperature", {"temperature": 0.7}), "losses": main_losses, "sweep": sw}
            for k, sw in (("same", main_sweep), ("flat", flat))}
    abl = ablation_summary(main_losses, runs, main_sweep)
    assert abl["main"]["e2e_tv_rs_slope"]["value"] == pytest.approx(-1.7, abs=0.3)
    assert abl["variants"]["same"]["e2e_tv_rs_slope_vs_main"] == {"value": 0.0, "ci": [0.0, 0.0]}
    change = abl["variants"]["flat"]["e2e_tv_rs_slope_vs_main"]
    assert change["value"] == pytest.approx(1.7, abs=0.3) and change["ci"][0] > 0.5
    flat_slope = abl["variants"]["flat"]["e2e_tv_rs_slope"]
    assert flat_slope["value"] == pytest.approx(0.0, abs=0.3) and flat_slope["ci"][0] < flat_slope["value"] < \
        flat_slope["ci"][1]
    assert "e2e_tv_rs_slope_vs_main" not in ablation_summary(main_losses, runs)["variants"]["flat"]


def test_report_shows_head_training_and_ablations():
    from bebop.experiments.demo import DemoConfig
    from bebop.experiments.demo.ablations import Variant, ablation_summary
    from bebop.experiments.demo.report import Results, render_report

    losses, sweep, rl = _paper_shaped()
    for v in losses.values():
        v["alpha_to"], v["accept_length_to"] = v["alpha_rs"], v["accept_length_rs"]
    runs = {"data_tau0.7": {"variant": Variant("data_tau0.7", "training data at τ = 0.7", "temperature",
                                               {"temperature": 0.7}), "losses": losses, "seconds": 12.0,
                            "heads": {"e2e_tv": {"kept_step": 50, "budget": 400}}}}
    heads = {"fkl (warm start)": {"budget": 800, "stopped_at": 300, "kept_step": 200, "heldout_alpha": [0.9] * 3,
                                  "curve": [[0, 0.5], [200, 0.9], [300, 0.9]]}}
    res = Results(losses, sweep, {"heads": {}}, rl, heads)
    summary = {"claims": evaluate_claims(losses, sweep, {"heads": {}}, rl), "heads": heads,
               "policy": {"dir": "p", "sft_steps": 10, "eval": None}, "stages": {}, "total_seconds": 2.0,
               "plots": {k: f"plots/{v}" for k, v in PLOTS.items()}, "ablations": ablation_summary(losses, runs)}
    report = render_report(summary, res, DemoConfig())
    assert "## Head training" in report and "| fkl (warm start) | 800 | 300 | 200 | 0.900 0.900 0.900 |" in report
    assert "## Ablations" in report and "| training data at τ = 0.7 |" in report
    assert "+0.00 [+0.00, +0.00]" in report and "50 / 400, – / –" in report and "took 12 s" in report
    assert "## Ablations" not in render_report({**summary, "ablations": None}, res, DemoConfig())


@pytest.mark.slow
def test_cli_quick_ablations_run_every_variant_then_reuse_them(demo_dir):
    """`--quick --ablations` after a quick run: the main stages are reused, every ablation stage runs once and is
    reused on a rerun, and report.md / summary.json carry the ablations."""
    from bebop.experiments.demo.ablations import variants

    r = cli("demo", "--quick", "--ablations", "--out", str(demo_dir))
    assert r.returncode == 0, r.stderr
    summary = json.loads((demo_dir / "summary.json").read_text())
    stages = summary["stages"]
    vs = variants(quick_config(ablations="all"))
    expected = {f"abl_{v.key}_{part}" for v in vs if v.ablation != "rl"
                for part in (("init",) if v.own_init else ()) + ("ce", "e2e_tv", "measure", "sweep")}
    expected |= {f"abl_{v.key}_{part}" for v in vs if v.ablation == "rl" for part in ("rl", "rl_heldout")}
    assert {k for k in stages if k.startswith("abl_")} == expected
    assert not any(stages[k]["cached"] for k in expected) and stages["head_e2e_tv"]["cached"]
    abl = summary["ablations"]
    assert set(abl["variants"]) == {v.key for v in vs}
    for key, v in abl["variants"].items():
        if key.startswith("rl_"):   # the main run's heads through 4 × the RL steps
            assert set(v["rl"]) == {"to-ce", "rs-ce", "rs-e2e_tv", "rs-online-ce"}
            assert all(r["drift"]["ci"] is not None and r["after_vs_main"]["ci"] is not None for r in v["rl"].values())
            continue
        assert v["vs_main"]["e2e_tv_minus_ce_points"]["ci"] is not None
        assert v["e2e_tv_rs_slope"]["value"] is not None and "e2e_tv_rs_slope_vs_main" in v
    assert json.loads((demo_dir / "ablations" / "rl_steps12" / "rl" / "bench_rl.json").read_text())["config"]["steps"] \
        == 12
    report = (demo_dir / "report.md").read_text()
    assert "## Ablations" in report and "## Head training" in report and "| RL for 12 steps | rs-e2e_tv |" in report
    assert set(summary["heads"]["e2e_tv"]) >= {"budget", "stopped_at", "kept_step", "curve"}

    r = cli("demo", "--quick", "--ablations", "--out", str(demo_dir))
    assert r.returncode == 0, r.stderr
    assert all(s["cached"] for s in json.loads((demo_dir / "summary.json").read_text())["stages"].values())


def test_a_redone_stage_redoes_the_stages_built_on_it(tmp_path):
    """Stages are reused while their keys match; deleting one stage's output redoes it and every stage that depends
    on it (its run mark changed), though no setting changed, and leaves an independent stage cached."""
    from rich.console import Console

    from bebop.experiments.demo.pipeline import _Stages

    calls: list[str] = []

    def run_all() -> None:
        st = _Stages(tmp_path, False, Console(quiet=True))
        for name, deps in (("a", []), ("b", ["a"]), ("c", [])):
            st.run(name, name, tmp_path / f"{name}.out", {"n": 1}, deps,
                   lambda name=name: (calls.append(name), (tmp_path / f"{name}.out").write_text(name)))

    run_all()
    run_all()
    assert calls == ["a", "b", "c"]
    (tmp_path / "a.out").unlink()
    run_all()
    assert calls == ["a", "b", "c", "a", "b"]
