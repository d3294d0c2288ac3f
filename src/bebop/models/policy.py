"""The policy: a stock transformers causal LM (a tiny `Qwen3ForCausalLM` for the toy world).

`load_policy` accepts any causal-LM directory with a tokenizer, e.g. a user's Qwen3 checkpoint.
Saving goes through a temporary directory and a rename, so a crash never leaves a half-written policy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, Qwen3Config, Qwen3ForCausalLM

from bebop.config import positive
from bebop.errors import BebopError
from bebop.io import atomic_dir
from bebop.models.device import resolve_device, resolve_dtype


@dataclass
class ModelConfig:
    """Shape of the toy policy. Default: 8 narrow layers, so that one MTP layer costs ~1/8 of the target
    (real MTP models: 1 MTP layer vs 40-60 backbone layers; DESIGN §8)."""

    num_layers: int = 8
    hidden_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_positions: int = 256

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size", "max_positions"):
            positive(name, getattr(self, name))
        if self.hidden_size % self.num_heads:
            raise BebopError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise BebopError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")


def build_policy(cfg: ModelConfig, tokenizer) -> Qwen3ForCausalLM:
    """A freshly initialised tiny Qwen3 policy whose vocabulary matches ``tokenizer``."""
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen3ForCausalLM(config)


def load_policy(path: str | Path, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto"):
    """Load ``(model, tokenizer)`` from a causal-LM directory onto ``device`` in ``dtype`` (``auto``: CUDA in
    bfloat16 when available, else the CPU in float32; see ``bebop.models.device``), in eval mode; clear errors
    for missing or corrupt files and for a device or dtype that cannot be used (checked before reading weights)."""
    path = Path(path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if not path.is_dir():
        raise BebopError(f"model directory not found: {path}")
    for required in ("config.json", "tokenizer.json"):
        if not (path / required).is_file():
            raise BebopError(f"model directory {path} has no {required}")
    try:
        json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BebopError(f"corrupt config.json in {path}: {e}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt)
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BebopError(f"cannot load model from {path}: {msg}") from None
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise BebopError(
            f"tokenizer in {path} has {len(tokenizer)} tokens but the model's vocab size is "
            f"{model.get_input_embeddings().num_embeddings}"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(dev).eval(), tokenizer


def save_policy(model: PreTrainedModel, tokenizer, out: str | Path) -> None:
    """``save_pretrained`` (safetensors) + tokenizer into ``out`` atomically: write a sibling temp dir,
    then swap it in with renames, so readers see either the old or the new checkpoint."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
