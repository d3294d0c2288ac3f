"""``bebop bench decode | losses | rl``: benchmarks that print a table and write JSON.

Each option's default is read from the benchmark's config dataclass; list-valued options are comma-separated
strings on the command line."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from bebop.cli.generate import load_model_and_head, parse_gamma
from bebop.cli.options import ConfigOpt, DeviceOpt, DtypeOpt, JsonOpt, TomlDeviceOpt, TomlDtypeOpt, TrainDtypeOpt
from bebop.cli.render import (
    adaptive_table,
    announce_paths,
    console,
    decode_table,
    losses_table,
    rl_bench_table,
    write_json,
)
from bebop.cli.rl import check_inputs
from bebop.config import positive
from bebop.errors import BebopError
from bebop.experiments.options import BatchingBenchConfig, DecodeBenchConfig, LossBenchConfig

D, L, K = DecodeBenchConfig, LossBenchConfig, BatchingBenchConfig


def _ints(flag: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise BebopError(f"{flag} must be comma-separated integers, got {text!r}") from None


def bench_decode_cmd(
    model: Annotated[Path, typer.Option(help="Policy directory.")],
    mtp: Annotated[Path, typer.Option(help="MTP head (dir or .safetensors, or native = the model's own MTP layer).")],
    task: Annotated[str, typer.Option(help="Task whose prompts are decoded.")] = D.task,
    rule: Annotated[str, typer.Option(help="rejection or target_only; with --gamma auto also auto (RS or TO per "
                                            "row).")] = D.rule,
    gamma: Annotated[str, typer.Option(help="Draft tokens per verification, or 'auto': adaptive γ against every "
                                            "fixed γ = 1..--gamma-max.")] = str(D.gamma),
    gamma_max: Annotated[int, typer.Option(help="Largest γ with --gamma auto.")] = D.gamma_max,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = ",".join(map(str, D.batch_sizes)),
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = D.temperature,
    max_new_tokens: Annotated[int, typer.Option(help="Completion length cap.")] = D.max_new_tokens,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Every row decodes --max-new-tokens tokens (EOS "
                                             "does not stop it): the engine's speed without a static batch waiting "
                                             "for rows of other lengths.")] = D.ignore_eos,
    continuous: Annotated[bool, typer.Option("--continuous", help="Continuous batching: a batch size B is B slots "
                                             "that all --prompts pass through (a finished row's slot takes the next "
                                             "prompt), plain and MTP alike, instead of static batches of B rows; "
                                             "fixed γ only.")] = D.continuous,
    lengths: Annotated[str | None, typer.Option(
        help="Comma-separated completion lengths, e.g. 128,512,2048,4096: measure per-token cost against length "
             "instead (every row decodes exactly L tokens, no EOS; plain and MTP at fixed γ; KV-cache slots per "
             "kept token). Runs on the loaded policy and head when its context holds the prompt and the longest "
             "length, else on a random-initialised toy-shape policy with that length + 512 positions and a "
             "warm-started head.")] = None,
    repeats: Annotated[int, typer.Option(help="Timed repeats (median).")] = D.repeats,
    prompts: Annotated[int, typer.Option(help="Prompts per batch size (consecutive batches).")] = D.num_prompts,
    seed: Annotated[int, typer.Option(help="Seed of prompts and sampling.")] = D.seed,
    threads: Annotated[int, typer.Option(help="torch intra-op threads for the benchmark (1: steadiest on a shared "
                                              "machine).")] = D.threads,
    json_path: JsonOpt = None,
    device: DeviceOpt = D.device,
    dtype: DtypeOpt = D.dtype,
) -> None:
    """Plain vs MTP decoding vs transformers' generate() — or, with --gamma auto, adaptive γ vs every fixed
    γ; or, with --lengths, per-token cost against completion length — measured side by side in one run."""
    from bebop.engine.forwards import decoding_path
    from bebop.experiments.bench_decode import bench_decode

    if continuous and (gamma == "auto" or lengths is not None):
        raise BebopError("--continuous measures plain and fixed-γ decoding; it does not combine with "
                         + ("--gamma auto" if gamma == "auto" else "--lengths"))
    if lengths is not None:
        _bench_lengths(model, mtp, task, rule, gamma, batch_sizes, temperature, lengths, repeats, seed, threads,
                       json_path, device, dtype)
        return

    cfg = DecodeBenchConfig(task=task, gamma=parse_gamma(gamma), rule=rule, gamma_max=gamma_max,
                            temperature=temperature, batch_sizes=_ints("--batch-sizes", batch_sizes),
                            max_new_tokens=max_new_tokens, ignore_eos=ignore_eos, continuous=continuous,
                            repeats=repeats,
                            num_prompts=prompts, seed=seed, threads=threads, device=device, dtype=dtype)
    positive("max_new_tokens", cfg.max_new_tokens)
    announce_paths()
    the_model, tokenizer, head = load_model_and_head(model, mtp, cfg.device, cfg.dtype)
    results = bench_decode(the_model, tokenizer, head, cfg)
    if cfg.gamma == "auto":
        console.print(adaptive_table(results, f"bench decode --gamma auto: {task}, rule={rule}, τ={temperature}"))
    else:
        console.print(decode_table(results, f"bench decode: {task}, rule={rule}, γ={gamma}, τ={temperature}"
                                            + (", EOS ignored" if ignore_eos else "")
                                            + (", continuous batching" if continuous else "")))
    write_json(json_path, {"config": asdict(cfg),
                           "backend": decoding_path(the_model, head).backend, "results": results})


def _bench_lengths(model: Path, mtp: Path, task: str, rule: str, gamma: str, batch_sizes: str, temperature: float,
                   lengths: str, repeats: int, seed: int, threads: int, json_path: Path | None, device: str,
                   dtype: str) -> None:
    """``bench decode --lengths``: per-token cost against forced completion lengths (``experiments.bench_length``)
    on the loaded policy when its context holds the prompts and the longest length, else on a random-initialised
    toy-shape one."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from bebop.engine.forwards import decoding_path
    from bebop.experiments.bench_length import (
        CONTEXT_MARGIN,
        LengthBenchConfig,
        bench_length,
        context_of,
        length_policy,
        needed_context,
        write_length_json,
    )

    if gamma == "auto":
        raise BebopError("--lengths measures a fixed γ: pass --gamma 1..8, not auto")
    cfg = LengthBenchConfig(lengths=_ints("--lengths", lengths), batch_sizes=_ints("--batch-sizes", batch_sizes),
                            gamma=parse_gamma(gamma), rule=rule, temperature=temperature, repeats=repeats, task=task,
                            seed=seed, threads=threads)
    announce_paths()
    the_model, tokenizer, head = load_model_and_head(model, mtp, device, dtype)
    context = context_of(the_model)
    policy = {"kind": "loaded", "model": str(model), "mtp": str(mtp), "context": context}
    if context is not None and context < needed_context(tokenizer, cfg):
        ref = the_model.get_input_embeddings().weight
        the_model, head = length_policy(tokenizer, cfg.lengths[-1] + CONTEXT_MARGIN, cfg.shape, cfg.seed)
        the_model, head = the_model.to(device=ref.device, dtype=ref.dtype), head.to(device=ref.device, dtype=ref.dtype)
        policy = {"kind": "random-init", "tokenizer": str(model), "context": cfg.lengths[-1] + CONTEXT_MARGIN,
                  "shape": asdict(cfg.shape), "head": "MTPHead.from_base", "loaded_context": context}
        console.print(f"{model} holds {context} positions: measuring a random-initialised toy-shape policy with "
                      f"{policy['context']} positions and a warm-started head")
    total = len(cfg.batch_sizes) * len(cfg.lengths) * cfg.repeats * 2
    with Progress(TextColumn("[bold]bench lengths"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[label]}"), TimeElapsedColumn(), console=console) as bar:
        job = bar.add_task("lengths", total=total, label="")
        results = bench_length(the_model, tokenizer, head, cfg,
                               progress=lambda label: bar.update(job, advance=1, label=label))
    console.print(_length_table(results, f"bench decode --lengths: {task} prompts, γ={cfg.gamma}, rule={rule}, "
                                         f"τ={temperature}, {policy['kind']} policy ({policy['context']} positions)"))
    policy["backend"] = decoding_path(the_model, head).backend
    write_length_json(json_path, cfg, results, policy)


def _length_table(results: dict, title: str):
    """One row per (batch, mode, length) of ``bench decode --lengths``, every figure from its JSON results."""
    from bebop.cli.render import fmt, table

    cols = ["batch", "mode", "length", "ms/token", "window", "ms/token in window", "growth", "accept len",
            "slots/token", "MTP speedup"]
    rows = []
    for bs, r in results.items():
        for mode in ("plain", "mtp"):
            for length, row in r[mode].items():
                rows.append((bs, mode, length, f"{1e3 * row['seconds_per_token']:.3f}", row["window"],
                             f"{1e3 * row['window_seconds_per_token']:.3f}", f"{row['growth']:.2f}x",
                             fmt(row.get("accept_length"), ".2f"), f"{row['slots_per_token']:.2f}",
                             f"{r['speedup'][length]:.2f}x" if mode == "mtp" else ""))
    return table(title, cols, rows)


def bench_losses_cmd(
    model: Annotated[Path, typer.Option(help="Policy directory.")],
    out: Annotated[Path, typer.Option(help="Directory for the heads (one per loss).")] = Path(L.out),
    task: Annotated[str, typer.Option(help="Task (training data and held-out prompts).")] = L.task,
    losses: Annotated[str, typer.Option(help="Comma-separated losses.")] = ",".join(L.losses),
    gamma: Annotated[int, typer.Option(help="Deployed γ for the measurement.")] = L.gamma,
    gamma_train: Annotated[int, typer.Option(help="Steps unrolled in training.")] = L.gamma_train,
    steps: Annotated[int, typer.Option(help="Training steps per head.")] = L.steps,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = L.lr,
    data_samples: Annotated[int, typer.Option(help="Policy samples used as training data.")] = L.data_samples,
    init: Annotated[str | None, typer.Option(help="Shared starting head for every loss.")] = L.init,
    eval_prompts: Annotated[int, typer.Option(help="Held-out prompts per measurement.")] = L.eval_prompts,
    seed: Annotated[int, typer.Option(help="Seed (data, training, measurement).")] = L.seed,
    json_path: JsonOpt = None,
    device: DeviceOpt = L.device,
    dtype: TrainDtypeOpt = L.dtype,
) -> None:
    """Train one head per loss on identical data/steps/seeds, then measure RS and TO acceptance."""
    from bebop.experiments.bench_losses import bench_losses

    cfg = LossBenchConfig(task=task, losses=tuple(x.strip() for x in losses.split(",") if x.strip()), gamma=gamma,
                          gamma_train=gamma_train, steps=steps, lr=lr, data_samples=data_samples, init=init,
                          eval_prompts=eval_prompts, seed=seed, out=str(out), device=device, dtype=dtype)
    positive("eval_prompts", cfg.eval_prompts)
    announce_paths()
    results = bench_losses(str(model), cfg.out, cfg)
    console.print(losses_table(results, f"bench losses: {task}, γ={gamma}, {steps} steps each"))
    write_json(json_path, results)  # {"<loss>": {"alpha_rs": [...], ...}}
    (out / "bench_losses_config.json").write_text(json.dumps(asdict(cfg), indent=2))


def bench_rl_cmd(
    model: Annotated[str | None, typer.Option(help="SFT policy directory.")] = None,
    mtp: Annotated[str | None, typer.Option(help="e2e-TV head directory (rs-e2e_tv, to-e2e_tv).")] = None,
    mtp_ce: Annotated[str | None, typer.Option(help="CE head directory (rs-ce, to-ce, rs-online-ce).")] = None,
    task: Annotated[str | None, typer.Option(help="Task.")] = None,
    out: Annotated[str | None, typer.Option(help="Output directory: one run per method + bench_rl.json.")] = None,
    methods: Annotated[str | None, typer.Option(help="Comma list: none, rs-e2e_tv, to-e2e_tv, rs-ce, to-ce, "
                                                     "rs-online-ce.")] = None,
    steps: Annotated[int | None, typer.Option(help="RL steps per method.")] = None,
    eval_samples: Annotated[int | None, typer.Option(help="Held-out problems before/after each run.")] = None,
    async_rollouts: Annotated[bool | None, typer.Option("--async/--sync", help="Async rollouts.")] = None,
    prompts_per_step: Annotated[int | None, typer.Option(help="Prompts per step.")] = None,
    group_size: Annotated[int | None, typer.Option(help="Samples per prompt.")] = None,
    lr: Annotated[float | None, typer.Option(help="Policy learning rate.")] = None,
    rollout_batch: Annotated[int | None, typer.Option(
        help="Rows in flight per rollout worker (continuous batching; 0 = one static batch).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (same for every method).")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the results JSON here.")] = None,
    device: TomlDeviceOpt = None,
    dtype: TomlDtypeOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Short GRPO runs per rollout method, side by side: step time, rollout time, accept-length drift, accuracy."""
    from bebop.config import make_config
    from bebop.experiments.bench_rl import RLBenchConfig, bench_rl, method_config

    announce_paths()
    cfg = make_config(RLBenchConfig, config, model=model, mtp=mtp, mtp_ce=mtp_ce, task=task, out=out,
                      methods=methods, steps=steps, eval_samples=eval_samples, async_rollouts=async_rollouts,
                      **{"rl.prompts_per_step": prompts_per_step, "rl.group_size": group_size, "rl.lr": lr,
                         "rl.rollout_batch": rollout_batch, "rl.seed": seed, "rl.device": device,
                         "rl.dtype": dtype})
    for name in cfg.method_list():
        check_inputs(method_config(cfg, name))  # before the first run creates OUT
    results = bench_rl(cfg, console=console)
    console.print(rl_bench_table(results, f"bench rl: {cfg.task}, {cfg.steps} steps (timing means skip step 0)"))
    write_json(json_path, results)


def bench_batching_cmd(
    model: Annotated[Path, typer.Option(help="Policy directory.")],
    mtp: Annotated[Path, typer.Option(help="MTP head (dir or .safetensors, or native = the model's own MTP layer).")],
    task: Annotated[str, typer.Option(help="Task whose prompts are decoded.")] = K.task,
    batch: Annotated[int, typer.Option(help="Rows per static batch = slots of continuous batching.")] = K.batch,
    prompts: Annotated[int, typer.Option(help="Prompts of the step.")] = K.prompts,
    group_size: Annotated[int, typer.Option(help="Samples per prompt (rows = prompts x group size).")] = K.group_size,
    gamma: Annotated[int, typer.Option(help="Draft tokens per verification.")] = K.gamma,
    rule: Annotated[str, typer.Option(help="rejection or target_only.")] = K.rule,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = K.temperature,
    max_new_tokens: Annotated[int, typer.Option(help="Completion length cap.")] = K.max_new_tokens,
    repeats: Annotated[int, typer.Option(help="Timed repeats (median).")] = K.repeats,
    seed: Annotated[int, typer.Option(help="Seed of prompts and sampling.")] = K.seed,
    threads: Annotated[int, typer.Option(help="torch intra-op threads (1: steadiest when shared).")] = K.threads,
    json_path: JsonOpt = None,
    device: DeviceOpt = K.device,
    dtype: DtypeOpt = K.dtype,
) -> None:
    """Static against continuous batching on one RL step's rows (prompts x group size), plain and MTP, side by side:
    tokens/s, row utilization, cache slots per kept token, accept length."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from bebop.cli.render import fmt, table
    from bebop.experiments.bench_batching import bench_batching

    cfg = BatchingBenchConfig(task=task, batch=batch, prompts=prompts, group_size=group_size, gamma=gamma, rule=rule,
                              temperature=temperature, max_new_tokens=max_new_tokens, repeats=repeats, seed=seed,
                              threads=threads, device=device, dtype=dtype)
    announce_paths()
    the_model, tokenizer, head = load_model_and_head(model, mtp, cfg.device, cfg.dtype)
    with Progress(TextColumn("[bold]bench batching"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[label]}"), TimeElapsedColumn(), console=console) as bar:
        job = bar.add_task("batching", total=4 * (cfg.repeats + 1), label="")
        res = bench_batching(the_model, tokenizer, head, cfg,
                             progress=lambda label: bar.update(job, advance=1, label=label))
    rows = []
    for kind in ("plain", "mtp"):
        for mode in ("static", "continuous"):
            r = res[kind][mode]
            c = r["completion_tokens"]
            rows.append((kind, mode, f"{r['tokens_per_s']:.0f}", f"{r['utilization']:.0%}",
                         fmt(r["slots_per_token"], ".2f"), fmt(r["accept_length"], ".2f"),
                         f"{c['min']} / {c['median']} / {c['max']}",
                         f"{res[kind]['continuous_vs_static']:.2f}x" if mode == "continuous" else "",
                         f"{res['mtp_speedup'][mode]:.2f}x" if kind == "mtp" else ""))
    console.print(table(f"bench batching: {task}, {res['rows']} rows through batch {batch}, gamma={gamma}, "
                        f"rule={rule}, tau={temperature}",
                        ["decoding", "batching", "tok/s", "utilization", "slots/token", "accept len",
                         "completion min / median / max", "continuous / static", "MTP / plain"], rows))
    write_json(json_path, {"config": asdict(cfg), "results": res})
