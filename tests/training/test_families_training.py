"""Training across model families: `train-mtp --loss e2e_tv` from the checkpoint's native MTP layer (or a fresh,
warm-started head where the family has none) lowers the loss on each family, and `sft --arch` writes native-MTP
families the way their released checkpoints are stored."""

from __future__ import annotations

import json

import pytest
import torch

from bebop.core.losses import mtp_loss_from_hidden
from bebop.errors import BebopError
from bebop.models.checkpoint import load_head
from bebop.models.families import ARCHS, NATIVE_MTP_ARCHS, build_family_policy
from bebop.models.mtp import MTPHead
from bebop.models.native import native_keys, save_model_with_head
from bebop.models.policy import ModelConfig, load_policy, save_policy
from bebop.tasks import get_task
from bebop.training.samples import policy_samples
from bebop.training.sft import SFTConfig, task_corpus, train_sft
from bebop.training.train_mtp import TrainMTPConfig, pad_batch, teacher_forced, train_mtp

SHAPE = ModelConfig(num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)
GAMMA = 2


@pytest.fixture(scope="module")
def tok():
    from bebop.models.tokenizer import build_tokenizer

    return build_tokenizer(task_corpus(n_per_task=50))


def _model_dir(arch, tok, path):
    torch.manual_seed(0)
    model = build_family_policy(arch, SHAPE, tok).eval()
    with torch.no_grad():  # sharper logits than a random init, so p is far from uniform and there is room to learn
        model.get_input_embeddings().weight.mul_(8.0)
    if arch in NATIVE_MTP_ARCHS:
        save_model_with_head(model, tok, MTPHead.from_base(model).eval(), path)
    else:
        save_policy(model, tok, path)
    return path


def _fixed_loss(model, tokenizer, head, rows) -> float:
    ids, mask, pl = pad_batch(rows, tokenizer.pad_token_id, model.device)
    with torch.no_grad():
        hq, hp, y = teacher_forced(model, head, ids, mask, pl, GAMMA)
        w = model.get_output_embeddings().weight
        return float(mtp_loss_from_hidden("e2e_tv", hq, hp, w, 1.0, y, torch.ones(len(y))))


@pytest.mark.parametrize("arch", ARCHS)
def test_e2e_tv_from_the_native_head_lowers_the_loss(arch, tok, tmp_path):
    model_dir = _model_dir(arch, tok, tmp_path / "model")
    cfg = TrainMTPConfig(model=str(model_dir), out=str(tmp_path / "head"), loss="e2e_tv", gamma_train=GAMMA,
                         steps=30, batch_size=8, lr=3e-3, warmup=2, data_samples=32, heldout_samples=8,
                         max_new_tokens=12, eval_every=100, warm_steps=10, device="cpu", dtype="float32")
    summary = train_mtp(cfg)
    native = arch in NATIVE_MTP_ARCHS
    assert summary["init"] == ("native" if native else "fresh")
    assert [s["name"] for s in summary["stages"]] == (["main"] if native else ["warm", "main"])
    model, tokenizer = load_policy(model_dir, "cpu", "float32")
    start = load_head("native", model) if native else MTPHead.from_base(model)
    rows = policy_samples(model, tokenizer, get_task("arith"), 16, 1.0, 12, seed=77)
    before = _fixed_loss(model, tokenizer, start.eval(), rows)
    after = _fixed_loss(model, tokenizer, load_head(tmp_path / "head", model).eval(), rows)
    assert after < before, (arch, before, after)


def test_init_native_needs_native_weights(tok, tmp_path):
    model_dir = _model_dir("llama", tok, tmp_path / "model")
    cfg = TrainMTPConfig(model=str(model_dir), out=str(tmp_path / "head"), init="native", steps=1, data_samples=4,
                         heldout_samples=4, max_new_tokens=8, gamma_train=1, device="cpu")
    with pytest.raises(BebopError, match="has no native MTP weights"):
        train_mtp(cfg)
    assert not (tmp_path / "head" / "mtp.safetensors").exists()


@pytest.mark.parametrize("arch", ["qwen3_5", "deepseek_v3"])
def test_sft_arch_writes_the_native_layout(arch, tmp_path):
    out = tmp_path / arch
    cfg = SFTConfig(task="arith", out=str(out), steps=3, batch_size=4, eval_samples=0, arch=arch, model=SHAPE,
                    device="cpu", dtype="float32")
    summary = train_sft(cfg)
    assert summary["arch"] == arch
    index = json.loads((out / "model.safetensors.index.json").read_text())
    keys = native_keys(out)
    assert keys and set(keys) <= set(index["weight_map"])
    assert any(k.startswith("mtp.fc.") for k in keys) if arch == "qwen3_5" else \
        any(k.endswith(".eh_proj.weight") for k in keys)
    model, _ = load_policy(out, "cpu", "float32")
    assert load_head("native", model).num_layers == 1


def test_sft_native_mtp_loss_trains_the_head(tmp_path):
    """The native layer is trained alongside the policy: after SFT it predicts the token after next on the task
    better than the fresh head it started from."""
    import random

    from bebop.tasks import get_task
    from bebop.training.sft import native_mtp_loss, sft_batch

    out = tmp_path / "q"
    train_sft(SFTConfig(task="arith", out=str(out), steps=100, batch_size=16, lr=3e-3, eval_samples=0,
                        arch="qwen3_5", model=SHAPE, device="cpu", dtype="float32"))
    model, tokenizer = load_policy(out, "cpu", "float32")
    batch = sft_batch(get_task("arith"), tokenizer, random.Random(5), 16)
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
        trained = native_mtp_loss(model, load_head("native", model), hidden, batch)
        torch.manual_seed(0)
        fresh = native_mtp_loss(model, MTPHead.from_base(model), hidden, batch)
    assert trained < fresh - 0.5, (float(trained), float(fresh))


def test_sft_unknown_arch():
    with pytest.raises(BebopError, match="unknown model family .gpt2."):
        SFTConfig(arch="gpt2")


@pytest.mark.parametrize("arch", ARCHS)
def test_user_prompts_train_and_eval_mtp_on_every_family(arch, tok, tmp_path):
    """A user's JSONL prompts through the sample cache, `train-mtp` on them, then `eval-mtp`'s α from the
    checkpoint's native head (hybrid families included: everything is teacher-forced)."""
    from bebop.cli.evalmtp import EvalMTPConfig, run_eval_mtp
    from bebop.training.options import DataSource

    model_dir = _model_dir(arch, tok, tmp_path / "model")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Q: {i}+{i}\n"}) + "\n" for i in range(20)))
    summary = train_mtp(TrainMTPConfig(model=str(model_dir), out=str(tmp_path / "head"), prompts=str(prompts),
                                       gamma_train=GAMMA, steps=2, batch_size=4, data_samples=16, heldout_samples=8,
                                       max_new_tokens=10, warm_steps=2, cache_dir=str(tmp_path / "cache"),
                                       device="cpu", dtype="float32"))
    assert summary["data"] == {"source": "prompts", "label": str(prompts), "train_rows": 16, "heldout_rows": 8}
    res = run_eval_mtp(model_dir, tmp_path / "head", DataSource(prompts=str(prompts)),
                       EvalMTPConfig(gamma=GAMMA, samples=16, max_new_tokens=10, cache_dir=str(tmp_path / "cache"),
                                     device="cpu", dtype="float32"))
    for rule in ("rejection", "target_only"):
        assert len(res[rule]["alpha"]) == GAMMA and all(0 <= a <= 1 for a in res[rule]["alpha"])
    assert res["n_positions"] > 0
