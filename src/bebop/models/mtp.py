"""The MTP head of DESIGN §2 (DeepSeek-V3 / Qwen3.5 style) and its checkpoint import/export.

One MTP step, exactly as DESIGN §2 writes it::

    h_in  = eh_proj( concat( enorm(Embed(token_{t+k})), hnorm(h^{k-1}_t) ) )      # embedding FIRST
    h^k_t = post_norm( DecoderBlock(h_in) )        # causal self-attention over the head's own KV cache
    q_k   = softmax( LMHead(h^k_t) / tau )         # predicts token t+k+1

The layer itself is ``transformers.modeling_layers.MtpLayer`` (enorm, hnorm, eh_proj, mtp_block = the base
model's own decoder-layer class, post_norm); :class:`MTPHead` only wraps it with the shared embedding, LM head
and rotary embedding of the base model, a correct 4D mask for batched rows with holes, and a training unroll.

**Which hidden state is h^0** (checked against the reference implementations, transformers 5.24):

* transformers ``MTPCandidateGenerator.get_candidates`` (``generation/candidate_generator.py``) feeds
  ``model_outputs.hidden_states[-1]`` into ``MtpModel``. ``capture_outputs`` (``utils/output_capturing.py``,
  ``tie_last_hidden_states=True`` for all LMs) overwrites ``hidden_states[-1]`` with ``last_hidden_state``,
  and ``Qwen3Model.forward`` computes ``last_hidden_state = self.norm(hidden_states)``. So with
  ``output_hidden_states=True`` HF Qwen3's ``hidden_states[-1]`` is **already after the final RMSNorm** — the
  tensor the LM head sees — and that is what transformers feeds the MTP layer.
* vLLM (``deepseek_mtp.py``, ``qwen3_5_mtp.py``, ``qwen3_next_mtp.py``) and SGLang (``deepseek_nextn.py``)
  take ``hidden_states`` from the target model's forward output, which their model classes return after
  the final norm as well.

Bebop follows the same convention: **h^0_t = the base model's last hidden state after its final norm**
(``out.hidden_states[-1]`` of an HF Qwen3 forward with ``output_hidden_states=True``, or
``model.model(...).last_hidden_state``). Later steps feed ``h^k`` = the head output *after* ``post_norm`` (as
transformers' ``MtpLayer``/``MtpModel`` and SGLang's NextN do). Note: vLLM's ``deepseek_mtp.py`` chains the
*pre*-``shared_head.norm`` state for k >= 2 and zeroes the embedding at position 0; Qwen3.5/Qwen3-Next in vLLM
chain the post-norm state like Bebop.

**Position ids.** Following transformers' ``MtpModel``, the MTP input at sequence slot t pairs token
``x_{t+k}`` with ``h^{k-1}_t`` and carries the position id of the token (``t+k``); vLLM uses the hidden
state's position ``t`` instead. Both are equivalent: RoPE attention depends only on position differences,
so any per-row constant offset gives the same result (up to float rounding). Be consistent within a cache.
"""

from __future__ import annotations

import copy
import json
import re
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_layers import MtpLayer

from bebop.errors import BebopError
from bebop.io import atomic_write, atomic_write_json

__all__ = [
    "LAYOUTS",
    "MTPHead",
    "export_head",
    "hf_mtp_generate",
    "load_head",
    "save_head",
]

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
#    Qwen3.5 has ONE fc/norm set and stacks ``mtp.layers.0..L-1`` inside one module, which is not the same
#    computation as L recursive MtpLayers, so only 1-layer heads map onto it.
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


class _Shared:
    """Plain holder of the base model's shared modules: not an nn.Module, so nothing in it is registered,
    trained, moved or saved with the head; ``deepcopy`` keeps the references (shared, never copied)."""

    __slots__ = ("embed", "lm_head", "rotary")

    def __init__(self, embed: nn.Module, lm_head: nn.Module, rotary: nn.Module):
        self.embed, self.lm_head, self.rotary = embed, lm_head, rotary

    def __deepcopy__(self, memo):
        return self


def _text_config(config: PretrainedConfig) -> PretrainedConfig:
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _head_config(config: PretrainedConfig, num_layers: int) -> PretrainedConfig:
    """The MTP layers' config: like ``PreTrainedConfig.get_mtp_config`` — a copy of the base text config whose
    index-based fields describe ``num_layers`` full-attention layers (MTP layers restart indexing at 0)."""
    cfg = copy.deepcopy(_text_config(config))
    cfg.num_hidden_layers = num_layers
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = ["full_attention"] * num_layers
    if hasattr(cfg, "first_k_dense_replace"):
        cfg.first_k_dense_replace = 0
    # Bebop passes an explicit additive 4D mask (holes anywhere), which eager and sdpa accept.
    if getattr(cfg, "_attn_implementation", None) not in ("eager", "sdpa"):
        cfg._attn_implementation = "sdpa"
    return cfg


def _classes_for_config(config: PretrainedConfig) -> tuple[type[nn.Module], type[nn.Module]]:
    """Find the base decoder-layer class and RMSNorm class from the transformers auto mapping."""
    from transformers import AutoModel

    try:
        model_cls = AutoModel._model_mapping[type(config)]
    except (KeyError, ValueError) as e:
        raise BebopError(
            f"cannot find the decoder-layer class for model_type {getattr(config, 'model_type', None)!r}; "
            "pass decoder_layer_cls= and norm_cls= explicitly"
        ) from e
    module = sys.modules[model_cls.__module__]
    prefix = model_cls.__name__.removesuffix("Model")

    def pick(suffix: str) -> type[nn.Module]:
        cls = getattr(module, prefix + suffix, None)
        if cls is None:
            found = [v for k, v in vars(module).items() if k.endswith(suffix) and isinstance(v, type)]
            if not found:
                raise BebopError(f"no *{suffix} class in {module.__name__}; pass it explicitly")
            cls = found[0]
        return cls

    return pick("DecoderLayer"), pick("RMSNorm")


class MTPHead(nn.Module):
    """DESIGN §2 MTP head: ``num_layers`` ``transformers.modeling_layers.MtpLayer`` s on a base causal LM.

    ``config`` is the BASE model's config. Own parameters (the only ones in ``parameters()``/``state_dict()``):
    ``layers.{i}.enorm.weight``, ``layers.{i}.hnorm.weight``, ``layers.{i}.eh_proj.weight`` (H x 2H, input =
    ``[enorm(embed), hnorm(hidden)]``), ``layers.{i}.mtp_block.*`` (the base decoder-layer class) and
    ``layers.{i}.post_norm.weight``. The input embedding, LM head and rotary embedding are the base model's
    own modules, referenced (never copied or registered) after :meth:`bind`.

    Layer ``i`` owns layer index ``i`` of the head's KV cache; with more than one layer, draft/training step k
    (1-based) uses layer ``(k - 1) % num_layers`` (as vLLM's ``spec_step_idx % num_mtp_layers``).
    """

    def __init__(
        self,
        config: PretrainedConfig,
        num_layers: int = 1,
        decoder_layer_cls: type[nn.Module] | None = None,
        norm_cls: type[nn.Module] | None = None,
    ):
        super().__init__()
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
            raise BebopError(f"num_layers must be a positive int, got {num_layers!r}")
        base = _text_config(config)
        if decoder_layer_cls is None or norm_cls is None:
            found_layer, found_norm = _classes_for_config(base)
            decoder_layer_cls = decoder_layer_cls or found_layer
            norm_cls = norm_cls or found_norm
        self.num_layers = num_layers
        self.base_model_type: str = getattr(base, "model_type", "")
        self.base_num_hidden_layers: int = int(base.num_hidden_layers)
        self.hidden_size: int = int(base.hidden_size)
        self.vocab_size: int = int(base.vocab_size)
        self.config = _head_config(base, num_layers)
        self.layers = nn.ModuleList(
            [MtpLayer(self.config, decoder_layer_cls, norm_cls, i, use_post_norm=True) for i in range(num_layers)]
        )
        self._shared: _Shared | None = None
        self._init_weights()

    # ---------------------------------------------------------------- construction / binding
    @torch.no_grad()
    def _init_weights(self) -> None:
        std = float(getattr(self.config, "initializer_range", 0.02))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif module is not self and "norm" in type(module).__name__.lower():
                if getattr(module, "weight", None) is not None:
                    module.weight.fill_(1.0)

    @classmethod
    def from_base(cls, model: PreTrainedModel, num_layers: int = 1) -> MTPHead:
        """Build a head for ``model``, warm-started, on the model's device/dtype, and bind it.

        Warm start: every ``mtp_block`` = a copy of the base model's LAST decoder layer; ``eh_proj`` =
        ``[N(0, initializer_range) | I]`` so that ``h_in ~= hnorm(h)`` starts on the hidden-state path while the
        embedding half still gets gradients; ``enorm``/``hnorm`` = ones; ``post_norm`` = a copy of the base
        model's final norm, so ``logits(head(...))`` starts on the same scale as the base model's logits.
        """
        decoder = model.get_decoder()
        last = decoder.layers[-1]
        final_norm = getattr(decoder, "norm", None)
        norm_cls = type(final_norm) if final_norm is not None else None
        head = cls(model.config, num_layers, decoder_layer_cls=type(last), norm_cls=norm_cls)
        ref = model.get_input_embeddings().weight
        head.to(device=ref.device, dtype=ref.dtype)
        h = head.hidden_size
        with torch.no_grad():
            for layer in head.layers:
                layer.mtp_block.load_state_dict(last.state_dict())
                w = layer.eh_proj.weight
                w[:, :h].normal_(0.0, float(getattr(head.config, "initializer_range", 0.02)))
                w[:, h:].copy_(torch.eye(h, dtype=w.dtype, device=w.device))
                if final_norm is not None and getattr(final_norm, "weight", None) is not None:
                    layer.post_norm.weight.copy_(final_norm.weight)
        head.bind(model)
        return head

    def bind(self, model: PreTrainedModel) -> None:
        """Reference (not copy, not register) ``model``'s input embedding, LM head and rotary embedding."""
        embed = model.get_input_embeddings()
        lm_head = model.get_output_embeddings()
        rotary = getattr(model.get_decoder(), "rotary_emb", None)
        if embed is None or lm_head is None or rotary is None:
            raise BebopError(
                f"cannot bind an MTP head to {type(model).__name__}: it needs an input embedding, an LM head "
                "and a rotary embedding (model.get_decoder().rotary_emb)"
            )
        v, h = embed.weight.shape
        if h != self.hidden_size:
            raise BebopError(f"MTP head hidden size {self.hidden_size} != model hidden size {h}")
        if v != self.vocab_size or lm_head.weight.shape[0] != v:
            raise BebopError(
                f"MTP head vocab size {self.vocab_size} != model vocab size {v} (lm_head {lm_head.weight.shape[0]})"
            )
        self._shared = _Shared(embed, lm_head, rotary)

    def _bound(self) -> _Shared:
        if self._shared is None:
            raise BebopError("MTP head is not bound to a base model: call head.bind(model) first")
        return self._shared

    @property
    def embed_tokens(self) -> nn.Module:
        return self._bound().embed

    @property
    def lm_head(self) -> nn.Module:
        return self._bound().lm_head

    def new_cache(self) -> DynamicCache:
        """A fresh KV cache laid out for this head's layers (layer i <-> cache layer i)."""
        return DynamicCache(config=self.config)

    # ---------------------------------------------------------------- compute
    @staticmethod
    def _mask(
        attention_mask: torch.Tensor | None, batch: int, past: int, q_len: int, dtype: torch.dtype, device
    ) -> torch.Tensor | None:
        """Additive 4D mask [B|1, 1, T, past+T]: query slot ``past+q`` sees key slot ``j`` iff ``j <= past+q``
        (causal in cache-slot order) and ``attention_mask[b, j] == 1``. A query always sees its own slot, so a
        row whose query slot is itself a hole never becomes fully masked (no NaN); its output is garbage that
        nobody reads, and its key is hidden from every other query by the 2D mask."""
        if attention_mask is None and q_len == 1:
            return None
        kv = past + q_len
        q_slot = torch.arange(past, kv, device=device)[:, None]
        k_slot = torch.arange(kv, device=device)[None, :]
        allowed = (k_slot <= q_slot)[None]  # [1, T, kv]
        if attention_mask is not None:
            real = attention_mask.to(device=device).bool()[:, None, :]  # [B, 1, kv]
            allowed = allowed & (real | (k_slot == q_slot)[None])
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[:, None]

    def forward(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """One MTP step (DESIGN §2) with MTP layer ``layer`` over T new slots per row.

        ``input_ids`` [B, T]: the tokens consumed (``x_{t+k}`` or drafts); ``hidden`` [B, T, H]: ``h^{k-1}`` for
        the same slots (h^0 = base last hidden state after the final norm); ``position_ids`` [B, T] (or [1, T]);
        ``attention_mask`` [B, past+T] over (cached slots + new slots), 1 = real, 0 = hole/padding — holes may be
        anywhere; ``cache``: a transformers Cache owned by the caller, of which this call reads and appends
        layer index ``layer`` (``past`` = its current length). Returns ``h^k`` [B, T, H] after ``post_norm``.
        """
        shared = self._bound()
        if not 0 <= layer < self.num_layers:
            raise BebopError(f"layer must be in [0, {self.num_layers}), got {layer}")
        if input_ids.dim() != 2:
            raise BebopError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        if hidden.shape != (b, t, self.hidden_size):
            raise BebopError(f"hidden must be [B, T, H] = {(b, t, self.hidden_size)}, got shape {tuple(hidden.shape)}")
        if position_ids.dim() != 2 or position_ids.shape[1] != t or position_ids.shape[0] not in (1, b):
            raise BebopError(f"position_ids must be [B, T] = {(b, t)}, got shape {tuple(position_ids.shape)}")
        past = cache.get_seq_length(layer) if cache is not None else 0
        if attention_mask is not None and tuple(attention_mask.shape) != (b, past + t):
            raise BebopError(
                f"attention_mask must be [B, past+T] = {(b, past + t)} (cache holds {past} slots), "
                f"got shape {tuple(attention_mask.shape)}"
            )
        embeds = shared.embed(input_ids)
        hidden = hidden.to(embeds.dtype)
        position_embeddings = shared.rotary(embeds, position_ids)
        mask = self._mask(attention_mask, b, past, t, embeds.dtype, embeds.device)
        return self.layers[layer](
            inputs_embeds=embeds,
            previous_hidden_state=hidden,
            position_embeddings=position_embeddings,
            attention_mask=mask,
            position_ids=position_ids,
            cache=cache,
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft logits through the base model's (shared) LM head."""
        return self._bound().lm_head(hidden)

    def unroll(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        steps: int,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Teacher-forced recursive unroll for training (DESIGN §4), no cache.

        ``input_ids`` [B, T] = the true sequence x_0..x_{T-1}; ``hidden`` [B, T, H] = h^0, the base model's last
        hidden state after its final norm (h^0_t predicts x_{t+1}). Returns ``[h^1, ..., h^steps]``, each
        [B, T, H]. **Alignment:** at position t, step k consumes token ``x_{t+k}`` and ``h^{k-1}_t`` and its
        logits predict ``x_{t+k+1}``. Position t of step k is meaningful only if ``t + k + 1 < T`` (for
        the prediction target) — later positions are computed on padding token 0 and are garbage for the
        caller to mask. Step k uses MTP layer ``(k-1) % num_layers``; each step runs causal self-attention over
        its own slots (slot t of step k sees slots <= t of step k). With ``attention_mask`` [B, T] (1 = real),
        slot t of step k is a visible key only if both ``x_t``'s and ``x_{t+k}``'s slots are real; positions
        default to ``cumsum(mask) - 1`` (or ``arange(T)``), plus k (the consumed token's position).
        """
        if not isinstance(steps, int) or steps < 1:
            raise BebopError(f"steps must be a positive int, got {steps!r}")
        if input_ids.dim() != 2:
            raise BebopError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        device = input_ids.device
        if attention_mask is not None and tuple(attention_mask.shape) != (b, t):
            raise BebopError(f"attention_mask must be [B, T] = {(b, t)}, got shape {tuple(attention_mask.shape)}")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                position_ids = torch.arange(t, device=device)[None].expand(b, t)
        outs: list[torch.Tensor] = []
        h = hidden
        for k in range(1, steps + 1):
            tokens = torch.nn.functional.pad(input_ids[:, k:], (0, min(k, t)), value=0)
            mask_k = None
            if attention_mask is not None:
                shifted = torch.nn.functional.pad(attention_mask[:, k:], (0, min(k, t)), value=0)
                mask_k = attention_mask.bool() & shifted.bool()
            h = self.forward(tokens, h, position_ids + k, attention_mask=mask_k, layer=(k - 1) % self.num_layers)
            outs.append(h)
        return outs


# ==================================================================================================================
# checkpoints
# ==================================================================================================================
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


def load_head(path: str | Path, model: PreTrainedModel) -> MTPHead:
    """Load an MTP head for ``model`` from a directory or a ``.safetensors`` file.

    Auto-detects the Bebop (``layers.{i}.*``), Qwen3.5 (``mtp.*``) and DeepSeek-V3 (``model.layers.{N}.*``)
    layouts by key names. Raises :class:`BebopError` naming the problem for a missing path, an unreadable
    (corrupt/truncated) file, hidden- or vocab-size mismatch with ``model``, or missing/unexpected keys.
    """
    path = Path(path)
    file, dir_info = _resolve(path)
    tensors, meta_info = _read(file)
    info = dir_info or meta_info or {}
    layout = _detect_layout(tensors.keys(), file)

    embed = model.get_input_embeddings()
    model_vocab, model_hidden = embed.weight.shape
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
    for name, t in shared.items():
        if tuple(t.shape) != (model_vocab, model_hidden):
            raise BebopError(
                f"MTP checkpoint {file}: shared {name.split('@')[0]} copy has shape {tuple(t.shape)} = "
                f"(vocab {t.shape[0]}, hidden {t.shape[-1]}) but the model has vocab {model_vocab}, "
                f"hidden {model_hidden}"
            )
    for name, t in own.items():
        if name.endswith(".eh_proj.weight") and tuple(t.shape) != (model_hidden, 2 * model_hidden):
            raise BebopError(
                f"MTP checkpoint {file}: {name} has shape {tuple(t.shape)}, i.e. hidden size {t.shape[0]}, "
                f"but the model has hidden size {model_hidden} (expected {(model_hidden, 2 * model_hidden)})"
            )
        if re.fullmatch(r"layers\.\d+\.(enorm|hnorm|post_norm)\.weight", name) and tuple(t.shape) != (model_hidden,):
            raise BebopError(
                f"MTP checkpoint {file}: {name} has shape {tuple(t.shape)} but the model has hidden size {model_hidden}"
            )
    if unexpected:
        raise BebopError(f"unexpected keys in MTP checkpoint {file} ({layout} layout): {_few(unexpected)}")
    layer_ids = sorted({int(k.split(".")[1]) for k in own})
    if not layer_ids or layer_ids != list(range(len(layer_ids))):
        raise BebopError(f"MTP checkpoint {file} has non-contiguous MTP layer indices {layer_ids}")

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
        raise BebopError(f"MTP checkpoint {file} ({layout} layout) does not match the model: " + "; ".join(parts))
    for name, t in own.items():
        if t.shape != expected[name].shape:
            raise BebopError(
                f"MTP checkpoint {file}: {name} has shape {tuple(t.shape)}, the model needs "
                f"{tuple(expected[name].shape)}"
            )
    head.load_state_dict(own, strict=True)
    head.to(device=embed.weight.device, dtype=embed.weight.dtype)
    head.bind(model)
    return head


# ==================================================================================================================
# transformers generate(use_mtp=True)
# ==================================================================================================================
def hf_mtp_generate(
    model: PreTrainedModel, head: MTPHead, input_ids: torch.Tensor, max_new_tokens: int, **gen_kwargs
) -> torch.Tensor:
    """Run transformers' own ``model.generate(..., use_mtp=True)`` with ``head`` as the MTP module.

    How transformers 5.24 does it (generation/utils.py ``_get_candidate_generator`` -> candidate_generator.py
    ``MTPCandidateGenerator`` -> modeling_layers.py ``MtpModel.from_pretrained``): it needs
    ``config.num_mtp_layers`` (and ``mtp_layer_types`` when the config has ``layer_types``, for
    ``get_mtp_config``), then re-reads the MTP weights from the checkpoint files of ``config.name_or_path``,
    selecting keys with regexes taken from ``model._keys_to_ignore_on_load_unexpected`` (Qwen3ForCausalLM has
    none) restricted to layer numbers >= num_hidden_layers, i.e. DeepSeek numbering, and renames them with
    ``layers.{N}.`` -> ``layers.{N - num_hidden_layers}.mtp_block.`` + ``mapping["MtpModel"]``. The MtpModel
    it builds has exactly Bebop's parameter names and computation (MtpLayer with the base decoder-layer class).

    So for a stock Qwen3ForCausalLM we: export the head in the DeepSeek-V3 layout to a temporary
    ``model.safetensors``, and for the duration of the call point ``config.name_or_path`` there, set
    ``num_mtp_layers``/``mtp_layer_types`` and the key regex — transformers' own loader then loads our weights.
    Everything is restored afterwards. Limitation (transformers): assisted decoding supports batch size 1 only.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise BebopError(
            f"transformers' generate(use_mtp=True) (assisted decoding) supports batch size 1 only; "
            f"got input_ids of shape {tuple(input_ids.shape)}"
        )
    cfg = model.config
    text_cfg = _text_config(cfg)
    n0 = int(text_cfg.num_hidden_layers)
    sentinel = object()
    saved = {
        "num_mtp_layers": getattr(text_cfg, "num_mtp_layers", sentinel),
        "mtp_layer_types": getattr(text_cfg, "mtp_layer_types", sentinel),
    }
    saved_name = cfg._name_or_path
    saved_dtype = getattr(cfg, "dtype", None)
    had_own_keys = "_keys_to_ignore_on_load_unexpected" in model.__dict__
    old_keys = model.__dict__.get("_keys_to_ignore_on_load_unexpected")
    with tempfile.TemporaryDirectory(prefix="bebop-hf-mtp-") as tmp:
        export_head(head, Path(tmp) / "model.safetensors", "deepseek_v3", num_base_layers=n0, include_shared=False)
        try:
            text_cfg.num_mtp_layers = head.num_layers
            if getattr(text_cfg, "layer_types", None) is not None:
                text_cfg.mtp_layer_types = ["full_attention"] * head.num_layers
            cfg._name_or_path = tmp
            if saved_dtype is None:  # models built from a config (not from_pretrained) have config.dtype None
                cfg.dtype = model.dtype
            model._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{n0 + i}\..*" for i in range(head.num_layers)]
            return model.generate(input_ids, max_new_tokens=max_new_tokens, use_mtp=True, **gen_kwargs)
        finally:
            cfg._name_or_path = saved_name
            cfg.dtype = saved_dtype
            if had_own_keys:
                model._keys_to_ignore_on_load_unexpected = old_keys
            else:
                model.__dict__.pop("_keys_to_ignore_on_load_unexpected", None)
            for k, v in saved.items():
                if v is sentinel:
                    if k in text_cfg.__dict__:
                        delattr(text_cfg, k)
                else:
                    setattr(text_cfg, k, v)
