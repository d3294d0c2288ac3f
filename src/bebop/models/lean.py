"""Lean inference forwards for Qwen3-style decoders and Bebop MTP heads, over the models' own weights.

Why: at the toy sizes Bebop decodes, an eager transformers forward is mostly Python and dispatch (kwargs plumbing,
output capturing, 4D mask building, DynamicCache bookkeeping). Speculative decoding is sensitive to exactly that
fixed per-call cost (DESIGN §8), and so is plain decoding. The engine (``bebop.engine.forwards``) therefore runs
BOTH plain and MTP decoding through these forwards when the model is supported, and through transformers otherwise.

What is computed — the same math as transformers' ``Qwen3DecoderLayer`` / ``Qwen3Model`` in eval mode
(``transformers.models.qwen3.modeling_qwen3``, 5.x) and as ``transformers.modeling_layers.MtpLayer``:

    x ← x + o_proj( SDPA( rope(q_norm(q)), rope(k_norm(k)), v ) )     q, k, v = projections of RMSNorm₁(x)
    x ← x + down( silu(gate(h)) ⊙ up(h) )                             h = RMSNorm₂(x)
    RMSNorm(x) = w ⊙ (x · rsqrt(mean(x²) + ε)), in float32, cast back (as Qwen3RMSNorm)
    rope(x) = x·cos + rotate_half(x)·sin, cos/sin of (position · inv_freq) (the model's own rotary buffers)

and for the MTP head (DESIGN §2): ``h_in = eh_proj([enorm(Embed(tok)), hnorm(h)])``, the block above, then
``post_norm``. Equal up to float rounding (``tests/test_lean.py`` checks logits against transformers on random
prompts with left padding and holes, in one call and chunked through the cache), cheaper because:
(1) q/k/v and gate/up projections are one matmul each, on concatenated weights with the preceding RMSNorm
weight folded in (``W·(w⊙n) = (W·diag w)·n``; likewise enorm/hnorm into ``eh_proj``), every matmul on a
contiguous transposed copy (``x @ Wᵀ`` is markedly cheaper than ``F.linear`` at these sizes); (2) q_norm and
k_norm are one normalisation over the q and k heads together, and float32 RMSNorm takes ``mean(x²)`` as
``‖x‖²/n`` (one ``vector_norm`` + ``addcmul``); (3) cos/sin come from a table indexed by position, with
``rotate_half(x)·sin = roll(x, D/2)·sin±``, ``sin± = [−sin₁, sin₂]`` (bit-identical); (4) the KV cache is a
preallocated static tensor per layer stack, written in place at explicit slots, with a per-row boolean
validity mask over slots (holes anywhere), turned into one additive SDPA mask per forward — no cache objects,
no per-layer mask work.

Weights: the transposed/fused matmul weights (and the LM head's) are copies, one per weight. They are rebuilt
whenever a source parameter changes — replaced in its module, moved (``data_ptr``) or updated in place (the
version counter, which optimizer steps and ``load_state_dict`` bump) — checked on every ``lean_decoder`` /
``lean_head`` call (once per generate call), so an RL trainer updating the policy between rollouts is always
decoded with its current weights. Norm vectors, embedding and rotary buffers are read from the modules.

Semantics are eval mode (no attention dropout), as in generation.

Cache contract: a forward over T new slots at ``start`` writes K/V to slots ``start..start+T-1`` and attends
with ``valid[:, :start+T]`` (True = real slot), causally in slot order; a query always sees its own slot, so
a hole or padding query never becomes fully masked (its output is garbage nobody reads). Positions must be
``< cache.capacity`` (they are: a position never exceeds its slot index in the engine).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LeanDecoder", "LeanHead", "StaticKV", "lean_decoder", "lean_head"]


def _rms(x: Tensor, w: Tensor | None, eps: Tensor) -> Tensor:
    """Qwen3RMSNorm: ``w * (x · rsqrt(mean(x²) + eps))``, computed in float32 (``eps`` a float32 scalar
    tensor); ``w=None`` skips the weight (folded into the next matmul). For float32 inputs ``mean(x²)`` is
    taken as ``‖x‖²/n`` via one ``vector_norm`` + ``addcmul`` (4 small ops instead of 7; equal up to
    float rounding)."""
    if x.dtype == torch.float32:
        s = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        h = x * torch.rsqrt(torch.addcmul(eps, s, s, value=1.0 / x.shape[-1]))
    else:
        f = x.float()
        h = (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return h if w is None else w * h


def _eps(norm) -> Tensor:
    w = norm.weight
    return torch.tensor(float(norm.variance_epsilon), dtype=torch.float32, device=w.device)


def _t(w: Tensor) -> Tensor:
    """A weight [out, in] as a contiguous [in, out] copy: ``x @ _t(W)`` = ``F.linear(x, W)``, and at these
    sizes a plain matmul on a contiguous right operand is markedly cheaper than ``F.linear``."""
    return w.t().contiguous()


def _mm(x: Tensor, wt: Tensor, bias: Tensor | None = None) -> Tensor:
    y = torch.matmul(x, wt)
    return y if bias is None else y + bias


class _Sources:
    """The parameters a lean forward was built from, as (module, name, tensor, data_ptr, version). ``fresh()``
    is True while every module still holds the same tensor, at the same address, unmodified in place — cheap
    enough to check on every generate call (no module-tree traversal). Inference tensors (a model created
    under ``torch.inference_mode``) have no version counter: such a model is never considered fresh."""

    def __init__(self, *modules):
        self.entries = []
        self.untracked = False
        for root in modules:
            for mod in root.modules():
                for name, t in mod._parameters.items():
                    if t is not None:
                        self.untracked |= t.is_inference()
                        self.entries.append((mod, name, t, t.data_ptr(), None if t.is_inference() else t._version))

    def fresh(self) -> bool:
        return not self.untracked and all(
            mod._parameters.get(name) is t and t.data_ptr() == ptr and t._version == ver
            for mod, name, t, ptr, ver in self.entries)


class StaticKV:
    """Preallocated KV slots for a stack of layers: ``k``/``v`` [L, B, H_kv, capacity, D], with per-layer views
    in ``layers``. Grows (copying) when a write goes past ``capacity``; the caller keeps the validity mask."""

    def __init__(self, layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int, dtype, device):
        shape = (layers, batch, kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0), strict=True))

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def ensure(self, n: int) -> None:
        if n <= self.capacity:
            return
        cap = max(n, 2 * self.capacity)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros((*old.shape[:3], cap, old.shape[4]))
            new[:, :, :, : old.shape[3]] = old
            setattr(self, name, new)
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0), strict=True))


class _Layer:
    """One decoder layer's weights, read from a transformers Qwen3DecoderLayer. Fused copies: ``qkv`` =
    [q; k; v] projections with the input RMSNorm weight folded in (``W·(w⊙n) = (W·diag w)·n``), ``gate_up`` =
    [gate; up] with the post-attention RMSNorm weight folded in."""

    def __init__(self, layer):
        attn, mlp = layer.self_attn, layer.mlp
        self.eps1, self.eps_qk, self.eps2 = _eps(layer.input_layernorm), _eps(attn.q_norm), _eps(
            layer.post_attention_layernorm)
        self.d = attn.head_dim
        self.hq = attn.q_proj.weight.shape[0] // self.d
        self.hkv = attn.k_proj.weight.shape[0] // self.d
        self.scale = float(attn.scaling)
        ln1 = layer.input_layernorm.weight
        self.qkv = _t(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]) * ln1[None, :])
        biases = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
        if all(b is None for b in biases):
            self.qkv_bias = None
        else:
            lin = [attn.q_proj, attn.k_proj, attn.v_proj]
            self.qkv_bias = torch.cat([b if b is not None else m.weight.new_zeros(m.weight.shape[0])
                                       for b, m in zip(biases, lin, strict=True)])
        self.qk_norm = torch.cat([attn.q_norm.weight.expand(self.hq, self.d),
                                  attn.k_norm.weight.expand(self.hkv, self.d)])
        self.o = _t(attn.o_proj.weight)
        self.o_bias = attn.o_proj.bias
        ln2 = layer.post_attention_layernorm.weight
        self.gate_up = _t(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]) * ln2[None, :])
        self.down = _t(mlp.down_proj.weight)

    def __call__(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, kc: Tensor, vc: Tensor, start: int) -> Tensor:
        B, T, _ = x.shape
        d, hq, hkv = self.d, self.hq, self.hkv
        qkv = _mm(_rms(x, None, self.eps1), self.qkv, self.qkv_bias).view(B, T, hq + 2 * hkv, d)
        qk = _rms(qkv.narrow(2, 0, hq + hkv), self.qk_norm, self.eps_qk)
        qk = qk * cos + torch.roll(qk, d // 2, -1) * sin                      # RoPE on q and k heads at once
        end = start + T
        kc.narrow(2, start, T).copy_(qk.narrow(2, hq, hkv).transpose(1, 2))
        vc.narrow(2, start, T).copy_(qkv.narrow(2, hq + hkv, hkv).transpose(1, 2))
        o = F.scaled_dot_product_attention(qk.narrow(2, 0, hq).transpose(1, 2), kc.narrow(2, 0, end),
                                           vc.narrow(2, 0, end), attn_mask=mask, scale=self.scale,
                                           enable_gqa=hq != hkv)
        x = x + _mm(o.transpose(1, 2).reshape(B, T, hq * d), self.o, self.o_bias)
        gate, up = _mm(_rms(x, None, self.eps2), self.gate_up).chunk(2, dim=-1)
        return x + _mm(F.silu(gate) * up, self.down)


class _Rope:
    """cos and signed-sin tables [n, D] from the model's rotary module (default-style RoPE: static inv_freq)."""

    def __init__(self, rotary, dtype):
        self.inv_freq = rotary.inv_freq
        self.scaling = float(getattr(rotary, "attention_scaling", 1.0))
        self.dtype = dtype
        self.cos = self.sin = None
        self.ensure(256)

    def ensure(self, n: int) -> None:
        if self.cos is not None and self.cos.shape[0] >= n:
            return
        n = max(n, 2 * (self.cos.shape[0] if self.cos is not None else 0))
        inv = self.inv_freq.float()
        freqs = torch.arange(n, device=inv.device, dtype=torch.float)[:, None] * inv[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos = (emb.cos() * self.scaling).to(self.dtype)
        sin = (emb.sin() * self.scaling).to(self.dtype)
        half = sin.shape[-1] // 2
        self.cos, self.sin = cos[:, None, :], torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)[:, None, :]

    def __call__(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """[B, T] positions -> cos, sin± as [B, T, 1, D] (broadcast over heads)."""
        return self.cos[pos], self.sin[pos]


def _attn_mask(valid: Tensor, start: int, T: int, dtype) -> Tensor:
    """Additive SDPA mask [B, 1, T, start+T] (0 = attend, −inf = not; built once per forward, as a float mask
    is cheaper for SDPA than a boolean one): query slot start+i sees key slot j iff j ≤ start+i and (valid[j]
    or j = start+i). Every query sees at least its own slot, so no row is fully masked."""
    if T == 1:  # the query's own slot is the last one; the caller marks it valid
        allowed = valid.unsqueeze(1)
    else:
        S = start + T
        qs = torch.arange(start, S, device=valid.device).unsqueeze(1)
        ks = torch.arange(S, device=valid.device)
        allowed = (valid.unsqueeze(1) | (ks == qs)) & (ks <= qs)
    mask = torch.where(allowed, 0.0, float("-inf"))
    return (mask if mask.dtype == dtype else mask.to(dtype)).unsqueeze(1)


def _supported_layer(layer) -> bool:
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RMSNorm

    if type(layer) is not Qwen3DecoderLayer:
        return False
    attn, mlp = layer.self_attn, layer.mlp
    return (getattr(attn.config, "hidden_act", None) == "silu" and attn.sliding_window is None
            and attn.q_norm.variance_epsilon == attn.k_norm.variance_epsilon
            and all(getattr(m, "bias", None) is None for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
            and all(type(n) is Qwen3RMSNorm for n in (layer.input_layernorm, layer.post_attention_layernorm,
                                                       attn.q_norm, attn.k_norm)))


class LeanDecoder:
    """The base model's decoder stack (embedding → layers → final norm) as a lean forward; see module doc."""

    def __init__(self, model):
        dec = model.get_decoder()
        self.sources = _Sources(model)
        self.embed = model.get_input_embeddings().weight
        self.norm = dec.norm.weight
        self.eps = _eps(dec.norm)
        self.layers = [_Layer(layer) for layer in dec.layers]
        self.rope = _Rope(dec.rotary_emb, self.embed.dtype)
        lm = model.get_output_embeddings()
        self.lm_t = _t(lm.weight) if type(lm) is torch.nn.Linear else None
        self.lm_bias = lm.bias if self.lm_t is not None else None

    def logits(self, hidden: Tensor) -> Tensor:
        """The LM head (an ``nn.Linear``) on ``hidden`` [..., H], from a transposed copy of its weight."""
        return _mm(hidden, self.lm_t, self.lm_bias)

    def new_cache(self, batch: int, capacity: int) -> StaticKV:
        L0 = self.layers[0]
        self.rope.ensure(capacity)
        return StaticKV(len(self.layers), batch, L0.hkv, L0.d, capacity, self.embed.dtype, self.embed.device)

    def __call__(self, ids: Tensor, pos: Tensor, valid: Tensor, cache: StaticKV, start: int) -> Tensor:
        """Last hidden states [B, T, H] after the final norm (what the LM head sees) for ``ids`` [B, T] at
        positions ``pos`` [B, T], written to cache slots ``start..start+T-1``; ``valid`` [B, start+T] bool."""
        T = ids.shape[1]
        if start + T > cache.capacity:
            cache.ensure(start + T)
            self.rope.ensure(cache.capacity)
        x = F.embedding(ids, self.embed)
        cos, sin = self.rope(pos)
        mask = _attn_mask(valid, start, T, x.dtype)
        for layer, (kc, vc) in zip(self.layers, cache.layers, strict=True):
            x = layer(x, cos, sin, mask, kc, vc, start)
        return _rms(x, self.norm, self.eps)


class _HeadLayer:
    """One MTP layer (DESIGN §2) as a lean forward. ``enorm`` and ``hnorm`` are one normalisation over the
    stacked [embedding, hidden] pair, their weights folded into a copy of ``eh_proj`` (same math as
    ``eh_proj(cat(enorm(e), hnorm(h)))``)."""

    def __init__(self, layer):
        self.eps = _eps(layer.enorm)
        self.hidden_first = bool(getattr(layer.config, "mtp_hidden_states_first", False))
        norms = [layer.hnorm.weight, layer.enorm.weight] if self.hidden_first else [layer.enorm.weight,
                                                                                     layer.hnorm.weight]
        self.eh = _t(layer.eh_proj.weight * torch.cat(norms)[None, :])
        self.block = _Layer(layer.mtp_block)
        self.post = layer.post_norm.weight if layer.post_norm is not None else None
        self.p_eps = _eps(layer.post_norm) if layer.post_norm is not None else None


class LeanHead:
    """A bound ``MTPHead``'s layers as lean forwards (DESIGN §2), with the base model's embedding and rope; layer
    i owns layer i of the head's cache."""

    def __init__(self, head, base: LeanDecoder):
        self.base = base
        self.sources = _Sources(*head.layers)
        self.layers = [_HeadLayer(layer) for layer in head.layers]

    def new_cache(self, batch: int, capacity: int) -> StaticKV:
        self.base.rope.ensure(capacity)
        b, eh = self.layers[0].block, self.layers[0].eh
        return StaticKV(len(self.layers), batch, b.hkv, b.d, capacity, eh.dtype, eh.device)

    def __call__(self, ids: Tensor, hidden: Tensor, pos: Tensor, valid: Tensor, cache: StaticKV, start: int,
                 layer: int = 0) -> Tensor:
        """``h^k`` [B, T, H] after post_norm from MTP layer ``layer`` for tokens ``ids`` [B, T] and ``h^{k-1}``
        ``hidden`` [B, T, H]."""
        B, T = ids.shape
        if start + T > cache.capacity:
            cache.ensure(start + T)
            self.base.rope.ensure(cache.capacity)
        lay = self.layers[layer]
        e = F.embedding(ids, self.base.embed)
        if hidden.dtype != e.dtype:
            hidden = hidden.to(e.dtype)
        pair = torch.stack([hidden, e] if lay.hidden_first else [e, hidden], dim=2)
        x = _mm(_rms(pair, None, lay.eps).view(B, T, -1), lay.eh)
        cos, sin = self.base.rope(pos)
        kc, vc = cache.layers[layer]
        x = lay.block(x, cos, sin, _attn_mask(valid, start, T, x.dtype), kc, vc, start)
        return _rms(x, lay.post, lay.p_eps) if lay.post is not None else x


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def lean_decoder(model) -> LeanDecoder | None:
    """The lean forward of ``model`` (cached, rebuilt if any weight changed), or None if unsupported
    (anything but a transformers Qwen3 decoder with default-style RoPE, SiLU MLP and full attention)."""
    cached = _DECODERS.get(model)
    if cached is not None and cached.sources.fresh():
        return cached
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    rotary = getattr(dec, "rotary_emb", None)
    if (dec is None or rotary is None or not hasattr(rotary, "inv_freq") or not hasattr(dec, "norm")
            or str(getattr(rotary, "rope_type", "default")).startswith(("dynamic", "longrope"))
            or not all(_supported_layer(layer) for layer in dec.layers)):
        return None
    with torch.no_grad():
        lean = LeanDecoder(model)
    _DECODERS[model] = lean
    return lean


def lean_head(head, model, base: LeanDecoder | None = None) -> LeanHead | None:
    """The lean forward of a bound ``MTPHead`` (all its layers), or None if unsupported. ``base`` =
    ``lean_decoder(model)`` if the caller already has it."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    base = base or lean_decoder(model)
    if base is None or head.num_layers < 1:
        return None
    if getattr(head, "_shared", None) is None or head._shared.embed.weight is not base.embed:
        return None
    for layer in head.layers:
        if not _supported_layer(layer.mtp_block) or not all(type(n) is Qwen3RMSNorm for n in (layer.enorm,
                                                                                              layer.hnorm)):
            return None
        if (layer.post_norm is not None and type(layer.post_norm) is not Qwen3RMSNorm) or (
                layer.enorm.variance_epsilon != layer.hnorm.variance_epsilon):
            return None
    cached = _HEADS.get(head)
    if cached is not None and cached.base is base and cached.sources.fresh():
        return cached
    with torch.no_grad():
        lean = LeanHead(head, base)
    _HEADS[head] = lean
    return lean
