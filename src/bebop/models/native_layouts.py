"""The native MTP layouts: which families ship MTP weights, under which checkpoint names and config keys, and how
a checkpoint name maps to (MTP layer, name inside the layer). Names only; the values are read by the family's own
classes (``native.py``, ``native_write.py``).

Layouts (names verified against the serving engines' loaders and the released checkpoints; see checkpoint.py):

* ``qwen3_5`` — Qwen3.5, Qwen3.5-MoE, Qwen3-Next: ``mtp.fc``, ``mtp.pre_fc_norm_embedding``,
  ``mtp.pre_fc_norm_hidden``, ``mtp.layers.0.<block>``, ``mtp.norm``; config key ``mtp_num_hidden_layers``
  (inside ``text_config`` in the released multimodal ``qwen3_5`` / ``qwen3_5_moe`` checkpoints, whose language
  model sits under ``model.language_model.`` while ``mtp.*`` stays at the top level).
  transformers ignores these keys on load (``_keys_to_ignore_on_load_unexpected = ["^mtp.*"]``).
* ``deepseek_v3`` — DeepSeek-V3, Kimi-K2.5, GLM-4.5: ``model.layers.{N+i}.`` with ``enorm``, ``hnorm``,
  ``eh_proj``, ``shared_head.norm``, the shared ``embed_tokens`` / ``shared_head.head`` copies and the block's
  own names directly under the layer; config key ``num_nextn_predict_layers``.
* ``mimo`` — Xiaomi MiMo (a Qwen2 model, ``model_type: mimo``): ``model.mtp_layers.{i}.`` with
  ``token_layernorm``, ``hidden_layernorm``, ``input_proj``, ``final_layernorm`` and the block's own names;
  config key ``num_nextn_predict_layers``. MiMo's ``input_proj`` reads ``cat([hidden, embedding])`` (hidden
  FIRST; vLLM ``mimo_mtp.py`` and MiMo's ``modeling_mimo.py``), so its two column halves are swapped on the
  way into Bebop's embedding-first ``eh_proj`` and back.
"""

from __future__ import annotations

import re

import torch
from transformers import PretrainedConfig

from bebop.models.mtp import _text_config

LAYOUT_OF_TYPE = {
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
COUNT_KEYS = {
    "qwen3_5": ("mtp_num_hidden_layers", "num_nextn_predict_layers"),
    "deepseek_v3": ("num_nextn_predict_layers", "num_mtp_layers"),
    "mimo": ("num_nextn_predict_layers",),
}
# Bebop part -> layout name of that part (per MTP layer; the block's own names follow under the layer prefix)
PARTS = {
    "qwen3_5": {"enorm": "pre_fc_norm_embedding", "hnorm": "pre_fc_norm_hidden", "eh_proj": "fc", "post_norm": "norm"},
    "deepseek_v3": {"enorm": "enorm", "hnorm": "hnorm", "eh_proj": "eh_proj", "post_norm": "shared_head.norm"},
    "mimo": {
        "enorm": "token_layernorm",
        "hnorm": "hidden_layernorm",
        "eh_proj": "input_proj",
        "post_norm": "final_layernorm",
    },
}
DEEPSEEK_SHARED = {"embed_tokens.weight": "embed", "shared_head.head.weight": "lm_head"}
_LAYER_PREFIXES = ("model.", "model.language_model.", "language_model.model.")
MTP_LOOKING = re.compile(r"mtp|nextn", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------- config side
def configs(config: PretrainedConfig | dict) -> list:
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
    for cfg in configs(config):
        layout = LAYOUT_OF_TYPE.get(_get(cfg, "model_type") or "")
        if layout is not None:
            return layout
    return None


def num_native_layers(config: PretrainedConfig | dict) -> int:
    """The number of MTP layers ``config`` declares under its family's own key (0 when it has none)."""
    layout = native_layout(config)
    if layout is None:
        return 0
    for key in COUNT_KEYS[layout]:
        for cfg in configs(config):
            value = _get(cfg, key)
            if value is not None:
                return int(value)
    return 0


# ---------------------------------------------------------------------------------------------- key side
def is_appended_layer(key: str, n_base: int) -> bool:
    """Whether ``key`` is in a decoder layer numbered from ``n_base`` on (DeepSeek's appended MTP layers)."""
    m = re.match(r"(.*?)layers\.(\d+)\.", key)
    return m is not None and m.group(1) in _LAYER_PREFIXES and int(m.group(2)) >= n_base


def part_key(layout: str, i: int, n: int, name: str, block: bool = False) -> str:
    """The checkpoint name of ``name`` (a part, or with ``block`` a block tensor) in MTP layer i (= layer n)."""
    if layout == "qwen3_5":
        return f"mtp.layers.{i}.{name}" if block else f"mtp.{name}"
    if layout == "mimo":
        return f"model.mtp_layers.{i}.{name}"
    return f"model.layers.{n}.{name}"


def detect(keys: list[str], n_base: int) -> str | None:
    """The layout the MTP-looking ``keys`` of a checkpoint with ``n_base`` decoder layers are in, if any."""
    qwen_parts = {f"mtp.{v}.weight" for v in PARTS["qwen3_5"].values()}
    if any(k.startswith("mtp.layers.") or k in qwen_parts for k in keys):
        return "qwen3_5"
    if any(k.startswith("model.mtp_layers.") for k in keys):
        return "mimo"
    if any(is_appended_layer(k, n_base) for k in keys):
        return "deepseek_v3"
    return None


def locate(key: str, layout: str, n_base: int) -> tuple[int, str] | None:
    """(MTP layer index, name inside the layer) of a checkpoint key of ``layout``, or None if it is not one."""
    if layout == "qwen3_5":
        m = re.fullmatch(r"mtp\.layers\.(\d+)\.(.+)", key)
        if m:
            return int(m.group(1)), m.group(2)
        rest = key.removeprefix("mtp.")
        return (0, rest) if rest != key and rest.removesuffix(".weight") in PARTS[layout].values() else None
    if layout == "mimo":
        m = re.fullmatch(r"model\.mtp_layers\.(\d+)\.(.+)", key)
        return (int(m.group(1)), m.group(2)) if m else None
    m = re.fullmatch(r"(.*?)layers\.(\d+)\.(.+)", key)
    if m is None or m.group(1) not in _LAYER_PREFIXES or int(m.group(2)) < n_base:
        return None
    return int(m.group(2)) - n_base, m.group(3)


def swap_halves(w: torch.Tensor) -> torch.Tensor:
    """MiMo's input_proj reads cat([hidden, embedding]); Bebop's eh_proj reads cat([embedding, hidden])."""
    h = w.shape[1] // 2
    return torch.cat([w[:, h:], w[:, :h]], dim=1)
