"""Writing a head as a model's own MTP layer: the head's tensors in the family's native layout, added to a model
directory as extra shards in ``model.safetensors.index.json`` with the family's config key, written atomically.

Two writers: :func:`save_model_with_head` saves an in-memory model (the toy world's SFT policy) with its head, and
:func:`copy_checkpoint_with_head` copies a checkpoint directory byte for byte — every weight the model holds
besides the MTP layer (a vision tower, float32 ``A_log`` in a bfloat16 checkpoint), its config and tokenizer —
and swaps its MTP layer for the head (``bebop export``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import PreTrainedModel

from bebop.errors import BebopError
from bebop.io import atomic_dir
from bebop.models.checkpoint import _few
from bebop.models.mtp import MTPHead, _text_config
from bebop.models.native_convert import convert, layers_prefix
from bebop.models.native_layouts import (
    COUNT_KEYS,
    LAYOUT_OF_TYPE,
    MTP_LOOKING,
    PARTS,
    native_layout,
    part_key,
    swap_halves,
)
from bebop.models.native_shards import INDEX_NAME, native_keys, read_json, weight_map

# files that hold or index weights in some format: never copied as plain files (safetensors shards are copied one
# by one and indexed anew)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".index.json")


def native_tensors(model: PreTrainedModel, head: MTPHead, layout: str) -> dict[str, torch.Tensor]:
    """``head``'s tensors in ``layout`` as a checkpoint of ``model`` stores them (block in checkpoint format,
    DeepSeek's shared embedding / LM-head copies included), on the CPU in the model's dtype."""
    base = _text_config(model.config)
    n_base = int(base.num_hidden_layers)
    vocab, hidden = model.get_input_embeddings().weight.shape
    if (head.hidden_size, head.vocab_size) != (hidden, vocab):
        raise BebopError(
            f"MTP head has hidden size {head.hidden_size} and vocab size {head.vocab_size} but the model has "
            f"hidden size {hidden} and vocab size {vocab}"
        )
    if layout == "qwen3_5" and head.num_layers != 1:
        raise BebopError(
            f"the Qwen3.5 MTP layout holds exactly one MTP layer (one fc/norm set) but the head has "
            f"{head.num_layers} layers"
        )
    prefix = layers_prefix(model)
    out: dict[str, torch.Tensor] = {}
    blocks: dict[str, torch.Tensor] = {}
    for name, t in head.state_dict().items():
        i, rest = name.split(".", 2)[1:]
        i = int(i)
        if rest.startswith("mtp_block."):
            blocks[f"{prefix}{n_base + i}.{rest.removeprefix('mtp_block.')}"] = t
            continue
        part = rest.removesuffix(".weight")
        t = swap_halves(t) if layout == "mimo" and part == "eh_proj" else t
        out[part_key(layout, i, n_base + i, PARTS[layout][part] + ".weight")] = t
    for key, t in convert(model, blocks, to_checkpoint=True).items():
        n, rest = key.removeprefix(prefix).split(".", 1)
        out[part_key(layout, int(n) - n_base, int(n), rest, block=True)] = t
    if layout == "deepseek_v3":
        for i in range(head.num_layers):
            out[part_key(layout, i, n_base + i, "embed_tokens.weight")] = model.get_input_embeddings().weight
            out[part_key(layout, i, n_base + i, "shared_head.head.weight")] = model.get_output_embeddings().weight
    dtype = model.get_input_embeddings().weight.dtype
    return {k: v.detach().to("cpu", dtype).contiguous().clone() for k, v in out.items()}


def _header(file: Path) -> dict:
    """A safetensors file's header (8-byte length, then JSON: dtype, shape and data_offsets per tensor)."""
    with open(file, "rb") as f:
        return json.loads(f.read(int.from_bytes(f.read(8), "little")))


def _totals(files: list[Path]) -> tuple[int, int]:
    """(bytes of tensor data, number of parameters) in safetensors ``files``, from their headers."""
    size = params = 0
    for file in files:
        for k, v in _header(file).items():
            if k != "__metadata__":
                size += v["data_offsets"][1] - v["data_offsets"][0]
                params += int(torch.Size(v["shape"]).numel())
    return size, params


def _groups(tensors: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    """``tensors`` in name order, cut into shards of at most ``max_bytes`` (a larger tensor gets its own)."""
    groups: list[dict[str, torch.Tensor]] = []
    size = 0
    for k in sorted(tensors):
        n = tensors[k].numel() * tensors[k].element_size()
        if not groups or (max_bytes is not None and size + n > max_bytes):
            groups.append({})
            size = 0
        groups[-1][k] = tensors[k]
        size += n
    return groups


def add_shards(out: Path, tensors: dict[str, torch.Tensor], max_shard_size: str | int | None = None) -> None:
    """Add ``tensors`` to a saved model directory as more shards (of at most ``max_shard_size``; one without it),
    renumbering the shards and rewriting ``model.safetensors.index.json`` (a single ``model.safetensors`` becomes
    shard 1)."""
    from safetensors.torch import save_file
    from transformers.utils.hub import convert_file_size_to_int

    index_path = out / INDEX_NAME
    index = read_json(index_path, "safetensors index") if index_path.is_file() else {"metadata": {}}
    wmap = weight_map(out)
    clash = sorted(set(wmap) & set(tensors))
    if clash:
        raise BebopError(f"the model's own weights already use the MTP names {_few(clash)}")
    groups = _groups(tensors, None if max_shard_size is None else convert_file_size_to_int(max_shard_size))
    shards = sorted(set(wmap.values()))
    total = len(shards) + len(groups)
    names = {old: f"model-{j + 1:05d}-of-{total:05d}.safetensors" for j, old in enumerate(shards)}
    for old, new in names.items():
        (out / old).rename(out / f".{new}.renamed")
    for new in names.values():
        (out / f".{new}.renamed").rename(out / new)
    moved = {k: names[f] for k, f in wmap.items()}
    for j, group in enumerate(groups, start=len(shards) + 1):
        shard = f"model-{j:05d}-of-{total:05d}.safetensors"
        save_file(group, str(out / shard), metadata={"format": "pt"})
        moved |= dict.fromkeys(group, shard)
    index["weight_map"] = dict(sorted(moved.items()))
    meta = index.setdefault("metadata", {})
    size, params = _totals([out / f for f in sorted(set(moved.values()))])
    meta["total_size"] = size
    if "total_parameters" in meta:
        meta["total_parameters"] = params
    index_path.write_text(json.dumps(index, indent=2) + "\n")


def set_count(config_path: Path, layout: str, num_layers: int) -> None:
    """Write the family's own config key for the number of MTP layers (in ``text_config`` for wrappers)."""
    config = read_json(config_path, "model config")
    target = config
    text = config.get("text_config")
    if isinstance(text, dict) and LAYOUT_OF_TYPE.get(text.get("model_type", "")) == layout:
        target = text
    for key in COUNT_KEYS[layout]:
        if key in target or key == COUNT_KEYS[layout][0]:
            target[key] = num_layers
    if layout == "qwen3_5":  # a Bebop head reads the model's own embedding
        target["mtp_use_dedicated_embeddings"] = False
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_with_layout(model, tokenizer, head: MTPHead | None, out_dir: str | Path, layout: str, max_shard_size) -> None:
    """:func:`save_model_with_head` with the layout given (a test writes a Qwen2 model in MiMo's layout)."""
    tensors = native_tensors(model, head, layout) if head is not None else {}
    state = model.state_dict()
    own_mtp = [k for k in state if MTP_LOOKING.search(k)]  # e.g. a remote-code MiMo's own mtp_layers
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(
            tmp,
            max_shard_size=max_shard_size,
            state_dict={k: v for k, v in state.items() if k not in own_mtp} if own_mtp else None,
        )
        tokenizer.save_pretrained(tmp)
        if tensors:
            add_shards(tmp, tensors)
        set_count(tmp / "config.json", layout, head.num_layers if head is not None else 0)


def _layout_or_refuse(model: PreTrainedModel) -> str:
    layout = native_layout(model.config)
    if layout is None:
        kind = getattr(_text_config(model.config), "model_type", type(model).__name__)
        raise BebopError(
            f"model type {kind!r} has no native MTP layout (known: {', '.join(sorted(LAYOUT_OF_TYPE))}); "
            "save its head in Bebop's own format next to the model instead"
        )
    return layout


def save_model_with_head(
    model: PreTrainedModel,
    tokenizer,
    head: MTPHead | None,
    out_dir: str | Path,
    max_shard_size: str | int = "200KB",
) -> None:
    """Write a complete model directory atomically: sharded safetensors with ``model.safetensors.index.json``,
    config and tokenizer, and — when ``head`` is given — the head merged in the family's native MTP layout
    (added to the shards and to the index's weight_map) with the family's config key for the number of MTP
    layers (0 without a head). Families without a native layout (Qwen3, Llama, ...) raise a BebopError: their
    heads stay in Bebop's own head file (``checkpoint.save_head``).
    """
    save_with_layout(model, tokenizer, head, out_dir, _layout_or_refuse(model), max_shard_size)


def _copy_shard(src: Path, dst: Path, keep: list[str], whole: bool) -> None:
    """``src`` to ``dst``: byte for byte when ``whole``, else only the tensors ``keep`` (metadata kept)."""
    if whole:
        shutil.copy2(src, dst)
        return
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt", device="cpu") as f:
        save_file({k: f.get_tensor(k) for k in keep}, str(dst), metadata=f.metadata() or {"format": "pt"})


def copy_checkpoint_with_head(
    model_dir: str | Path,
    model: PreTrainedModel,
    head: MTPHead,
    out_dir: str | Path,
    max_shard_size: str | int = "5GB",
) -> None:
    """Copy the checkpoint in ``model_dir`` (which ``model`` was loaded from) to ``out_dir`` atomically with
    ``head`` as its MTP layer: every file but the weights copied as it is (config, tokenizer, processor and
    generation configs, chat template), every safetensors shard copied byte for byte without the checkpoint's own
    MTP tensors, the head's tensors added in the family's native layout in shards of at most ``max_shard_size``,
    the index rewritten and the family's config key set. What ``model`` does not hold (the vision tower of a
    multimodal ``qwen3_5`` checkpoint) and the checkpoint's own dtypes survive, which a ``save_pretrained`` of
    the loaded causal LM would lose."""
    model_dir = Path(model_dir)
    layout = native_layout(read_json(model_dir / "config.json", "model config")) or _layout_or_refuse(model)
    tensors = native_tensors(model, head, layout)
    old_mtp = native_keys(model_dir)
    wmap = weight_map(model_dir)
    by_shard: dict[str, list[str]] = {}
    for k, shard in sorted(wmap.items()):
        by_shard.setdefault(shard, []).append(k)
    with atomic_dir(out_dir) as tmp:
        for f in sorted(model_dir.iterdir()):
            if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(f, tmp / f.name)
        kept: dict[str, str] = {}
        for shard, names in sorted(by_shard.items()):
            keep = [k for k in names if k not in old_mtp]
            if keep:
                _copy_shard(model_dir / shard, tmp / shard, keep, whole=len(keep) == len(names))
                kept |= dict.fromkeys(keep, shard)
        if (model_dir / INDEX_NAME).is_file():  # else a single model.safetensors, which add_shards indexes
            meta = read_json(model_dir / INDEX_NAME, "safetensors index").get("metadata") or {}
            (tmp / INDEX_NAME).write_text(json.dumps({"metadata": meta, "weight_map": kept}, indent=2) + "\n")
        add_shards(tmp, tensors, max_shard_size)
        set_count(tmp / "config.json", layout, head.num_layers)
