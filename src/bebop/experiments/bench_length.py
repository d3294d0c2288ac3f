"""`bebop bench decode --lengths`: per-token decode cost against completion length, plain and MTP, side by side.

Every row is decoded to exactly L tokens (no EOS: ``eos_id`` None, ``max_new_tokens`` = L), so each length costs
the same work whatever the policy samples. Per batch size, mode (plain, MTP) and length L the benchmark reports:

- ``seconds_per_token``: decode seconds (prefill excluded) ÷ tokens emitted in them (all rows; the engine's
  ``decode_tokens`` where it counts them, which leave out each row's first token, sampled from the prefill), median
  over repeats;
- ``window_seconds_per_token``: the cost of the tokens between the previous length and L, (T(L) − T(L_prev)) ÷
  (tokens(L) − tokens(L_prev)) — the marginal per-token cost at that depth of the context (for the first length,
  its own per-token cost);
- ``growth``: per-token cost over that at the first length;
- ``slots_per_token``: KV-cache slots a row holds per kept token. Plain decoding writes one slot per token. MTP
  writes γ+1 slots per verify whatever was accepted (rejected drafts stay as holes), so without cache compaction a
  row holds (prompt + steps·(γ+1)) / (prompt + kept tokens) — computed here from the decode metrics, summed over
  rows (``slots_per_token_source`` = ``computed``); an engine whose ``DecodeMetrics`` carries
  ``slots_per_token`` (cache compaction) reports it itself (``engine``).

The policy must hold the longest length after the prompt: :func:`length_policy` builds a random-initialised one
of the toy shape with enough positions (its MTP head warm-started with ``MTPHead.from_base``) when the loaded one
is too short. Speed figures are ratios measured side by side in one run, on ``threads`` intra-op threads.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from bebop.config import check_gamma, positive
from bebop.core.sampling import RULES, SamplingParams
from bebop.engine.decode import DecodeConfig, DecodeMetrics
from bebop.engine.dispatch import decode
from bebop.engine.forwards import check_context
from bebop.errors import BebopError
from bebop.models.policy import ModelConfig, build_policy
from bebop.tasks import get_task, sample_problems

__all__ = ["LengthBenchConfig", "bench_length", "context_of", "length_policy", "needed_context", "slots_per_token",
           "write_length_json"]

CONTEXT_MARGIN = 512  # positions a built policy holds beyond the longest length (room for the prompt)


@dataclass
class LengthBenchConfig:
    """Options of the length benchmark: forced completion lengths, batch sizes, draft length and rule, sampling
    temperature, timed repeats (median; one untimed warm-up per batch size and mode), the task whose prompts are
    decoded, the seed of prompts, sampling and a built policy, and torch intra-op threads."""

    lengths: tuple[int, ...] = (128, 512, 2048, 4096)
    batch_sizes: tuple[int, ...] = (1, 8)
    gamma: int = 3
    rule: str = "rejection"
    temperature: float = 1.0
    repeats: int = 1
    task: str = "arith"
    seed: int = 0
    threads: int = 1
    shape: ModelConfig = field(default_factory=ModelConfig)   # of a built policy (its context is set by lengths)

    def __post_init__(self) -> None:
        self.lengths = tuple(self.lengths)
        self.batch_sizes = tuple(self.batch_sizes)
        if not self.lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.lengths):
            raise BebopError(f"lengths must be integers >= 1, got {list(self.lengths)}")
        if list(self.lengths) != sorted(set(self.lengths)):
            raise BebopError(f"lengths must be increasing without repeats, got {list(self.lengths)}")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise BebopError(f"batch sizes must be >= 1, got {list(self.batch_sizes)}")
        check_gamma(self.gamma)
        if self.rule not in RULES:
            raise BebopError(f"unknown rule {self.rule!r}; choose one of: {', '.join(RULES)}")
        SamplingParams(temperature=self.temperature)
        positive("repeats", self.repeats)
        positive("threads", self.threads)
        get_task(self.task)


def context_of(model) -> int | None:
    """The model's context (``max_position_embeddings``), or None when it declares none."""
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    return getattr(cfg, "max_position_embeddings", None)


def length_policy(tokenizer, context: int, shape: ModelConfig | None = None, seed: int = 0):
    """A random-initialised policy of ``shape`` (the toy shape by default) with ``context`` positions, in eval
    mode, and its MTP head warm-started from it (``MTPHead.from_base``); the global torch RNG is left untouched."""
    from bebop.models.mtp import MTPHead

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_policy(replace(shape or ModelConfig(), max_positions=context), tokenizer).eval()
        head = MTPHead.from_base(model).eval()
    return model, head


def needed_context(tokenizer, cfg: LengthBenchConfig) -> int:
    """Positions the benchmark needs: its longest prompt plus the longest length."""
    return max(len(p) for p in _prompts(tokenizer, cfg, max(cfg.batch_sizes))) + cfg.lengths[-1]


def _prompts(tokenizer, cfg: LengthBenchConfig, bs: int) -> list[list[int]]:
    return [tokenizer(p.prompt)["input_ids"] for p in sample_problems(get_task(cfg.task), bs, cfg.seed)]


def _run(model, head, prompts: list[list[int]], cfg: LengthBenchConfig, length: int, pad_id: int,
         seed: int) -> DecodeMetrics:
    """One forced-length engine call: plain when ``head`` is None, else MTP at ``cfg.gamma``."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    dc = DecodeConfig(SamplingParams(temperature=cfg.temperature), length, None, cfg.gamma, cfg.rule, pad_id, gen)
    return decode(model, head, prompts, dc).metrics


def slots_per_token(metrics: DecodeMetrics, prompts: list[list[int]], gamma: int | None) -> tuple[float, str]:
    """KV-cache slots per kept token over the rows of one call, and where the figure came from.

    ``engine``: the metrics' own ``slots_per_token`` (an engine with cache compaction). ``computed``: (Σ prompt +
    slots written) ÷ (Σ prompt + tokens), where MTP (``gamma``) writes γ+1 slots per row-step and plain one per
    token (every token but the last is fed back)."""
    own = getattr(metrics, "slots_per_token", None)
    if own is not None and not callable(own):
        return float(own), "engine"
    prompt = sum(len(p) for p in prompts)
    written = metrics.steps * (gamma + 1) if gamma is not None else metrics.tokens - len(prompts)
    return (prompt + written) / (prompt + metrics.tokens), "computed"


def bench_length(model, tokenizer, head, cfg: LengthBenchConfig, progress=None) -> dict:
    """Per batch size, per mode (``plain``, ``mtp``) and per length: decode seconds, tokens, per-token cost, the
    cost within the window since the previous length, growth over the first length, accept length (MTP) and cache
    slots per kept token (module doc). Plain and MTP runs of one length and repeat run back to back with the same
    seed; every repeat visits every length (forward, then backward order), so the repeats of one length are spread
    over the run and the median drops a load swing. ``progress``: an optional callable given a short label after
    each timed call.

    Raises a ``BebopError`` before any decoding when the longest length does not fit the model's context."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        prompts = {bs: _prompts(tokenizer, cfg, bs) for bs in cfg.batch_sizes}
        for p in prompts.values():
            check_context(model, p, cfg.lengths[-1])
        return {str(bs): _bench_batch(model, head, prompts[bs], cfg, pad_id, progress) for bs in cfg.batch_sizes}
    finally:
        torch.set_num_threads(threads)


def _bench_batch(model, head, prompts: list[list[int]], cfg: LengthBenchConfig, pad_id: int, progress) -> dict:
    modes = {"plain": None, "mtp": head}
    for h in modes.values():  # warm-up (untimed)
        _run(model, h, prompts, cfg, cfg.lengths[0], pad_id, cfg.seed)
    seconds: dict[str, dict[int, list[float]]] = {m: {n: [] for n in cfg.lengths} for m in modes}
    last: dict[str, dict[int, DecodeMetrics]] = {m: {} for m in modes}
    for rep in range(cfg.repeats):  # each repeat visits every length, in alternating order: a load swing on a
        order = cfg.lengths if rep % 2 == 0 else cfg.lengths[::-1]   # shared machine hits one sample per length
        for length in order:
            seed = (cfg.seed * 1000 + rep) * 100_003 + length
            for name, h in (modes.items() if rep % 2 == 0 else reversed(modes.items())):
                m = _run(model, h, prompts, cfg, length, pad_id, seed)
                if progress is not None:
                    progress(f"batch {len(prompts)} {name} L={length} rep {rep + 1}/{cfg.repeats}")
                seconds[name][length].append(m.decode_seconds)
                last[name][length] = m
    out: dict = {}
    for name in modes:
        rows, prev = {}, None
        for length in cfg.lengths:
            m = last[name][length]
            sec = statistics.median(seconds[name][length])
            slots, source = slots_per_token(m, prompts, cfg.gamma if name == "mtp" else None)
            timed = getattr(m, "decode_tokens", 0) or m.tokens     # the tokens emitted within decode_seconds
            row = {"length": length, "tokens": m.tokens, "decode_seconds": sec, "seconds_per_token": sec / timed,
                   "target_forwards": m.target_forwards, "slots_per_token": slots, "slots_per_token_source": source}
            if prev is None:
                row["window"], row["window_seconds_per_token"] = f"0-{length}", row["seconds_per_token"]
            else:
                dt, dn = sec - prev["decode_seconds"], m.tokens - prev["tokens"]   # same first-token offset
                row["window"], row["window_seconds_per_token"] = f"{prev['length']}-{length}", dt / dn
            if name == "mtp":
                row["accept_length"] = m.accept_length
            rows[str(length)] = row
            prev = row
        first = rows[str(cfg.lengths[0])]["seconds_per_token"]
        for row in rows.values():
            row["growth"] = row["seconds_per_token"] / first
        out[name] = rows
    out["speedup"] = {str(n): out["plain"][str(n)]["seconds_per_token"] / out["mtp"][str(n)]["seconds_per_token"]
                      for n in cfg.lengths}
    return out


def write_length_json(path: str | Path | None, cfg: LengthBenchConfig, results: dict, policy: dict) -> dict:
    """The benchmark's JSON document (config, the policy it ran on, results), written to ``path`` when given."""
    doc = {"config": asdict(cfg), "policy": policy, "results": results}
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2))
    return doc
