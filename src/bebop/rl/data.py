"""A user's prompts for ``bebop rl`` (``--prompts FILE.jsonl`` or ``--dataset NAME_OR_PATH [--split] [--field]``):
the loaders of ``train-mtp`` (:mod:`bebop.training.prompts`: chat templates, length limit, checks), plus what the
reward functions get for each prompt (the prompt as given, the row's other columns), a seeded held-out split for
the before/after evaluation, and the prompts of each RL step.

Step ``s`` takes ``prompts_per_step`` prompts at positions ``s·P … s·P + P − 1`` of an endless stream that visits
the training prompts in a fresh seeded permutation each epoch (every prompt once per epoch). The stream is a pure
function of (seed, position), so a resumed run and Ray workers (each taking its slice of a step) sample exactly the
prompts of the uninterrupted local run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import torch

from bebop.core.sampling import SamplingParams
from bebop.engine.dispatch import DecodeConfig, decode
from bebop.errors import BebopError
from bebop.rl.rewards import RESERVED_COLUMNS, Rewards, Row, mean_or_none, reward_means
from bebop.training.options import DataSource
from bebop.training.prompts import PROMPT_FIELDS, dataset_columns, load_prompts, source_records

EVAL_SEED_OFFSET = 10_000   # the held-out evaluation's sampling seed is the run's seed plus this


@dataclass
class UserPrompts:
    """A user's prompts as the RL run uses them; lists are aligned (one entry per kept prompt)."""

    label: str                        # the file or dataset, for messages
    ids: list[list[int]]              # rendered prompt token ids (chat template applied)
    prompts: list                     # the prompt as the reward functions get it: text, or a list of messages
    where: list[str]                  # its file and line, or dataset row
    columns: dict[str, list]          # the rows' other columns (None where a JSONL line lacks the key)
    train: list[int]                  # indices of the training prompts
    heldout: list[int]                # indices of the held-out prompts (empty when the run evaluates nothing)
    skipped: int = 0                  # prompts dropped as longer than the context allows


def _prompt_field(record: dict) -> str:
    return next(f for f in PROMPT_FIELDS if f in record)


def split_heldout(n: int, heldout: int, seed: int) -> tuple[list[int], list[int]]:
    """``(train, held-out)`` indices of ``n`` prompts: a seeded permutation holds out ``min(heldout, n // 10)``
    prompts, at least one (as train-mtp does); ``heldout = 0`` holds out none."""
    if heldout == 0:
        return list(range(n)), []
    if n < 2:
        raise BebopError(f"need at least 2 prompts to hold one out for --eval-samples, got {n}; give more prompts "
                         "or --eval-samples 0")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = max(1, min(heldout, n // 10))
    return sorted(order[k:]), sorted(order[:k])


def load_user_prompts(source: DataSource, tokenizer, max_prompt_len: int, heldout: int, seed: int) -> UserPrompts:
    """The prompts of ``source`` (a ``--prompts`` file or a ``--dataset``), rendered as train-mtp renders them and
    kept when at most ``max_prompt_len`` tokens long, with their extra columns and the held-out split."""
    if source.kind not in ("prompts", "dataset"):
        raise BebopError(f"bebop rl reads prompts from --prompts or --dataset, not --{source.kind}")
    ps = load_prompts(tokenizer, source, max_prompt_len)
    if source.kind == "dataset":
        label, field, extra = dataset_columns(source.dataset, source.split, source.field)
        values = extra.pop(field)
        prompts = [values[i] for i in ps.index]
        where = [f"{label} row {i}" for i in ps.index]
    else:
        label, records = source_records(source)
        keys: dict[str, None] = {}
        for _, rec in records:
            keys.update(dict.fromkeys(k for k in rec if k != _prompt_field(rec)))
        extra = {k: [rec.get(k) for _, rec in records] for k in keys}
        prompts = [records[i][1][_prompt_field(records[i][1])] for i in ps.index]
        where = [records[i][0] for i in ps.index]
    columns = {k: [v[i] for i in ps.index] for k, v in extra.items() if k not in RESERVED_COLUMNS}
    train, held = split_heldout(len(ps.ids), heldout, seed)
    return UserPrompts(label=label, ids=ps.ids, prompts=prompts, where=where,
                       columns=columns, train=train, heldout=held, skipped=ps.skipped)


@lru_cache(maxsize=8)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(f"bebop-rl-prompts:{seed}:{epoch}").shuffle(order)
    return tuple(order)


def step_positions(n: int, per_step: int, seed: int, step: int) -> list[int]:
    """Which of ``n`` training prompts RL step ``step`` takes: positions ``step·per_step …`` of the stream that
    visits all ``n`` in a new seeded permutation each epoch. A pure function of its arguments."""
    if n < 1:
        raise BebopError("no training prompts")
    out = []
    for pos in range(step * per_step, (step + 1) * per_step):
        epoch, k = divmod(pos, n)
        out.append(_epoch_order(n, seed, epoch)[k])
    return out


def reward_inputs(data: UserPrompts, picks: list[int], texts: list[str], repeat: int) -> tuple[list, list, dict, list]:
    """``(prompts, completions, columns, rows)`` for grading the completions ``texts`` of the prompts ``picks``
    (indices into ``data``), each repeated ``repeat`` times in a row. A prompt given as messages goes to the
    reward functions as messages, its completion as ``[{"role": "assistant", "content": text}]`` (TRL's
    conversational form); a text prompt and its completion as text."""
    rows_of = [p for p in picks for _ in range(repeat)]
    prompts = [data.prompts[p] for p in rows_of]
    completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t
                   for p, t in zip(prompts, texts, strict=True)]
    columns = {k: [v[p] for p in rows_of] for k, v in data.columns.items()}
    rows = [Row(data.prompts[p], data.where[p]) for p in rows_of]
    return prompts, completions, columns, rows


@torch.inference_mode()
def evaluate_rewards(model, tokenizer, data: UserPrompts, rewards: Rewards, samples: int, temperature: float,
                     max_new_tokens: int, seed: int, batch_size: int = 64) -> dict:
    """Mean reward (weighted total and each function's) of ``samples`` completions sampled plainly at
    ``temperature``, one per held-out prompt in turn, from a generator seeded by ``seed`` + EVAL_SEED_OFFSET
    (the same prompts and seed before and after RL)."""
    if not data.heldout:
        raise BebopError("no held-out prompts to evaluate on")
    picks = [data.heldout[j % len(data.heldout)] for j in range(samples)]
    gen = torch.Generator(device=model.device).manual_seed(seed + EVAL_SEED_OFFSET)
    params = SamplingParams(temperature=temperature)
    total: list[float] = []
    parts: dict[str, list] = {name: [] for name in rewards.names}
    n_tok = 0
    for i in range(0, samples, batch_size):
        chunk = picks[i : i + batch_size]
        r = decode(model, None, [data.ids[p] for p in chunk],
                   DecodeConfig(params, max_new_tokens, tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                                generator=gen))
        completions = r.completions()
        texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
        prompts, comps, columns, rows = reward_inputs(data, chunk, texts, 1)
        t, p = rewards.score(prompts, comps, completions, columns, rows)
        total += t
        for name in rewards.names:
            parts[name] += p[name]
        n_tok += sum(len(c) for c in completions)
    return {"heldout_prompts": len(data.heldout), "samples": samples, "temperature": temperature,
            "reward": mean_or_none(total), **reward_means(parts), "mean_tokens": n_tok / samples}
