"""How much memory a decoding call needs, estimated before it runs, and one clear error when a batch cannot fit.

Why: a batch too large for the device fails deep inside a forward (a CUDA out-of-memory error, or a host that
starts swapping) after the prompts were already prefilled. :func:`check_batch_fits` refuses it up front, naming
the batch, the estimate, what is available and the largest batch that fits.

What is counted (:func:`decode_bytes`), beyond the model's weights, for ``batch`` rows over ``slots`` cache
columns (every slot a row may occupy in the call, holes included):

* **target KV** — per full-attention layer ``2·B·H_kv·slots·D`` elements in the model's dtype
  (``bebop.models.lean.StaticKV``; on hybrid models the attention layers only). On the transformers path the
  layers' own geometry is read (``k_proj`` and ``head_dim``; Multi-head Latent Attention caches the compressed
  latent, ``kv_lora_rank + qk_rope_head_dim`` per slot) and the figure is marked an estimate: transformers'
  ``DynamicCache`` grows by concatenation, so one layer's cache is briefly held twice, which the transients count.
* **linear-attention state** (hybrid models, ``bebop.models.hybrid.LinearState``) — per Gated DeltaNet layer the
  convolution window ``B·C·(K−1)`` (model dtype) and the recurrent state ``B·H·d_k·d_v`` (float32); during a
  forward over T tokens (T = γ+1 for a verify, 1 for a plain step) the convolution input grows by T columns and
  ``store`` mode holds T+1 states (the one after the step is a view into them), ``recompute`` mode the state
  before plus q, k, v, g, β of the T tokens (``docs/hybrid.md``); after the prefill the prompt's convolution
  input stays pending until the next forward (a prefill transient).
* **head KV** — the MTP head's ``StaticKV``: per head layer ``2·B·H_kv·slots·D`` (one slot layout with the target).
* **masks** — the ``[B, slots]`` validity mask and one forward's additive attention mask.
* **transients** — the larger of a decoding step's and the prefill's short-lived tensors: per step about eight
  ``[B, γ+1, V]`` float32 tensors (logits, probabilities, the exponential races, the stacked drafts' q, entropy and
  verification temporaries, the previous step's p and q until the next step replaces them), plus the random
  draws made ahead (:func:`draws_ahead`); per prefill the ``[B, P, P]`` attention mask and
  one layer's activations over the prompt; on the transformers path a layer's cache copy while it grows, and
  MLA's per-layer expansion of the latent to full keys and values.
* **lean weight copies** (lean path only) — the lean forwards keep transposed, fused copies of every matmul
  weight (``bebop.models.lean`` module doc); they count as a fixed cost until they are built (cached per model).

Every term but the draws made ahead is linear in the batch, and those are capped; the largest batch that fits is
found by bisection on the (increasing) total.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

from bebop.errors import BebopError
from bebop.models import hybrid as hybrid_mod
from bebop.models import lean as lean_mod

__all__ = ["DRAW_CHUNK_BYTES", "DRAW_CHUNK_STEPS", "FRACTION", "LIMIT_ENV", "available_bytes", "check_batch_fits",
           "decode_bytes", "draws_ahead", "format_bytes", "parse_bytes"]

LIMIT_ENV = "BEBOP_MEMORY_LIMIT"
"""Environment variable that overrides the available memory: bytes, or a number with a KiB/MiB/GiB/TiB suffix."""
FRACTION = 0.9
"""The share of the available memory a decoding call may plan to use; the rest is headroom for the allocator's
fragmentation and for what the estimate leaves out (small per-step tensors, the Python side)."""
STEP_PROB_COPIES = 8
"""How many ``[B, γ+1, V]`` float32 tensors a decoding step holds at its peak (module doc); measured on CPU with
the profiler's memory timeline, a step of the lean path held about 5.3 beyond the draws made ahead."""
DRAW_CHUNK_STEPS, DRAW_CHUNK_BYTES = 64, 32 << 20
"""The decode loop may draw its exponential races ahead, in chunks of at most this many steps and bytes (one
step's when that is larger); two chunks are alive while one refills (:func:`draws_ahead`)."""

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str, name: str = LIMIT_ENV) -> int:
    """``"123456"``, ``"512MiB"``, ``"1.5 GiB"`` → bytes (K/M/G/T, with or without ``B`` / ``iB``, are binary
    units). Anything else, or a size of zero, is a BebopError naming ``name`` and the value."""
    m = _SIZE.match(text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise BebopError(f"{name}={text!r} is not a size: give bytes, or a number with a KiB, MiB, GiB or TiB "
                         "suffix (e.g. 512MiB, 8GiB)")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise BebopError(f"{name}={text!r} must be a positive size")
    return value


def format_bytes(n: float) -> str:
    """``n`` bytes as ``"1.50 GiB"``, ``"12.0 MiB"`` or ``"640 B"``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.2f} {unit}" if value < 10 else f"{value:.1f} {unit}"
    return f"{int(n)} B"


def _host_available() -> tuple[int, str]:
    """(bytes, where from) of the host's available memory: MemAvailable from /proc/meminfo, else the free
    physical pages (``os.sysconf``)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free physical pages (os.sysconf)"
    except (ValueError, OSError, AttributeError):
        raise BebopError(f"cannot read the host's available memory; set {LIMIT_ENV} (e.g. 16GiB)") from None


def _available(device: torch.device | str) -> tuple[int, str]:
    """(bytes, where the figure comes from) for :func:`available_bytes`."""
    env = os.environ.get(LIMIT_ENV)
    if env is not None and env.strip() != "":
        return parse_bytes(env), f"{LIMIT_ENV}={env}"
    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        free, _ = torch.cuda.mem_get_info(index)
        cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        return free + cached, f"free on cuda:{index} (torch.cuda.mem_get_info, plus the allocator's unused cache)"
    return _host_available()


def available_bytes(device: torch.device | str) -> int:
    """Bytes a decoding call on ``device`` can still allocate: ``$BEBOP_MEMORY_LIMIT`` when set (bytes, or with a
    KiB/MiB/GiB/TiB suffix; a bad value is a BebopError naming it); on CUDA the device's free memory plus what
    PyTorch's allocator holds unused; elsewhere (CPU, and unified-memory devices) the host's MemAvailable."""
    return _available(device)[0]


# ------------------------------------------------------------------------------------------------ geometry


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _path(model, backend: str) -> str:
    """The forwards :func:`bebop.engine.forwards.forwards` would take, without building them: ``hybrid``,
    ``lean`` or ``transformers``."""
    if backend not in ("auto", "lean", "transformers"):
        raise BebopError(f"unknown backend {backend!r}; expected one of auto, lean, transformers")
    if backend != "transformers":
        if hybrid_mod.is_hybrid(model):
            if not hybrid_mod.why_not_hybrid(model):
                return "hybrid"
        elif not lean_mod.why_not_lean(model):
            return "lean"
    return "transformers"


def _attention_slot(attn, cfg) -> tuple[int, int, bool]:
    """(cached elements per row and slot — keys and values together —, query heads, whether it is MLA) of one
    attention module, read from its projections (``cfg`` fills in what the module does not say)."""
    heads = int(getattr(attn, "num_heads", 0) or getattr(cfg, "num_attention_heads", 1))
    rank = getattr(attn, "kv_lora_rank", None)
    if rank is not None:                       # MLA: transformers caches the normalised latent and the rope key
        return int(rank) + int(attn.qk_rope_head_dim), heads, True
    d = getattr(attn, "head_dim", None) or getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    k_proj = getattr(attn, "k_proj", None)
    kv_heads = (k_proj.weight.shape[0] // int(d) if k_proj is not None
                else int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads))
    q_proj = getattr(attn, "q_proj", None)
    if q_proj is not None:
        heads = max(1, q_proj.weight.shape[0] // int(d))
    return 2 * kv_heads * int(d), heads, False


def _mla_expand(attn, slots: int) -> int:
    """Elements per row of MLA's expansion of the latent over ``slots`` (the ``kv_b_proj`` output and the key
    tensor built from it), held while one layer attends."""
    h = int(attn.num_heads)
    nope, rope, v = int(attn.qk_nope_head_dim), int(attn.qk_rope_head_dim), int(attn.v_head_dim)
    return slots * h * (2 * nope + rope + v)


def _width(layer, cfg) -> int:
    """The widest per-token activation of a decoder layer's MLP (gate and up together), for prefill transients."""
    mlp = getattr(layer, "mlp", None)
    gate = getattr(mlp, "gate_proj", None)
    if gate is not None:
        return 2 * gate.weight.shape[0]
    return 2 * int(getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size)


def _lean_copies(model, head) -> tuple[int, int]:
    """(bytes of the lean path's weight copies for ``model`` and ``head``, of those not built yet)."""
    def matrices(*modules) -> int:
        return sum(p.numel() * p.element_size() for m in modules for p in m.parameters() if p.dim() == 2)

    dec = model.get_decoder()
    lm = model.get_output_embeddings()
    total = matrices(*dec.layers) + (lm.weight.numel() * lm.weight.element_size()
                                     if type(lm) is torch.nn.Linear else 0)
    built = lean_mod._DECODERS.get(model)
    pending = 0 if built is not None and built.sources.fresh() else total
    if head is not None and not lean_mod._head_problem(head, model):
        h = matrices(*head.layers)
        total += h
        cached = lean_mod._HEADS.get(head)
        pending += 0 if cached is not None and cached.sources.fresh() else h
    return total, pending


# ------------------------------------------------------------------------------------------------ estimate


def decode_bytes(model, head, batch: int, slots: int, gamma: int, mode: str | None = None, *,
                 prompt_len: int = 0, backend: str = "auto") -> dict:
    """Bytes a decoding call of ``batch`` rows over ``slots`` cache columns allocates beyond the weights (module
    doc): ``target_kv``, ``linear_state``, ``step_state`` (a hybrid forward's pending linear state),
    ``head_kv``, ``masks``, ``transients`` (with :func:`draws_ahead`) and ``lean_weight_copies`` (still to be
    built), their sum ``total``
    (``prefill_state``, the hybrid prefill's pending convolution input, is part of ``transients``),
    ``per_row`` and ``fixed`` (``total = fixed + batch · per_row + draws``), and ``path``, ``estimate`` (True when read
    from a transformers-path config rather than the engine's own caches) and ``notes``.

    ``gamma``: the longest draft verified (0 for plain decoding); ``mode``: the hybrid linear-state mode (default
    the model's hybrid forwards' own, ``"store"``); ``prompt_len``: the longest prompt, for the prefill's
    transients (0: not counted); ``backend`` as :func:`bebop.engine.forwards.forwards`."""
    for name, value, low in (("batch", batch, 1), ("slots", slots, 1), ("gamma", gamma, 0),
                             ("prompt_len", prompt_len, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise BebopError(f"{name} must be an integer >= {low}, got {value!r}")
    path = _path(model, backend)
    cfg = _text_config(model)
    weight = model.get_input_embeddings().weight
    size = _itemsize(weight.dtype)
    vocab = int(getattr(cfg, "vocab_size", None) or weight.shape[0])
    T = gamma + 1                                   # tokens per target forward after the prefill
    notes: list[str] = []
    row = dict.fromkeys(("target_kv", "linear_state", "step_state", "head_kv", "masks"), 0)
    layer_transient = 0
    prefill_act = prefill_state = 0
    dec = model.get_decoder()
    layers = list(getattr(dec, "layers", []))
    if not layers:
        notes.append("no decoder layers to read: KV from the config's heads and head_dim")
        elems, _, _ = _attention_slot(object(), cfg)
        row["target_kv"] = int(cfg.num_hidden_layers) * elems * slots * size
    if mode is None:
        mode = hybrid_mod.hybrid_decoder(model).mode if path == "hybrid" else "store"
    if mode not in hybrid_mod.MODES:
        raise BebopError(f"unknown linear-state mode {mode!r}; expected one of {', '.join(hybrid_mod.MODES)}")
    for layer in layers:
        lin = getattr(layer, "linear_attn", None)
        width = _width(layer, cfg)
        if lin is not None:
            C, K = int(lin.conv_dim), int(lin.conv_kernel_size)
            H, dk, dv = int(lin.num_v_heads), int(lin.head_k_dim), int(lin.head_v_dim)
            state = H * dk * dv * 4
            row["linear_state"] += C * (K - 1) * size + state
            pending = C * T * size                                      # the convolution input's new columns
            if mode == "store":
                pending += T * state                                    # T+1 states, one of them the current
                layer_transient = max(layer_transient, (T + 1) * state if T > 1 else 0)   # list before the stack
            else:
                # the state before; q, k, g, β (float32); v, a view of the whole convolution output unless
                # the model's dtype makes .float() copy it
                v = C * T * 4 if size == 4 else H * T * dv * 4
                pending += state + T * H * (2 * dk + 2) * 4 + v
            row["step_state"] += pending
            prefill_state += C * prompt_len * size                      # the prompt's convolution input, pending
            prefill_act = max(prefill_act, prompt_len * (width + 3 * C) * size)
            continue
        attn = getattr(layer, "self_attn", None)
        elems, heads, mla = _attention_slot(attn if attn is not None else object(), cfg)
        row["target_kv"] += elems * slots * size
        if path == "transformers":
            layer_transient = max(layer_transient, elems * slots * size)          # DynamicCache's cat
            if mla:
                layer_transient = max(layer_transient, _mla_expand(attn, slots) * size)
        prefill_act = max(prefill_act, prompt_len * (width + 4 * elems + heads * 64) * size)
    if path == "transformers":
        notes.append("transformers path: KV estimated from the layers' geometry (DynamicCache)")
    if head is not None:
        hsize = size if path == "hybrid" else _itemsize(next(head.parameters()).dtype)
        for mtp in head.layers:
            attn = getattr(mtp.mtp_block, "self_attn", None)
            elems, _, mla = _attention_slot(attn if attn is not None else object(), cfg)
            row["head_kv"] += elems * slots * hsize
            if path == "transformers" and mla:
                layer_transient = max(layer_transient, _mla_expand(attn, slots) * hsize)
    row["masks"] = slots + T * slots * (4 + size + 1)                 # validity; a forward's additive mask
    step = STEP_PROB_COPIES * T * vocab * 4 + layer_transient
    prefill = prompt_len * prompt_len * (4 + size + 3) + prefill_act + prefill_state + 2 * vocab * 4
    row["transients"] = max(step, prefill)
    per_row = sum(row.values())
    copies, pending = _lean_copies(model, head) if path == "lean" else (0, 0)
    out = {name: batch * value for name, value in row.items()}
    draws = draws_ahead(batch, gamma, vocab)
    out["transients"] += draws
    out.update(prefill_state=batch * prefill_state, lean_weight_copies=pending,
               total=batch * per_row + pending + draws, per_row=per_row, fixed=pending, draws=draws, vocab=vocab,
               batch=batch, slots=slots, gamma=gamma, prompt_len=prompt_len, path=path, mode=mode,
               estimate=path == "transformers", notes=notes, lean_weight_copies_all=copies)
    return out


_LABELS = {"target_kv": "target KV", "head_kv": "head KV", "linear_state": "linear state",
           "step_state": "pending linear state", "masks": "masks", "transients": "transients",
           "lean_weight_copies": "lean weight copies"}


def draws_ahead(batch: int, gamma: int, vocab: int) -> int:
    """Bytes of random draws made ahead for ``batch`` rows: two chunks of Exp(1) noise ``[γ+1, B, V]`` (float32)
    per step, each at most :data:`DRAW_CHUNK_STEPS` steps and :data:`DRAW_CHUNK_BYTES` (or one step)."""
    step = 4 * (gamma + 1) * batch * vocab
    return 2 * min(DRAW_CHUNK_STEPS * step, max(DRAW_CHUNK_BYTES, step))


def _largest_batch(budget: float, est: dict) -> int:
    """The largest batch whose total is within ``budget`` (0 when not even one row fits)."""
    def total(b: int) -> int:
        return est["fixed"] + b * est["per_row"] + draws_ahead(b, est["gamma"], est["vocab"])

    lo, hi = 0, max(1, math.ceil(budget / est["per_row"]))   # total(hi) > budget: per-row bytes alone exceed it
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if total(mid) <= budget else (lo, mid - 1)
    return lo


def check_batch_fits(model, head, batch: int, slots: int, gamma: int, *, prompt_len: int = 0,
                     mode: str | None = None, backend: str = "auto", fraction: float = FRACTION) -> dict:
    """Raise one BebopError, before any decoding, when :func:`decode_bytes` of this call exceeds ``fraction`` of
    :func:`available_bytes` on the model's device, naming the batch, the estimate, what is available (and where
    that figure comes from) and the largest batch that fits. Returns the estimate with ``available`` and
    ``largest_batch`` added when it fits. ``slots``: the cache columns the call will use (prompt plus the
    completion's slots, rejected-draft holes included)."""
    est = decode_bytes(model, head, batch, slots, gamma, mode, prompt_len=prompt_len, backend=backend)
    device = model.get_input_embeddings().weight.device
    avail, source = _available(device)
    budget = fraction * avail
    largest = _largest_batch(budget, est)
    est.update(available=avail, available_from=source, largest_batch=largest)
    if est["total"] <= budget:
        return est
    parts = ", ".join(f"{label} {format_bytes(est[name])}" for name, label in _LABELS.items() if est[name])
    kind = "an estimate from the config, " if est["estimate"] else ""
    advice = (f"the largest batch that fits is {largest}" if largest >= 1 else
              "not even one row fits: lower max_new_tokens, the prompt length or gamma")
    raise BebopError(
        f"a batch of {batch} rows over {slots} cache slots (gamma {gamma}) needs about {format_bytes(est['total'])} "
        f"for decoding ({kind}{parts}; {format_bytes(est['per_row'])} per row), beyond {fraction:.0%} of the "
        f"{format_bytes(avail)} available on {device} ({source}); {advice}")
