"""Helpers shared by the native-MTP tests (test_native*.py): the tiny shape, a head moved off its warm start,
reading a written checkpoint straight from its shards as a reference would, and the fixtures ``tok`` and ``saved``
(each native family written once with a perturbed head as its MTP layer)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bebop.models.families import build_family_policy
from bebop.models.mtp import MTPHead
from bebop.models.native_write import save_model_with_head
from bebop.models.policy import ModelConfig
from bebop.models.tokenizer import build_tokenizer

SHAPE = ModelConfig(num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)
T = 8  # MTP slots compared (a multi-token causal sequence)


def perturbed_head(model) -> MTPHead:
    """A warm-started head moved off its warm start, so every tensor matters in the comparisons."""
    head = MTPHead.from_base(model)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return head.eval()


def shard_keys(out: Path) -> dict[str, set[str]]:
    """Shard file name -> the tensor names it holds."""
    keys = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as s:
            keys[f.name] = set(s.keys())
    return keys


def raw(out: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Checkpoint tensors under ``prefix`` read straight from the shards, prefix stripped (the reference's view)."""
    found = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as s:
            found.update({k[len(prefix) :]: s.get_tensor(k) for k in s.keys() if k.startswith(prefix)})
    return found


def with_extra_shard(src: Path, dst: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A copy of checkpoint ``src`` at ``dst`` with ``tensors`` added in one more indexed shard."""
    shutil.copytree(src, dst)
    save_file(tensors, str(dst / "extra.safetensors"), metadata={"format": "pt"})
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    index["weight_map"].update(dict.fromkeys(tensors, "extra.safetensors"))
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


_WRITTEN: dict[str, tuple] = {}  # one checkpoint per family per test process, shared by the test modules


@pytest.fixture(scope="session")
def tok():
    return build_tokenizer(["the cat sat on the mat , 1 + 2 = 3 ."])


@pytest.fixture(scope="session")
def saved(tmp_path_factory, tok):
    """arch -> (model, head, directory written by save_model_with_head), built once per family. Test modules
    import this fixture (``from native_helpers import saved, tok``)."""

    def get(arch):
        if arch not in _WRITTEN:
            torch.manual_seed(0)
            model = build_family_policy(arch, SHAPE, tok).eval()
            head = perturbed_head(model)
            out = tmp_path_factory.mktemp(arch) / "model"
            save_model_with_head(model, tok, head, out)
            _WRITTEN[arch] = (model, head, out)
        return _WRITTEN[arch]

    return get
