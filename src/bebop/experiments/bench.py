"""`bebop bench decode`: plain vs MTP decoding vs transformers' generate(), side by side in one run.

All decoders get the same prompts, seeds and max lengths. Speed model (DESIGN §8):
  speedup ≈ (1 + E[A]) / (c_verify(γ+1)/c_1 + γ·c_draft/c_1)
with c_1 one plain target forward, c_verify(γ+1) a target forward over γ+1 tokens and c_draft one MTP
step, each measured here per batch size.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace

import torch

from bebop.core.sampling import SamplingParams
from bebop.engine.decode import DecodeMetrics, Rollout, forward_costs, generate, generate_mtp, left_pad, median_seconds
from bebop.engine.turns import generate_turns
from bebop.errors import BebopError
from bebop.experimental.adaptive import AUTO, AdaptiveDraft, calibrate, decode_trace, replay
from bebop.tasks import get_task, sample_problems
from bebop.training.multiturn import is_multi_turn, task_env


@dataclass
class DecodeBenchConfig:
    task: str = "arith"
    gamma: int | str = 3            # "auto": adaptive γ against every fixed γ = 1..gamma_max (``bench_adaptive``)
    rule: str = "rejection"         # with gamma "auto" also "auto" (RS or TO per row)
    gamma_max: int = 5
    temperature: float = 1.0
    batch_sizes: tuple[int, ...] = (1, 8)
    max_new_tokens: int = 64
    repeats: int = 3
    num_prompts: int = 32           # prompts per batch size, decoded in consecutive batches of that size
    seed: int = 0
    threads: int = 1                # torch intra-op threads for the whole benchmark (restored afterwards)


def hf_generate_tokens_per_s(model, tokenizer, prompts, params: SamplingParams, max_new_tokens: int, seed: int,
                             repeats: int) -> float:
    """transformers' ``generate()`` on the same weights and prompts: generated (non-pad) tokens / s."""
    ids, mask = left_pad(prompts, tokenizer.pad_token_id, model.device)
    kw = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if params.temperature == 0:
        kw.update(do_sample=False)
    else:
        kw.update(do_sample=True, temperature=params.temperature, top_k=params.top_k or 0, top_p=params.top_p or 1.0)
    counts = []

    def once():
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, **kw)[:, ids.shape[1]:]
        counts.append(_count_generated(out, tokenizer.eos_token_id))

    once()
    counts.clear()
    sec = median_seconds(once, repeats)
    return statistics.median(counts) / sec


def _count_generated(out: torch.Tensor, eos_id: int) -> int:
    """Tokens up to and including the first EOS per row."""
    is_eos = out == eos_id
    first = torch.where(is_eos.any(1), is_eos.long().argmax(1) + 1, out.shape[1])
    return int(first.sum())


def bench_decode(model, tokenizer, head, cfg: DecodeBenchConfig) -> dict:
    """Per batch size: plain/MTP/HF tokens per second, speedup, α_k, accept length, forward costs.

    Runs with ``cfg.threads`` intra-op threads (default 1): at these sizes one thread is as fast as two at
    batch 1, and on a machine shared with other jobs two threads stall each other by milliseconds per op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        if cfg.gamma == AUTO:
            return _bench_adaptive(model, tokenizer, head, cfg)
        return _bench_decode(model, tokenizer, head, cfg)
    finally:
        torch.set_num_threads(threads)


def _decode_batches(tokenizer, cfg: DecodeBenchConfig, bs: int, seed: int) -> list[tuple[list, list[list[int]]]]:
    """``cfg.num_prompts`` task problems (rounded to whole batches) drawn with ``seed``, in batches of ``bs``:
    (problems, prompt ids) per batch."""
    n_prompts = max(bs, cfg.num_prompts // bs * bs)
    problems = sample_problems(get_task(cfg.task), n_prompts, seed)
    prompts = [tokenizer(p.prompt)["input_ids"] for p in problems]
    return [(problems[i : i + bs], prompts[i : i + bs]) for i in range(0, n_prompts, bs)]


def decode_task(model, tokenizer, head, task_name: str, batch: tuple[list, list[list[int]]], params: SamplingParams,
                max_new_tokens: int, gamma, rule: str, generator: torch.Generator) -> tuple[Rollout, torch.Tensor]:
    """One engine call on ``batch`` (problems, prompt ids): plain (``head`` None) or MTP; multi-turn tasks (agent)
    run their episodes through ``turns.generate_turns`` with the task's environment. Returns the rollout and
    its mask of sampled tokens (environment tokens are not sampled; ``metrics.tokens`` counts sampled ones)."""
    problems, prompts = batch
    task = get_task(task_name)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if is_multi_turn(task):
        if isinstance(gamma, AdaptiveDraft):
            raise BebopError(f"adaptive gamma is not supported for the multi-turn task {task_name!r} yet")
        r = generate_turns(model, head, prompts, params, max_new_tokens, eos,
                           tokenizer.convert_tokens_to_ids(task.terminator), task_env(task, tokenizer, problems),
                           gamma=gamma, rule=rule, pad_id=pad, generator=generator)
        return r, r.sampled
    if head is None:
        r = generate(model, prompts, params, max_new_tokens, eos, pad, generator)
    else:
        r = generate_mtp(model, head, prompts, params, max_new_tokens, eos, gamma, rule, pad, generator)
    return r, r.mask


def _bench_adaptive(model, tokenizer, head, cfg: DecodeBenchConfig) -> dict:
    """``bench decode --gamma auto``: per batch size, plain decoding, MTP at every fixed γ = 1..γ_max (per rule:
    ``cfg.rule``, or RS and TO when it is ``auto``) and adaptive γ (``experimental.adaptive``), all on the same prompts,
    seeds and lengths, run back to back batch by batch in a rotating order. Each repeat samples with new seeds
    and a run's tokens/s is its total tokens over its total seconds across the timed repeats: at batch > 1 a
    batch lasts as long as its longest row, so one fixed sample would favour whichever run happened to draw short
    tails. The adaptive run is calibrated (step costs, α prior, confidence tables) on other prompts at the same
    batch size first, with twice the timed repeats (neighbouring γ's differ by a few percent); that one-off cost
    is reported, not timed. Per batch size, ``replay`` also scores the RS planner's per-row decisions against
    every fixed γ without timing noise: ``adaptive.replay`` over the decode steps of 4× ``num_prompts`` other
    prompts decoded at γ_max (``adaptive.decode_trace``), under that batch size's calibrated costs."""
    params = SamplingParams(temperature=cfg.temperature)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rules = ("rejection", "target_only") if cfg.rule == AUTO else (cfg.rule,)
    results: dict[str, dict] = {}
    if is_multi_turn(get_task(cfg.task)):
        raise BebopError(f"--gamma auto is not supported for the multi-turn task {cfg.task!r} yet")
    for bs in cfg.batch_sizes:
        t0 = time.perf_counter()
        calib = [prompts for _, prompts in _decode_batches(tokenizer, cfg, bs, cfg.seed + 7919)]
        adaptive = calibrate(model, head, calib, params, cfg.gamma_max, cfg.max_new_tokens, eos, pad, cfg.seed,
                             repeats=2 * cfg.repeats, warm_rule=cfg.rule if cfg.rule == AUTO else None)
        calib_s = time.perf_counter() - t0
        runs = {"plain": (None, None)} | {f"{r}/{g}": (g, r) for r in rules for g in range(1, cfg.gamma_max + 1)}
        runs["auto"] = (adaptive, cfg.rule)
        batches = _decode_batches(tokenizer, cfg, bs, cfg.seed)
        totals = {name: DecodeMetrics() for name in runs}
        names = list(runs)
        for rep in range(cfg.repeats + 1):  # repeat 0 warms up
            for bi, batch in enumerate(batches):
                turn = (rep * len(batches) + bi) % len(names)     # back to back, so load swings hit every run alike,
                for name in names[turn:] + names[:turn]:          # and in a rotating order: none always runs last
                    gamma, rule = runs[name]
                    gen = torch.Generator(device=model.device).manual_seed((cfg.seed * 1000 + rep) * 1000 + bi)
                    r, _ = decode_task(model, tokenizer, None if gamma is None else head, cfg.task, batch, params,
                                       cfg.max_new_tokens, gamma, rule, gen)
                    if rep > 0:
                        totals[name].merge(r.metrics)
        plain = totals["plain"].tokens_per_s
        res: dict = {"plain_tokens_per_s": plain, "calibration_seconds": calib_s,
                     "step_seconds": list(adaptive.step_seconds), "prior_alpha": list(adaptive.prior),
                     "calibrated_tokens_per_s": list(adaptive.throughput or []), "gamma_cap": adaptive.batch_cap(bs),
                     "fixed": {}}
        for name, (gamma, _) in runs.items():
            if gamma is None:
                continue
            m = totals[name]
            row = {"tokens_per_s": m.tokens_per_s, "accept_length": m.accept_length,
                   "step_seconds": m.decode_seconds / max(m.target_forwards, 1),
                   "alpha": m.alpha, "mean_gamma": m.mean_gamma, "target_only_fraction": m.target_only_fraction}
            row["speedup"] = row["tokens_per_s"] / plain
            if name == "auto":
                res["auto"] = row
            else:
                res["fixed"][name] = row
        best = max(res["fixed"], key=lambda k: res["fixed"][k]["tokens_per_s"])
        res["best_fixed"] = best
        res["auto_vs_best_fixed"] = res["auto"]["tokens_per_s"] / res["fixed"][best]["tokens_per_s"]
        res["auto_vs_best_fixed_upto"] = [      # [c-1]: against the best fixed γ ≤ c (adaptive may draft past c)
            res["auto"]["tokens_per_s"] / max(row["tokens_per_s"] for name, row in res["fixed"].items()
                                              if int(name.rsplit("/", 1)[1]) <= c) for c in range(1, cfg.gamma_max + 1)]
        if "rejection" in rules:             # 4× the bench's prompts, other ones: a few thousand draft steps
            trace = [p for _, p in _decode_batches(tokenizer, replace(cfg, num_prompts=4 * cfg.num_prompts), bs,
                                                   cfg.seed + 104_729)]
            conf, accept = decode_trace(model, head, trace, params, cfg.gamma_max, cfg.max_new_tokens, eos, pad,
                                       cfg.seed)
            res["replay"] = {"rule": "rejection", **replay(conf, accept, adaptive)}
        results[str(bs)] = res
    return results


def _bench_decode(model, tokenizer, head, cfg: DecodeBenchConfig) -> dict:
    from bebop.models.mtp import hf_mtp_generate

    params = SamplingParams(temperature=cfg.temperature)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    multi_turn = is_multi_turn(get_task(cfg.task))
    results: dict[str, dict] = {}
    for bs in cfg.batch_sizes:
        batches = _decode_batches(tokenizer, cfg, bs, cfg.seed)
        plain_rates, mtp_rates = [], []
        mtp_all = DecodeMetrics()
        for rep in range(cfg.repeats + 1):  # repeat 0 warms up
            plain, mtp = DecodeMetrics(), DecodeMetrics()
            for bi, batch in enumerate(batches):
                for h, m in ((None, plain), (head, mtp)):
                    gen = torch.Generator(device=model.device).manual_seed(cfg.seed * 1000 + bi)
                    m.merge(decode_task(model, tokenizer, h, cfg.task, batch, params, cfg.max_new_tokens, cfg.gamma,
                                        cfg.rule, gen)[0].metrics)
            if rep > 0:
                plain_rates.append(plain.tokens_per_s)
                mtp_rates.append(mtp.tokens_per_s)
                mtp_all.merge(mtp)
        res = {
            "plain_tokens_per_s": statistics.median(plain_rates),
            "mtp_tokens_per_s": statistics.median(mtp_rates),
            "alpha": mtp_all.alpha,
            "expected_alpha": mtp_all.expected_alpha,
            "accept_length": mtp_all.accept_length,
            "accept_length_counts_bonus": True,
            "threads": cfg.threads,
        }
        res["speedup"] = res["mtp_tokens_per_s"] / res["plain_tokens_per_s"]
        costs = forward_costs(model, head, batches[0][1], cfg.gamma)
        res.update(costs)
        e_a = res["accept_length"] - 1
        cost_ratio = (costs["c_verify"] + cfg.gamma * costs["c_draft"]) / costs["c_1"]
        res["speedup_limit"] = (1 + e_a) / cost_ratio
        res["fraction_of_limit"] = res["speedup"] / res["speedup_limit"]
        if multi_turn:
            res["hf_tokens_per_s"] = res["plain_vs_hf"] = res["hf_mtp_tokens_per_s"] = None
            res["hf_error"] = res["hf_mtp_error"] = "multi-turn task: transformers' generate() has no environment loop"
            results[str(bs)] = res
            continue
        hf_tps = [hf_generate_tokens_per_s(model, tokenizer, p, params, cfg.max_new_tokens, cfg.seed, cfg.repeats)
                  for _, p in batches]
        res["hf_tokens_per_s"] = statistics.mean(hf_tps)
        res["plain_vs_hf"] = res["plain_tokens_per_s"] / res["hf_tokens_per_s"]
        if bs == 1:
            try:
                tok_count, secs = 0, 0.0
                for _, p in batches:
                    ids = torch.tensor([p[0]], device=model.device)
                    kw = dict(do_sample=params.temperature > 0, pad_token_id=pad, eos_token_id=eos)
                    if params.temperature > 0:
                        kw.update(temperature=params.temperature, top_k=0)
                    hf_mtp_generate(model, head, ids, cfg.max_new_tokens, **kw)  # warm-up
                    t0 = time.perf_counter()
                    out = hf_mtp_generate(model, head, ids, cfg.max_new_tokens, **kw)
                    secs += time.perf_counter() - t0
                    tok_count += _count_generated(out[:, ids.shape[1]:], eos)
                res["hf_mtp_tokens_per_s"] = tok_count / secs
            except Exception as e:  # record why transformers' MTP path could not run
                res["hf_mtp_tokens_per_s"] = None
                res["hf_mtp_error"] = f"{type(e).__name__}: {e}"
        results[str(bs)] = res
    return results


@dataclass
class LossBenchConfig:
    task: str = "arith"
    losses: tuple[str, ...] = ("ce", "fkl", "rkl", "tv", "e2e_tv")
    gamma: int = 3                       # deployed γ (measurement); training uses gamma_train
    gamma_train: int = 3
    steps: int = 400
    lr: float = 5e-3
    data_samples: int = 2048
    init: str | None = None              # shared starting head for every loss (None: the same warm start)
    temperatures: tuple[float, ...] = (1.0, 0.7)
    eval_prompts: int = 128
    batch_size: int = 32
    max_new_tokens: int = 64
    seed: int = 0


@torch.inference_mode()
def measure_acceptance(model, tokenizer, head, task_name: str, rule: str, temperature: float, gamma: int,
                       n_prompts: int, batch_size: int, max_new_tokens: int, seed: int) -> dict:
    """Empirical per-step α_k and accept length of ``head`` through the real engine on held-out prompts, and the
    policy's mean per-token entropy H(p) (at τ) over the emitted tokens (the sampled ones: multi-turn tasks run
    real episodes, whose environment tokens are neither drafted nor counted)."""
    problems = sample_problems(get_task(task_name), n_prompts, seed)
    params = SamplingParams(temperature=temperature)
    total = DecodeMetrics()
    gen = torch.Generator(device=model.device).manual_seed(seed)
    ent_sum, n_tok = 0.0, 0
    for i in range(0, n_prompts, batch_size):
        chunk = problems[i : i + batch_size]
        batch = (chunk, [tokenizer(p.prompt)["input_ids"] for p in chunk])
        r, sampled = decode_task(model, tokenizer, head, task_name, batch, params, max_new_tokens, gamma, rule, gen)
        total.merge(r.metrics)
        ent_sum += float((r.entropy * sampled).sum())
        n_tok += int(sampled.sum())
    return {"alpha": total.alpha, "expected_alpha": total.expected_alpha, "accept_length": total.accept_length,
            "entropy": ent_sum / max(n_tok, 1)}


def bench_losses(model_dir: str, out_dir: str, cfg: LossBenchConfig) -> dict:
    """Train one head per loss on identical data, steps and seeds; measure each through the engine under
    RS and TO at every temperature in ``cfg.temperatures`` on held-out prompts."""
    from pathlib import Path

    from bebop.models.mtp import load_head
    from bebop.models.policy import load_policy
    from bebop.training.train_mtp import TrainMTPConfig, train_mtp

    model, tokenizer = load_policy(model_dir)
    results: dict[str, dict] = {}
    for loss in cfg.losses:
        head_dir = Path(out_dir) / loss
        train_mtp(TrainMTPConfig(model=model_dir, out=str(head_dir), task=cfg.task, loss=loss,
                                 gamma_train=cfg.gamma_train, steps=cfg.steps, lr=cfg.lr,
                                 data_samples=cfg.data_samples, seed=cfg.seed, init=cfg.init))
        head = load_head(head_dir, model).eval()
        row: dict[str, object] = {}
        for tau in cfg.temperatures:
            suffix = "" if tau == cfg.temperatures[0] else f"_t{tau:g}"
            for rule, tag in (("rejection", "rs"), ("target_only", "to")):
                r = measure_acceptance(model, tokenizer, head, cfg.task, rule, tau, cfg.gamma, cfg.eval_prompts,
                                       cfg.batch_size, cfg.max_new_tokens, cfg.seed + 99_991)
                row[f"alpha_{tag}{suffix}"] = r["alpha"]
                row[f"accept_length_{tag}{suffix}"] = r["accept_length"]
        results[loss] = row
    return results
