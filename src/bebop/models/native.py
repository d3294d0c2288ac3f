"""Native MTP weights inside a model checkpoint directory: find them, import them as a Bebop head, and write a
complete model directory with a head merged in the family's own layout, as the released checkpoints store it.

Layouts (names verified against the serving engines' loaders and the released checkpoints; see checkpoint.py):

* ``qwen3_5`` — Qwen3.5, Qwen3.5-MoE, Qwen3-Next: ``mtp.fc``, ``mtp.pre_fc_norm_embedding``,
  ``mtp.pre_fc_norm_hidden``, ``mtp.layers.0.<block>``, ``mtp.norm``; config key ``mtp_num_hidden_layers``.
  transformers ignores these keys on load (``_keys_to_ignore_on_load_unexpected = ["^mtp.*"]``).
* ``deepseek_v3`` — DeepSeek-V3, Kimi-K2.5, GLM-4.5: ``model.layers.{N+i}.`` with ``enorm``, ``hnorm``,
  ``eh_proj``, ``shared_head.norm``, the shared ``embed_tokens`` / ``shared_head.head`` copies and the block's
  own names directly under the layer; config key ``num_nextn_predict_layers``.
* ``mimo`` — Xiaomi MiMo (a Qwen2 model, ``model_type: mimo``): ``model.mtp_layers.{i}.`` with
  ``token_layernorm``, ``hidden_layernorm``, ``input_proj``, ``final_layernorm`` and the block's own names;
  config key ``num_nextn_predict_layers``. MiMo's ``input_proj`` reads ``cat([hidden, embedding])`` (hidden
  FIRST; vLLM ``mimo_mtp.py`` and MiMo's ``modeling_mimo.py``), so its two column halves are swapped on the
  way into Bebop's embedding-first ``eh_proj`` and back.

The block tensors are stored in the checkpoint's format, which for MoE families differs from transformers'
in-memory format (one ``experts.{j}.gate_proj`` / ``up_proj`` / ``down_proj`` per expert on disk, fused
``experts.gate_up_proj`` / ``down_proj`` in memory). Both directions go through the base model's own transformers
weight conversions, the same ones ``save_pretrained`` / ``from_pretrained`` apply to the model's own layers.
"""

from __future__ import annotations

import json
import re
from copy import deepcopy
from pathlib import Path

import torch
from transformers import PretrainedConfig, PreTrainedModel

from bebop.errors import BebopError
from bebop.io import atomic_dir
from bebop.models.checkpoint import _few, build_head, check_sizes
from bebop.models.mtp import MTPHead, _text_config

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_LAYOUT_OF_TYPE = {
    "qwen3_5": "qwen3_5",
    "qwen3_5_text": "qwen3_5",
    "qwen3_5_moe": "qwen3_5",
    "qwen3_5_moe_text": "qwen3_5",
    "qwen3_next": "qwen3_5",
    "deepseek_v3": "deepseek_v3",
    "kimi_k25": "deepseek_v3",
    "glm4_moe": "deepseek_v3",
    "mimo": "mimo",
}
# the config key for the number of MTP layers, as each layout's released checkpoints spell it (first = written)
_COUNT_KEYS = {
    "qwen3_5": ("mtp_num_hidden_layers", "num_nextn_predict_layers"),
    "deepseek_v3": ("num_nextn_predict_layers", "num_mtp_layers"),
    "mimo": ("num_nextn_predict_layers",),
}
# Bebop part -> layout name of that part (per MTP layer; the block's own names follow under the layer prefix)
_PARTS = {
    "qwen3_5": {"enorm": "pre_fc_norm_embedding", "hnorm": "pre_fc_norm_hidden", "eh_proj": "fc", "post_norm": "norm"},
    "deepseek_v3": {"enorm": "enorm", "hnorm": "hnorm", "eh_proj": "eh_proj", "post_norm": "shared_head.norm"},
    "mimo": {
        "enorm": "token_layernorm",
        "hnorm": "hidden_layernorm",
        "eh_proj": "input_proj",
        "post_norm": "final_layernorm",
    },
}
_DEEPSEEK_SHARED = {"embed_tokens.weight": "embed", "shared_head.head.weight": "lm_head"}
_LAYER_PREFIXES = ("model.", "model.language_model.", "language_model.model.")
_MTP_LOOKING = re.compile(r"mtp|nextn", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------- config side
def _configs(config: PretrainedConfig | dict) -> list:
    """The top-level config and its text config (multimodal wrappers keep the LM's keys in ``text_config``)."""
    if isinstance(config, dict):
        text = config.get("text_config")
        return [config] + ([text] if isinstance(text, dict) else [])
    text = _text_config(config)
    return [config] + ([text] if text is not config else [])


def _get(cfg, key: str):
    return cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)


def native_layout(config: PretrainedConfig | dict) -> str | None:
    """The native MTP layout of ``config``'s family: ``"qwen3_5"``, ``"deepseek_v3"``, ``"mimo"``, or None for
    families without native MTP weights (Qwen3, Llama, ...). ``config`` may also be a parsed config.json."""
    for cfg in _configs(config):
        layout = _LAYOUT_OF_TYPE.get(_get(cfg, "model_type") or "")
        if layout is not None:
            return layout
    return None


def num_native_layers(config: PretrainedConfig | dict) -> int:
    """The number of MTP layers ``config`` declares under its family's own key (0 when it has none)."""
    layout = native_layout(config)
    if layout is None:
        return 0
    for key in _COUNT_KEYS[layout]:
        for cfg in _configs(config):
            value = _get(cfg, key)
            if value is not None:
                return int(value)
    return 0


# ---------------------------------------------------------------------------------------------- checkpoint side
def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BebopError(f"cannot read {what} {path}: {e}") from None


def _weight_map(model_dir: Path) -> dict[str, str]:
    """Every tensor name -> shard file, from the index or from the single file's header (no tensor is read)."""
    index = model_dir / INDEX_NAME
    if index.is_file():
        weight_map = _read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise BebopError(f"safetensors index {index} has no weight_map")
        return dict(weight_map)
    single = model_dir / SINGLE_NAME
    if not single.is_file():
        raise BebopError(f"no {INDEX_NAME} or {SINGLE_NAME} in model directory {model_dir}")
    from safetensors import safe_open

    try:
        with safe_open(str(single), framework="pt", device="cpu") as f:
            return {k: SINGLE_NAME for k in f.keys()}
    except Exception as e:  # safetensors raises its own (Rust) error types for bad headers
        raise BebopError(f"cannot read {single}: corrupt or truncated safetensors ({e})") from None


def _base_layers(model_dir: Path) -> int:
    config = model_dir / "config.json"
    if not config.is_file():
        raise BebopError(f"model directory {model_dir} has no config.json")
    for cfg in _configs(_read_json(config, "model config")):
        if isinstance(cfg.get("num_hidden_layers"), int):
            return cfg["num_hidden_layers"]
    raise BebopError(f"{config} has no num_hidden_layers")


def _is_appended_layer(key: str, n_base: int) -> bool:
    m = re.match(r"(.*?)layers\.(\d+)\.", key)
    return m is not None and m.group(1) in _LAYER_PREFIXES and int(m.group(2)) >= n_base


def native_keys(model_dir: str | Path) -> dict[str, str]:
    """The checkpoint's MTP tensor names -> shard file, read from ``model.safetensors.index.json`` (or the single
    ``model.safetensors`` header) without loading any tensor: ``mtp.*``, ``model.mtp_layers.*``, decoder layers
    numbered from ``num_hidden_layers`` on, and any other name that looks like MTP (``mtp``/``nextn``)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise BebopError(f"model directory not found: {model_dir}")
    n_base = _base_layers(model_dir)
    return {
        k: f for k, f in _weight_map(model_dir).items() if _is_appended_layer(k, n_base) or _MTP_LOOKING.search(k)
    }


def _load_tensors(model_dir: Path, keys: dict[str, str]) -> dict[str, torch.Tensor]:
    """Read only ``keys`` from only the shards that hold them."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(keys.values())):
        path = model_dir / shard
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for k in (k for k, s in keys.items() if s == shard):
                    out[k] = f.get_tensor(k)
        except Exception as e:  # safetensors raises its own (Rust) error types for bad or missing files
            raise BebopError(f"cannot read MTP tensors from shard {path}: {e}") from None
    return out


# ---------------------------------------------------------------------------------------------- format conversion
def _layers_prefix(model: PreTrainedModel) -> str:
    """The state-dict prefix of the model's decoder layers (``model.layers.`` for the causal LMs here)."""
    layers = model.get_decoder().layers
    for name, module in model.named_modules():
        if module is layers:
            return name + "."
    raise BebopError(f"cannot find the decoder layers of {type(model).__name__}")  # pragma: no cover


def _convert(model: PreTrainedModel, tensors: dict[str, torch.Tensor], to_checkpoint: bool) -> dict[str, torch.Tensor]:
    """Tensors named in ``model``'s layer namespace through ``model``'s own transformers weight conversions: from
    the checkpoint format to the in-memory one, or back (as ``save_pretrained`` does). Prefix changes are left
    out: the caller chooses the names."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        PrefixChange,
        WeightConverter,
        WeightRenaming,
        apply_converters,
        apply_renamings,
        dot_natural_key,
    )

    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:
        conversions = get_model_conversion_mapping(model, add_legacy=False)
    conversions = [c for c in conversions if not isinstance(c, PrefixChange)]
    if to_checkpoint:
        conversions = [c.reverse_transform() for c in conversions[::-1]]
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    groups: dict[str, WeightRenaming | WeightConverter] = {}
    for key, tensor in sorted(tensors.items(), key=lambda kv: dot_natural_key(kv[0])):
        name = key if to_checkpoint else apply_renamings(key, renamings)
        name, pattern = apply_converters(name, converters)
        if pattern is None:
            name = apply_renamings(key, renamings) if to_checkpoint else name
            group = groups.setdefault(name, WeightRenaming(key, name))
            pattern = key
        else:
            group = groups.setdefault(name, deepcopy(by_pattern[pattern]))
        group.add_tensor(name, key, pattern, tensor)
    out: dict[str, torch.Tensor] = {}
    for name, group in groups.items():
        for target, value in group.convert(name, model=model, config=model.config).items():
            if to_checkpoint and isinstance(group, WeightConverter):
                target = apply_renamings(target, renamings)
            out[target] = value[0] if isinstance(value, list) else value
    return out


def _swap_halves(w: torch.Tensor) -> torch.Tensor:
    """MiMo's input_proj reads cat([hidden, embedding]); Bebop's eh_proj reads cat([embedding, hidden])."""
    h = w.shape[1] // 2
    return torch.cat([w[:, h:], w[:, :h]], dim=1)


def _part_key(layout: str, i: int, n: int, name: str, block: bool = False) -> str:
    """The checkpoint name of ``name`` (a part, or with ``block`` a block tensor) in MTP layer i (= layer n)."""
    if layout == "qwen3_5":
        return f"mtp.layers.{i}.{name}" if block else f"mtp.{name}"
    if layout == "mimo":
        return f"model.mtp_layers.{i}.{name}"
    return f"model.layers.{n}.{name}"


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
    prefix = _layers_prefix(model)
    out: dict[str, torch.Tensor] = {}
    blocks: dict[str, torch.Tensor] = {}
    for name, t in head.state_dict().items():
        i, rest = name.split(".", 2)[1:]
        i = int(i)
        if rest.startswith("mtp_block."):
            blocks[f"{prefix}{n_base + i}.{rest.removeprefix('mtp_block.')}"] = t
            continue
        part = rest.removesuffix(".weight")
        t = _swap_halves(t) if layout == "mimo" and part == "eh_proj" else t
        out[_part_key(layout, i, n_base + i, _PARTS[layout][part] + ".weight")] = t
    for key, t in _convert(model, blocks, to_checkpoint=True).items():
        n, rest = key.removeprefix(prefix).split(".", 1)
        out[_part_key(layout, int(n) - n_base, int(n), rest, block=True)] = t
    if layout == "deepseek_v3":
        for i in range(head.num_layers):
            out[_part_key(layout, i, n_base + i, "embed_tokens.weight")] = model.get_input_embeddings().weight
            out[_part_key(layout, i, n_base + i, "shared_head.head.weight")] = model.get_output_embeddings().weight
    dtype = model.get_input_embeddings().weight.dtype
    return {k: v.detach().to("cpu", dtype).contiguous().clone() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------- import
def _detect(keys: list[str], n_base: int) -> str | None:
    qwen_parts = {f"mtp.{v}.weight" for v in _PARTS["qwen3_5"].values()}
    if any(k.startswith("mtp.layers.") or k in qwen_parts for k in keys):
        return "qwen3_5"
    if any(k.startswith("model.mtp_layers.") for k in keys):
        return "mimo"
    if any(_is_appended_layer(k, n_base) for k in keys):
        return "deepseek_v3"
    return None


def _locate(key: str, layout: str, n_base: int) -> tuple[int, str] | None:
    """(MTP layer index, name inside the layer) of a checkpoint key of ``layout``, or None if it is not one."""
    if layout == "qwen3_5":
        m = re.fullmatch(r"mtp\.layers\.(\d+)\.(.+)", key)
        if m:
            return int(m.group(1)), m.group(2)
        rest = key.removeprefix("mtp.")
        return (0, rest) if rest != key and rest.removesuffix(".weight") in _PARTS[layout].values() else None
    if layout == "mimo":
        m = re.fullmatch(r"model\.mtp_layers\.(\d+)\.(.+)", key)
        return (int(m.group(1)), m.group(2)) if m else None
    m = re.fullmatch(r"(.*?)layers\.(\d+)\.(.+)", key)
    if m is None or m.group(1) not in _LAYER_PREFIXES or int(m.group(2)) < n_base:
        return None
    return int(m.group(2)) - n_base, m.group(3)


def _split(tensors: dict[str, torch.Tensor], layout: str, n_base: int, source: Path):
    """Checkpoint tensors -> (Bebop-named parts, per-layer block tensors in checkpoint names, shared copies,
    keys of no known layout)."""
    parts = {f"{v}.weight": k for k, v in _PARTS[layout].items()}
    own: dict[str, torch.Tensor] = {}
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    shared: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, t in tensors.items():
        where = _locate(key, layout, n_base)
        if where is None:
            unknown.append(key)
            continue
        i, name = where
        if layout == "qwen3_5" and key.startswith("mtp.layers.") and i != 0:
            raise BebopError(
                f"{source} stacks several decoder layers in its Qwen3.5 MTP module (found {key}); Bebop's head "
                "applies one decoder layer per MTP layer, so only mtp.layers.0 is supported"
            )
        if name in parts and not (layout == "qwen3_5" and key.startswith("mtp.layers.")):
            t = _swap_halves(t) if layout == "mimo" and parts[name] == "eh_proj" else t
            own[f"layers.{i}.{parts[name]}.weight"] = t
        elif layout == "deepseek_v3" and name in _DEEPSEEK_SHARED:
            shared[f"{_DEEPSEEK_SHARED[name]}@{n_base + i}"] = t
        else:
            blocks.setdefault(i, {})[name] = t
    return own, blocks, shared, unknown


def _import_blocks(model: PreTrainedModel, blocks: dict[int, dict[str, torch.Tensor]], n_base: int, source: Path):
    """Checkpoint-format block tensors -> Bebop names ``layers.{i}.mtp_block.*`` in the in-memory format."""
    prefix = _layers_prefix(model)
    named = {f"{prefix}{n_base + i}.{name}": t for i, block in blocks.items() for name, t in block.items()}
    try:
        converted = _convert(model, named, to_checkpoint=False)
    except Exception as e:  # a conversion op on tensors of the wrong shape or count
        raise BebopError(f"cannot convert the MTP block weights in {source} to {type(model).__name__}: {e}") from None
    own = {}
    for key, t in converted.items():
        n, rest = key.removeprefix(prefix).split(".", 1)
        own[f"layers.{int(n) - n_base}.mtp_block.{rest}"] = t
    return own


def _check_dir_fits(model_dir: Path, model: PreTrainedModel) -> None:
    vocab, hidden = model.get_input_embeddings().weight.shape
    for cfg in _configs(_read_json(model_dir / "config.json", "model config"))[::-1]:
        for field, have in (("hidden_size", hidden), ("vocab_size", vocab)):
            if isinstance(cfg.get(field), int) and cfg[field] != have:
                raise BebopError(
                    f"the MTP weights in {model_dir} belong to a model with {field} {cfg[field]}, "
                    f"but the model has {field} {have}"
                )
        if "hidden_size" in cfg:
            return


def model_dir_of(model: PreTrainedModel) -> Path | None:
    """The directory ``model`` was loaded from (transformers records it in ``config._name_or_path``), if any."""
    name = getattr(model.config, "_name_or_path", "") or ""
    return Path(name) if name and Path(name).is_dir() else None


def has_native_mtp(model: PreTrainedModel) -> bool:
    """Whether the checkpoint ``model`` was loaded from ships MTP weights (read from its index, no tensors)."""
    model_dir = model_dir_of(model)
    return model_dir is not None and bool(native_keys(model_dir))


def load_native_head(model_dir: str | Path, model: PreTrainedModel) -> MTPHead:
    """The checkpoint's own MTP layer(s) as a Bebop head bound to ``model`` (on its device and dtype).

    Only the MTP tensors are read, from only the shards that hold them. Raises one BebopError when the
    checkpoint has no MTP weights, when MTP-looking keys fit no known layout (naming the first ones), or when the
    weights do not fit ``model`` (hidden size, vocabulary, block parameters).
    """
    model_dir = Path(model_dir)
    keys = native_keys(model_dir)
    if not keys:
        kind = getattr(_text_config(model.config), "model_type", type(model).__name__)
        raise BebopError(
            f"{model_dir} has no native MTP weights (model type {kind!r}); train a fresh head warm-started "
            "from the model's own decoder layer instead of --init native"
        )
    n_base = _base_layers(model_dir)
    layout = _detect(list(keys), n_base)
    if layout is None:
        raise BebopError(f"MTP weights in {model_dir} are in no known layout; first keys: {_few(keys)}")
    _check_dir_fits(model_dir, model)
    own, blocks, shared, unknown = _split(_load_tensors(model_dir, keys), layout, n_base, model_dir)
    if unknown:
        raise BebopError(f"MTP weights in {model_dir} outside the {layout} layout; first keys: {_few(unknown)}")
    check_sizes(own, shared, model, model_dir)
    own.update(_import_blocks(model, blocks, n_base, model_dir))
    return build_head(own, model, model_dir, layout)


# ---------------------------------------------------------------------------------------------- export
def _tensor_bytes(file: Path) -> int:
    """Bytes of tensor data in a safetensors file, from its header (8-byte length, then JSON with data_offsets)."""
    with open(file, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")


def _add_shard(out: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Add ``tensors`` to a saved model directory as one more shard, renumbering the shards and rewriting
    ``model.safetensors.index.json`` (a single ``model.safetensors`` becomes shard 1)."""
    from safetensors.torch import save_file

    index_path = out / INDEX_NAME
    if index_path.is_file():
        index = _read_json(index_path, "safetensors index")
    else:
        index = {"metadata": {"total_size": _tensor_bytes(out / SINGLE_NAME)}, "weight_map": _weight_map(out)}
    weight_map: dict[str, str] = index["weight_map"]
    clash = sorted(set(weight_map) & set(tensors))
    if clash:
        raise BebopError(f"the model's own weights already use the MTP names {_few(clash)}")
    shards = sorted(set(weight_map.values()))
    total = len(shards) + 1
    names = {old: f"model-{j + 1:05d}-of-{total:05d}.safetensors" for j, old in enumerate(shards)}
    for old, new in names.items():
        (out / old).rename(out / f".{new}.renamed")
    for new in names.values():
        (out / f".{new}.renamed").rename(out / new)
    mtp_shard = f"model-{total:05d}-of-{total:05d}.safetensors"
    save_file(tensors, str(out / mtp_shard), metadata={"format": "pt"})
    moved = {k: names[f] for k, f in weight_map.items()} | dict.fromkeys(tensors, mtp_shard)
    index["weight_map"] = dict(sorted(moved.items()))
    meta = index.setdefault("metadata", {})
    meta["total_size"] = int(meta.get("total_size", 0)) + sum(t.numel() * t.element_size() for t in tensors.values())
    if "total_parameters" in meta:
        meta["total_parameters"] = int(meta["total_parameters"]) + sum(t.numel() for t in tensors.values())
    index_path.write_text(json.dumps(index, indent=2) + "\n")


def _set_count(config_path: Path, layout: str, num_layers: int) -> None:
    """Write the family's own config key for the number of MTP layers (in ``text_config`` for wrappers)."""
    config = _read_json(config_path, "model config")
    target = config
    text = config.get("text_config")
    if isinstance(text, dict) and _LAYOUT_OF_TYPE.get(text.get("model_type", "")) == layout:
        target = text
    for key in _COUNT_KEYS[layout]:
        if key in target or key == _COUNT_KEYS[layout][0]:
            target[key] = num_layers
    if layout == "qwen3_5":
        target.setdefault("mtp_use_dedicated_embeddings", False)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _save(model, tokenizer, head: MTPHead | None, out_dir: str | Path, layout: str, max_shard_size) -> None:
    tensors = native_tensors(model, head, layout) if head is not None else {}
    state = model.state_dict()
    own_mtp = [k for k in state if _MTP_LOOKING.search(k)]  # e.g. a remote-code MiMo's own mtp_layers
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(
            tmp,
            max_shard_size=max_shard_size,
            state_dict={k: v for k, v in state.items() if k not in own_mtp} if own_mtp else None,
        )
        tokenizer.save_pretrained(tmp)
        if tensors:
            _add_shard(tmp, tensors)
        _set_count(tmp / "config.json", layout, head.num_layers if head is not None else 0)


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
    layout = native_layout(model.config)
    if layout is None:
        kind = getattr(_text_config(model.config), "model_type", type(model).__name__)
        raise BebopError(
            f"model type {kind!r} has no native MTP layout (known: {', '.join(sorted(_LAYOUT_OF_TYPE))}); "
            "save its head in Bebop's own format next to the model instead"
        )
    _save(model, tokenizer, head, out_dir, layout, max_shard_size)
