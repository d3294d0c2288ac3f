"""bf16 on the CPU: MTP-head training and SFT run under autocast with float32 master weights and finite losses,
and a head's teacher-forced acceptance is the same in float32 and bf16 to within a point."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import build_tiny_policy
from safetensors import safe_open

from bebop.core.sampling import SamplingParams
from bebop.models.checkpoint import load_head, save_head
from bebop.models.mtp import MTPHead
from bebop.models.policy import ModelConfig, load_policy, save_policy
from bebop.tasks import get_task
from bebop.training.samples import policy_samples, usable
from bebop.training.sft import SFTConfig, train_sft
from bebop.training.train_mtp import TrainMTPConfig, expected_alpha, train_mtp


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("bf16") / "base"
    save_policy(build_tiny_policy(tiny_tokenizer, logit_scale=4.0), tiny_tokenizer, d)
    return d


def _tensor_dtypes(path) -> set[torch.dtype]:
    with safe_open(str(path), framework="pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}


def test_train_mtp_under_bf16_has_finite_losses_and_float32_head(policy_dir, tmp_path):
    before = {k: v.clone() for k, v in load_policy(policy_dir)[0].state_dict().items()}
    cfg = TrainMTPConfig(model=str(policy_dir), out=str(tmp_path / "head"), loss="e2e_tv", gamma_train=3, steps=10,
                         batch_size=8, lr=3e-3, data_samples=32, heldout_samples=16, max_new_tokens=16,
                         eval_every=1, warm_steps=0, device="cpu", dtype="bfloat16")
    summary = train_mtp(cfg)
    log = [json.loads(line) for line in (tmp_path / "head" / "train_mtp.jsonl").read_text().splitlines()]
    assert len(log) == 10
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in log)
    assert all(0.0 < a <= 1.0 for r in log for a in r["heldout_alpha"])
    assert (summary["dtype"], summary["device"], summary["backend"]) == ("bfloat16", "cpu", "lean")
    assert _tensor_dtypes(tmp_path / "head" / "mtp.safetensors") == {torch.float32}   # master weights stay fp32
    after = load_policy(policy_dir)[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)                      # backbone untouched


def test_fp32_and_bf16_acceptance_of_the_same_head_agree_within_a_point(policy_dir, tmp_path):
    torch.manual_seed(0)
    fp32, tok = load_policy(policy_dir, "cpu", "float32")
    bf16, _ = load_policy(policy_dir, "cpu", "bfloat16")
    save_head(MTPHead.from_base(fp32), tmp_path / "head", fp32.config)
    head32 = load_head(tmp_path / "head", fp32).eval()
    head_master = load_head(tmp_path / "head", bf16).float().eval()   # fp32 weights over a bf16 backbone (training)
    head_bf16 = load_head(tmp_path / "head", bf16).eval()             # all bf16 (decoding)
    assert next(head_bf16.parameters()).dtype is torch.bfloat16
    data = usable(policy_samples(fp32, tok, get_task("arith"), 48, 1.0, 16, seed=3), 3)
    params = SamplingParams(temperature=1.0)
    ref = expected_alpha(fp32, head32, data, 3, params, tok.pad_token_id)
    for head in (head_master, head_bf16):
        got = expected_alpha(bf16, head, data, 3, params, tok.pad_token_id)
        assert max(abs(a - b) for a, b in zip(ref, got, strict=True)) < 0.01, (ref, got)


def test_sft_under_bf16_autocast_keeps_float32_weights(tmp_path, tiny_tokenizer):
    shape = ModelConfig(num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        cfg = SFTConfig(out=str(tmp_path / dtype), steps=4, batch_size=8, eval_samples=0, log_every=1, model=shape,
                        device="cpu", dtype=dtype)
        summary = train_sft(cfg)
        assert summary["dtype"] == dtype
        runs[dtype] = [json.loads(x)["loss"] for x in (tmp_path / f"{dtype}.sft.jsonl").read_text().splitlines()]
        assert _tensor_dtypes(tmp_path / dtype / "model.safetensors") == {torch.float32}
    assert all(math.isfinite(x) for x in runs["bfloat16"])
    assert abs(runs["bfloat16"][0] - runs["float32"][0]) < 0.02 * runs["float32"][0]   # same data, same init
