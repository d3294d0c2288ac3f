"""Pre-RL MTP training: backbone bit-identical afterwards, head improves acceptance, files in every layout."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_policy

from bebop.errors import BebopError
from bebop.models.checkpoint import load_head
from bebop.models.policy import load_policy, save_policy
from bebop.training.train_mtp import TrainMTPConfig, train_mtp


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, tiny_tokenizer):
    model = build_tiny_policy(tiny_tokenizer, logit_scale=4.0)  # a peakier random policy
    d = tmp_path_factory.mktemp("policy") / "base"
    save_policy(model, tiny_tokenizer, d)
    return d


def test_train_mtp_keeps_backbone_and_improves_alpha(policy_dir, tmp_path):
    before = {k: v.clone() for k, v in load_policy(policy_dir)[0].state_dict().items()}
    cfg = TrainMTPConfig(model=str(policy_dir), out=str(tmp_path / "head"), loss="e2e_tv", gamma_train=3,
                         steps=40, batch_size=16, lr=3e-3, data_samples=64, heldout_samples=32,
                         max_new_tokens=16, eval_every=39, warm_steps=0)
    summary = train_mtp(cfg)
    after = load_policy(policy_dir)[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    log = [json.loads(line) for line in (tmp_path / "head" / "train_mtp.jsonl").read_text().splitlines()]
    assert log[-1]["heldout_alpha"][0] > log[0]["heldout_alpha"][0]
    assert len(summary["heldout_alpha"]) == 3
    model, _ = load_policy(policy_dir)
    for f in ("", "qwen3_5_mtp.safetensors", "deepseek_v3_mtp.safetensors"):
        load_head(tmp_path / "head" / f if f else tmp_path / "head", model)


def test_train_mtp_warm_starts_with_forward_kl_without_init(policy_dir, tmp_path):
    """Without ``init`` the default run trains the forward-KL warm stage first, then the chosen loss from it."""
    cfg = TrainMTPConfig(model=str(policy_dir), out=str(tmp_path / "head"), loss="e2e_tv", gamma_train=2,
                         steps=3, warm_steps=4, batch_size=4, data_samples=16, heldout_samples=8,
                         max_new_tokens=12, eval_every=1)
    summary = train_mtp(cfg)
    log = [json.loads(line) for line in (tmp_path / "head" / "train_mtp.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["loss_name"], r["step"]) for r in log] == (
        [("warm", "fkl", s) for s in range(4)] + [("main", "e2e_tv", s) for s in range(3)])
    stages = [(s["name"], s["loss"], s["steps"]) for s in summary["stages"]]
    assert stages == [("warm", "fkl", 4), ("main", "e2e_tv", 3)]


def test_train_mtp_with_init_skips_the_warm_stage(policy_dir, tmp_path):
    """A given starting head (e.g. a checkpoint's native head) replaces the warm stage."""
    small = {"gamma_train": 2, "batch_size": 4, "data_samples": 16, "heldout_samples": 8, "max_new_tokens": 12,
             "eval_every": 1}
    train_mtp(TrainMTPConfig(model=str(policy_dir), out=str(tmp_path / "init"), loss="fkl", steps=1, warm_steps=0,
                             **small))
    summary = train_mtp(TrainMTPConfig(model=str(policy_dir), out=str(tmp_path / "head"), steps=2,
                                       init=str(tmp_path / "init"), **small))
    log = [json.loads(line) for line in (tmp_path / "head" / "train_mtp.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in log} == {"main"}
    assert [s["name"] for s in summary["stages"]] == ["main"]


def test_head_layers_builds_a_fresh_head_of_that_depth_and_refuses_a_loaded_one_of_another(policy_dir, tmp_path):
    """``head_layers`` 2: the fresh head has 2 MTP layers, trains, saves in Bebop's and DeepSeek-V3's layouts (Qwen3.5's
    holds one layer) and fine-tunes from itself; a 1-layer start with ``head_layers`` 2 is one clear error."""
    small = {"gamma_train": 3, "batch_size": 4, "data_samples": 16, "heldout_samples": 8, "max_new_tokens": 12,
             "eval_every": 1, "steps": 2}
    two = tmp_path / "two"
    train_mtp(TrainMTPConfig(model=str(policy_dir), out=str(two), warm_steps=1, head_layers=2, **small))
    model, _ = load_policy(policy_dir)
    assert load_head(two, model).num_layers == 2
    assert load_head(two / "deepseek_v3_mtp.safetensors", model).num_layers == 2
    assert not (two / "qwen3_5_mtp.safetensors").exists()
    train_mtp(TrainMTPConfig(model=str(policy_dir), out=str(tmp_path / "again"), init=str(two), head_layers=2,
                             **small))
    one = tmp_path / "one"
    train_mtp(TrainMTPConfig(model=str(policy_dir), out=str(one), warm_steps=0, **small))
    with pytest.raises(BebopError, match=r"head_layers 2 does not match .* which has 1 MTP layer"):
        train_mtp(TrainMTPConfig(model=str(policy_dir), out=str(tmp_path / "bad"), init=str(one), head_layers=2,
                                 **small))
    assert not (tmp_path / "bad").exists()
    with pytest.raises(BebopError, match="head_layers"):
        TrainMTPConfig(head_layers=0)


def test_default_head_recipe_warm_starts():
    cfg = TrainMTPConfig()
    assert cfg.init is None
    assert [(s.name, s.loss) for s in cfg.stages()] == [("warm", "fkl"), ("main", "e2e_tv")]


@pytest.mark.parametrize(("kw", "needle"), [({"loss": "l2"}, "'l2'"), ({"gamma_train": 0}, "gamma_train"),
                                            ({"data_samples": 0}, "data_samples"), ({"warm_loss": "l1"}, "'l1'"),
                                            ({"warm_steps": -1}, "warm_steps")])
def test_bad_train_config(kw, needle):
    with pytest.raises(BebopError, match=needle):
        TrainMTPConfig(**kw)


def test_no_usable_data_is_a_clear_error(policy_dir, tmp_path):
    """Completions shorter than γ_train + 1 tokens leave nothing to train on: say so, write nothing."""
    cfg = TrainMTPConfig(model=str(policy_dir), out=str(tmp_path / "head"), gamma_train=3, steps=2, warm_steps=0,
                         data_samples=8, heldout_samples=8, max_new_tokens=2)
    with pytest.raises(BebopError, match=r"no usable training data.*gamma_train \+ 1 = 4"):
        train_mtp(cfg)
    assert not (tmp_path / "head").exists()
