"""MTP head checkpoints: Bebop's own layout and the public Qwen3.5 and DeepSeek-V3 layouts, written atomically
and read back with shape checks, so a head moves between Bebop, transformers, vLLM and SGLang (DESIGN §2, §9)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import PretrainedConfig, PreTrainedModel

from bebop.errors import BebopError
from bebop.io import atomic_write, atomic_write_json
from bebop.models.mtp import MTPHead, _text_config

LAYOUT_VERSION = 1
WEIGHTS_NAME = "mtp.safetensors"
CONFIG_NAME = "mtp_config.json"

# --------------------------------------------------------------------------------------------------------------
# Public checkpoint layouts: Bebop key (per MTP layer i)  ->  public key.  ``{n}`` = num_hidden_layers of the base
# model + i (DeepSeek numbering: MTP layers are appended after the base layers). ``<block>`` stands for the base
# decoder layer's own parameter names (self_attn.q_proj.weight, mlp.gate_proj.weight, input_layernorm.weight,
# post_attention_layernorm.weight, self_attn.q_norm.weight, ...), unchanged.
#
# Verified against:
#  * qwen3_5 — vLLM vllm/model_executor/models/qwen3_5_mtp.py and qwen3_next_mtp.py (Qwen3_5MultiTokenPredictor:
#    ``fc`` = Linear(2H -> H), ``pre_fc_norm_embedding``, ``pre_fc_norm_hidden``, ``layers.{idx}`` decoder layers,
#    ``norm``; module prefix ``mtp``; forward does ``cat([pre_fc_norm_embedding(emb), pre_fc_norm_hidden(h)])``,
#    i.e. EMBEDDING FIRST, then ``norm`` after the block); transformers 5.24 conversion_mapping.py
#    ``mapping["MtpModel"]`` (``^fc.`` -> ``layers.0.eh_proj.``, ``^pre_fc_norm_embedding.`` -> ``layers.0.enorm.``,
#    ``^pre_fc_norm_hidden.`` -> ``layers.0.hnorm.``, ``^norm.`` -> ``layers.0.post_norm.``, ``layers.N.<block>`` ->
#    ``layers.N.mtp_block.<block>``, prefix ``mtp`` removed); the names Qwen/Qwen3.5-0.8B ships (mtp.fc.weight,
#    mtp.norm.weight, mtp.pre_fc_norm_*.weight, mtp.layers.0.self_attn.q_proj.weight, mtp.layers.0.mlp.down_proj...).
#    Qwen3.5 has ONE fc/norm set shared by ``mtp.layers.0..L-1`` (vLLM runs draft step k through layer k mod L),
#    which is not the same computation as L MtpLayers with their own fc/norms, so only 1-layer heads map onto it.
#  * deepseek_v3 — deepseek-ai/DeepSeek-V3 README_WEIGHTS.md (MTP module = ``model.layers.61`` with embed_tokens,
#    enorm, hnorm, eh_proj, shared_head, and the block's self_attn/mlp directly under the layer); vLLM
#    deepseek_mtp.py (``enorm``, ``hnorm``, ``eh_proj`` on ``cat([enorm(emb), hnorm(h)])`` = embedding first,
#    ``shared_head.norm`` = final norm, ``shared_head.head`` = LM head copy, block names rewritten to
#    ``mtp_block``); SGLang deepseek_nextn.py (same names, skips ``shared_head.head``/``embed_tokens`` as shared);
#    transformers conversion_mapping.py ``mapping["MtpModel"]`` (``.shared_head.norm.`` -> ``.post_norm.``) and
#    MtpModel.get_weight_conversions (``layers.{N}.`` -> ``layers.{N - num_hidden_layers}.mtp_block.``).
# The layouts fix NAMES only: values are interpreted by the base model's own classes (e.g. Qwen3.5's
# zero-centred RMSNorm), exactly as transformers' MtpModel does when it loads these checkpoints.
# --------------------------------------------------------------------------------------------------------------
LAYOUTS: dict[str, dict[str, str]] = {
    "bebop": {
        "enorm.weight": "layers.{i}.enorm.weight",
        "hnorm.weight": "layers.{i}.hnorm.weight",
        "eh_proj.weight": "layers.{i}.eh_proj.weight",
        "post_norm.weight": "layers.{i}.post_norm.weight",
        "mtp_block.": "layers.{i}.mtp_block.",
    },
    "qwen3_5": {
        "enorm.weight": "mtp.pre_fc_norm_embedding.weight",
        "hnorm.weight": "mtp.pre_fc_norm_hidden.weight",
        "eh_proj.weight": "mtp.fc.weight",
        "post_norm.weight": "mtp.norm.weight",
        "mtp_block.": "mtp.layers.0.",
    },
    "deepseek_v3": {
        "enorm.weight": "model.layers.{n}.enorm.weight",
        "hnorm.weight": "model.layers.{n}.hnorm.weight",
        "eh_proj.weight": "model.layers.{n}.eh_proj.weight",
        "post_norm.weight": "model.layers.{n}.shared_head.norm.weight",
        "mtp_block.": "model.layers.{n}.",
        # shared copies (optional on export, shape-checked then ignored on import)
        "@embed": "model.layers.{n}.embed_tokens.weight",
        "@lm_head": "model.layers.{n}.shared_head.head.weight",
    },
}
_OWN_PARTS = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "post_norm.weight")


def _head_info(head: MTPHead, layout: str) -> dict:
    return {
        "layout": layout,
        "layout_version": LAYOUT_VERSION,
        "num_layers": head.num_layers,
        "model_type": head.base_model_type,
        "vocab_size": head.vocab_size,
        "hidden_size": head.hidden_size,
        "num_hidden_layers": head.base_num_hidden_layers,
    }


def _to_layout(head: MTPHead, layout: str, n0: int, include_shared: bool) -> dict[str, torch.Tensor]:
    table = LAYOUTS[layout]
    if layout == "qwen3_5" and head.num_layers != 1:
        raise BebopError(
            f"layout 'qwen3_5' holds exactly one MTP module (one fc/norm set), but the head has "
            f"{head.num_layers} layers; export with layout 'bebop' or 'deepseek_v3'"
        )
    out: dict[str, torch.Tensor] = {}
    for name, tensor in head.state_dict().items():
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        if m is None:  # pragma: no cover - MTPHead has no other parameters
            raise BebopError(f"unexpected MTP head parameter {name!r}")
        i, rest = int(m.group(1)), m.group(2)
        if rest.startswith("mtp_block."):
            key = table["mtp_block."] + rest[len("mtp_block.") :]
        else:
            key = table[rest]
        out[key.format(i=i, n=n0 + i)] = tensor.detach().to("cpu").contiguous().clone()
    if include_shared:
        if "@embed" not in table:
            raise BebopError(f"layout {layout!r} has no slots for shared embedding/LM-head copies")
        shared = head._bound()
        for i in range(head.num_layers):
            out[table["@embed"].format(n=n0 + i)] = shared.embed.weight.detach().to("cpu").contiguous().clone()
            out[table["@lm_head"].format(n=n0 + i)] = shared.lm_head.weight.detach().to("cpu").contiguous().clone()
    return out


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path, info: dict) -> None:
    from safetensors.torch import save_file

    metadata = {"format": "pt", "bebop_mtp": json.dumps(info)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def save_head(head: MTPHead, out_dir: str | Path, base_model_config: PretrainedConfig) -> None:
    """Write ``out_dir/mtp.safetensors`` (Bebop layout) and ``out_dir/mtp_config.json`` atomically."""
    base = _text_config(base_model_config)
    for field in ("hidden_size", "vocab_size"):
        if int(getattr(base, field)) != getattr(head, field):
            raise BebopError(
                f"base model config {field} {getattr(base, field)} does not match the MTP head's {getattr(head, field)}"
            )
    out_dir = Path(out_dir)
    info = _head_info(head, "bebop")
    info["model_type"] = getattr(base, "model_type", head.base_model_type)
    info["num_hidden_layers"] = int(base.num_hidden_layers)
    _write_safetensors(_to_layout(head, "bebop", 0, False), out_dir / WEIGHTS_NAME, info)
    atomic_write_json(out_dir / CONFIG_NAME, info)


def export_head(
    head: MTPHead,
    path: str | Path,
    layout: str,
    num_base_layers: int | None = None,
    include_shared: bool | None = None,
) -> None:
    """Write the head in a public layout (see :data:`LAYOUTS`): ``"bebop"``, ``"qwen3_5"`` or ``"deepseek_v3"``.

    ``path`` ending in ``.safetensors`` is the file; otherwise it is a directory that receives ``mtp.safetensors``
    and ``mtp_config.json``. ``num_base_layers`` = the ``N`` of DeepSeek numbering (default: the base model's
    num_hidden_layers). ``include_shared`` (deepseek_v3 only; default True when the head is bound) also writes
    the shared ``embed_tokens`` / ``shared_head.head`` copies so vLLM/SGLang can load the file standalone.
    """
    if layout not in LAYOUTS:
        raise BebopError(f"unknown MTP layout {layout!r}; choose one of {sorted(LAYOUTS)}")
    n0 = head.base_num_hidden_layers if num_base_layers is None else int(num_base_layers)
    if n0 < 0:
        raise BebopError(f"num_base_layers must be >= 0, got {num_base_layers}")
    if include_shared is None:
        include_shared = layout == "deepseek_v3" and head._shared is not None
    tensors = _to_layout(head, layout, n0, include_shared)
    info = _head_info(head, layout)
    info["num_hidden_layers"] = n0
    path = Path(path)
    if path.suffix == ".safetensors":
        _write_safetensors(tensors, path, info)
    else:
        _write_safetensors(tensors, path / WEIGHTS_NAME, info)
        atomic_write_json(path / CONFIG_NAME, info)


def _resolve(path: Path) -> tuple[Path, dict | None]:
    if not path.exists():
        raise BebopError(f"MTP checkpoint not found: {path}")
    info = None
    if path.is_dir():
        cfg = path / CONFIG_NAME
        if cfg.is_file():
            try:
                info = json.loads(cfg.read_text())
            except (OSError, ValueError) as e:
                raise BebopError(f"corrupt MTP config {cfg}: {e}") from e
        file = path / WEIGHTS_NAME
        if not file.is_file():
            found = sorted(path.glob("*.safetensors"))
            if len(found) != 1:
                raise BebopError(
                    f"no {WEIGHTS_NAME} in {path} (found {len(found)} .safetensors files: "
                    f"{[f.name for f in found][:5]})"
                )
            file = found[0]
        return file, info
    return path, None


def _read(file: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own (Rust) error types for bad headers / short files
        raise BebopError(f"cannot read MTP checkpoint {file}: corrupt or truncated safetensors ({e})") from e
    info = None
    if "bebop_mtp" in meta:
        try:
            info = json.loads(meta["bebop_mtp"])
        except ValueError:
            info = None
    return tensors, info


def _detect_layout(keys: Iterable[str], file: Path) -> str:
    keys = list(keys)
    if any(k.startswith("mtp.") for k in keys):
        return "qwen3_5"
    if any(re.match(r"model\.layers\.\d+\.", k) for k in keys):
        return "deepseek_v3"
    if any(re.match(r"layers\.\d+\.(enorm|hnorm|eh_proj|post_norm|mtp_block)\.", k) for k in keys):
        return "bebop"
    raise BebopError(f"unrecognised MTP checkpoint layout in {file}; first keys: {sorted(keys)[:5]}")


def _from_layout(
    tensors: dict[str, torch.Tensor], layout: str, file: Path
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """Public keys -> (Bebop state dict, shared copies, unexpected keys)."""
    table = LAYOUTS[layout]
    reverse = {v: k for k, v in table.items() if not k.startswith("@") and k != "mtp_block."}
    own: dict[str, torch.Tensor] = {}
    shared: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    if layout == "bebop":
        for k, v in tensors.items():
            if re.match(r"layers\.\d+\.", k):
                own[k] = v
            else:
                unexpected.append(k)
        return own, shared, unexpected
    if layout == "qwen3_5":
        stacked = sorted({m.group(1) for k in tensors if (m := re.match(r"mtp\.layers\.(\d+)\.", k))})
        if stacked and stacked != ["0"]:
            raise BebopError(
                f"{file} is a Qwen3.5 MTP module with stacked decoder layers mtp.layers.{{{','.join(stacked)}}}; "
                "Bebop's head applies one decoder layer per MtpLayer, so only mtp.layers.0 is supported"
            )
        for k, v in tensors.items():
            if k in reverse:
                own[f"layers.0.{reverse[k]}"] = v
            elif k.startswith(table["mtp_block."]):
                own["layers.0.mtp_block." + k[len(table["mtp_block."]) :]] = v
            else:
                unexpected.append(k)
        return own, shared, unexpected
    # deepseek_v3: MTP layers are the model.layers.{n} that carry an eh_proj, in increasing n
    ns = sorted({int(m.group(1)) for k in tensors if (m := re.fullmatch(r"model\.layers\.(\d+)\.eh_proj\.weight", k))})
    if not ns:
        raise BebopError(f"no model.layers.{{N}}.eh_proj.weight in DeepSeek-layout file {file}")
    index = {n: i for i, n in enumerate(ns)}
    for k, v in tensors.items():
        m = re.match(r"model\.layers\.(\d+)\.(.+)", k)
        if m is None or int(m.group(1)) not in index:
            unexpected.append(k)
            continue
        n, rest = int(m.group(1)), m.group(2)
        i = index[n]
        generic = "model.layers.{n}." + rest
        if generic == table["@embed"] or generic == table["@lm_head"]:
            shared[f"{'embed' if generic == table['@embed'] else 'lm_head'}@{n}"] = v
        elif generic in reverse:
            own[f"layers.{i}.{reverse[generic]}"] = v
        else:
            own[f"layers.{i}.mtp_block.{rest}"] = v
    return own, shared, unexpected


def _few(names: Iterable[str], k: int = 5) -> str:
    names = sorted(names)
    more = f" (+{len(names) - k} more)" if len(names) > k else ""
    return ", ".join(names[:k]) + more


def check_sizes(
    own: dict[str, torch.Tensor], shared: dict[str, torch.Tensor], model: PreTrainedModel, source: str | Path
) -> None:
    """Shape checks that name a hidden-size or vocabulary mismatch between a head's tensors (Bebop names, before
    the block is matched) and ``model``: the shared embedding / LM-head copies, ``eh_proj`` and the MTP norms."""
    model_vocab, model_hidden = model.get_input_embeddings().weight.shape
    for name, t in shared.items():
        if tuple(t.shape) != (model_vocab, model_hidden):
            raise BebopError(
                f"MTP checkpoint {source}: shared {name.split('@')[0]} copy has shape {tuple(t.shape)} = "
                f"(vocab {t.shape[0]}, hidden {t.shape[-1]}) but the model has vocab {model_vocab}, "
                f"hidden {model_hidden}"
            )
    for name, t in own.items():
        if name.endswith(".eh_proj.weight") and tuple(t.shape) != (model_hidden, 2 * model_hidden):
            raise BebopError(
                f"MTP checkpoint {source}: {name} has shape {tuple(t.shape)}, i.e. hidden size {t.shape[0]}, "
                f"but the model has hidden size {model_hidden} (expected {(model_hidden, 2 * model_hidden)})"
            )
        if re.fullmatch(r"layers\.\d+\.(enorm|hnorm|post_norm)\.weight", name) and tuple(t.shape) != (model_hidden,):
            raise BebopError(
                f"MTP checkpoint {source}: {name} has shape {tuple(t.shape)} but the model has hidden size "
                f"{model_hidden}"
            )


def build_head(own: dict[str, torch.Tensor], model: PreTrainedModel, source: str | Path, layout: str) -> MTPHead:
    """An :class:`MTPHead` for ``model`` holding ``own`` (a complete Bebop-named state dict), on the model's
    device and dtype, bound to it. Missing, extra or mis-shaped tensors raise one BebopError naming them."""
    layer_ids = sorted({int(k.split(".")[1]) for k in own})
    if not layer_ids or layer_ids != list(range(len(layer_ids))):
        raise BebopError(f"MTP checkpoint {source} has non-contiguous MTP layer indices {layer_ids}")
    embed = model.get_input_embeddings()
    decoder = model.get_decoder()
    final_norm = getattr(decoder, "norm", None)
    head = MTPHead(
        model.config,
        len(layer_ids),
        decoder_layer_cls=type(decoder.layers[-1]),
        norm_cls=type(final_norm) if final_norm is not None else None,
    )
    expected = head.state_dict()
    missing = set(expected) - set(own)
    extra = set(own) - set(expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing keys (Bebop names): {_few(missing)}")
        if extra:
            parts.append(f"unexpected keys (Bebop names): {_few(extra)}")
        raise BebopError(f"MTP checkpoint {source} ({layout} layout) does not match the model: " + "; ".join(parts))
    for name, t in own.items():
        if t.shape != expected[name].shape:
            raise BebopError(
                f"MTP checkpoint {source}: {name} has shape {tuple(t.shape)}, the model needs "
                f"{tuple(expected[name].shape)}"
            )
    head.load_state_dict(own, strict=True)
    head.to(device=embed.weight.device, dtype=embed.weight.dtype)
    head.bind(model)
    return head


NATIVE = "native"  # head spec: the MTP layer(s) shipped inside the model's own checkpoint


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and not (path / WEIGHTS_NAME).is_file()


def load_head(path: str | Path, model: PreTrainedModel) -> MTPHead:
    """Load an MTP head for ``model`` from a head directory, a ``.safetensors`` file, a model checkpoint
    directory (its native MTP layers), or ``"native"`` (the native MTP layers of the checkpoint ``model`` was
    loaded from).

    Auto-detects the Bebop (``layers.{i}.*``), Qwen3.5 (``mtp.*``) and DeepSeek-V3 (``model.layers.{N}.*``)
    layouts by key names. Raises :class:`BebopError` naming the problem for a missing path, an unreadable
    (corrupt/truncated) file, hidden- or vocab-size mismatch with ``model``, or missing/unexpected keys.
    """
    if str(path) == NATIVE or _is_model_dir(Path(path)):
        from bebop.models.native import load_native_head, model_dir_of

        model_dir = model_dir_of(model) if str(path) == NATIVE else Path(path)
        if model_dir is None:
            raise BebopError("--mtp/--init native needs a model loaded from a checkpoint directory")
        return load_native_head(model_dir, model)
    path = Path(path)
    file, dir_info = _resolve(path)
    tensors, meta_info = _read(file)
    info = dir_info or meta_info or {}
    layout = _detect_layout(tensors.keys(), file)

    model_vocab, model_hidden = model.get_input_embeddings().weight.shape
    made_for, model_type = str(info.get("model_type", "")), str(getattr(_text_config(model.config), "model_type", ""))
    if made_for and model_type and made_for.removesuffix("_text") != model_type.removesuffix("_text"):
        raise BebopError(
            f"MTP checkpoint {file} was made for a model_type {made_for!r} model, but the model is {model_type!r}: "
            "a head's block is a layer of its model's family; train one for this model (bebop train-mtp)"
        )
    if "hidden_size" in info and int(info["hidden_size"]) != model_hidden:
        raise BebopError(
            f"MTP checkpoint {file} has hidden size {info['hidden_size']} but the model has hidden size {model_hidden}"
        )
    if "vocab_size" in info and int(info["vocab_size"]) != model_vocab:
        raise BebopError(
            f"MTP checkpoint {file} was made for vocab size {info['vocab_size']} but the model has vocab size "
            f"{model_vocab}"
        )

    own, shared, unexpected = _from_layout(tensors, layout, file)
    check_sizes(own, shared, model, file)
    if unexpected:
        raise BebopError(f"unexpected keys in MTP checkpoint {file} ({layout} layout): {_few(unexpected)}")
    return build_head(own, model, file, layout)
