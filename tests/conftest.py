"""Shared fixtures: a tiny policy built in seconds (no downloads), torch on one thread for stable CI."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from bebop.sft import task_corpus
    from bebop.tokenizer import build_tokenizer

    return build_tokenizer(task_corpus(n_per_task=100))


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    from bebop.model import ModelConfig, build_policy

    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)
    return build_policy(cfg, tiny_tokenizer).eval()
