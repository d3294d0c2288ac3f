"""Lean inference forwards for dense Qwen3, Llama and Qwen2 decoders and Bebop MTP heads, over the models' own weights.

Why: at the toy sizes Bebop decodes, an eager transformers forward is mostly Python and dispatch (kwargs plumbing,
output capturing, 4D mask building, DynamicCache bookkeeping). Speculative decoding is sensitive to exactly that
fixed per-call cost (DESIGN §8), and so is plain decoding. The engine (``bebop.engine.forwards``) therefore runs
BOTH plain and MTP decoding through these forwards when the model is supported, and through transformers otherwise.

What is computed — the same math as transformers' ``Qwen3DecoderLayer`` / ``Qwen3Model``, ``LlamaDecoderLayer`` /
``LlamaModel`` and ``Qwen2DecoderLayer`` / ``Qwen2Model`` in eval mode (``transformers.models.{qwen3,llama,qwen2}``,
5.x) and as ``transformers.modeling_layers.MtpLayer``:

    x ← x + o_proj( SDPA( rope(q_norm(q)), rope(k_norm(k)), v ) )     q, k, v = projections of RMSNorm₁(x)
    x ← x + down( silu(gate(h)) ⊙ up(h) )                             h = RMSNorm₂(x)
    RMSNorm(x) = w ⊙ (x · rsqrt(mean(x²) + ε)), in float32, cast back (as Qwen3/Llama/Qwen2RMSNorm)
    rope(x) = x·cos + rotate_half(x)·sin, cos/sin of (position · inv_freq) · attention_scaling (the model's own
              rotary buffers, so any RoPE whose frequencies are fixed at build time: default, linear, llama3, yarn)

The three families differ only in what the lean layer reads as optional: Qwen3 has q_norm/k_norm (Llama and Qwen2
have none: q and k go straight to RoPE); Qwen2 has q/k/v biases; Llama has q/k/v/o biases under
``attention_bias`` and gate/up/down biases under ``mlp_bias``, and an explicit ``head_dim``. What the lean path
cannot reproduce — sliding-window layers, an MLP activation other than SiLU, RoPE whose frequencies change with
the sequence length (dynamic, longrope), partial rotary dims, any other layer or norm class — is refused, and
:func:`why_not_lean` / :func:`why_not_lean_head` say why (the engine prints it and decodes through transformers).

and for the MTP head (DESIGN §2): ``h_in = eh_proj([enorm(Embed(tok)), hnorm(h)])``, the block above, then
``post_norm``. Equal up to float rounding (``tests/models/test_lean.py`` checks hidden states and logits against
transformers on random prompts with left padding and holes, in one call and chunked through the cache, for each
family), cheaper because:
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

import functools
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LeanDecoder", "LeanHead", "StaticKV", "forget", "lean_decoder", "lean_head", "why_not_lean",
           "why_not_lean_head"]


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

    def select(self, rows: Tensor) -> None:
        """Keep only batch rows ``rows``."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0), strict=True))

    def compact(self, order: Tensor, length: int) -> None:
        """Row b keeps slots ``order[b, :length]`` (in that order) as its slots ``0..length-1``: one gather per
        cache, indexing whole [H, D] blocks (so the index is [B, length], not the cache's size)."""
        rows = torch.arange(order.shape[0], device=order.device).unsqueeze(1)
        for name in ("k", "v"):
            t = getattr(self, name)
            kept = t.permute(1, 3, 0, 2, 4)[rows, order].permute(2, 0, 3, 1, 4)       # [L, B, H, length, D]
            t.narrow(3, 0, length).copy_(kept)

    def put(self, rows: Tensor, src: StaticKV, width: int) -> None:
        """Batch rows ``rows`` take slots ``0..width-1`` of every row of ``src`` (a cache of ``len(rows)`` rows, e.g.
        a joining row's prefill); their other slots are left for the caller's validity mask to hide."""
        self.ensure(width)
        for name in ("k", "v"):
            getattr(self, name)[:, rows, :, :width] = getattr(src, name)[:, :, :, :width]

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


def _fused_bias(linears) -> Tensor | None:
    """The bias of the concatenated projections ``linears`` (zeros where one has none), or None if none has one."""
    if all(m.bias is None for m in linears):
        return None
    return torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.weight.shape[0]) for m in linears])


class _Layer:
    """One decoder layer's weights, read from a transformers Qwen3, Llama or Qwen2 decoder layer. Fused copies:
    ``qkv`` = [q; k; v] projections with the input RMSNorm weight folded in (``W·(w⊙n) = (W·diag w)·n``; biases
    are added after the matmul, so folding leaves them alone), ``gate_up`` = [gate; up] with the post-attention
    RMSNorm weight folded in. ``qk_norm`` is None for layers without q/k norms (Llama, Qwen2)."""

    def __init__(self, layer):
        attn, mlp = layer.self_attn, layer.mlp
        self.eps1, self.eps2 = _eps(layer.input_layernorm), _eps(layer.post_attention_layernorm)
        self.d = attn.head_dim
        self.hq = attn.q_proj.weight.shape[0] // self.d
        self.hkv = attn.k_proj.weight.shape[0] // self.d
        self.scale = float(attn.scaling)
        ln1 = layer.input_layernorm.weight
        self.qkv = _t(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]) * ln1[None, :])
        self.qkv_bias = _fused_bias([attn.q_proj, attn.k_proj, attn.v_proj])
        q_norm = getattr(attn, "q_norm", None)
        self.qk_norm = self.eps_qk = None
        if q_norm is not None:
            self.eps_qk = _eps(q_norm)
            self.qk_norm = torch.cat([q_norm.weight.expand(self.hq, self.d),
                                      attn.k_norm.weight.expand(self.hkv, self.d)])
        self.o = _t(attn.o_proj.weight)
        self.o_bias = attn.o_proj.bias
        ln2 = layer.post_attention_layernorm.weight
        self.gate_up = _t(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]) * ln2[None, :])
        self.gate_up_bias = _fused_bias([mlp.gate_proj, mlp.up_proj])
        self.down = _t(mlp.down_proj.weight)
        self.down_bias = mlp.down_proj.bias

    def __call__(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, kc: Tensor, vc: Tensor, start: int) -> Tensor:
        B, T, _ = x.shape
        d, hq, hkv = self.d, self.hq, self.hkv
        qkv = _mm(_rms(x, None, self.eps1), self.qkv, self.qkv_bias).view(B, T, hq + 2 * hkv, d)
        qk = qkv.narrow(2, 0, hq + hkv)
        if self.qk_norm is not None:
            qk = _rms(qk, self.qk_norm, self.eps_qk)
        qk = qk * cos + torch.roll(qk, d // 2, -1) * sin                      # RoPE on q and k heads at once
        end = start + T
        kc.narrow(2, start, T).copy_(qk.narrow(2, hq, hkv).transpose(1, 2))
        vc.narrow(2, start, T).copy_(qkv.narrow(2, hq + hkv, hkv).transpose(1, 2))
        o = F.scaled_dot_product_attention(qk.narrow(2, 0, hq).transpose(1, 2), kc.narrow(2, 0, end),
                                           vc.narrow(2, 0, end), attn_mask=mask, scale=self.scale,
                                           enable_gqa=hq != hkv)
        x = x + _mm(o.transpose(1, 2).reshape(B, T, hq * d), self.o, self.o_bias)
        gate, up = _mm(_rms(x, None, self.eps2), self.gate_up, self.gate_up_bias).chunk(2, dim=-1)
        return x + _mm(F.silu(gate) * up, self.down, self.down_bias)


class _Rope:
    """cos and signed-sin tables [n, D] from the model's rotary module: ``inv_freq`` and ``attention_scaling`` as
    the module holds them, so any RoPE whose frequencies are fixed when the module is built (default, linear,
    llama3, yarn) gives the module's own cos/sin (``tests/models/test_lean.py`` compares them for llama3)."""

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


LEAN_FAMILIES: tuple[str, ...] = ("Qwen3", "Llama", "Qwen2")
_DYNAMIC_ROPE = ("dynamic", "longrope")   # rope types whose inv_freq changes with the sequence length


@functools.cache
def _kinds() -> dict[type, tuple[str, bool]]:
    """Decoder-layer class -> (family, whether it has q/k norms): the layers the lean path covers."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

    return {Qwen3DecoderLayer: ("Qwen3", True), LlamaDecoderLayer: ("Llama", False),
            Qwen2DecoderLayer: ("Qwen2", False)}


@functools.cache
def _rms_classes() -> tuple[type, ...]:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    return (Qwen3RMSNorm, LlamaRMSNorm, Qwen2RMSNorm)


def _is_rms(norm) -> bool:
    """True for the x·w RMSNorm classes of Qwen3, Llama and Qwen2 (the same float32 math; not the zero-centred
    x·(1+w) norms of Qwen3.5 / Qwen3-Next)."""
    return type(norm) in _rms_classes()


def _layer_problem(layer, where: str) -> str:
    """Why the lean layer cannot reproduce ``layer`` (``where`` names it in the message), or "" if it can."""
    kind = _kinds().get(type(layer))
    if kind is None:
        return (f"{where} is a {type(layer).__name__}, not one of the decoder layers the lean path covers "
                f"({', '.join(LEAN_FAMILIES)})")
    attn = layer.self_attn
    act = getattr(attn.config, "hidden_act", None)
    if act not in ("silu", "swish"):
        return f"{where} has hidden_act {act!r} (the lean MLP is SiLU-gated)"
    if getattr(attn, "sliding_window", None) is not None:
        return f"{where} uses sliding-window attention (window {attn.sliding_window})"
    norms = [layer.input_layernorm, layer.post_attention_layernorm] + ([attn.q_norm, attn.k_norm] if kind[1] else [])
    odd = next((n for n in norms if not _is_rms(n)), None)
    if odd is not None:
        return f"{where} has a {type(odd).__name__} norm (the lean path computes x·w RMSNorms)"
    if kind[1] and attn.q_norm.variance_epsilon != attn.k_norm.variance_epsilon:
        return f"{where} has q_norm and k_norm with different epsilons"
    return ""


def why_not_lean(model) -> str:
    """Why the lean path cannot decode ``model`` exactly, naming the first thing it cannot reproduce, or "" when
    it can: a transformers Qwen3, Llama or Qwen2 decoder with SiLU MLPs, full attention on every layer, x·w
    RMSNorms and RoPE over the whole head with frequencies fixed at build time."""
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    if dec is None or not hasattr(dec, "layers") or len(dec.layers) == 0:
        return f"{type(model).__name__} has no decoder layers the lean path can read"
    for i, layer in enumerate(dec.layers):
        problem = _layer_problem(layer, f"layer {i}")
        if problem:
            return problem
    rotary = getattr(dec, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        return "its decoder has no rotary embedding with an inv_freq buffer"
    rope_type = str(getattr(rotary, "rope_type", "default"))
    if rope_type.startswith(_DYNAMIC_ROPE):
        return f"rope_type {rope_type!r} changes its frequencies with the sequence length"
    if not _is_rms(getattr(dec, "norm", None)):
        return f"its final norm is a {type(getattr(dec, 'norm', None)).__name__}, not an x·w RMSNorm"
    head_dim, rotary_dim = dec.layers[0].self_attn.head_dim, 2 * rotary.inv_freq.numel()
    if rotary_dim != head_dim:
        return f"RoPE covers {rotary_dim} of {head_dim} head dims (partial rotary)"
    return ""


def why_not_lean_head(head, model) -> str:
    """Why the lean path cannot run the MTP ``head`` bound to ``model`` (the target's own reason first), or ""
    when it can: every MTP layer's block a covered decoder layer, its enorm/hnorm/post_norm x·w RMSNorms."""
    base = why_not_lean(model)
    return f"the target model cannot use the lean path: {base}" if base else _head_problem(head, model)


def _head_problem(head, model) -> str:
    """Why the lean path cannot run ``head`` on ``model``, given that it can run ``model`` itself."""
    if head.num_layers < 1 or getattr(head, "_shared", None) is None:
        return "the head has no layers or is not bound to a model"
    if head._shared.embed is not model.get_input_embeddings():
        return "the head is bound to another model's embedding"
    for i, layer in enumerate(head.layers):
        problem = _layer_problem(layer.mtp_block, f"its layer {i}'s block")
        norms = [layer.enorm, layer.hnorm] + ([layer.post_norm] if layer.post_norm is not None else [])
        if not problem and not all(_is_rms(n) for n in norms):
            problem = f"its layer {i} has norms {', '.join(type(n).__name__ for n in norms)}, not x·w RMSNorms"
        if not problem and layer.enorm.variance_epsilon != layer.hnorm.variance_epsilon:
            problem = f"its layer {i} has enorm and hnorm with different epsilons"
        if problem:
            return problem
    return ""


class LeanDecoder:
    """The base model's decoder stack (embedding → layers → final norm) as a lean forward; see module doc."""

    def __init__(self, model):
        dec = model.get_decoder()
        self.family = _kinds()[type(dec.layers[0])][0]        # "Qwen3", "Llama" or "Qwen2"
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


def forget(*modules) -> None:
    """Drop the lean forwards cached for these models or heads, so the next call rebuilds them from the current
    weights. Needed after weights are written without bumping their version counters (``param.data`` writes,
    which some trainers' optimizers do), which the freshness check cannot see."""
    for m in modules:
        _DECODERS.pop(m, None)
        _HEADS.pop(m, None)


def lean_decoder(model) -> LeanDecoder | None:
    """The lean forward of ``model`` (cached, rebuilt if any weight changed), or None if unsupported
    (:func:`why_not_lean` says why)."""
    cached = _DECODERS.get(model)
    if cached is not None and cached.sources.fresh():
        return cached
    if why_not_lean(model):
        return None
    with torch.no_grad():
        lean = LeanDecoder(model)
    _DECODERS[model] = lean
    return lean


def lean_head(head, model, base: LeanDecoder | None = None) -> LeanHead | None:
    """The lean forward of a bound ``MTPHead`` (all its layers), or None if unsupported
    (:func:`why_not_lean_head` says why). ``base`` = ``lean_decoder(model)`` if the caller already has it."""
    base = base or lean_decoder(model)
    if base is None or _head_problem(head, model) or head._shared.embed.weight is not base.embed:
        return None
    cached = _HEADS.get(head)
    if cached is not None and cached.base is base and cached.sources.fresh():
        return cached
    with torch.no_grad():
        lean = LeanHead(head, base)
    _HEADS[head] = lean
    return lean
