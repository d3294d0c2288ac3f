"""`bebop demo --quick`: every promised file is written, the claims have figures and verdicts, stages are cached,
and ``--model`` skips SFT. The quick numbers are meaningless; only the plumbing is checked."""

from __future__ import annotations

import json

import pytest
from conftest import cli
from matplotlib.image import imread

from bebop.experiments.demo import CLAIMS, PLOTS, evaluate_claims, quick_config, run_demo

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
        assert isinstance(c["held"], bool)
        assert c["verdict"] == ("held" if c["held"] else "not held")
    report = (demo_dir / "report.md").read_text()
    assert report.count("**held**") + report.count("**not held**") == 5
    assert set(summary["stages"]) >= {"sft", "head_init", "head_ce", "head_e2e_tv", "losses", "sweep", "entropy", "rl"}


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


def _rl(step_s: dict, accept: dict, drift: dict) -> dict:
    def rows(m):
        return [{"step": i, "step_s": step_s[m], "rollout_s": step_s[m] / 2, "train_s": step_s[m] / 2,
                 "entropy": 0.2 + 0.01 * i, "accept_length": accept.get(m)} for i in range(6)]

    return {m: {"per_step": rows(m), "accept_length_last5": accept.get(m), "drift_last5_vs_first5": drift.get(m),
                "reward_first5": 0.5, "entropy_first5": 0.2, "entropy_last5": 0.2, "step_speedup": None,
                "rollout_speedup": None} for m in step_s}


def _sweep(slopes: dict) -> dict:
    temps = [0.5, 1.0, 1.5]
    ent = [0.1, 0.2, 0.3]
    heads: dict = {}
    for name, (rs, to) in slopes.items():
        heads[name] = {rule: {"accept_length": [3 + s * e for e in ent], "entropy": ent,
                              "fit": {"slope": s, "intercept": 3.0, "r": -1.0}}
                       for rule, s in (("rejection", rs), ("target_only", to))}
    return {"temperatures": temps, "heads": heads}


def test_claim_rules_follow_the_paper_numbers():
    """Numbers shaped like the paper's give five 'held'; a flat CE head and slow MTP give 'not held'."""
    losses = {"fkl (warm start)": {"alpha_rs": [0.8, 0.8, 0.8]}, "ce": {"alpha_rs": [0.85, 0.8, 0.8]},
              "e2e_tv": {"alpha_rs": [0.9, 0.85, 0.85]}}
    rl = _rl({"none": 2.0, "to-ce": 1.3, "rs-ce": 1.3, "rs-e2e_tv": 1.2, "rs-online-ce": 1.3},
             {"to-ce": 2.8, "rs-ce": 3.0, "rs-e2e_tv": 3.5, "rs-online-ce": 2.9},
             {"to-ce": -0.05, "rs-ce": -0.04, "rs-e2e_tv": 0.0, "rs-online-ce": -0.08})
    sweep = _sweep({"ce": (-1.7, -1.7), "e2e_tv": (-0.06, -1.7)})
    sweep["heads"]["ce"]["rejection"]["accept_length"] = [3.2, 3.1, 3.0]  # RS above TO at the highest τ
    sweep["heads"]["e2e_tv"]["rejection"]["accept_length"] = [3.3, 3.3, 3.3]
    claims = evaluate_claims(losses, sweep, {"heads": {}}, rl)
    assert [c["verdict"] for c in claims] == ["held"] * 5, [(c["id"], c["figures"]) for c in claims]

    slow = _rl({"none": 1.0, "rs-e2e_tv": 1.0}, {"rs-e2e_tv": 3.0}, {"rs-e2e_tv": 0.0})
    claims = evaluate_claims({"ce": {"alpha_rs": [0.9] * 3}, "e2e_tv": {"alpha_rs": [0.9] * 3}},
                             _sweep({"ce": (-0.1, -1.7), "e2e_tv": (-0.1, -1.7)}), {"heads": {}}, slow)
    assert [c["held"] for c in claims] == [False] * 5


def test_demo_stages_use_the_default_recipes_without_a_wall_clock_cap():
    """The demo's SFT and head stages are the same step recipes as `bebop sft` and `bebop train-mtp`."""
    from bebop.experiments.demo import DemoConfig
    from bebop.training.sft import sft_recipe
    from bebop.training.train_mtp import TrainMTPConfig

    cfg, head = DemoConfig(), TrainMTPConfig()
    assert cfg.sft_minutes is None and cfg.sft_steps == sft_recipe(cfg.task).steps
    assert DemoConfig(task="agent").sft_steps == sft_recipe("agent").steps
    assert (cfg.init_loss, cfg.init_steps, cfg.init_lr) == (head.warm_loss, head.warm_steps, head.warm_lr)
    assert (cfg.head_steps, cfg.head_lr, cfg.data_samples) == (head.steps, head.lr, head.data_samples)


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
                  max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
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
                     data_samples=99, rl_prompts=3, rl_group=5, rl_lr=1e-4, online_steps=6, extra_losses="tv")
    cfg = quick_config(**overrides) if quick else DemoConfig(**overrides)
    policy, dirs = tmp_path / "policy", head_dirs(cfg, tmp_path / "heads")
    sft, heads, rl = _hand_built(cfg, policy, dirs, tmp_path / "rl")
    assert sft_config(cfg, policy) == sft
    assert head_configs(cfg, policy, dirs) == heads
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
    res = Results(losses, _sweep({"ce": (-1.7, -1.7), "e2e_tv": (-0.06, -1.7)}), {"heads": {}}, rl)
    claims = evaluate_claims(res.losses, res.sweep, res.ent, res.rl)
    summary = {"claims": claims, "policy": {"dir": "p", "sft_steps": 10, "eval": None},
               "stages": {"sft": {"seconds": 1.0, "cached": False}}, "total_seconds": 2.0,
               "plots": {k: f"plots/{v}" for k, v in PLOTS.items()}}
    report = render_report(summary, res, DemoConfig())
    for title in ("## Claims", "## Accept length vs policy entropy", "## RS vs TO over temperature",
                  "## α per draft step per loss", "## RL"):
        assert title in report
    assert all(f"plots/{v}" in report for v in PLOTS.values())
    assert report.count("**held**") + report.count("**not held**") == 5
    assert "accuracy τ=1 –" in report


def test_demo_arch_reaches_the_sft_stage(tmp_path):
    """`arch = "llama"` in the demo's TOML trains the demo policy in that family."""
    from bebop.experiments.demo import DemoConfig
    from bebop.experiments.demo.config import sft_config

    assert sft_config(DemoConfig(arch="llama"), tmp_path / "p").arch == "llama"
    assert sft_config(DemoConfig(), tmp_path / "p").arch == "qwen3"
