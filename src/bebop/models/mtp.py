"""The MTP head of DESIGN §2 (DeepSeek-V3 / Qwen3.5 style), built on transformers' MtpLayer.

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
import sys

import torch
from torch import nn
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_layers import MtpLayer

from bebop.errors import BebopError


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


def _warm_source(layers: nn.ModuleList, block: nn.Module) -> nn.Module:
    """The last base decoder layer with exactly the MTP block's parameters (names and shapes): a hybrid model's
    linear-attention layers or a dense layer of an MoE model cannot seed a full-attention MoE block."""
    want = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    for layer in reversed(layers):
        if {k: tuple(v.shape) for k, v in layer.state_dict().items()} == want:
            return layer
    raise BebopError(
        f"no decoder layer of the base model has the MTP block's parameters ({type(block).__name__}, "
        f"{len(want)} tensors); cannot warm-start the head from the base model"
    )


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
        """Random init of a head built from scratch: every matrix (linear weights, routed-expert tensors, router
        weights) ~ N(0, initializer_range), linear biases 0. Norms keep their class's own init — ones for the x·w
        RMSNorms, zeros for the zero-centred x·(1+w) RMSNorms of Qwen3.5 / Qwen3-Next — since "scale 1" is a
        different number in the two conventions. The decoder-layer classes leave expert tensors uninitialised
        (torch.empty), so they must be filled here."""
        std = float(getattr(self.config, "initializer_range", 0.02))
        for module in self.modules():
            if module is self or "norm" in type(module).__name__.lower():
                continue
            for name, param in module.named_parameters(recurse=False):
                if param.dim() >= 2:
                    param.normal_(0.0, std)
                elif isinstance(module, nn.Linear) and name == "bias":
                    param.zero_()

    @classmethod
    def from_base(cls, model: PreTrainedModel, num_layers: int = 1) -> MTPHead:
        """Build a head for ``model``, warm-started, on the model's device/dtype, and bind it.

        Warm start: every ``mtp_block`` = a copy of the base model's last decoder layer of the same kind (for
        hybrids, the last full-attention layer; for MoE models, the last MoE layer); ``eh_proj`` =
        ``[N(0, initializer_range) | I]`` so that ``h_in ~= hnorm(h)`` starts on the hidden-state path while the
        embedding half still gets gradients; ``enorm``/``hnorm`` = scale 1 in the norm class's own convention;
        ``post_norm`` = a copy of the base model's final norm (same class, so the same convention), so
        ``logits(head(...))`` starts on the same scale as the base model's logits.
        """
        decoder = model.get_decoder()
        last = decoder.layers[-1]
        final_norm = getattr(decoder, "norm", None)
        norm_cls = type(final_norm) if final_norm is not None else None
        head = cls(model.config, num_layers, decoder_layer_cls=type(last), norm_cls=norm_cls)
        source = _warm_source(decoder.layers, head.layers[0].mtp_block)
        ref = model.get_input_embeddings().weight
        head.to(device=ref.device, dtype=ref.dtype)
        h = head.hidden_size
        with torch.no_grad():
            for layer in head.layers:
                layer.mtp_block.load_state_dict(source.state_dict())
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

    @staticmethod
    def _chain_mask(context: torch.Tensor | None, blocks: int, t: int, device) -> torch.Tensor:
        """Boolean 4D mask [B|1, 1, T, (blocks+1)·T] for one draft step of the unroll over a cache of ``blocks``
        earlier T-slot blocks of the same MTP layer, laid out as the engine's head cache is when it drafts from
        position t: with ``context`` (layer 0; [B, T] real step-1 slots, or all real when its rows are None) the
        first block holds the step-1 slots of the context (slot s ≤ t, real) and the later blocks this draft's own
        chain (slot t only); without it (layers ≠ 0) every block is chain. The query's own slot is always seen."""
        q = torch.arange(t, device=device)[:, None]
        s = torch.arange(t, device=device)[None, :]
        own = (s == q)[None]                                           # [1, T, T]
        parts = []
        for b in range(blocks + 1):
            if b == 0 and context is not None:
                seen = (s <= q)[None] & (context.bool()[:, None, :] | own)   # [B, T, T]
                parts.append(seen)
            else:
                parts.append(own)
        width = max(p.shape[0] for p in parts)
        return torch.cat([p.expand(width, t, t) for p in parts], dim=-1)[:, None]

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
        anywhere — or a boolean [B|1, 1, T, past+T] mask of the keys each new slot sees; ``cache``: a transformers
        Cache owned by the caller, of which this call reads and appends layer index ``layer`` (``past`` = its
        current length). Returns ``h^k`` [B, T, H] after ``post_norm``.
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
        full = attention_mask is not None and attention_mask.dim() == 4
        if full and (attention_mask.shape[0] not in (1, b) or tuple(attention_mask.shape[1:]) != (1, t, past + t)):
            raise BebopError(f"a 4D attention_mask must be [B|1, 1, T, past+T] = [{b}|1, 1, {t}, {past + t}], "
                             f"got shape {tuple(attention_mask.shape)}")
        if not full and attention_mask is not None and tuple(attention_mask.shape) != (b, past + t):
            raise BebopError(
                f"attention_mask must be [B, past+T] = {(b, past + t)} (cache holds {past} slots), "
                f"got shape {tuple(attention_mask.shape)}"
            )
        embeds = shared.embed(input_ids)
        hidden = hidden.to(embeds.dtype)
        position_embeddings = shared.rotary(embeds, position_ids)
        if full:
            mask = torch.zeros(attention_mask.shape, dtype=embeds.dtype, device=embeds.device)
            mask.masked_fill_(~attention_mask.to(embeds.device), torch.finfo(embeds.dtype).min)
        else:
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
        caller to mask. Step k uses MTP layer ``(k-1) % num_layers``.

        **Attention context = the engine's head cache.** Step 1 runs causal self-attention over the step-1 slots
        (slot t sees slots ≤ t), as the engine's cache holds them for the accepted context. Step k ≥ 2 at
        position t drafts from there: with layer 0 it sees the step-1 slots ≤ t and this draft's own earlier
        layer-0 slots at t (its chain), with another layer only that layer's chain at t — exactly the keys the
        engine's head attends to when it drafts d_k after position t (``engine.step``), so the unrolled q_k is
        the q_k that decoding draws from. With ``attention_mask`` [B, T] (1 = real), a step-1 slot t is a visible
        key only if both ``x_t``'s and ``x_{t+1}``'s slots are real; positions default to ``cumsum(mask) - 1`` (or
        ``arange(T)``), plus k (the consumed token's position).
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
        cache = self.new_cache()
        blocks = [0] * self.num_layers          # T-slot blocks each layer's cache holds
        context = torch.ones((1, t), dtype=torch.bool, device=device)
        for k in range(1, steps + 1):
            layer = (k - 1) % self.num_layers
            tokens = torch.nn.functional.pad(input_ids[:, k:], (0, min(k, t)), value=0)
            if k == 1:
                mask_1 = None
                if attention_mask is not None:
                    shifted = torch.nn.functional.pad(attention_mask[:, 1:], (0, min(1, t)), value=0)
                    mask_1 = attention_mask.bool() & shifted.bool()
                    context = mask_1
                h = self.forward(tokens, h, position_ids + 1, attention_mask=mask_1, cache=cache, layer=0)
            else:
                chain = self._chain_mask(context if layer == 0 else None, blocks[layer], t, device)
                h = self.forward(tokens, h, position_ids + k, attention_mask=chain, cache=cache, layer=layer)
            blocks[layer] += 1
            outs.append(h)
        return outs
