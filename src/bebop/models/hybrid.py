"""Decoding forwards for hybrid linear-attention decoders (Qwen3.5, Qwen3.5-MoE, Qwen3-Next), with per-row rollback
of their linear-attention state, and for their full-attention MTP heads.

Why: a Gated DeltaNet layer folds every token it reads into a recurrent state ``S`` [H, d_k, d_v] and a
short-convolution window (the last K−1 pre-convolution inputs). A verify pass over ``[x, d_1..d_γ]`` folds in drafts
that may be rejected, and a KV crop cannot take them out again. transformers' caches keep only the state after the
last token, so transformers refuses assisted and MTP generation on these models. Here one verify pass keeps enough
to put each row back at its own accepted position: rows accept ragged counts, exactly as holes do in the attention
path (``bebop.engine.step``).

What is computed is the math of transformers' ``Qwen3_5DecoderLayer`` / ``Qwen3NextDecoderLayer`` in eval mode
(``transformers.models.{qwen3_5,qwen3_5_moe,qwen3_next}``, 5.x), layer by layer, with their own modules for the
projections, norms, MLP or MoE block and rotary embedding:

* full attention: ``x ← x + o_proj( SDPA(rope(q_norm(q)), rope(k_norm(k)), v) ⊙ σ(gate) )`` over static KV slots
  with the engine's per-row validity mask (``bebop.models.lean.StaticKV``, holes anywhere);
* Gated DeltaNet (:func:`delta_rule`): ``c = silu(conv1d([window, W_qkv·h]))`` split into q, k, v (q, k
  L2-normalised, q scaled by d_k^−½), ``β = σ(W_b·h)``, ``g = −exp(A_log)·softplus(W_a·h + dt_bias)``, then per
  token ``S ← S·e^g;  S ← S + k ⊗ β(v − Sᵀk);  o = Sᵀq``, and ``out_proj(RMSNormGated(o, z))``.

**State after a forward** (:class:`LinearState`). A forward over T new tokens leaves, for every linear layer, the
convolution input ``[window, new inputs]`` and the recurrent states before and after each of the T tokens pending;
:meth:`HybridCache.keep` then gives each row the state after its own last kept token (−1: the state before the
call). A forward that is not followed by ``keep`` keeps every token (prefill, plain decoding). How the states after
each token are kept is ``mode``:

* ``"store"`` (the default, as vLLM and SGLang do on GPUs): the T+1 states stay in memory until ``keep`` gathers
  each row's — ``(T+1)·B·H·d_k·d_v`` floats per linear layer during the step;
* ``"recompute"``: only q, k, v, g, β of the T tokens (a few hundred floats per token) and the state before the
  call are kept; ``keep`` runs the recurrence again and selects each row's state on the way — at most three
  states per layer, for a second pass of the (matmul-free) recurrence.

``docs/hybrid.md`` measures both.

A prefill keeps every token, so it keeps no per-token states; over more than :data:`STEPWISE_MAX` tokens it runs
transformers' chunked delta rule.

Left padding: padded prompt positions are zeroed before the linear layers, as transformers does
(``apply_mask_to_padding_states``); with a zero initial state they leave the state at zero.
"""

from __future__ import annotations

import functools
import sys
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from bebop.errors import BebopError
from bebop.models.lean import StaticKV, _attn_mask

__all__ = ["GAMMA_MAX", "MODES", "HybridCache", "HybridDecoder", "HybridHead", "LinearState", "delta_rule",
           "hybrid_decoder", "hybrid_head", "is_hybrid", "select_state", "why_not_hybrid", "why_not_hybrid_blocks",
           "why_not_hybrid_head"]

MODES = ("store", "recompute")
GAMMA_MAX = 16
"""The longest draft a hybrid verify rolls back: in ``store`` mode a verify holds γ+1 recurrent states per
linear-attention layer and row (``docs/hybrid.md`` gives the memory)."""
STEPWISE_MAX = 64
"""A prefill (a forward at slot 0) over more tokens than this runs transformers' chunked delta rule; every other
forward runs the rule token by token, keeping what a rollback needs."""

_FAMILIES = {"qwen3_5": "Qwen3.5", "qwen3_5_text": "Qwen3.5", "qwen3_5_moe": "Qwen3.5-MoE",
             "qwen3_5_moe_text": "Qwen3.5-MoE", "qwen3_next": "Qwen3-Next"}
_MODULES = ("qwen3_5", "qwen3_5_moe", "qwen3_next")


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def is_hybrid(model) -> bool:
    """True when ``model``'s decoder has linear-attention layers (its config's ``layer_types``)."""
    return "linear_attention" in (getattr(_text_config(model), "layer_types", None) or [])


def _family_module(obj) -> str:
    """The transformers model package a module class comes from (``qwen3_5``, ``qwen3_next``, …), or ""."""
    parts = type(obj).__module__.split(".")
    return parts[-2] if len(parts) >= 2 and parts[-3:-2] == ["models"] else ""


def why_not_hybrid(model) -> str:
    """Why the hybrid forwards cannot decode ``model``, or "" when they can: a Qwen3.5, Qwen3.5-MoE or Qwen3-Next text
    decoder (every layer a Gated DeltaNet or a gated full-attention layer of these families)."""
    cfg = _text_config(model)
    model_type = str(getattr(cfg, "model_type", ""))
    if model_type not in _FAMILIES:
        return f"model_type {model_type!r} is not a hybrid family the engine covers ({', '.join(sorted(_FAMILIES))})"
    dec = model.get_decoder()
    for i, layer in enumerate(dec.layers):
        if _family_module(layer) not in _MODULES:
            return f"layer {i} is a {type(layer).__name__}, not a Qwen3.5 / Qwen3-Next decoder layer"
        lin = getattr(layer, "linear_attn", None)
        if lin is not None and not (hasattr(lin, "in_proj_qkv") or hasattr(lin, "in_proj_qkvz")):
            return f"layer {i}'s linear attention has neither in_proj_qkv nor in_proj_qkvz"
        if lin is not None and lin.activation not in ("silu", "swish"):
            return f"layer {i}'s linear attention has activation {lin.activation!r} (the kernel is SiLU)"
    return ""


def why_not_hybrid_head(head, model) -> str:
    """Why the hybrid forwards cannot run the MTP ``head`` bound to ``model``, or "" when they can: every MTP
    layer's block a full-attention layer of the model's family, the head bound to the model's embedding."""
    base = why_not_hybrid(model)
    if base:
        return f"the target model cannot use the hybrid path: {base}"
    if getattr(head, "_shared", None) is None or head._shared.embed is not model.get_input_embeddings():
        return "the head is not bound to this model's embedding"
    return why_not_hybrid_blocks(head, model)


def why_not_hybrid_blocks(head, model) -> str:
    """Why ``head``'s blocks are not full-attention layers of the hybrid ``model``'s family, or "" when they are.
    Such a head cannot draft for a hybrid model on any path: transformers' modules would run its blocks with the
    model's rotary embedding (partial, Qwen3.5's), which another family's attention does not take."""
    for i, layer in enumerate(head.layers):
        block = layer.mtp_block
        if _family_module(block) not in _MODULES or getattr(block, "self_attn", None) is None:
            return (f"its layer {i}'s block is a {type(block).__name__}, not a full-attention layer of the "
                    f"model's family ({getattr(_text_config(model), 'model_type', '?')})")
    return ""


# --------------------------------------------------------------------------------------------- the delta rule


def delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor,
               keep_states: bool = True) -> tuple[Tensor, Tensor]:
    """The gated delta rule token by token, from ``state`` [B, H, d_k, d_v] (float32). ``q``, ``k`` [B, H, T, d_k]
    (L2-normalised; q scaled), ``v`` [B, H, T, d_v], ``g``, ``beta`` [B, H, T], all float32. Returns (outputs
    [B, H, T, d_v], the states before and after each token [T+1, B, H, d_k, d_v]) — or only the final state
    [B, H, d_k, d_v] with ``keep_states=False``.
    The recurrence of transformers' ``torch_recurrent_gated_delta_rule``."""
    T = q.shape[2]
    decay = g.exp()
    states = [state]
    out = []
    for t in range(T):
        state = state * decay[:, :, t, None, None]
        k_t = k[:, :, t]
        delta = (v[:, :, t] - (k_t.unsqueeze(-2) @ state).squeeze(-2)) * beta[:, :, t, None]
        state = state + k_t.unsqueeze(-1) * delta.unsqueeze(-2)
        out.append((q[:, :, t].unsqueeze(-2) @ state).squeeze(-2))
        if keep_states:
            states.append(state)
    o = torch.stack(out, dim=2)
    return o, (torch.stack(states) if keep_states else state)


def select_state(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor, last: Tensor) -> Tensor:
    """Each row b's state after token ``last[b]`` (−1: ``state`` itself), by running the recurrence again (the
    ``recompute`` mode): at most three states live at once."""
    decay = g.exp()
    chosen = state
    for t in range(q.shape[2]):
        state = state * decay[:, :, t, None, None]
        k_t = k[:, :, t]
        delta = (v[:, :, t] - (k_t.unsqueeze(-2) @ state).squeeze(-2)) * beta[:, :, t, None]
        state = state + k_t.unsqueeze(-1) * delta.unsqueeze(-2)
        chosen = torch.where((last == t)[:, None, None, None], state, chosen)
    return chosen


def _l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


# --------------------------------------------------------------------------------------------- state


class LinearState:
    """One linear-attention layer's per-row state: ``conv`` [B, C, K−1] (the last K−1 pre-convolution inputs, in
    the model's dtype) and ``rec`` [B, H, d_k, d_v] (float32), plus what the last forward left pending."""

    def __init__(self, batch: int, channels: int, kernel: int, heads: int, dk: int, dv: int, dtype, device):
        self.conv = torch.zeros((batch, channels, kernel - 1), dtype=dtype, device=device)
        self.rec = torch.zeros((batch, heads, dk, dv), dtype=torch.float32, device=device)
        self.full: Tensor | None = None        # [B, C, K−1+T] the convolution input of the last forward
        self.states: Tensor | list | None = None   # store mode: [T+1, B, H, d_k, d_v]; [before, after] if T = 1
        self.qkvgb: tuple | None = None        # recompute mode: (q, k, v, g, β, the state before) of the last forward

    def commit_all(self) -> None:
        """Keep every token of the pending forward (``conv`` / ``rec`` already hold the states after it)."""
        self.full = self.states = self.qkvgb = None

    def keep(self, last: Tensor) -> None:
        """Row b keeps the state after token ``last[b]`` of the pending forward (−1: before it)."""
        if self.full is None:
            raise BebopError("keep() called with no pending forward on a linear-attention layer")
        K1 = self.conv.shape[-1]
        B, C, _ = self.full.shape
        idx = (last + 1).unsqueeze(1) + torch.arange(K1, device=last.device)               # [B, K−1]
        self.conv = self.full.gather(2, idx.unsqueeze(1).expand(B, C, K1))
        if isinstance(self.states, list):                     # one token: the state before or after it
            self.rec = torch.where((last >= 0)[:, None, None, None], self.states[1], self.states[0])
        elif self.states is not None:
            self.rec = self.states[last + 1, torch.arange(B, device=last.device)]
        elif self.qkvgb is not None:
            self.rec = select_state(*self.qkvgb, last)
        else:
            raise BebopError("a prefill keeps every token and only its final state; it cannot be rolled back")
        self.full = self.states = self.qkvgb = None

    def select(self, rows: Tensor) -> None:
        self.commit_all()
        self.conv, self.rec = self.conv[rows], self.rec[rows]


class HybridCache:
    """The decoding state of a hybrid decoder: static KV slots for its full-attention layers (the engine's slot
    layout and validity mask) and a :class:`LinearState` per linear-attention layer."""

    def __init__(self, kv: StaticKV, linear: list[LinearState], mode: str):
        self.kv, self.linear, self.mode = kv, linear, mode
        self.owner: object | None = None
        self.pending = False

    def keep(self, last: Tensor) -> None:
        """Every row b keeps the linear states after token ``last[b]`` of the last forward (−1: before it); the
        full-attention slots after it are the engine's holes."""
        for s in self.linear:
            s.keep(last)
        self.pending = False

    def select(self, rows: Tensor) -> None:
        self.kv.select(rows)
        for s in self.linear:
            s.select(rows)
        self.pending = False

    def compact(self, order: Tensor, length: int) -> None:
        """The attention slots of row b become ``order[b, :length]`` (``StaticKV.compact``); linear states have no
        slots."""
        self.kv.compact(order, length)

    def put(self, rows: Tensor, src: HybridCache, width: int) -> None:
        """Batch rows ``rows`` take ``src``'s rows (a joining row's prefill): its attention slots ``0..width-1`` and
        its linear-attention states; every row's pending forward is kept whole first."""
        for s in (*self.linear, *src.linear):
            s.commit_all()
        self.kv.put(rows, src.kv, width)
        for dst, s in zip(self.linear, src.linear, strict=True):
            dst.conv[rows], dst.rec[rows] = s.conv, s.rec
        self.pending = False


# --------------------------------------------------------------------------------------------- layers


class _Attention:
    """A gated full-attention layer of Qwen3.5 / Qwen3-Next (or an MTP block of one) over static KV slots."""

    def __init__(self, layer, apply_rope):
        self.layer, self.attn, self.rope = layer, layer.self_attn, apply_rope
        self.d = self.attn.head_dim
        self.hq = self.attn.q_proj.weight.shape[0] // (2 * self.d)
        self.hkv = self.attn.k_proj.weight.shape[0] // self.d

    def __call__(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, kc: Tensor, vc: Tensor, start: int) -> Tensor:
        layer, attn = self.layer, self.attn
        B, T, _ = x.shape
        h = layer.input_layernorm(x)
        q, gate = attn.q_proj(h).view(B, T, self.hq, 2 * self.d).chunk(2, dim=-1)
        q = attn.q_norm(q).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(h).view(B, T, self.hkv, self.d)).transpose(1, 2)
        v = attn.v_proj(h).view(B, T, self.hkv, self.d).transpose(1, 2)
        q, k = self.rope(q, k, cos, sin)
        end = start + T
        kc.narrow(2, start, T).copy_(k)
        vc.narrow(2, start, T).copy_(v)
        o = F.scaled_dot_product_attention(q, kc.narrow(2, 0, end), vc.narrow(2, 0, end), attn_mask=mask,
                                           scale=attn.scaling, enable_gqa=self.hq != self.hkv)
        o = o.transpose(1, 2).reshape(B, T, -1) * torch.sigmoid(gate.reshape(B, T, -1))
        x = x + attn.o_proj(o)
        return x + layer.mlp(layer.post_attention_layernorm(x))


class _Linear:
    """A Gated DeltaNet layer (Qwen3.5: separate q/k/v, z, b, a projections; Qwen3-Next: fused qkvz and ba) with
    explicit per-row state (module doc)."""

    def __init__(self, layer, chunk_rule):
        self.layer, self.lin, self.chunk_rule = layer, layer.linear_attn, chunk_rule
        lin = self.lin
        self.kernel = lin.conv_kernel_size
        self.conv_w = lin.conv1d.weight          # [C, 1, K]
        self.split = [lin.key_dim, lin.key_dim, lin.value_dim]

    def new_state(self, batch: int, dtype, device) -> LinearState:
        lin = self.lin
        return LinearState(batch, lin.conv_dim, self.kernel, lin.num_v_heads, lin.head_k_dim, lin.head_v_dim,
                           dtype, device)

    def _project(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(pre-convolution q|k|v [B, T, C], z [B, T, H, d_v], b, a [B, T, H]) as the family's module projects them."""
        lin = self.lin
        B, T, _ = h.shape
        if hasattr(lin, "in_proj_qkv"):
            return (lin.in_proj_qkv(h), lin.in_proj_z(h).view(B, T, -1, lin.head_v_dim), lin.in_proj_b(h),
                    lin.in_proj_a(h))
        q, k, v, z, b, a = lin.fix_query_key_value_ordering(lin.in_proj_qkvz(h), lin.in_proj_ba(h))
        return torch.cat([t.reshape(B, T, -1) for t in (q, k, v)], dim=-1), z, b, a

    def __call__(self, x: Tensor, pad: Tensor | None, st: LinearState, mode: str, prefill: bool) -> Tensor:
        layer, lin = self.layer, self.lin
        B, T, _ = x.shape
        h = layer.input_layernorm(x)
        if pad is not None:
            h = h * pad.unsqueeze(-1).to(h.dtype)
        mixed, z, b, a = self._project(h)
        full = torch.cat([st.conv, mixed.transpose(1, 2).to(st.conv.dtype)], dim=-1)      # [B, C, K−1+T]
        c = F.silu(F.conv1d(full, self.conv_w, lin.conv1d.bias, groups=full.shape[1])).to(mixed.dtype)
        q, k, v = torch.split(c.transpose(1, 2), self.split, dim=-1)
        beta = b.sigmoid()
        g = -lin.A_log.float().exp() * F.softplus(a.float() + lin.dt_bias)
        q, k = q.reshape(B, T, -1, lin.head_k_dim), k.reshape(B, T, -1, lin.head_k_dim)
        v = v.reshape(B, T, -1, lin.head_v_dim)
        st.full, st.conv = full, full[:, :, T:]
        if prefill and T > STEPWISE_MAX:
            o, st.rec = self.chunk_rule(q, k, v, g=g, beta=beta, initial_state=st.rec, output_final_state=True,
                                        use_qk_l2norm_in_kernel=True)
            st.states = st.qkvgb = None
        else:
            rep = lin.num_v_heads // lin.num_k_heads
            q, k = (t.repeat_interleave(rep, dim=2) if rep > 1 else t for t in (q, k))
            q, k, v, g, beta = (t.transpose(1, 2).float() for t in (q, k, v, g, beta))
            q, k = _l2norm(q) / (q.shape[-1] ** 0.5), _l2norm(k)
            one = T == 1                                  # plain decoding: no stack, the state before is kept
            o, kept = delta_rule(q, k, v, g, beta, st.rec, keep_states=mode == "store" and not (one or prefill))
            if prefill:                                   # a prefill keeps all its tokens: nothing to roll back
                st.states, st.qkvgb, st.rec = None, None, kept
            elif mode == "store" and one:
                st.states, st.qkvgb, st.rec = [st.rec, kept], None, kept
            elif mode == "store":
                st.states, st.qkvgb, st.rec = kept, None, kept[-1]
            else:
                st.states, st.qkvgb, st.rec = None, (q, k, v, g, beta, st.rec), kept
            o = o.transpose(1, 2).to(x.dtype)
        o = lin.norm(o.reshape(-1, lin.head_v_dim), z.reshape(-1, lin.head_v_dim)).view(B, T, -1)
        x = x + lin.out_proj(o)
        return x + layer.mlp(layer.post_attention_layernorm(x))


@functools.cache
def _functions(module_name: str):
    """(apply_rotary_pos_emb, torch_chunk_gated_delta_rule) of a transformers model package."""
    mod = sys.modules[module_name]
    return mod.apply_rotary_pos_emb, getattr(mod, "torch_chunk_gated_delta_rule", None)


class HybridDecoder:
    """The decoder stack of a hybrid model (embedding → layers → final norm) as forwards over a
    :class:`HybridCache`; see module doc."""

    def __init__(self, model):
        dec = model.get_decoder()
        cfg = _text_config(model)
        kinds = [getattr(layer, "linear_attn", None) is not None for layer in dec.layers]
        self.family = (f"{_FAMILIES[str(cfg.model_type)]} hybrid: {sum(kinds)} Gated DeltaNet + "
                       f"{len(kinds) - sum(kinds)} attention layers")
        self.embed = model.get_input_embeddings()
        self.norm, self.rotary = dec.norm, dec.rotary_emb
        rope = chunk = None
        self.layers: list = []
        for layer in dec.layers:
            rope, c = _functions(type(layer).__module__)
            chunk = chunk or c
            self.layers.append(_Linear(layer, c) if getattr(layer, "linear_attn", None) is not None
                               else _Attention(layer, rope))
        self.attn = [i for i, layer in enumerate(self.layers) if isinstance(layer, _Attention)]
        self.lm_head = model.get_output_embeddings()
        self.mode = "store"

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden)

    def new_cache(self, batch: int, capacity: int, mode: str | None = None) -> HybridCache:
        """A fresh cache for ``batch`` rows (KV ``capacity`` slots, grown on demand); ``mode`` (default
        :attr:`mode`, which the engine's caches take): how per-token linear states are kept (module doc)."""
        mode = self.mode if mode is None else mode
        if mode not in MODES:
            raise BebopError(f"unknown linear-state mode {mode!r}; expected one of {', '.join(MODES)}")
        w = self.embed.weight
        a = self.layers[self.attn[0]] if self.attn else None
        kv = StaticKV(len(self.attn), batch, a.hkv if a else 1, a.d if a else 1, capacity, w.dtype, w.device)
        linear = [layer.new_state(batch, w.dtype, w.device) for layer in self.layers if isinstance(layer, _Linear)]
        cache = HybridCache(kv, linear, mode)
        cache.owner = self
        return cache

    def __call__(self, ids: Tensor, pos: Tensor, valid: Tensor, cache: HybridCache, start: int) -> Tensor:
        """Last hidden states [B, T, H] after the final norm for ``ids`` [B, T] at positions ``pos`` [B, T], written
        to KV slots ``start..start+T-1`` (``valid`` [B, start+T] bool, as ``bebop.models.lean``). The linear states
        after each new token stay pending until :meth:`HybridCache.keep` (or the next forward, which keeps all)."""
        if cache.owner is not self:
            raise BebopError("this cache was made for another model's decoder; make one with its new_cache()")
        if cache.pending:
            for s in cache.linear:
                s.commit_all()
        T = ids.shape[1]
        if start + T > cache.kv.capacity:
            cache.kv.ensure(start + T)
        x = self.embed(ids)
        cos, sin = self.rotary(x, pos)
        mask = _attn_mask(valid, start, T, x.dtype)
        new = valid.narrow(1, start, T)
        pad = None if start > 0 or bool(new.all()) else new          # left padding (prefill only)
        lin = iter(cache.linear)
        kv = iter(cache.kv.layers)
        for layer in self.layers:
            if isinstance(layer, _Linear):
                x = layer(x, pad, next(lin), cache.mode, start == 0)
            else:
                kc, vc = next(kv)
                x = layer(x, cos, sin, mask, kc, vc, start)
        cache.pending = True
        return self.norm(x)


class HybridHead:
    """A bound ``MTPHead`` whose blocks are full-attention layers of a hybrid family, as forwards over static KV
    slots (layer i owns layer i of the head's cache), with the base model's embedding and rotary embedding:
    ``h^k = post_norm(block(eh_proj([enorm(Embed(tok)), hnorm(h^{k-1})])))`` (DESIGN §2, ``MtpLayer``)."""

    def __init__(self, head, base: HybridDecoder):
        self.head, self.base = head, base
        self.blocks = [_Attention(layer.mtp_block, _functions(type(layer.mtp_block).__module__)[0])
                       for layer in head.layers]
        self.hidden_first = bool(getattr(head.config, "mtp_hidden_states_first", False))

    def new_cache(self, batch: int, capacity: int) -> StaticKV:
        b = self.blocks[0]
        w = self.base.embed.weight
        return StaticKV(len(self.blocks), batch, b.hkv, b.d, capacity, w.dtype, w.device)

    def __call__(self, ids: Tensor, hidden: Tensor, pos: Tensor, valid: Tensor, cache: StaticKV, start: int,
                 layer: int = 0) -> Tensor:
        """``h^k`` [B, T, H] after post_norm from MTP layer ``layer`` for tokens ``ids`` [B, T] and ``h^{k-1}``
        ``hidden`` [B, T, H], written to slots ``start..start+T-1`` of the head's cache layer ``layer``."""
        T = ids.shape[1]
        if start + T > cache.capacity:
            cache.ensure(start + T)
        mtp = self.head.layers[layer]
        e = self.base.embed(ids)
        hidden = hidden.to(e.dtype)
        pair = [mtp.hnorm(hidden), mtp.enorm(e)] if self.hidden_first else [mtp.enorm(e), mtp.hnorm(hidden)]
        x = mtp.eh_proj(torch.cat(pair, dim=-1))
        cos, sin = self.base.rotary(x, pos)
        kc, vc = cache.layers[layer]
        x = self.blocks[layer](x, cos, sin, _attn_mask(valid, start, T, x.dtype), kc, vc, start)
        return mtp.post_norm(x) if mtp.post_norm is not None else x


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def hybrid_decoder(model) -> HybridDecoder | None:
    """The hybrid forwards of ``model`` (cached per model; they call the model's own modules, so they always see
    its current weights), or None when unsupported (:func:`why_not_hybrid` says why)."""
    cached = _DECODERS.get(model)
    if cached is not None:
        return cached
    if why_not_hybrid(model):
        return None
    _DECODERS[model] = dec = HybridDecoder(model)
    return dec


def hybrid_head(head, model) -> HybridHead | None:
    """The hybrid forwards of a bound MTP ``head`` on ``model``, or None when unsupported
    (:func:`why_not_hybrid_head` says why)."""
    base = hybrid_decoder(model)
    if base is None or why_not_hybrid_head(head, model):
        return None
    cached = _HEADS.get(head)
    if cached is not None and cached.base is base and len(cached.blocks) == head.num_layers:
        return cached
    _HEADS[head] = lean = HybridHead(head, base)
    return lean
