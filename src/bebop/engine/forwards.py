"""The forwards the engine decodes with: target and MTP head over explicit cache slots, lean when supported.

Both plain and MTP decoding run the target (and the head) through the same backend — ``bebop.models.lean``
(static KV slots written in place, fused projections over the model's own weights, same math as transformers)
when the model is a supported Qwen3, Llama or Qwen2 decoder and ``backend="auto"`` or ``"lean"``, transformers'
own modules with a ``DynamicCache`` otherwise (``backend="transformers"``, or ``"auto"`` on any other model).
Hybrid linear-attention models (Qwen3.5, Qwen3-Next) take ``bebop.models.hybrid`` instead of the lean decoder:
its forwards keep what rolls a row's recurrent and convolution state back to its accepted position, which
``Forwards.keep`` does after every verify; transformers' caches cannot, so MTP decoding on a hybrid model needs
that path.
``"lean"`` on a model the lean path does not cover is an error, never a quiet fallback; which path runs, and why
not the lean one (``bebop.models.lean.why_not_lean``), is said once per command (:func:`decoding_path`,
:func:`report_paths`). Plain and MTP decoding are thus always compared on equal forwards.
Target and head caches share one slot layout (head slot s pairs with target slot s), so one validity mask
serves both.

A head of L > 1 layers drafts step k with layer (k−1) mod L, the layer ``MTPHead.unroll`` trains for step k.
Only layer 0 reads the accepted tokens (prefill and catch-up); layer j > 0 has no context from earlier
positions, so its drafts attend to the slots it wrote in the current draft only: it writes scratch slots
0, 1, … of its own cache layer, restarted every draft.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel

from bebop.errors import BebopError
from bebop.models.hybrid import (
    GAMMA_MAX,
    HybridCache,
    HybridDecoder,
    hybrid_decoder,
    hybrid_head,
    is_hybrid,
    why_not_hybrid,
    why_not_hybrid_blocks,
    why_not_hybrid_head,
)
from bebop.models.lean import StaticKV, lean_decoder, lean_head, why_not_lean, why_not_lean_head

BACKENDS = ("auto", "lean", "transformers")
LEAN, TRANSFORMERS = "lean", "transformers"


@dataclass(frozen=True)
class DecodingPath:
    """Which forwards decode a model: ``backend`` is ``"lean"`` or ``"transformers"``; ``reason`` says why
    transformers' modules run (empty on the lean path); ``head_reason`` says why the MTP head runs through
    transformers' modules while the target is lean (empty otherwise); ``model_type``, ``device`` and ``dtype``
    describe the model; ``family`` is the lean path's name for it ("Qwen3", "Llama", "Qwen2"; lean only)."""

    backend: str
    model_type: str
    device: str
    dtype: str
    reason: str = ""
    head_reason: str = ""
    family: str = ""

    @property
    def line(self) -> str:
        """One console line: ``decoding with the lean path (Llama, float32 on cpu)`` or ``decoding with
        transformers' modules (model_type deepseek_v3: layer 0 is a DeepseekV3DecoderLayer, …)``."""
        where = f"{self.dtype} on {self.device}"
        if self.backend == LEAN:
            text = f"decoding with the lean path ({self.family or self.model_type}, {where})"
            return text + (f"; the MTP head runs through transformers' modules ({self.head_reason})"
                           if self.head_reason else "")
        return f"decoding with transformers' modules ({self.reason}; {where})"


_REPORTER: list = [None, set()]   # [callable receiving each new path line, or None; the lines already said]


def report_paths(say: Callable[[str], None] | None) -> None:
    """Route the one-line notice of which path decodes (:attr:`DecodingPath.line`) to ``say`` (e.g. the CLI's
    console), once per distinct line from now on; ``None`` silences it. A command calls this when it starts."""
    _REPORTER[0], _REPORTER[1] = say, set()


def _announce(path: DecodingPath) -> None:
    say, said = _REPORTER
    if say is not None and path.line not in said:
        said.add(path.line)
        say(path.line)


def _why_not_lean(model: PreTrainedModel) -> str:
    model_type = getattr(model.config, "model_type", type(model).__name__)
    return f"model_type {model_type}: {why_not_hybrid(model) if is_hybrid(model) else why_not_lean(model)}"


def _lean_for(model: PreTrainedModel, backend: str):
    """The lean forwards of ``model`` under ``backend``: a ``HybridDecoder`` for hybrid linear-attention models, a
    ``LeanDecoder`` for the dense families, or None (unsupported, or backend "transformers")."""
    if backend not in ("auto", LEAN):
        return None
    return hybrid_decoder(model) if is_hybrid(model) else lean_decoder(model)


def _lean_head(head, model: PreTrainedModel, lean):
    """The lean forwards of ``head`` over the target's lean forwards ``lean``, or None."""
    if lean is None:
        return None
    return hybrid_head(head, model) if isinstance(lean, HybridDecoder) else lean_head(head, model, lean)


def _path(model: PreTrainedModel, head, backend: str, lean) -> DecodingPath:
    """The :class:`DecodingPath` of ``forwards`` given the lean forwards it got (None when not lean)."""
    if backend not in BACKENDS:
        raise BebopError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    weight = model.get_input_embeddings().weight
    desc = dict(model_type=str(getattr(model.config, "model_type", type(model).__name__)),
                device=str(weight.device), dtype=str(weight.dtype).removeprefix("torch."))
    if lean is None:
        reason = "backend 'transformers' asked for" if backend == TRANSFORMERS else _why_not_lean(model)
        if backend == LEAN:
            raise BebopError(f"backend 'lean' asked for, but {reason}; use backend 'auto' or 'transformers'")
        if head is not None:
            check_rollback(model, reason)
        return DecodingPath(TRANSFORMERS, reason=reason, **desc)
    head_reason = ""
    foreign = why_not_hybrid_blocks(head, model) if head is not None and isinstance(lean, HybridDecoder) else ""
    if foreign:   # transformers' modules would fail on its shapes, not fall back
        raise BebopError(f"the MTP head cannot draft for this hybrid model: {foreign}; use a head of the model's "
                         "family (MTPHead.from_base, or train one: bebop train-mtp)")
    if head is not None and _lean_head(head, model, lean) is None:
        why = why_not_hybrid_head if isinstance(lean, HybridDecoder) else why_not_lean_head
        head_reason = why(head, model) or "it is not bound to the model's own embedding"
        if backend == LEAN:
            raise BebopError(f"backend 'lean' asked for, but the MTP head cannot use it: {head_reason}")
    return DecodingPath(LEAN, head_reason=head_reason, family=lean.family, **desc)


def decoding_path(model: PreTrainedModel, head=None, backend: str = "auto") -> DecodingPath:
    """Which path :func:`forwards` takes for ``model`` (and ``head``) under ``backend``, without building caches.
    ``backend="lean"`` on a model (or head) the lean path does not cover raises a BebopError saying why."""
    return _path(model, head, backend, _lean_for(model, backend))


@dataclass
class Forwards:
    """``target(ids [B, T], pos [B, T], valid [B, start+T] bool, start) -> hidden [B, T, H]`` and
    ``drafter(ids, hidden, pos, valid, start, layer=0) -> h^k [B, T, H]`` (None without a head) write slots
    ``start..start+T-1`` of their own cache (anything at or after ``start`` is dropped) and attend to the slots
    marked valid; ``lm_head(hidden) -> logits``; ``select(rows)`` keeps only batch rows ``rows`` in every cache
    (so finished rows can leave the batch); ``layers`` = the head's MTP layers. ``keep(last [B])`` (hybrid models
    only, else None): after a target forward, row b keeps the linear-attention state after its new token
    ``last[b]`` (−1: none of them) — the rollback that holes give the KV slots; a forward not followed by ``keep``
    keeps all its tokens."""

    target: Callable[..., Tensor]
    drafter: Callable[..., Tensor] | None
    lm_head: Callable[[Tensor], Tensor]
    select: Callable[[Tensor], None]
    layers: int = 1
    path: DecodingPath | None = None
    keep: Callable[[Tensor], None] | None = None
    caches: tuple = ()

    def compact(self, order: Tensor, length: int) -> None:
        """Row b's cache slots become ``order[b, :length]`` in every cache (target and head share the slot layout):
        what drops the holes that rejected drafts and finished rows leave (``engine.continuous``)."""
        for c in self.caches:
            if isinstance(c, DynamicCache):
                _dynamic_compact(c, order, length)
            else:
                c.compact(order, length)

    def put(self, rows: Tensor, src: Forwards, width: int) -> None:
        """Batch rows ``rows`` take slots ``0..width-1`` (and any linear-attention state) of every row of ``src``'s
        caches: forwards of the same model and head over ``len(rows)`` rows, e.g. joining rows' prefill."""
        for c, sc in zip(self.caches, src.caches, strict=True):
            if isinstance(c, DynamicCache):
                _dynamic_put(c, rows, sc, width)
            else:
                c.put(rows, sc, width)


def target_forward(model: PreTrainedModel, ids, mask, positions, cache) -> torch.Tensor:
    """Last hidden states of the target (after its final norm, as the LM head sees them), transformers path."""
    return model.get_decoder()(
        input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
    ).last_hidden_state


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``(ids [B, P], mask [B, P])``."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _crop_layer(cache: DynamicCache, layer: int, length: int) -> None:
    """Drop the slots at or after ``length`` from one layer of ``cache``."""
    n = cache.layers[layer].get_seq_length() if layer < len(cache.layers) else 0
    if n > length:
        cache.layers[layer].crop(length - n)


def _dynamic_layers(cache: DynamicCache):
    """The layers of a transformers ``DynamicCache`` that hold keys/values, refusing layer kinds whose slots are not
    one per token (sliding windows)."""
    for layer in cache.layers:
        if type(layer).__name__ != "DynamicLayer":
            raise BebopError(f"continuous batching cannot move the slots of a {type(layer).__name__} cache layer; "
                             "decode this model without a rollout batch")
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            yield layer


def _dynamic_compact(cache: DynamicCache, order: Tensor, length: int) -> None:
    rows = torch.arange(order.shape[0], device=order.device).unsqueeze(1)
    for layer in _dynamic_layers(cache):
        n = layer.keys.shape[2]
        idx = order.clamp(max=n - 1)            # a head's scratch layer may hold fewer slots than the target
        layer.keys = layer.keys.transpose(1, 2)[rows, idx].transpose(1, 2).contiguous()
        layer.values = layer.values.transpose(1, 2)[rows, idx].transpose(1, 2).contiguous()


def _dynamic_put(cache: DynamicCache, rows: Tensor, src: DynamicCache, width: int) -> None:
    held = {id(layer) for layer in _dynamic_layers(cache)}
    for layer, sl in zip(cache.layers, src.layers, strict=False):
        if id(layer) not in held or getattr(sl, "keys", None) is None or not sl.keys.numel():
            continue
        for name in ("keys", "values"):
            t, st = getattr(layer, name), getattr(sl, name)
            if t.shape[2] < width:
                t = F.pad(t, (0, 0, 0, width - t.shape[2]))
            t[rows, :, :width] = st[:, :, :width]
            setattr(layer, name, t)


def _crop_to(cache: DynamicCache, length: int) -> None:
    n = cache.get_seq_length()
    if n > length:
        cache.crop(length - n)


def _lm_head(model: PreTrainedModel, lean):
    """The LM head as a function: the lean one when available, a plain ``F.linear`` when it is an
    ``nn.Linear`` (no module-call overhead), else the module."""
    if lean is not None and getattr(lean, "lm_t", None) is not None:
        return lean.logits
    lm = model.get_output_embeddings()
    if type(lm) is torch.nn.Linear:
        w, b = lm.weight, lm.bias
        return lambda h: F.linear(h, w, b)
    return lm


def _drafter(model: PreTrainedModel, head, lean, batch: int, capacity: int):
    """(drafter, its cache) over the lean head when supported, else over ``head`` with a ``DynamicCache``."""
    lhead = _lean_head(head, model, lean)
    if lhead is not None:
        mcache = lhead.new_cache(batch, capacity)

        def drafter(ids, hidden, pos, valid, start, layer=0):
            return lhead(ids, hidden, pos, valid, mcache, start, layer)
        return drafter, mcache
    mcache = head.new_cache()

    def drafter(ids, hidden, pos, valid, start, layer=0):
        _crop_layer(mcache, layer, start)
        return head(ids, hidden, pos, valid.long(), mcache, layer=layer)
    return drafter, mcache


def check_rollback(model: PreTrainedModel, reason: str = "") -> None:
    """Speculative decoding rolls rejected drafts back out of the target's state. On a hybrid model the
    linear-attention layers (Gated DeltaNet) fold every verified token into a recurrent state that only the hybrid
    forwards (``bebop.models.hybrid``) can roll back per row; transformers' caches cannot, so MTP decoding through
    transformers' modules would silently leave the policy's law: refuse it (plain decoding is exact there)."""
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    kinds = sorted({t for t in (getattr(cfg, "layer_types", None) or []) if t not in ("full_attention",
                                                                                       "sliding_attention")})
    if kinds:
        raise BebopError(
            f"MTP decoding on model_type {getattr(cfg, 'model_type', '?')!r} needs a per-row rollback of its "
            f"{', '.join(kinds)} state, which only the engine's hybrid path does, and it cannot run here "
            f"({reason or 'transformers path'}); use backend 'auto', or decode without --mtp (exact)"
        )


def forwards(model: PreTrainedModel, head, batch: int, capacity: int, backend: str = "auto",
             gamma: int = 0) -> Forwards:
    """The target's (and the head's) forwards for ``batch`` rows (module doc); ``capacity`` is a first
    allocation (lean caches grow on demand). ``backend``: ``"auto"`` (lean when supported, else transformers'),
    ``"lean"`` (an error when unsupported) or ``"transformers"``; the path taken is announced (module doc).
    ``gamma``: the longest draft the caller will verify (a hybrid model's rollback has a maximum)."""
    lean = _lean_for(model, backend)
    path = _path(model, head, backend, lean)
    _announce(path)
    keep = None
    if isinstance(lean, HybridDecoder):
        if gamma > GAMMA_MAX:
            raise BebopError(f"gamma {gamma} is larger than the maximum draft length on hybrid linear-attention "
                             f"models ({GAMMA_MAX}: a verify keeps gamma+1 recurrent states per layer and row)")
        tcache = lean.new_cache(batch, capacity)
        keep = tcache.keep

        def target(ids, pos, valid, start):
            return lean(ids, pos, valid, tcache, start)
    elif lean is not None:
        tcache = lean.new_cache(batch, capacity)

        def target(ids, pos, valid, start):
            return lean(ids, pos, valid, tcache, start)
    else:
        tcache = DynamicCache(config=model.config)

        def target(ids, pos, valid, start):
            _crop_to(tcache, start)
            return target_forward(model, ids, valid.long(), pos, tcache)

    caches = [tcache]
    drafter = None
    if head is not None:
        drafter, mcache = _drafter(model, head, lean, batch, capacity)
        caches.append(mcache)

    def select(rows: torch.Tensor) -> None:
        for c in caches:
            if isinstance(c, StaticKV | HybridCache):
                c.select(rows)
            else:
                c.batch_select_indices(rows)

    layers = head.num_layers if head is not None else 1
    return Forwards(target, drafter, _lm_head(model, lean), select, layers, path, keep, tuple(caches))


def check_context(model: PreTrainedModel, prompts: list[list[int]], max_new_tokens: int) -> None:
    """One clear error, before any decoding, when the longest prompt plus the completion limit does not fit in the
    model's context (``max_position_embeddings``), or when the limit or a prompt is empty."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise BebopError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise BebopError("every prompt needs at least one token (got an empty prompt or no prompts)")
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    limit = getattr(cfg, "max_position_embeddings", None)
    longest = max(len(p) for p in prompts)
    if limit is not None and longest + max_new_tokens > limit:
        raise BebopError(
            f"a {longest}-token prompt plus max_new_tokens {max_new_tokens} is {longest + max_new_tokens} positions, "
            f"beyond the model's context of {limit} (max_position_embeddings); lower max_new_tokens to at most "
            f"{max(0, limit - longest)}"
        )


def median_seconds(fn, repeats: int) -> float:
    """Median wall-clock seconds of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def forward_costs(model, head, prompt_ids: list[list[int]], gamma: int, repeats: int = 20,
                  backend: str = "auto") -> dict[str, float]:
    """Measured seconds of one plain target forward (c_1), one over γ+1 tokens (c_verify) and one MTP step
    (c_draft) at the batch size of ``prompt_ids``, with a KV cache holding the prompt — through the same
    forwards the engine uses (DESIGN §8)."""
    device = model.device
    ids, mask = left_pad(prompt_ids, 0, device)
    B, P = ids.shape
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    valid = torch.ones((B, P + gamma + 1), dtype=torch.bool, device=device)
    valid[:, :P] = mask.bool()
    fw = forwards(model, head, B, P + gamma + 1, backend, gamma)
    hid = fw.target(ids, pos, valid[:, :P], 0)
    fw.drafter(ids, hid, pos, valid[:, :P], 0)

    def run_target(n_tok: int) -> float:
        x = ids[:, -1:].repeat(1, n_tok)
        p = pos[:, -1:] + 1 + torch.arange(n_tok, device=device)

        def once():
            fw.target(x, p, valid[:, : P + n_tok], P)   # writes slots P.., which the next call overwrites

        once()
        return median_seconds(once, repeats)

    c1, cv = run_target(1), run_target(gamma + 1)

    def draft_once():
        fw.drafter(ids[:, -1:], hid[:, -1:], pos[:, -1:] + 1, valid[:, : P + 1], P)

    draft_once()
    cd = median_seconds(draft_once, repeats)
    return {"c_1": c1, "c_verify": cv, "c_draft": cd}
