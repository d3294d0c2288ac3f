"""Training commands: ``bebop sft``, ``bebop eval`` and ``bebop train-mtp``.

Options left unset (None) take their values from the TOML file and then the config dataclass; options with a shown
default read it from the dataclass, so no default is stated here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from bebop.cli.options import (
    CacheDirOpt,
    CompletionsOpt,
    ConfigOpt,
    DatasetOpt,
    DeviceOpt,
    DtypeOpt,
    FieldOpt,
    PromptsOpt,
    TaskSourceOpt,
    TomlDeviceOpt,
    TomlDtypeOpt,
)
from bebop.cli.render import announce_paths, console, print_dict
from bebop.training.options import EvalConfig

E = EvalConfig


def sft(
    task: Annotated[str | None, typer.Option(help="Task: arith, countdown, code, agent, search, anagram.")] = None,
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
    arch: Annotated[str | None, typer.Option(
        help="Model family: qwen3, llama, qwen3_5, qwen3_next, deepseek_v3, glm4_moe (the last four with a native "
             "MTP layer, written in the family's own checkpoint layout).")] = None,
    device: TomlDeviceOpt = None,
    dtype: TomlDtypeOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Train a tiny policy (Qwen3 by default, or --arch) from scratch on a task's reference solutions (SFT)."""
    from bebop.config import make_config, non_negative
    from bebop.training.sft import SFTConfig, train_sft

    announce_paths()
    cfg = make_config(
        SFTConfig, config, task=task, out=out, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
        max_minutes=max_minutes, eval_samples=eval_samples, device=device, dtype=dtype, arch=arch, **{
            "model.num_layers": layers, "model.hidden_size": hidden, "model.num_heads": heads,
            "model.num_kv_heads": kv_heads, "model.intermediate_size": intermediate,
        },
    )
    non_negative("eval_samples", cfg.eval_samples)
    summary = train_sft(cfg)
    console.print(f"saved policy to [bold]{cfg.out}[/] after {summary['steps']} steps "
                  f"in {summary['train_seconds']:.0f}s ({summary['dtype']} compute on {summary['device']})")
    if "eval" in summary:
        print_dict(f"eval {cfg.task}", summary["eval"])


def eval_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Policy directory (model + tokenizer).")],
    task: Annotated[str, typer.Option(help="Task to evaluate on.")] = E.task,
    samples: Annotated[int, typer.Option(help="Number of problems.")] = E.samples,
    temperature: Annotated[float, typer.Option(help="Sampling temperature for `accuracy`.")] = E.temperature,
    max_new_tokens: Annotated[int | None, typer.Option(
        help="Completion length cap (default: the task's completion budget, at least 96).")] = E.max_new_tokens,
    seed: Annotated[int, typer.Option(help="Seed of problems and sampling.")] = E.seed,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON and write it to DIR/eval_<task>.json.")] = False,
    device: DeviceOpt = E.device,
    dtype: DtypeOpt = E.dtype,
) -> None:
    """Accuracy (sampled and greedy) and mean per-token entropy of a policy on a task."""
    from bebop.engine.forwards import decoding_path
    from bebop.models.policy import load_policy
    from bebop.tasks import get_task
    from bebop.training.evaluate import evaluate

    cfg = EvalConfig(task=task, samples=samples, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
                     device=device, dtype=dtype)
    if not json_out:
        announce_paths()
    model, tokenizer = load_policy(model_dir, cfg.device, cfg.dtype)
    res = evaluate(model, tokenizer, get_task(cfg.task), samples=cfg.samples, temperature=cfg.temperature,
                   max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    res["backend"] = decoding_path(model).backend
    if json_out:
        (model_dir / f"eval_{task}.json").write_text(json.dumps(res, indent=2))
        print(json.dumps(res))
    else:
        print_dict(f"eval {task} on {model_dir}", res)


def train_mtp_cmd(
    model: Annotated[str | None, typer.Option(help="Policy directory (frozen backbone).")] = None,
    out: Annotated[str | None, typer.Option(help="Output directory for the head (and its checkpoint).")] = None,
    task: TaskSourceOpt = None,
    prompts: PromptsOpt = None,
    dataset: DatasetOpt = None,
    split: Annotated[str | None, typer.Option(help="The dataset's split.")] = None,
    field: FieldOpt = None,
    completions: CompletionsOpt = None,
    loss: Annotated[str | None, typer.Option(help="ce, fkl, rkl, tv or e2e_tv.")] = None,
    gamma_train: Annotated[int | None, typer.Option(help="Draft steps unrolled in training.")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps of the loss (after the warm stage).")] = None,
    warm_steps: Annotated[int | None, typer.Option(help="Forward-KL warm-stage steps for a fresh head.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per step (per process under torchrun).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Rollout temperature (data and target p).")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Rollout length: completion tokens per sample.")] = None,
    data_samples: Annotated[int | None, typer.Option(help="Policy samples used as training data.")] = None,
    heldout_samples: Annotated[int | None, typer.Option(
        help="Held-out samples (a user's prompts: at most a tenth of them are held out).")] = None,
    cache_dir: CacheDirOpt = None,
    eval_every: Annotated[int | None, typer.Option(help="Steps between held-out α measurements (logged).")] = None,
    patience: Annotated[int | None, typer.Option(
        help="Early stopping: held-out measurements without improvement before a stage stops and keeps its best "
             "head (0 = off).")] = None,
    min_delta: Annotated[float | None, typer.Option(
        help="Early stopping: gain of the mean held-out α that counts as an improvement.")] = None,
    min_steps: Annotated[int | None, typer.Option(
        help="Early stopping: steps a stage trains before it is watched (and before its head may be kept).")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(
        help="Steps between atomic checkpoints in OUT/checkpoint (0 = none); a rerun resumes from it.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed.")] = None,
    init: Annotated[str | None, typer.Option(
        help="Starting head: 'native' (the checkpoint's own MTP layer) or a head path. Default: the native layer "
             "when the checkpoint has one, else a fresh head with a forward-KL warm stage.")] = None,
    head_layers: Annotated[int | None, typer.Option(
        help="MTP layers of a fresh head (default 1; draft step k uses layer (k-1) mod L). A loaded head keeps its "
             "own.")] = None,
    device: TomlDeviceOpt = None,
    dtype: TomlDtypeOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Train an MTP head on the policy's own samples with the backbone frozen (DESIGN §4). Multi-GPU:
    `torchrun --nproc_per_node N -m bebop.cli train-mtp ...` (DDP; only rank 0 writes)."""
    import os

    from bebop.config import make_config
    from bebop.training.train_mtp import TrainMTPConfig, train_mtp

    main = int(os.environ.get("RANK", "0")) == 0
    if main:
        announce_paths()
    cfg = make_config(TrainMTPConfig, config, model=model, out=out, task=task, prompts=prompts, dataset=dataset,
                      split=split, field=field, completions=completions, loss=loss, gamma_train=gamma_train,
                      steps=steps, warm_steps=warm_steps, batch_size=batch_size, lr=lr, temperature=temperature,
                      max_new_tokens=max_new_tokens, data_samples=data_samples, heldout_samples=heldout_samples,
                      cache_dir=cache_dir, eval_every=eval_every, patience=patience, min_delta=min_delta,
                      min_steps=min_steps,
                      checkpoint_every=checkpoint_every, seed=seed, init=init, head_layers=head_layers, device=device,
                      dtype=dtype)
    summary = train_mtp(cfg)
    if not main:
        return
    console.print(f"saved head to [bold]{cfg.out}[/] (started from: {summary['init']}); "
                  "`bebop export` merges it into a model directory for vLLM / SGLang")
    print_dict("held-out expected α per step", {f"alpha_{k + 1}": a for k, a in enumerate(summary["heldout_alpha"])})
    for o in summary["early_stop"] if cfg.patience else ():
        ended = f"stopped early at step {o['last_step']}" if o["stopped_early"] else f"ran all {o['budget']} steps"
        kept = "its last head" if o["best_step"] is None else \
            f"the head of step {o['best_step']} (mean held-out α {o['best_score']:.4f})"
        console.print(f"{o['stage']} stage: {ended}; kept {kept}")
