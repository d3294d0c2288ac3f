"""`bebop bench batching`: static against continuous batching on one RL step's rows, plain and MTP, side by side.

An RL step decodes ``prompts`` × ``group_size`` rows whose completion lengths vary. In static batches of B rows each
batch runs until its slowest row ends while the finished rows' slots idle; with continuous batching
(``engine.continuous``) a freed slot takes the next waiting row at the next step. Both see the same rows, the same
B, the same seeds and the same forwards. Reported per mode: emitted tokens per second (median over repeats, prefill
included: every row is prefilled once in both), row utilization (live rows ÷ batch slots per decode forward), cache
slots attended per kept token (continuous only: compaction keeps it near 1), accept length, and the spread of
completion lengths that makes the difference.
"""

from __future__ import annotations

import statistics

import torch

from bebop.core.sampling import SamplingParams
from bebop.engine.dispatch import decode
from bebop.engine.metrics import DecodeMetrics
from bebop.experiments.measure import decode_config
from bebop.experiments.options import BatchingBenchConfig
from bebop.tasks import get_task, sample_problems
from bebop.training.multiturn import is_multi_turn, task_env

__all__ = ["BatchingBenchConfig", "bench_batching", "static_utilization"]

MODES = ("static", "continuous")


def static_utilization(metrics: DecodeMetrics, rows: int, mtp: bool) -> float:
    """Live rows ÷ batch slots per decode forward of one static batch of ``rows`` rows: every decode forward holds
    all ``rows`` slots; a live row-step is a verify step of a live row (MTP, ``metrics.steps``) or a token after the
    prefill's first (plain)."""
    slots = rows * metrics.target_forwards
    live = metrics.steps if mtp else metrics.tokens - rows
    return live / slots if slots else 1.0


def _rows(model, tokenizer, cfg: BatchingBenchConfig) -> tuple[list[list[int]], object]:
    """The step's rows (each prompt ``group_size`` times, as GRPO samples them) and the task's turns, if any."""
    from bebop.engine.turns import Turns

    task = get_task(cfg.task)
    problems = sample_problems(task, cfg.prompts, cfg.seed)
    rows = [tokenizer(p.prompt)["input_ids"] for p in problems for _ in range(cfg.group_size)]
    turns = None
    if is_multi_turn(task):
        per_row = [p for p in problems for _ in range(cfg.group_size)]
        turns = Turns(task_env(task, tokenizer, per_row), tokenizer.convert_tokens_to_ids(task.terminator))
    return rows, turns


def _decode(model, tokenizer, head, rows, turns, cfg: BatchingBenchConfig, mode: str, seed: int) -> dict:
    """One pass over every row in ``mode``: tokens, seconds, utilization, slots per token, accept length, lengths."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    dc = decode_config(tokenizer, SamplingParams(temperature=cfg.temperature), cfg.max_new_tokens, cfg.gamma,
                       cfg.rule, gen)
    metrics, lengths, util = DecodeMetrics(), [], []
    if mode == "continuous":
        r = decode(model, head, rows, dc, turns, slots=cfg.batch)
        metrics.merge(r.metrics)
        lengths = r.lengths.tolist()
        util = [(r.metrics.live_steps, r.metrics.slot_steps)]
    else:
        for i in range(0, len(rows), cfg.batch):
            chunk = rows[i : i + cfg.batch]
            sub = None
            if turns is not None:
                from bebop.engine.turns import Turns

                env, base = turns.env, i
                sub = Turns(lambda row, t, env=env, base=base: env(base + row, t), turns.stop_id, turns.turn_tokens,
                            turns.max_turns)
            r = decode(model, head, chunk, dc, sub)
            metrics.merge(r.metrics)
            lengths += r.lengths.tolist()
            u = static_utilization(r.metrics, len(chunk), head is not None)
            util.append((u * len(chunk) * r.metrics.target_forwards, len(chunk) * r.metrics.target_forwards))
    live, slots = sum(u[0] for u in util), sum(u[1] for u in util)
    return {"tokens": metrics.tokens, "seconds": metrics.seconds, "tokens_per_s": metrics.tokens_per_s,
            "utilization": live / slots if slots else 1.0, "slots_per_token": metrics.slots_per_token,
            "accept_length": metrics.accept_length if head is not None else None,
            "target_forwards": metrics.target_forwards, "prefills": metrics.prefills or -(-len(rows) // cfg.batch),
            "lengths": lengths}


def bench_batching(model, tokenizer, head, cfg: BatchingBenchConfig, progress=None) -> dict:
    """Per decoding kind (plain, MTP) and batching mode: the figures of one pass (module doc), tokens/s as the
    median over ``cfg.repeats`` timed passes after a warm-up; plus continuous ÷ static and MTP ÷ plain ratios."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        rows, turns = _rows(model, tokenizer, cfg)
        out: dict = {}
        for kind, h in (("plain", None), ("mtp", head)):
            out[kind] = {}
            for mode in MODES:
                passes = []
                for rep in range(cfg.repeats + 1):                  # pass 0 warms up
                    res = _decode(model, tokenizer, h, rows, turns, cfg, mode, cfg.seed * 1000 + rep)
                    if progress is not None:
                        progress(f"{kind} {mode} pass {rep}")
                    if rep:
                        passes.append(res)
                row = dict(passes[-1])
                row["tokens_per_s"] = statistics.median(p["tokens_per_s"] for p in passes)
                lengths = sorted(row.pop("lengths"))
                row["completion_tokens"] = {"min": lengths[0], "median": lengths[len(lengths) // 2],
                                            "max": lengths[-1]}
                out[kind][mode] = row
            out[kind]["continuous_vs_static"] = out[kind]["continuous"]["tokens_per_s"] / \
                out[kind]["static"]["tokens_per_s"]
        out["mtp_speedup"] = {m: out["mtp"][m]["tokens_per_s"] / out["plain"][m]["tokens_per_s"] for m in MODES}
        out["rows"] = len(rows)
        return out
    finally:
        torch.set_num_threads(threads)
