"""Resumable head-training state without pickle: ``OUT/checkpoint/`` holds ``state.safetensors`` (the head's
parameters, AdamW's per-parameter tensors, the gradient scaler's scale and the batch generator's state) and
``state.json`` (format version, the stage and step to continue from, the run's config, the log records so far,
AdamW's hyper-parameters). The directory is replaced atomically (``io.atomic_dir``), so a crash during a write
leaves the previous checkpoint whole."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from bebop.errors import BebopError
from bebop.io import atomic_dir

FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoint"
# Config fields a resumed run may change: where it runs and how often it reports or saves.
RESUMABLE_CHANGES = frozenset({"out", "device", "eval_every", "checkpoint_every", "cache_dir"})


@dataclass
class TrainState:
    """Where a run stands: continue at ``stages[stage]``'s step ``step`` with these tensors."""

    stage: int
    step: int
    config: dict[str, Any]
    history: list[dict] = field(default_factory=list)
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    generator: torch.Tensor | None = None


def flatten_optimizer(sd: dict[str, Any], prefix: str = "optimizer.") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer ``state_dict`` as safetensors-ready tensors named ``{prefix}{param index}.{name}`` and a
    JSON-ready rest (``param_groups`` and the non-tensor per-parameter values)."""
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                        prefix: str = "optimizer.") -> dict[str, Any]:
    """The ``state_dict`` that :func:`flatten_optimizer` took apart (JSON turned the betas tuples into lists)."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            idx, name = key.removeprefix(prefix).split(".", 1)
            state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} if isinstance(g.get("betas"), list) else g
              for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_state(out: str | Path, st: TrainState) -> Path:
    """Write ``st`` to ``out/checkpoint`` atomically; returns the directory."""
    tensors = {f"head.{k}": v.detach().cpu().contiguous() for k, v in st.head.items()}
    meta: dict[str, Any] = {"format_version": FORMAT_VERSION, "stage": st.stage, "step": st.step,
                            "config": st.config, "history": st.history, "optimizer": None, "scaler": st.scaler}
    if st.optimizer is not None:
        opt_tensors, meta["optimizer"] = flatten_optimizer(st.optimizer)
        tensors.update(opt_tensors)
    if st.generator is not None:
        tensors["generator"] = st.generator.cpu()
    target = Path(out) / CHECKPOINT_DIR
    with atomic_dir(target) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    return target


def load_state(out: str | Path) -> TrainState | None:
    """The checkpoint in ``out/checkpoint``, or None when there is none."""
    d = Path(out) / CHECKPOINT_DIR
    if not (d / "state.json").exists():
        return None
    try:
        meta = json.loads((d / "state.json").read_text())
        tensors = load_file(str(d / "state.safetensors"))
    except (OSError, ValueError) as e:
        raise BebopError(f"cannot read the checkpoint in {d}: {e}; remove it to start over") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise BebopError(f"checkpoint {d} has format version {meta.get('format_version')!r}, this Bebop reads "
                         f"{FORMAT_VERSION}; remove it to start over")
    head = {k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")}
    opt = unflatten_optimizer(tensors, meta["optimizer"]) if meta["optimizer"] is not None else None
    return TrainState(meta["stage"], meta["step"], meta["config"], meta["history"], head, opt, meta["scaler"],
                      tensors.get("generator"))


def check_resumable(saved: dict[str, Any], now: dict[str, Any], where: str | Path) -> None:
    """Refuse to resume a checkpoint written with other settings (anything but :data:`RESUMABLE_CHANGES`)."""
    diff = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if diff:
        parts = ", ".join(f"{k}: {saved.get(k)!r} → {now.get(k)!r}" for k in diff)
        raise BebopError(f"the checkpoint in {Path(where) / CHECKPOINT_DIR} was written with other settings "
                         f"({parts}); rerun with the same settings to resume, or use another --out")
