"""`bebop …` command line. Bad input prints one line ``error: …`` naming the bad value and exits with 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from bebop.errors import BebopError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Bebop: exact MTP speculative decoding for fast RL rollouts.")
console = Console(width=None if sys.stdout.isatty() else 160)

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML file with config values.")]


def print_dict(title: str, values: dict) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in values.items():
        if isinstance(v, float):
            v = f"{v:.4f}"
        elif isinstance(v, list):
            v = ", ".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in v)
        elif isinstance(v, dict):
            continue
        table.add_row(k, str(v))
    console.print(table)


@app.command()
def sft(
    task: Annotated[str | None, typer.Option(help="Task: arith, countdown, code, agent.")] = None,
    out: Annotated[str | None, typer.Option(help="Output directory for model + tokenizer.")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for data and init.")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="Wall-time budget of the training loop.")] = None,
    eval_samples: Annotated[int | None, typer.Option(help="Problems for the final evaluation (0 = skip).")] = None,
    layers: Annotated[int | None, typer.Option(help="Decoder layers.")] = None,
    hidden: Annotated[int | None, typer.Option(help="Hidden size.")] = None,
    heads: Annotated[int | None, typer.Option(help="Attention heads.")] = None,
    kv_heads: Annotated[int | None, typer.Option(help="Key/value heads.")] = None,
    intermediate: Annotated[int | None, typer.Option(help="MLP width.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Train a tiny Qwen3 policy from scratch on a task's reference solutions (SFT)."""
    from bebop.config import make_config
    from bebop.training.sft import SFTConfig, train_sft

    cfg = make_config(
        SFTConfig, config, task=task, out=out, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
        max_minutes=max_minutes, eval_samples=eval_samples, **{
            "model.num_layers": layers, "model.hidden_size": hidden, "model.num_heads": heads,
            "model.num_kv_heads": kv_heads, "model.intermediate_size": intermediate,
        },
    )
    summary = train_sft(cfg)
    console.print(f"saved policy to [bold]{cfg.out}[/] after {summary['steps']} steps "
                  f"in {summary['train_seconds']:.0f}s")
    if "eval" in summary:
        print_dict(f"eval {cfg.task}", summary["eval"])


@app.command("eval")
def eval_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Policy directory (model + tokenizer).")],
    task: Annotated[str, typer.Option(help="Task to evaluate on.")] = "arith",
    samples: Annotated[int, typer.Option(help="Number of problems.")] = 256,
    temperature: Annotated[float, typer.Option(help="Sampling temperature for `accuracy`.")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(help="Completion length cap.")] = 96,
    seed: Annotated[int, typer.Option(help="Seed of problems and sampling.")] = 10_000,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON and write it to DIR/eval_<task>.json.")] = False,
) -> None:
    """Accuracy (sampled and greedy) and mean per-token entropy of a policy on a task."""
    from bebop.config import positive
    from bebop.core.sampling import SamplingParams
    from bebop.models.policy import load_policy
    from bebop.tasks import get_task
    from bebop.training.evaluate import evaluate

    the_task = get_task(task)
    positive("samples", samples)
    positive("max_new_tokens", max_new_tokens)
    SamplingParams(temperature=temperature)
    model, tokenizer = load_policy(model_dir)
    res = evaluate(model, tokenizer, the_task, samples=samples, temperature=temperature,
                   max_new_tokens=max_new_tokens, seed=seed)
    if json_out:
        (model_dir / f"eval_{task}.json").write_text(json.dumps(res, indent=2))
        print(json.dumps(res))
    else:
        print_dict(f"eval {task} on {model_dir}", res)


@app.command("train-mtp")
def train_mtp_cmd(
    model: Annotated[str | None, typer.Option(help="Policy directory (frozen backbone).")] = None,
    out: Annotated[str | None, typer.Option(help="Output directory for the head.")] = None,
    task: Annotated[str | None, typer.Option(help="Task whose prompts the policy samples on.")] = None,
    loss: Annotated[str | None, typer.Option(help="ce, fkl, rkl, tv or e2e_tv.")] = None,
    gamma_train: Annotated[int | None, typer.Option(help="Draft steps unrolled in training.")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Rollout temperature (data and target p).")] = None,
    data_samples: Annotated[int | None, typer.Option(help="Policy samples used as training data.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed.")] = None,
    init: Annotated[str | None, typer.Option(help="Start from this head instead of the warm start.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Train an MTP head on the policy's own samples with the backbone frozen (DESIGN §4)."""
    from bebop.config import make_config
    from bebop.training.train_mtp import TrainMTPConfig, train_mtp

    cfg = make_config(TrainMTPConfig, config, model=model, out=out, task=task, loss=loss, gamma_train=gamma_train,
                      steps=steps, batch_size=batch_size, lr=lr, temperature=temperature,
                      data_samples=data_samples, seed=seed, init=init)
    summary = train_mtp(cfg)
    console.print(f"saved head to [bold]{cfg.out}[/] (bebop, qwen3_5 and deepseek_v3 layouts)")
    print_dict("held-out expected α per step", {f"alpha_{k + 1}": a for k, a in enumerate(summary["heldout_alpha"])})


def _load_model_and_head(model_dir: Path, mtp_dir: Path | None):
    from bebop.models.mtp import load_head
    from bebop.models.policy import load_policy

    model, tokenizer = load_policy(model_dir)
    head = load_head(mtp_dir, model).eval() if mtp_dir is not None else None
    return model, tokenizer, head


@app.command("generate")
def generate_cmd(
    model: Annotated[Path, typer.Option(help="Policy directory.")],
    mtp: Annotated[Path | None, typer.Option(help="MTP head (dir or .safetensors); omit for plain decoding.")] = None,
    prompt: Annotated[list[str] | None, typer.Option(help="Prompt text (repeatable).")] = None,
    task: Annotated[str, typer.Option(help="Task to draw prompts from when --prompt is not given.")] = "arith",
    n: Annotated[int, typer.Option(help="Number of task prompts.")] = 4,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0 = greedy).")] = 1.0,
    top_k: Annotated[int | None, typer.Option(help="Top-k (off by default).")] = None,
    top_p: Annotated[float | None, typer.Option(help="Top-p in (0, 1] (off by default).")] = None,
    gamma: Annotated[str, typer.Option(help="Draft tokens per verification, or 'auto' (adaptive γ ≤ 5, "
                                            "calibrated on these prompts first).")] = "3",
    rule: Annotated[str, typer.Option(help="rejection, target_only, greedy or auto (RS or TO per row).")] =
        "rejection",
    max_new_tokens: Annotated[int, typer.Option(help="Completion length cap.")] = 96,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
) -> None:
    """Sample completions (plain, or MTP draft→verify with --mtp) and print them with decode metrics."""
    import torch

    from bebop.core.sampling import SamplingParams
    from bebop.engine.decode import generate, generate_mtp
    from bebop.tasks import get_task, sample_problems

    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    g = _parse_gamma(gamma)
    the_model, tokenizer, head = _load_model_and_head(model, mtp)
    texts = prompt or [p.prompt for p in sample_problems(get_task(task), n, seed)]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    gen = torch.Generator(device=the_model.device).manual_seed(seed)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if head is None:
        r = generate(the_model, prompts, params, max_new_tokens, eos, pad, gen)
    else:
        if g == "auto":
            from bebop.experimental.adaptive import calibrate

            g = calibrate(the_model, head, [prompts], params, 5, max_new_tokens, eos, pad, seed, repeats=1)
        r = generate_mtp(the_model, head, prompts, params, max_new_tokens, eos, g, rule, pad, gen)
    for t, c in zip(texts, tokenizer.batch_decode(r.completions(), skip_special_tokens=True), strict=True):
        console.print(f"[bold]{t.strip()}[/]\n{c}\n", highlight=False)
    print_dict("decode metrics", r.metrics.to_dict())


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print a table and write JSON.")
app.add_typer(bench_app, name="bench")


@bench_app.command("decode")
def bench_decode_cmd(
    model: Annotated[Path, typer.Option(help="Policy directory.")],
    mtp: Annotated[Path, typer.Option(help="MTP head (dir or .safetensors).")],
    task: Annotated[str, typer.Option(help="Task whose prompts are decoded.")] = "arith",
    rule: Annotated[str, typer.Option(help="rejection or target_only; with --gamma auto also auto (RS or TO per "
                                            "row).")] = "rejection",
    gamma: Annotated[str, typer.Option(help="Draft tokens per verification, or 'auto': adaptive γ against every "
                                            "fixed γ = 1..--gamma-max.")] = "3",
    gamma_max: Annotated[int, typer.Option(help="Largest γ with --gamma auto.")] = 5,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8",
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(help="Completion length cap.")] = 64,
    repeats: Annotated[int, typer.Option(help="Timed repeats (median).")] = 3,
    prompts: Annotated[int, typer.Option(help="Prompts per batch size (consecutive batches).")] = 32,
    seed: Annotated[int, typer.Option(help="Seed of prompts and sampling.")] = 0,
    threads: Annotated[int, typer.Option(help="torch intra-op threads for the benchmark (1: steadiest on a shared "
                                              "machine).")] = 1,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write results here.")] = None,
) -> None:
    """Plain vs MTP decoding vs transformers' generate() — or, with --gamma auto, adaptive γ vs every fixed
    γ — measured side by side in one run."""
    from bebop.config import positive
    from bebop.core.sampling import RULES, SamplingParams
    from bebop.experimental.adaptive import AUTO
    from bebop.experiments.bench import DecodeBenchConfig, bench_decode
    from bebop.tasks import get_task

    get_task(task)
    SamplingParams(temperature=temperature)
    g = _parse_gamma(gamma)
    rules = (*RULES, AUTO) if g == AUTO else RULES
    if rule not in rules:
        raise BebopError(f"unknown rule {rule!r}; choose one of: {', '.join(rules)}")
    if gamma_max < 1:
        raise BebopError(f"gamma-max must be >= 1, got {gamma_max}")
    try:
        sizes = tuple(int(b) for b in batch_sizes.split(","))
    except ValueError:
        raise BebopError(f"--batch-sizes must be comma-separated integers, got {batch_sizes!r}") from None
    positive("prompts", prompts)
    positive("repeats", repeats)
    positive("threads", threads)
    if any(b < 1 for b in sizes):
        raise BebopError(f"batch sizes must be >= 1, got {batch_sizes!r}")
    the_model, tokenizer, head = _load_model_and_head(model, mtp)
    cfg = DecodeBenchConfig(task=task, gamma=g, rule=rule, gamma_max=gamma_max, temperature=temperature,
                            batch_sizes=sizes, max_new_tokens=max_new_tokens, repeats=repeats, num_prompts=prompts,
                            seed=seed, threads=threads)
    results = bench_decode(the_model, tokenizer, head, cfg)
    if g == AUTO:
        console.print(adaptive_table(results, f"bench decode --gamma auto: {task}, rule={rule}, τ={temperature}"))
    else:
        console.print(decode_table(results, f"bench decode: {task}, rule={rule}, γ={gamma}, τ={temperature}"))
    if json_path is not None:
        from dataclasses import asdict

        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"config": asdict(cfg), "results": results}, indent=2))


def _parse_gamma(gamma: str) -> int | str:
    if gamma == "auto":
        return gamma
    try:
        g = int(gamma)
    except ValueError:
        raise BebopError(f"gamma must be a positive integer or 'auto', got {gamma!r}") from None
    if g < 1:
        raise BebopError(f"gamma must be >= 1, got {g}")
    return g


def decode_table(results: dict, title: str) -> Table:
    """The table of ``bench decode`` (fixed γ) from its JSON results."""
    table = Table(title=title)
    cols = ["batch", "plain tok/s", "mtp tok/s", "speedup", "limit", "hf tok/s", "hf mtp tok/s", "accept len",
            "alpha"]
    for c in cols:
        table.add_column(c, justify="right")
    for bs, r in results.items():
        hf_mtp = r.get("hf_mtp_tokens_per_s")
        hf = r.get("hf_tokens_per_s")
        table.add_row(bs, f"{r['plain_tokens_per_s']:.0f}", f"{r['mtp_tokens_per_s']:.0f}", f"{r['speedup']:.2f}x",
                      f"{r['speedup_limit']:.2f}x", "-" if hf is None else f"{hf:.0f}",
                      "-" if hf_mtp is None else f"{hf_mtp:.0f}", f"{r['accept_length']:.2f}",
                      " ".join(f"{a:.2f}" for a in r["alpha"]))
    return table


def adaptive_table(results: dict, title: str) -> Table:
    """The table of ``bench decode --gamma auto`` from its JSON results: one row per (batch, run)."""
    table = Table(title=title)
    for c in ["batch", "run", "tok/s", "vs plain", "accept len", "mean γ", "TO rows", "vs best fixed"]:
        table.add_column(c, justify="right")
    for bs, r in results.items():
        best = r["fixed"][r["best_fixed"]]["tokens_per_s"]
        table.add_row(bs, "plain", f"{r['plain_tokens_per_s']:.0f}", "1.00x", "", "", "", "")
        for name, row in [*r["fixed"].items(), ("auto", r["auto"])]:
            mark = " *" if name == r["best_fixed"] else ""
            table.add_row(bs, name + mark, f"{row['tokens_per_s']:.0f}", f"{row['speedup']:.2f}x",
                          f"{row['accept_length']:.2f}", f"{row['mean_gamma']:.2f}",
                          f"{row['target_only_fraction']:.0%}", f"{row['tokens_per_s'] / best:.2f}")
        upto = r.get("auto_vs_best_fixed_upto", [])
        if len(upto) > 5:        # the usual fixed range, when adaptive may draft longer than γ = 5
            table.add_row(bs, "auto vs best fixed γ ≤ 5", "", "", "", "", "", f"{upto[4]:.2f}")
        rp = r.get("replay")
        if rp is not None:       # decisions replayed on recorded decode steps under the calibrated costs (no clock)
            table.add_row(bs, f"replay: auto (best fixed γ = {rp['best_fixed_gamma']})", "", "", "",
                          f"{rp['planner_mean_gamma']:.2f}", "", f"{rp['planner_vs_best_fixed']:.2f}")
            table.add_row(bs, "replay: oracle", "", "", "", "", "", f"{rp['oracle_vs_best_fixed']:.2f}")
    return table


@bench_app.command("losses")
def bench_losses_cmd(
    model: Annotated[Path, typer.Option(help="Policy directory.")],
    out: Annotated[Path, typer.Option(help="Directory for the heads (one per loss).")] = Path("runs/bench_losses"),
    task: Annotated[str, typer.Option(help="Task (training data and held-out prompts).")] = "arith",
    losses: Annotated[str, typer.Option(help="Comma-separated losses.")] = "ce,fkl,rkl,tv,e2e_tv",
    gamma: Annotated[int, typer.Option(help="Deployed γ for the measurement.")] = 3,
    gamma_train: Annotated[int, typer.Option(help="Steps unrolled in training.")] = 3,
    steps: Annotated[int, typer.Option(help="Training steps per head.")] = 400,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 5e-3,
    data_samples: Annotated[int, typer.Option(help="Policy samples used as training data.")] = 2048,
    init: Annotated[str | None, typer.Option(help="Shared starting head for every loss.")] = None,
    eval_prompts: Annotated[int, typer.Option(help="Held-out prompts per measurement.")] = 128,
    seed: Annotated[int, typer.Option(help="Seed (data, training, measurement).")] = 0,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write results here.")] = None,
) -> None:
    """Train one head per loss on identical data/steps/seeds, then measure RS and TO acceptance."""
    from dataclasses import asdict

    from bebop.core.losses import LOSSES
    from bebop.experiments.bench import LossBenchConfig, bench_losses
    from bebop.tasks import get_task

    get_task(task)
    names = tuple(x.strip() for x in losses.split(",") if x.strip())
    bad = [x for x in names if x not in LOSSES]
    if bad or not names:
        raise BebopError(f"unknown loss {bad[0] if bad else losses!r}; choose from: {', '.join(LOSSES)}")
    if gamma < 1 or gamma_train < 1:
        raise BebopError(f"gamma and gamma_train must be >= 1, got {gamma} and {gamma_train}")
    cfg = LossBenchConfig(task=task, losses=names, gamma=gamma, gamma_train=gamma_train, steps=steps, lr=lr,
                          data_samples=data_samples, init=init, eval_prompts=eval_prompts, seed=seed)
    results = bench_losses(str(model), str(out), cfg)
    table = Table(title=f"bench losses: {task}, γ={gamma}, {steps} steps each")
    for c in ("loss", "α RS (τ=1)", "accept len RS", "α TO (τ=1)", "accept len TO", "accept len RS τ=0.7",
              "accept len TO τ=0.7"):
        table.add_column(c, justify="right")
    for name, r in results.items():
        table.add_row(name, " ".join(f"{a:.3f}" for a in r["alpha_rs"]), f"{r['accept_length_rs']:.3f}",
                      " ".join(f"{a:.3f}" for a in r["alpha_to"]), f"{r['accept_length_to']:.3f}",
                      f"{r['accept_length_rs_t0.7']:.3f}", f"{r['accept_length_to_t0.7']:.3f}")
    console.print(table)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2))  # {"<loss>": {"alpha_rs": [...], ...}}
    (out / "bench_losses_config.json").write_text(json.dumps(asdict(cfg), indent=2))


@bench_app.command("rl")
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
    rollout_batch: Annotated[int | None, typer.Option(help="Rows per engine call (0 = the whole step).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (same for every method).")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the results JSON here.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Short GRPO runs per rollout method, side by side: step time, rollout time, accept-length drift, accuracy."""
    from bebop.config import make_config
    from bebop.experiments.bench_rl import RLBenchConfig, bench_rl

    cfg = make_config(RLBenchConfig, config, model=model, mtp=mtp, mtp_ce=mtp_ce, task=task, out=out,
                      methods=methods, steps=steps, eval_samples=eval_samples, async_rollouts=async_rollouts,
                      **{"rl.prompts_per_step": prompts_per_step, "rl.group_size": group_size, "rl.lr": lr,
                         "rl.rollout_batch": rollout_batch, "rl.seed": seed})
    cfg.method_list()
    results = bench_rl(cfg, console=console)
    table = Table(title=f"bench rl: {cfg.task}, {cfg.steps} steps (timing means skip step 0)")
    for col in ("method", "step s", "rollout s", "train s", "step ×", "rollout ×", "acc before", "acc after",
                "accept len step0", "first5", "last5", "max dev", "entropy first5→last5"):
        table.add_column(col, justify="right")
    for name, r in results.items():
        def f(k: str, fmt: str = ".3f", r: dict = r) -> str:
            return "-" if r.get(k) is None else format(r[k], fmt)

        table.add_row(name, f("mean_step_s"), f("mean_rollout_s"), f("mean_train_s"), f("step_speedup", ".2f"),
                      f("rollout_speedup", ".2f"), f("accuracy_before"), f("accuracy_after"),
                      f("accept_length_step0"), f("accept_length_first5"), f("accept_length_last5"),
                      f("max_rel_dev_from_step0", ".1%"), f"{r['entropy_first5']:.3f}→{r['entropy_last5']:.3f}")
    console.print(table)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2))


@app.command("rl")
def rl_cmd(
    task: Annotated[str | None, typer.Option(help="Task: arith, countdown, code, agent.")] = None,
    model: Annotated[str | None, typer.Option(help="SFT policy directory to start from.")] = None,
    mtp: Annotated[str | None, typer.Option(help="MTP head directory (needed by --mtp-strategy frozen).")] = None,
    out: Annotated[str | None, typer.Option(help="Run directory: rl.jsonl, checkpoint.pt, policy/, mtp/.")] = None,
    mtp_strategy: Annotated[str | None, typer.Option(help="none, frozen, online-ce or online-tv.")] = None,
    rule: Annotated[str | None, typer.Option(help="Verification rule: rejection or target_only.")] = None,
    gamma: Annotated[int | None, typer.Option(help="Draft length γ.")] = None,
    steps: Annotated[int | None, typer.Option(help="RL steps.")] = None,
    prompts_per_step: Annotated[int | None, typer.Option(help="Prompts per step.")] = None,
    group_size: Annotated[int | None, typer.Option(help="Samples per prompt (G).")] = None,
    temperature: Annotated[float | None, typer.Option(help="Rollout temperature.")] = None,
    lr: Annotated[float | None, typer.Option(help="Policy learning rate.")] = None,
    rollout_batch: Annotated[int | None, typer.Option(help="Rows per engine call (0 = the whole step).")] = None,
    kl_coef: Annotated[float | None, typer.Option(help="KL-to-reference coefficient (0 = off).")] = None,
    async_rollouts: Annotated[bool | None, typer.Option("--async/--sync", help="Overlap rollouts with training.")]
    = None,
    max_staleness: Annotated[int | None, typer.Option(help="Async: max policy versions a rollout may lag.")] = None,
    online_every: Annotated[int | None, typer.Option(help="Online strategies: head re-training period.")] = None,
    backend: Annotated[str | None, typer.Option(help="local or ray.")] = None,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster address (default: start a local Ray).")]
    = None,
    ray_workers: Annotated[int | None, typer.Option(help="Ray rollout actors.")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Checkpoint period in steps.")] = None,
    eval_samples: Annotated[int | None, typer.Option(help="Held-out problems evaluated before/after (0 = skip).")]
    = None,
    reward: Annotated[str | None, typer.Option(help="Reward function 'module:function' (default: the task's).")]
    = None,
    seed: Annotated[int | None, typer.Option(help="Seed.")] = None,
    resume: Annotated[Path | None, typer.Option(help="Resume the run in this directory from its checkpoint.")]
    = None,
    config: ConfigOpt = None,
) -> None:
    """GRPO on a task with MTP-accelerated rollouts (DESIGN §5); resumable with --resume DIR."""
    from bebop.config import from_dict, make_config
    from bebop.rl.config import RLConfig
    from bebop.rl.trainer import train_rl

    if resume is not None:
        saved = resume / "rl_config.json"
        if not saved.is_file():
            raise BebopError(f"cannot resume: {resume} has no rl_config.json")
        cfg = from_dict(RLConfig, json.loads(saved.read_text()), str(saved))
    else:
        cfg = make_config(
            RLConfig, config, task=task, model=model, mtp=mtp, out=out, mtp_strategy=mtp_strategy, rule=rule,
            gamma=gamma, steps=steps, prompts_per_step=prompts_per_step, group_size=group_size,
            temperature=temperature, lr=lr, rollout_batch=rollout_batch, kl_coef=kl_coef, async_rollouts=async_rollouts,
            max_staleness=max_staleness, online_every=online_every, backend=backend, ray_address=ray_address,
            ray_workers=ray_workers, checkpoint_every=checkpoint_every, eval_samples=eval_samples, reward=reward,
            seed=seed,
        )
    summary = train_rl(cfg, resume=resume is not None, console=console)
    print_dict(f"rl {cfg.task} · {cfg.mtp_strategy}", {k: v for k, v in summary.items() if k != "config"})
    for when in ("eval_before", "eval_after"):
        if when in summary:
            print_dict(when, summary[when])


@app.command("demo")
def demo_cmd(
    out: Annotated[str | None, typer.Option(help="Demo directory (stages are cached here).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="CI smoke preset (~2 min): every file, meaningless numbers.")]
    = False,
    model: Annotated[str | None, typer.Option(help="Reuse this SFT policy directory and skip SFT.")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Redo every stage instead of reusing cached outputs.")]
    = False,
    config: ConfigOpt = None,
) -> None:
    """SFT policy → MTP heads (CE, e2e TV) → τ sweep → entropy analysis → short RL runs → report.md, plots and
    summary.json with a held / not-held verdict for each claim of DESIGN §6."""
    from bebop.config import make_config, read_toml
    from bebop.experiments.demo import QUICK, DemoConfig, run_demo

    file_keys = set(read_toml(config)) if config is not None else set()
    preset = {k: v for k, v in QUICK.items() if k not in file_keys} if quick else {}  # the file wins over --quick
    cfg = make_config(DemoConfig, config, **preset, out=out, model=model, fresh=fresh or None)
    run_demo(cfg, console=console)


analyze_app = typer.Typer(no_args_is_help=True, help="Entropy–acceptance analyses that write JSON and a PNG.")
app.add_typer(analyze_app, name="analyze")

MtpListOpt = Annotated[list[Path], typer.Option("--mtp", help="MTP head (dir or .safetensors); repeatable.")]


def _load_heads(model_dir: Path, mtp_dirs: list[Path]):
    """Policy, tokenizer and ``{name: head}`` (name = the head's directory/file name, or its path if ambiguous)."""
    from bebop.models.mtp import load_head

    if not mtp_dirs:
        raise BebopError("give at least one --mtp head")
    model, tokenizer, _ = _load_model_and_head(model_dir, None)
    names = [p.stem if p.suffix == ".safetensors" else p.name for p in mtp_dirs]
    if len(set(names)) < len(names):
        names = [str(p) for p in mtp_dirs]
    return model, tokenizer, {n: load_head(p, model).eval() for n, p in zip(names, mtp_dirs, strict=True)}


def _write_json(path: Path | None, data: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2))


@analyze_app.command("sweep")
def analyze_sweep_cmd(
    model: Annotated[Path, typer.Option(help="Policy directory.")],
    mtp: MtpListOpt,
    task: Annotated[str, typer.Option(help="Task whose held-out prompts are decoded.")] = "arith",
    temperatures: Annotated[str, typer.Option(help="Comma-separated τ values.")] = "0.3,0.5,0.7,1.0,1.3,1.5",
    gamma: Annotated[int, typer.Option(help="Draft tokens per verification.")] = 3,
    prompts: Annotated[int, typer.Option(help="Held-out prompts per (head, τ, rule).")] = 64,
    batch_size: Annotated[int, typer.Option(help="Prompts decoded per batch.")] = 32,
    max_new_tokens: Annotated[int, typer.Option(help="Completion length cap.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of prompts and sampling.")] = 0,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write results here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the RS-vs-TO-over-τ PNG here.")] = None,
    entropy_plot: Annotated[Path | None, typer.Option(help="Write accept length vs entropy (one point per τ, "
                                                           "fitted lines) here.")] = None,
) -> None:
    """RS vs TO acceptance of each head over a temperature sweep, measured through the engine; accept length
    is fitted against the policy's mean entropy over τ."""
    from bebop.config import positive
    from bebop.core.sampling import SamplingParams
    from bebop.experiments.analysis import RULE_NAMES, temperature_sweep
    from bebop.tasks import get_task

    get_task(task)
    try:
        temps = [float(t) for t in temperatures.split(",") if t.strip()]
    except ValueError:
        raise BebopError(f"--temperatures must be comma-separated numbers, got {temperatures!r}") from None
    if not temps:
        raise BebopError(f"--temperatures is empty: {temperatures!r}")
    for t in temps:
        SamplingParams(temperature=t)
    if gamma < 1:
        raise BebopError(f"gamma must be >= 1, got {gamma}")
    for name in ("prompts", "batch_size", "max_new_tokens"):
        positive(name, locals()[name])
    the_model, tokenizer, heads = _load_heads(model, mtp)
    res = temperature_sweep(the_model, tokenizer, heads, task, temps, gamma, prompts, batch_size, max_new_tokens,
                            seed)
    table = Table(title=f"analyze sweep: {task}, γ={gamma}, {prompts} prompts (accept length incl. bonus)")
    for c in ("head", "τ", "entropy", "accept len RS", "accept len TO", "α RS", "α TO"):
        table.add_column(c, justify="right")
    for name, row in res["heads"].items():
        rs, to = (row[r] for r in RULE_NAMES)
        for i, t in enumerate(res["temperatures"]):
            table.add_row(name, f"{t:g}", f"{rs['entropy'][i]:.3f}", f"{rs['accept_length'][i]:.3f}",
                          f"{to['accept_length'][i]:.3f}", " ".join(f"{a:.2f}" for a in rs["alpha"][i]),
                          " ".join(f"{a:.2f}" for a in to["alpha"][i]))
    console.print(table)
    fits = {}
    for name, row in res["heads"].items():
        for rule, tag in RULE_NAMES.items():
            fit = row[rule]["fit"]
            if fit["slope"] is not None and fit["r"] is not None:
                fits[f"{name} {tag} slope /nat (r)"] = f"{fit['slope']:+.3f} ({fit['r']:+.2f})"
    if fits:
        print_dict("accept length vs mean entropy over τ", fits)
    _write_json(json_path, res)
    if plot is not None:
        from bebop.experiments.plots import plot_temperature_sweep

        console.print(f"wrote [bold]{plot_temperature_sweep(res, plot)}[/]")
    if entropy_plot is not None:
        from bebop.experiments.analysis import sweep_series
        from bebop.experiments.plots import plot_entropy_accept

        path = plot_entropy_accept(sweep_series(res), entropy_plot,
                                   title=f"Accept length vs entropy (τ = {', '.join(f'{t:g}' for t in temps)})")
        console.print(f"wrote [bold]{path}[/]")


@analyze_app.command("entropy")
def analyze_entropy_cmd(
    model: Annotated[Path, typer.Option(help="Policy directory.")],
    mtp: MtpListOpt,
    task: Annotated[str, typer.Option(help="Task whose prompts the policy samples on.")] = "arith",
    samples: Annotated[int, typer.Option(help="Policy samples (teacher-forced through each head).")] = 256,
    temperature: Annotated[float, typer.Option(help="Sampling temperature of the samples and of p, q.")] = 1.0,
    gamma: Annotated[int, typer.Option(help="Draft steps per position.")] = 3,
    buckets: Annotated[int, typer.Option(help="Equal-width entropy buckets.")] = 10,
    max_new_tokens: Annotated[int, typer.Option(help="Completion length cap.")] = 96,
    seed: Annotated[int, typer.Option(help="Seed of prompts and sampling.")] = 0,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write results here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the entropy-vs-accept-length PNG here.")] = None,
) -> None:
    """Per-token entropy buckets: RS/TO acceptance and accept length vs H(p), fitted slopes, and the
    RS-vs-TO decision-boundary check TV(p,q) < 1 − p(argmax q)."""
    from bebop.config import positive
    from bebop.core.sampling import SamplingParams
    from bebop.experiments.analysis import entropy_analysis, entropy_series
    from bebop.tasks import get_task

    get_task(task)
    SamplingParams(temperature=temperature)
    if not temperature > 0:
        raise BebopError(f"temperature must be > 0 for the entropy analysis, got {temperature}")
    if gamma < 1:
        raise BebopError(f"gamma must be >= 1, got {gamma}")
    for name in ("samples", "buckets", "max_new_tokens"):
        positive(name, locals()[name])
    the_model, tokenizer, heads = _load_heads(model, mtp)
    res = entropy_analysis(the_model, tokenizer, heads, task, samples, temperature, gamma, buckets, max_new_tokens,
                           seed)
    table = Table(title=f"analyze entropy: {task}, τ={temperature}, γ={gamma} (per-token fits vs H(p_1))")
    for c in ("head", "rule", "positions", "mean accept len", "slope /nat", "intercept", "r", "α_k slopes",
              "boundary agreement", "RS wins"):
        table.add_column(c, justify="right")

    def f(v, fmt=".3f"):
        return "-" if v is None else format(v, fmt)

    for name, row in res["heads"].items():
        for rule, tag in (("rejection", "RS"), ("target_only", "TO")):
            r, fit = row[rule], row[rule]["fit"]
            table.add_row(name, tag, str(row["n_positions"]), f(r["mean_accept_length"]), f(fit["slope"]),
                          f(fit["intercept"]), f(fit["r"]), " ".join(f(a["slope"], "+.2f") for a in r["alpha_fits"]),
                          f(row["decision_boundary"]["agreement"], ".4f"), f(row["decision_boundary"]["rs_wins"]))
    console.print(table)
    _write_json(json_path, res)
    if plot is not None:
        from bebop.experiments.plots import plot_entropy_accept

        path = plot_entropy_accept(entropy_series(res), plot,
                                   title=f"Accept length vs entropy (token buckets, τ = {temperature:g})")
        console.print(f"wrote [bold]{path}[/]")


def main() -> None:
    """Entry point: run the app, turning BebopError into one clear line and exit code 2."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # rich shows Bebop's own progress
    try:
        app()
    except BebopError as e:
        Console(stderr=True).print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
