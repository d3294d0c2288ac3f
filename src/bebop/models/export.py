"""`bebop export`: a model directory with a (fine-tuned) MTP head merged in as the model's own MTP layer.

The output is the checkpoint itself with the head as its MTP layer — its shards copied byte for byte (so a
multimodal Qwen3.5 keeps its vision tower, model type and float32 tensors), the head in the family's native keys
in new shards of at most ``max_shard_size``, the index, the config key for the number of MTP layers, config and
tokenizer — so vLLM and SGLang load the head as the model's native MTP module (``bebop.models.serving`` prints
their launch flags).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from bebop.errors import BebopError
from bebop.models.checkpoint import load_head
from bebop.models.native import copy_checkpoint_with_head, native_layout
from bebop.models.policy import load_policy

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Exported:
    """What ``export_model`` wrote: the directory, the family's MTP layout, MTP layers, and the weights' dtype."""

    out: Path
    layout: str
    num_layers: int
    dtype: str


def checkpoint_dtype(config: dict) -> torch.dtype:
    """The dtype the checkpoint stores its weights in (``dtype`` / ``torch_dtype`` of config.json; float32 when
    absent), so an export keeps the size and precision of the checkpoint it came from."""
    cfg = config.get("text_config", config) if "dtype" not in config and "torch_dtype" not in config else config
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    if name not in _DTYPES:
        raise BebopError(f"config.json has dtype {name!r}; expected one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def export_model(model_dir: str | Path, head: str | Path, out: str | Path, max_shard_size: str = "5GB") -> Exported:
    """Merge ``head`` (a head directory or file, or ``"native"``) into a copy of the checkpoint in ``model_dir``,
    written atomically to ``out``. Refuses a family without a native MTP layout (vLLM and SGLang have no MTP
    module for it) and an ``out`` that exists and is not empty, so nothing is overwritten."""
    model_dir, out = Path(model_dir), Path(out)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise BebopError(f"no config.json in model directory {model_dir}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BebopError(f"corrupt config.json in {model_dir}: {e}") from None
    layout = native_layout(config)
    if layout is None:
        raise BebopError(
            f"model type {config.get('model_type')!r} has no native MTP layout that vLLM or SGLang load "
            "(Qwen3.5, Qwen3-Next, DeepSeek-V3, GLM-4.5, Kimi and MiMo have one)"
        )
    if out.resolve() == model_dir.resolve():
        raise BebopError(f"--out {out} is the model directory itself; export writes a new directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BebopError(f"--out {out} already exists and is not empty; choose a new directory")
    dtype = checkpoint_dtype(config)
    # float16 does not compute on CPU, but export only copies: load float16 weights as float32, cast back
    model, _ = load_policy(model_dir, "cpu", torch.float32 if dtype == torch.float16 else dtype)
    mtp = load_head(head, model).eval()
    model, mtp = model.to(dtype), mtp.to(dtype)
    copy_checkpoint_with_head(model_dir, model, mtp, out, max_shard_size=max_shard_size)
    return Exported(out, layout, mtp.num_layers, str(dtype).removeprefix("torch."))
