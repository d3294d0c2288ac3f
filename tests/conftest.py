"""Shared fixtures: a tiny policy built in seconds (no downloads), torch on one thread for stable CI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from bebop.models.tokenizer import build_tokenizer
    from bebop.training.sft import task_corpus

    return build_tokenizer(task_corpus(n_per_task=100))


def build_tiny_policy(tokenizer, seed: int = 0, logit_scale: float = 1.0):
    """A 2-layer, 32-wide random Qwen3 policy; ``logit_scale`` > 1 sharpens its (tied) logits."""
    from bebop.models.policy import ModelConfig, build_policy

    torch.manual_seed(seed)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)
    model = build_policy(cfg, tokenizer).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(logit_scale)
    return model


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    return build_tiny_policy(tiny_tokenizer)


@pytest.fixture(scope="module")
def peaky(tiny_tokenizer):
    """A tiny random policy with sharpened logits (so short sequences have few likely outcomes) + its head."""
    from bebop.models.mtp import MTPHead

    model = build_tiny_policy(tiny_tokenizer, seed=1, logit_scale=6.0)
    head = MTPHead.from_base(model).eval()
    return model, head


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_tokenizer):
    """A tiny saved policy (``base``) and head (``head``) for CLI runs."""
    from bebop.models.checkpoint import save_head
    from bebop.models.mtp import MTPHead
    from bebop.models.policy import save_policy

    model = build_tiny_policy(tiny_tokenizer)
    root = tmp_path_factory.mktemp("bench")
    save_policy(model, tiny_tokenizer, root / "base")
    save_head(MTPHead.from_base(model), root / "head", model.config)
    return root


def cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m bebop.cli ARGS`` in a subprocess, output captured."""
    return subprocess.run([sys.executable, "-m", "bebop.cli", *args], capture_output=True, text=True, timeout=300)
