"""`bebop demo --quick`: every promised file is written, the claims have figures and verdicts, stages are cached,
and ``--model`` skips SFT. The quick numbers are meaningless; only the plumbing is checked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from matplotlib.image import imread

from bebop.experiments.demo import CLAIMS, PLOTS, evaluate_claims, quick_config, run_demo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FILES = ("report.md", "summary.json", "losses.json", "sweep.json", "entropy.json", "rl/bench_rl.json",
         "policy/sft_summary.json", "heads/fkl_init/train_mtp_summary.json", "heads/ce/train_mtp_summary.json",
         "heads/e2e_tv/train_mtp_summary.json")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "bebop.cli", *args], capture_output=True, text=True, timeout=300)


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
