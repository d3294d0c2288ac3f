"""The head's training data (DESIGN §4): the policy's own samples at the rollout temperature and length, drawn
in batches from a built-in task's prompts or from a user's prompts (JSONL, a ``datasets`` dataset), or a user's
existing rollouts taken as they are.

A user's prompts are split once into training and held-out prompts by a seeded permutation; their samples are
generated in chunks with per-chunk seeds and cached on disk (``sample_cache``), so a rerun or a resumed run
reuses them and N ranks produce the same rows as one process."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console

from bebop.core.sampling import SamplingParams
from bebop.engine.dispatch import DecodeConfig, Turns, decode
from bebop.errors import BebopError
from bebop.models.mtp import _text_config
from bebop.tasks import get_task, sample_problems
from bebop.training.distributed import SINGLE, Dist
from bebop.training.multiturn import is_multi_turn, task_env
from bebop.training.options import DataSource
from bebop.training.prompts import PromptSet, load_prompts
from bebop.training.sample_cache import cached_samples, model_fingerprint

HELDOUT_SEED_OFFSET = 1_000_003  # the held-out samples' seed is the run's seed plus this
SAMPLE_BATCH = 128               # prompts per generation batch (one cache chunk)
Row = tuple[list[int], int]


def policy_samples(model, tokenizer, task, n: int, temperature: float, max_new_tokens: int, seed: int,
                   batch_size: int = 128) -> list[tuple[list[int], int]]:
    """``n`` sequences (prompt ids + sampled completion ids) from the policy, with their prompt lengths.
    Multi-turn tasks (agent) run real episodes, so the completions hold the environment's replies (as
    context the head drafts after, exactly as in rollouts) instead of replies the policy made up."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    out = []
    problems = sample_problems(task, n, seed)
    params = SamplingParams(temperature=temperature)
    for i in range(0, n, batch_size):
        chunk = problems[i : i + batch_size]
        prompts = [tokenizer(p.prompt)["input_ids"] for p in chunk]
        turns = Turns(task_env(task, tokenizer, chunk), tokenizer.convert_tokens_to_ids(task.terminator)) \
            if is_multi_turn(task) else None
        r = decode(model, None, prompts, DecodeConfig(params, max_new_tokens, tokenizer.eos_token_id,
                                                      pad_id=tokenizer.pad_token_id, generator=gen), turns)
        out += [(pr + c, len(pr)) for pr, c in zip(prompts, r.completions(), strict=True)]
    return out


def usable(rows: list[tuple[list[int], int]], gamma: int) -> list[tuple[list[int], int]]:
    """Sequences with at least one trainable position: ≥ γ + 1 completion tokens."""
    return [(ids, n) for ids, n in rows if len(ids) - n >= gamma + 1]


def default_cache_dir() -> Path:
    """``$BEBOP_CACHE/samples``, else ``~/.cache/bebop/samples``."""
    root = os.environ.get("BEBOP_CACHE")
    return Path(root) / "samples" if root else Path.home() / ".cache" / "bebop" / "samples"


def cache_path(cache_dir: str | None) -> Path | None:
    """The sample cache directory of a run: ``None`` → the default, ``""`` → no cache."""
    if cache_dir == "":
        return None
    return Path(cache_dir) if cache_dir else default_cache_dir()


def context_length(model) -> int:
    """The positions the policy was built for (``max_position_embeddings``)."""
    return int(_text_config(model.config).max_position_embeddings)


def sampler(model, tokenizer, temperature: float, max_new_tokens: int) -> Callable[[list[list[int]], int], list]:
    """``generate(prompts, seed) -> completions``: one batch of plain sampling from the policy at the rollout
    temperature, from a generator seeded by ``seed`` alone (so a chunk's samples do not depend on what ran before)."""
    params = SamplingParams(temperature=temperature)

    def generate(prompts: list[list[int]], seed: int) -> list[list[int]]:
        gen = torch.Generator(device=model.device).manual_seed(seed)
        dc = DecodeConfig(params, max_new_tokens, tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                          generator=gen)
        return decode(model, None, prompts, dc).completions()

    return generate


def split_prompts(n: int, heldout: int, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split of ``n`` prompts into (training, held-out) indices: ``min(heldout, n // 10)`` held out, at
    least one, so the held-out α is measured on prompts the head never trained on."""
    if n < 2:
        raise BebopError(f"need at least 2 prompts (one to train on, one held out), got {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = max(1, min(heldout, n // 10))
    return order[k:], order[:k]


def _share(n: int, share: str, heldout: int, seed: int) -> list[int]:
    if share == "all":
        if n < 1:
            raise BebopError("no prompts")
        return list(range(n))
    train, held = split_prompts(n, heldout, seed)
    return held if share == "heldout" else train


def _cycle(items: list, n: int) -> list:
    return [items[j % len(items)] for j in range(n)]


def _say(dist: Dist, text: str) -> None:
    if dist.is_main:
        Console(stderr=True).print(text)


def user_prompts(source: DataSource, tokenizer, max_prompt_len: int, dist: Dist = SINGLE) -> PromptSet:
    """The user's prompts (or rollouts) as token ids; says how many were skipped as too long."""
    ps = load_prompts(tokenizer, source, max_prompt_len)
    if ps.skipped:
        _say(dist, f"[yellow]skipped {ps.skipped} of {ps.skipped + len(ps.ids)} prompts from {source.label}: "
                   f"longer than {max_prompt_len} tokens")
    return ps


def source_rows(model, tokenizer, source: DataSource, n: int, temperature: float, max_new_tokens: int, seed: int,
                *, cache_dir: str | None = None, model_dir: str | None = None, share: str = "train",
                heldout_prompts: int = 0, split_seed: int | None = None, batch: int = SAMPLE_BATCH,
                dist: Dist = SINGLE) -> list[Row]:
    """``n`` rows (prompt ids + completion ids, prompt length) from ``source``, the same on every rank:

    * built-in task prompts: sampled fresh;
    * a user's prompts: their ``share`` of :func:`split_prompts` (``"train"``, ``"heldout"`` or ``"all"``;
      ``split_seed``, default ``seed``; ``heldout_prompts`` = the held-out size asked for), cycled to ``n``
      and sampled ``batch`` at a time (one cache chunk with its own seed) through the cache, keyed by the files in
      ``model_dir`` (no cache without it);
    * a user's rollouts: their share as given, whatever ``n``."""
    if share not in ("train", "heldout", "all"):
        raise BebopError(f"share must be train, heldout or all, got {share!r}")
    source = source.resolved()
    if source.kind == "task":
        return policy_samples(model, tokenizer, get_task(source.task), n, temperature, max_new_tokens, seed)
    ctx = context_length(model)
    split_seed = seed if split_seed is None else split_seed
    if source.kind == "completions":
        ps = user_prompts(source, tokenizer, ctx - 1, dist)
        pairs = list(zip(ps.ids, ps.completions or [], strict=True))
        rows = [(p + c, len(p)) for p, c in pairs if len(p) + len(c) <= ctx]
        if len(rows) < len(pairs):
            _say(dist, f"[yellow]skipped {len(pairs) - len(rows)} of {len(pairs)} rollouts from {source.label}: "
                       f"prompt + completion longer than the policy's context of {ctx} positions")
        return [rows[i] for i in _share(len(rows), share, heldout_prompts, split_seed)]
    if max_new_tokens >= ctx:
        raise BebopError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the policy's context of "
                         f"{ctx} positions")
    ps = user_prompts(source, tokenizer, ctx - max_new_tokens, dist)
    chosen = _share(len(ps.ids), share, heldout_prompts, split_seed)
    if share != "heldout" and dist.world > len(chosen):
        raise BebopError(f"{dist.world} ranks but only {len(chosen)} training prompts: use at most {len(chosen)} "
                         "processes or give more prompts")
    prompts = _cycle([ps.ids[i] for i in chosen], n)
    # a model built in memory has no files to identify it by: its samples are not cached
    key = {"model": model_fingerprint(model_dir) if model_dir else None, "temperature": temperature,
           "max_new_tokens": max_new_tokens, "eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id}
    rows = cached_samples(prompts, sampler(model, tokenizer, temperature, max_new_tokens), key_parts=key,
                          cache_dir=cache_path(cache_dir) if model_dir else None, chunk_size=batch, seed=seed,
                          dist=dist,
                          label=f"{share} samples from {source.label}")
    return rows


def training_rows(cfg, model, tokenizer, dist: Dist = SINGLE) -> tuple[list[Row], list[Row]]:
    """``(data, heldout)`` for a head-training run ``cfg`` (a ``TrainMTPConfig``): ``cfg.data_samples`` and
    ``cfg.heldout_samples`` rows from its source, keeping those with ≥ ``gamma_train`` + 1 completion tokens.
    A user's prompts are split into training and held-out prompts (:func:`split_prompts`)."""
    common = dict(cache_dir=cfg.cache_dir, model_dir=cfg.model, heldout_prompts=cfg.heldout_samples,
                  split_seed=cfg.seed, dist=dist)
    args = (model, tokenizer, cfg.source, cfg.data_samples, cfg.temperature, cfg.max_new_tokens)
    data = source_rows(*args, cfg.seed, **common)
    held = source_rows(*args[:3], cfg.heldout_samples, *args[4:], cfg.seed + HELDOUT_SEED_OFFSET, share="heldout",
                       **common)
    return usable(data, cfg.gamma_train), usable(held, cfg.gamma_train)
