"""`bebop bench decode`: plain vs MTP decoding vs transformers' generate(), side by side in one run; with
``gamma="auto"``, adaptive drafting against every fixed γ.

All decoders get the same prompts, seeds and max lengths. Speed model (DESIGN §8):
  speedup ≈ (1 + E[A]) / (c_verify(γ+1)/c_1 + γ·c_draft/c_1)
with c_1 one plain target forward, c_verify(γ+1) a target forward over γ+1 tokens and c_draft one MTP
step (a one-token head forward), each measured here per batch size within every timed repeat, between the decode
runs (so load swings on a shared machine hit costs and rates alike), timed in turn with the catch-up forward, and
reported as the medians of all their samples.

``fraction_of_limit`` = measured decode speedup ÷ that limit. The limit is a decode-phase quantity (per verify
step against per plain token), so the measured speedup it is compared with is the decode-phase one:
``decode_tokens_per_s`` of MTP over plain, tokens emitted after each row's first token (which the prefill gives
both decoders) over the seconds after prefill. ``speedup`` (total time, prefill included) is reported too, and is
the one used (``fraction_speedup`` says which) on multi-turn tasks, whose episodes count no decode phase.

A real step runs γ−1 one-token head forwards and one catch-up head forward over γ+1 tokens (the head re-reads the
accepted positions with the target's hiddens), not γ one-token ones; ``c_catchup`` measures that forward, and
``speedup_limit_catchup`` / ``fraction_of_limit_catchup`` use ``c_verify + (γ−1)·c_draft + c_catchup`` instead of
``c_verify + γ·c_draft``, beside (never instead of) the DESIGN §8 formula. ``host_seconds_per_step`` is what a
step costs beyond those forwards (plain: beyond c_1), from the measured step times; ``row_utilization`` the live
rows per batch slot (a static batch runs until its longest row is done, and MTP rows finish at more uneven step
counts than plain ones).

Attention makes every forward dearer as the context grows, and not by the same share for one token and γ+1 tokens.
The costs are therefore timed twice: with the prompt alone in the cache (the keys above) and with the prompt and
half a plain row's mean completion (the context a row decodes at on average, ``…_at_decode_context``), which give
``speedup_limit_at_decode_context`` and ``fraction_of_limit_at_decode_context``.

``continuous`` (``--continuous``): batch size B is B slots of ``engine.continuous`` that every prompt of the run
passes through, a finished row's slot taking the next prompt (how a rollout engine runs), for plain and MTP alike.
Its decode phase leaves out every admission's prefill too (``continuous_decode``), so the same limit, at B rows,
applies.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace

import torch

from bebop.core.sampling import SamplingParams
from bebop.core.speed import speedup_limit
from bebop.engine.decode import DecodeConfig, DecodeMetrics, forwards, left_pad, median_seconds
from bebop.engine.dispatch import Turns, decode
from bebop.errors import BebopError
from bebop.experimental.adaptive import AUTO, AdaptiveDraft, calibrate, decode_trace, replay
from bebop.experiments.measure import decode_config, decode_task
from bebop.experiments.options import DecodeBenchConfig
from bebop.tasks import get_task, sample_problems
from bebop.training.multiturn import is_multi_turn, task_env

__all__ = ["DecodeBenchConfig", "bench_decode", "hf_generate_tokens_per_s"]

MULTI_TURN_HF = "multi-turn task: transformers' generate() has no environment loop"


@dataclass
class _Run:
    """What one benchmark run shares: the policy, its tokenizer, the head, the options and the sampling params."""

    model: object
    tokenizer: object
    head: object
    cfg: DecodeBenchConfig

    @property
    def continuous(self) -> bool:
        return self.cfg.continuous

    @property
    def params(self) -> SamplingParams:
        return SamplingParams(temperature=self.cfg.temperature)

    @property
    def eos_pad(self) -> tuple[int | None, int]:
        """The EOS token the decoders stop at (None with ``ignore_eos``) and the padding token."""
        return None if self.cfg.ignore_eos else self.tokenizer.eos_token_id, self.tokenizer.pad_token_id

    def batches(self, bs: int, seed: int, num_prompts: int | None = None) -> list[tuple[list, list[list[int]]]]:
        """``num_prompts`` task problems (rounded to whole batches) drawn with ``seed``, in batches of ``bs``:
        (problems, prompt ids) per batch."""
        n = max(bs, (num_prompts or self.cfg.num_prompts) // bs * bs)
        problems = sample_problems(get_task(self.cfg.task), n, seed)
        prompts = [self.tokenizer(p.prompt)["input_ids"] for p in problems]
        return [(problems[i : i + bs], prompts[i : i + bs]) for i in range(0, n, bs)]

    def decode(self, head, batch, gamma, rule: str, seed: int, slots: int | None = None) -> DecodeMetrics:
        """Metrics of one engine call on ``batch`` (plain when ``head`` is None), sampling seeded by ``seed``; with
        ``slots``, continuous batching of the whole ``batch`` through that many slots."""
        gen = torch.Generator(device=self.model.device).manual_seed(seed)
        cfg = replace(decode_config(self.tokenizer, self.params, self.cfg.max_new_tokens, gamma, rule, gen),
                      eos_id=self.eos_pad[0])
        if slots is None:
            return decode_task(self.model, self.tokenizer, head, self.cfg.task, batch, cfg)[0].metrics
        problems, prompts = batch
        task = get_task(self.cfg.task)
        turns = None
        if is_multi_turn(task):
            stop = self.tokenizer.convert_tokens_to_ids(task.terminator)
            turns = Turns(task_env(task, self.tokenizer, problems), stop)
        return decode(self.model, head, prompts, cfg, turns, slots=slots).metrics

    def queues(self, bs: int, seed: int) -> list[tuple[list, list[list[int]]]]:
        """What one timed pass decodes: the static batches of ``bs`` rows, or with ``continuous`` one queue of all of
        them that ``bs`` slots drain."""
        batches = self.batches(bs, seed)
        if not self.continuous:
            return batches
        return [([p for b in batches for p in b[0]], [q for b in batches for q in b[1]])]


def bench_decode(model, tokenizer, head, cfg: DecodeBenchConfig) -> dict:
    """Per batch size: plain/MTP/HF tokens per second, speedup, α_k, accept length, forward costs.

    With ``cfg.continuous`` (fixed γ only), batch size B means B slots that every prompt passes through
    (``engine.continuous``: a finished row's slot takes the next prompt), for plain and MTP decoding alike, instead
    of static batches of B rows; the forward costs are still measured at B rows, and transformers' generate() still
    runs static batches (it has no other mode). Runs with ``cfg.threads`` intra-op threads (restored afterwards): one
    thread keeps the timing steady on a machine shared with other jobs, where threads of several processes contend
    for the same cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    run = _Run(model, tokenizer, head, cfg)
    try:
        if cfg.gamma == AUTO:
            if cfg.continuous:
                raise BebopError("--continuous measures a fixed gamma; pass --gamma 1..8, not auto")
            if is_multi_turn(get_task(cfg.task)):
                raise BebopError(f"--gamma auto is not supported for the multi-turn task {cfg.task!r} yet")
            return {str(bs): _bench_adaptive(run, bs) for bs in cfg.batch_sizes}
        return {str(bs): _bench_fixed(run, bs) for bs in cfg.batch_sizes}
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- fixed γ


def _bench_fixed(run: _Run, bs: int) -> dict:
    """One batch size at fixed γ: plain and MTP rates (medians over repeats, total and decode-phase), α, accept
    length, the forward costs measured within every repeat and the speed model's limit from them (module doc),
    and transformers' generate() (and its MTP path at batch 1) for reference."""
    cfg = run.cfg
    batches = run.batches(bs, cfg.seed)
    slots = bs if run.continuous else None
    rates: dict[str, list[float]] = {k: [] for k in ("plain", "mtp", "plain_decode", "mtp_decode")}
    costs: dict[str, list[float]] = {}
    plain_all, mtp_all = DecodeMetrics(), DecodeMetrics()
    extra = 0
    for rep in range(cfg.repeats + 1):  # repeat 0 warms up
        plain, mtp = DecodeMetrics(), DecodeMetrics()
        for bi, batch in enumerate(run.queues(bs, cfg.seed)):
            for h, m in ((None, plain), (run.head, mtp)):
                m.merge(run.decode(h, batch, cfg.gamma, cfg.rule, cfg.seed * 1000 + bi, slots))
        if rep == 0:                    # half the mean completion: the context a plain row decodes at on average
            extra = round(plain.tokens / len(batches) / bs / 2)
        if rep > 0:
            for name, m in (("plain", plain), ("mtp", mtp)):
                rates[name].append(m.tokens_per_s)
                rates[name + "_decode"].append(m.decode_tokens_per_s)
            plain_all.merge(plain)
            mtp_all.merge(mtp)
            for suffix, ctx in (("", 0), ("_at_decode_context", extra)):
                for name, samples in _forward_costs(run, batches[0][1], ctx).items():
                    costs.setdefault(name + suffix, []).extend(samples)
    res = {
        "plain_tokens_per_s": statistics.median(rates["plain"]),
        "mtp_tokens_per_s": statistics.median(rates["mtp"]),
        "plain_decode_tokens_per_s": statistics.median(rates["plain_decode"]),
        "mtp_decode_tokens_per_s": statistics.median(rates["mtp_decode"]),
        "alpha": mtp_all.alpha,
        "expected_alpha": mtp_all.expected_alpha,
        "accept_length": mtp_all.accept_length,
        "accept_length_counts_bonus": True,
        "threads": cfg.threads,
        "batching": "continuous" if run.continuous else "static",
    }
    res["speedup"] = res["mtp_tokens_per_s"] / res["plain_tokens_per_s"]
    # multi-turn episodes (turns.generate_turns) do not count a decode phase: their fraction uses the total speedup
    decode = res["mtp_decode_tokens_per_s"] > 0 and res["plain_decode_tokens_per_s"] > 0
    res["decode_speedup"] = res["mtp_decode_tokens_per_s"] / res["plain_decode_tokens_per_s"] if decode else None
    res["fraction_speedup"] = "decode_speedup" if decode else "speedup"
    res.update(_speed_limit(cfg.gamma, costs, res["accept_length"], res[res["fraction_speedup"]], plain_all,
                            mtp_all))
    res.update(_limit_at_decode_context(cfg.gamma, costs, res["accept_length"], res[res["fraction_speedup"]], extra))
    if is_multi_turn(get_task(cfg.task)):
        res["hf_tokens_per_s"] = res["plain_vs_hf"] = res["hf_mtp_tokens_per_s"] = None
        res["hf_error"] = res["hf_mtp_error"] = MULTI_TURN_HF
        return res
    hf_tps = [hf_generate_tokens_per_s(run.model, run.tokenizer, p, run.params, cfg.max_new_tokens, cfg.seed,
                                       cfg.repeats, cfg.ignore_eos) for _, p in batches]
    res["hf_tokens_per_s"] = statistics.mean(hf_tps)
    res["plain_vs_hf"] = res["plain_tokens_per_s"] / res["hf_tokens_per_s"]
    if bs == 1:
        res.update(_hf_mtp_rate(run, batches))
    return res


@torch.inference_mode()
def _forward_costs(run: _Run, prompts: list[list[int]], extra: int = 0, repeats: int = 20) -> dict[str, list[float]]:
    """Timed seconds (``repeats`` samples each) of c_1 (a target forward over one token), c_verify (over γ+1
    tokens), c_draft (a one-token head forward) and c_catchup (the head over γ+1 tokens, a verify step's catch-up),
    at the batch size of ``prompts`` with a cache holding them and ``extra`` more tokens (the prompts' own tokens
    again, at the next positions: attention costs grow with the context), through the engine's forwards
    (``engine.forwards.forward_costs`` measures the first three the same way). The four are timed in turn,
    ``repeats`` rounds in a rotating order, so a load swing on a shared machine moves all four alike instead of one of
    them (their ratios are what the limit uses)."""
    gamma = run.cfg.gamma
    device = run.model.device
    ids, mask = left_pad(prompts, 0, device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    if extra:
        more = torch.arange(extra, device=device)
        ids = torch.cat([ids, ids[:, more % ids.shape[1]]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1]).expand(-1, extra)], 1)
        pos = torch.cat([pos, pos[:, -1:] + 1 + more], 1)
    B, P = ids.shape
    valid = torch.ones((B, P + gamma + 1), dtype=torch.bool, device=device)
    valid[:, :P] = mask.bool()
    fw = forwards(run.model, run.head, B, P + gamma + 1, "auto", gamma)
    hid = fw.target(ids, pos, valid[:, :P], 0)
    fw.drafter(ids, hid, pos, valid[:, :P], 0)

    def after(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:   # n new slots after the prompt
        return ids[:, -1:].repeat(1, n), pos[:, -1:] + 1 + torch.arange(n, device=device), valid[:, : P + n]

    (x1, p1, v1), (xv, pv, vv) = after(1), after(gamma + 1)
    h1, hv = hid[:, -1:], hid[:, -1:].repeat(1, gamma + 1, 1)
    calls = {"c_1": lambda: fw.target(x1, p1, v1, P), "c_verify": lambda: fw.target(xv, pv, vv, P),
             "c_draft": lambda: fw.drafter(x1, h1, p1, v1, P), "c_catchup": lambda: fw.drafter(xv, hv, pv, vv, P)}
    times: dict[str, list[float]] = {k: [] for k in calls}
    names = list(calls)
    for r in range(repeats + 1):                 # round 0 warms up
        for name in names[r % 4:] + names[: r % 4]:
            t0 = time.perf_counter()
            calls[name]()
            if r:
                times[name].append(time.perf_counter() - t0)
    return times


def _speed_limit(gamma: int, costs: dict[str, list[float]], accept_length: float, speedup: float,
                 plain: DecodeMetrics, mtp: DecodeMetrics) -> dict:
    """Median forward costs over every sample of every repeat, their ratios to c_1, the speed model's limit and the
    fraction of it that the decode-phase ``speedup`` reaches (module doc), the same with the catch-up forward's own
    cost, each decoder's step time and host time per step beyond its forwards, and the live rows per batch slot."""
    c = {k: statistics.median(v) for k, v in costs.items() if not k.endswith("_at_decode_context")}
    c1 = c["c_1"]
    limit = speedup_limit(accept_length, c1, c["c_verify"], c["c_draft"], gamma)
    limit_cu = accept_length * c1 / (c["c_verify"] + (gamma - 1) * c["c_draft"] + c["c_catchup"])
    plain_step = plain.decode_seconds / max(plain.target_forwards, 1)
    mtp_step = mtp.decode_seconds / max(mtp.target_forwards, 1)
    return {
        **c, "c_verify_over_c_1": c["c_verify"] / c1, "c_draft_over_c_1": c["c_draft"] / c1,
        "c_catchup_over_c_1": c["c_catchup"] / c1,
        "speedup_limit": limit, "fraction_of_limit": speedup / limit,
        "limit_formula": "(1+E[A]) / (c_verify/c_1 + gamma*c_draft/c_1), speedup = decode-phase tokens/s ratio",
        "speedup_limit_catchup": limit_cu, "fraction_of_limit_catchup": speedup / limit_cu,
        "plain_step_seconds": plain_step, "mtp_step_seconds": mtp_step,
        "plain_host_seconds_per_step": plain_step - c1,
        "mtp_host_seconds_per_step": mtp_step - (c["c_verify"] + (gamma - 1) * c["c_draft"] + c["c_catchup"]),
        "plain_row_utilization": plain.utilization, "mtp_row_utilization": mtp.utilization,
    }


def _limit_at_decode_context(gamma: int, costs: dict[str, list[float]], accept_length: float, speedup: float,
                             extra: int) -> dict:
    """The speed model's limit and the fraction of it reached with the forward costs timed at the context a plain
    row decodes at on average (its prompt and ``extra`` = half its mean completion), where each row's steps run,
    rather than at the prompt alone."""
    c = {k.removesuffix("_at_decode_context"): statistics.median(v) for k, v in costs.items()
         if k.endswith("_at_decode_context")}
    limit = speedup_limit(accept_length, c["c_1"], c["c_verify"], c["c_draft"], gamma)
    return {"decode_context_extra_tokens": extra, **{k + "_at_decode_context": v for k, v in c.items()},
            "c_verify_over_c_1_at_decode_context": c["c_verify"] / c["c_1"],
            "c_draft_over_c_1_at_decode_context": c["c_draft"] / c["c_1"],
            "speedup_limit_at_decode_context": limit, "fraction_of_limit_at_decode_context": speedup / limit}


def hf_generate_tokens_per_s(model, tokenizer, prompts, params: SamplingParams, max_new_tokens: int, seed: int,
                             repeats: int, ignore_eos: bool = False) -> float:
    """transformers' ``generate()`` on the same weights and prompts: generated (non-pad) tokens / s. With
    ``ignore_eos`` every row runs ``max_new_tokens`` tokens (transformers has no such switch: ``min_new_tokens``
    masks EOS, which changes what is sampled but not the work per token)."""
    ids, mask = left_pad(prompts, tokenizer.pad_token_id, model.device)
    kw = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if ignore_eos:
        kw.update(min_new_tokens=max_new_tokens)
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


def _hf_mtp_rate(run: _Run, batches) -> dict:
    """transformers' own MTP generation at batch 1 (tokens / s), or why it could not run."""
    from bebop.models.hf_mtp import hf_mtp_generate

    eos, pad = run.tokenizer.eos_token_id, run.tokenizer.pad_token_id
    params = run.params
    kw = dict(do_sample=params.temperature > 0, pad_token_id=pad, eos_token_id=eos)
    if run.cfg.ignore_eos:
        kw.update(min_new_tokens=run.cfg.max_new_tokens)
    if params.temperature > 0:
        kw.update(temperature=params.temperature, top_k=0)
    try:
        tok_count, secs = 0, 0.0
        for _, p in batches:
            ids = torch.tensor([p[0]], device=run.model.device)
            hf_mtp_generate(run.model, run.head, ids, run.cfg.max_new_tokens, **kw)  # warm-up
            t0 = time.perf_counter()
            out = hf_mtp_generate(run.model, run.head, ids, run.cfg.max_new_tokens, **kw)
            secs += time.perf_counter() - t0
            tok_count += _count_generated(out[:, ids.shape[1]:], eos)
        return {"hf_mtp_tokens_per_s": tok_count / secs}
    except Exception as e:  # record why transformers' MTP path could not run
        return {"hf_mtp_tokens_per_s": None, "hf_mtp_error": f"{type(e).__name__}: {e}"}


def _count_generated(out: torch.Tensor, eos_id: int) -> int:
    """Tokens up to and including the first EOS per row."""
    is_eos = out == eos_id
    first = torch.where(is_eos.any(1), is_eos.long().argmax(1) + 1, out.shape[1])
    return int(first.sum())


# ---------------------------------------------------------------------------------------------- adaptive γ


def _bench_adaptive(run: _Run, bs: int) -> dict:
    """``bench decode --gamma auto`` at one batch size: plain decoding, MTP at every fixed γ = 1..γ_max (per rule:
    ``cfg.rule``, or RS and TO when it is ``auto``) and adaptive γ (``experimental.adaptive``), all on the same
    prompts, seeds and lengths (see :func:`_time_runs`). The adaptive run is calibrated (step costs, α prior,
    confidence tables) on other prompts at the same batch size first, with twice the timed repeats (neighbouring
    γ's are close in throughput, so their costs need the extra samples); that one-off cost is reported, not
    timed. ``replay`` also scores the RS planner's per-row decisions against every fixed γ without timing noise
    (:func:`_replay`)."""
    cfg = run.cfg
    rules = ("rejection", "target_only") if cfg.rule == AUTO else (cfg.rule,)
    eos, pad = run.eos_pad
    t0 = time.perf_counter()
    calib = [prompts for _, prompts in run.batches(bs, cfg.seed + 7919)]
    adaptive = calibrate(run.model, run.head, calib, DecodeConfig(run.params, cfg.max_new_tokens, eos, pad_id=pad),
                         cfg.gamma_max, cfg.seed, repeats=2 * cfg.repeats,
                         warm_rule=cfg.rule if cfg.rule == AUTO else None)
    calib_s = time.perf_counter() - t0
    runs = {"plain": (None, None)} | {f"{r}/{g}": (g, r) for r in rules for g in range(1, cfg.gamma_max + 1)}
    runs["auto"] = (adaptive, cfg.rule)
    totals = _time_runs(run, runs, run.batches(bs, cfg.seed))
    plain = totals.pop("plain").tokens_per_s
    rows = {name: _run_row(m, plain) for name, m in totals.items()}
    res: dict = {"plain_tokens_per_s": plain, "calibration_seconds": calib_s,
                 "step_seconds": list(adaptive.step_seconds), "prior_alpha": list(adaptive.prior),
                 "calibrated_tokens_per_s": list(adaptive.throughput or []), "gamma_cap": adaptive.batch_cap(bs),
                 "auto": rows.pop("auto"), "fixed": rows}
    res.update(_versus_fixed(res["auto"], rows, cfg.gamma_max))
    if "rejection" in rules:
        res["replay"] = {"rule": "rejection", **_replay(run, bs, adaptive)}
    return res


def _time_runs(run: _Run, runs: dict, batches) -> dict[str, DecodeMetrics]:
    """Every run on every batch, run back to back batch by batch in a rotating order (so load swings hit every
    run alike and none always runs last). Each repeat samples with new seeds and a run's totals sum its timed
    repeats: at batch > 1 a batch lasts as long as its longest row, so one fixed sample would favour whichever run
    happened to draw short tails."""
    cfg = run.cfg
    totals = {name: DecodeMetrics() for name in runs}
    names = list(runs)
    for rep in range(cfg.repeats + 1):  # repeat 0 warms up
        for bi, batch in enumerate(batches):
            turn = (rep * len(batches) + bi) % len(names)
            for name in names[turn:] + names[:turn]:
                gamma, rule = runs[name]
                m = run.decode(None if gamma is None else run.head, batch, gamma, rule,
                               (cfg.seed * 1000 + rep) * 1000 + bi)
                if rep > 0:
                    totals[name].merge(m)
    return totals


def _run_row(m: DecodeMetrics, plain_tokens_per_s: float) -> dict:
    """One run's figures from its summed metrics."""
    return {"tokens_per_s": m.tokens_per_s, "accept_length": m.accept_length,
            "step_seconds": m.decode_seconds / max(m.target_forwards, 1), "alpha": m.alpha,
            "mean_gamma": m.mean_gamma, "target_only_fraction": m.target_only_fraction,
            "speedup": m.tokens_per_s / plain_tokens_per_s}


def _versus_fixed(auto: dict, fixed: dict[str, dict], gamma_max: int) -> dict:
    """The best fixed run, adaptive's throughput against it, and (at index c − 1) against the best fixed γ ≤ c
    (adaptive may draft past c)."""
    best = max(fixed, key=lambda k: fixed[k]["tokens_per_s"])
    upto = [auto["tokens_per_s"] / max(row["tokens_per_s"] for name, row in fixed.items()
                                       if int(name.rsplit("/", 1)[1]) <= c) for c in range(1, gamma_max + 1)]
    return {"best_fixed": best, "auto_vs_best_fixed": auto["tokens_per_s"] / fixed[best]["tokens_per_s"],
            "auto_vs_best_fixed_upto": upto}


def _replay(run: _Run, bs: int, adaptive: AdaptiveDraft) -> dict:
    """``adaptive.replay`` over the decode steps of 4× ``num_prompts`` other prompts decoded at γ_max
    (``adaptive.decode_trace``), under this batch size's calibrated costs."""
    cfg = run.cfg
    eos, pad = run.eos_pad
    trace = [p for _, p in run.batches(bs, cfg.seed + 104_729, 4 * cfg.num_prompts)]
    conf, accept = decode_trace(run.model, run.head, trace, DecodeConfig(run.params, cfg.max_new_tokens, eos,
                                                                         cfg.gamma_max, pad_id=pad), cfg.seed)
    return replay(conf, accept, adaptive)

