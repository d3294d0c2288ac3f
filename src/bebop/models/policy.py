"""The policy: a stock transformers causal LM (a tiny `Qwen3ForCausalLM` by default in the toy world).

`load_policy` accepts any causal-LM directory with a tokenizer, e.g. a user's Qwen3 checkpoint.
Saving goes through a temporary directory and a rename, so a crash never leaves a half-written policy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from bebop.config import positive
from bebop.errors import BebopError
from bebop.io import atomic_dir
from bebop.models.device import resolve_device, resolve_dtype


@dataclass
class ModelConfig:
    """Shape of the toy policy. Default: 8 narrow layers, so that one MTP layer costs ~1/8 of the target
    (real MTP models: 1 MTP layer vs 40-60 backbone layers; DESIGN §8). ``max_positions`` is the context
    (``max_position_embeddings``): 256 fits every short-answer task; a task whose completions run longer declares
    the context it needs (``context``) and ``bebop sft`` widens the policy to it (:meth:`with_context`)."""

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

    def with_context(self, positions: int) -> ModelConfig:
        """This shape with a context of at least ``positions`` (a larger ``max_positions`` is kept)."""
        positive("context", positions)
        return self if positions <= self.max_positions else replace(self, max_positions=positions)


def build_policy(cfg: ModelConfig, tokenizer, arch: str = "qwen3") -> PreTrainedModel:
    """A freshly initialised tiny policy of family ``arch`` (``bebop.models.families.ARCHS``; the toy world's
    default is Qwen3) whose vocabulary and special token ids match ``tokenizer``."""
    from bebop.models.families import build_family_policy

    return build_family_policy(arch, cfg, tokenizer)


@contextmanager
def _mtp_keys_expected(config: dict) -> Iterator[None]:
    """While loading a DeepSeek-layout checkpoint, treat its appended MTP layers (``model.layers.{N}`` for
    N ≥ num_hidden_layers) as expected: transformers lists only the released depths (61, 46, 92) as MTP, so any
    other depth would be reported as unexpected weights. The MTP weights are read by ``bebop.models.native``."""
    from bebop.models.native import native_layout, num_native_layers

    if native_layout(config) != "deepseek_v3" or not num_native_layers(config):
        yield
        return
    from transformers import AutoConfig

    cls = AutoModelForCausalLM._model_mapping[type(AutoConfig.for_model(config["model_type"]))]
    n = int(config["num_hidden_layers"])
    extra = [rf"model\.layers\.{n + i}\." for i in range(num_native_layers(config))]
    before = cls._keys_to_ignore_on_load_unexpected
    cls._keys_to_ignore_on_load_unexpected = [*(before or []), *extra]
    try:
        yield
    finally:
        cls._keys_to_ignore_on_load_unexpected = before


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
        config = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BebopError(f"corrupt config.json in {path}: {e}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        with _mtp_keys_expected(config):
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
