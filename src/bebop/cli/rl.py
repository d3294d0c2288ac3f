"""``bebop rl``: GRPO with MTP-accelerated rollouts on a task or a user's prompts and reward functions; options unset
here come from the TOML file, then ``RLConfig``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from bebop.cli.options import ConfigOpt, DatasetOpt, FieldOpt, PromptsOpt, TomlDeviceOpt, TomlDtypeOpt
from bebop.cli.render import announce_paths, console, print_dict
from bebop.errors import BebopError


def check_inputs(cfg) -> None:
    """What ``RLConfig`` leaves to the run, checked before it starts: counts that may be 0 but not negative, and
    that the policy and the head exist (the trainer creates the run directory before it loads them), so a
    mistyped path or value writes nothing."""
    from bebop.config import check_model_dir, non_negative

    for name in ("eval_samples", "rollout_batch", "kl_coef"):
        non_negative(name, getattr(cfg, name))
    check_model_dir(cfg.model)
    if cfg.mtp not in (None, "native") and not Path(cfg.mtp).exists():
        raise BebopError(f"MTP checkpoint not found: {cfg.mtp}")


def rl_cmd(
    task: Annotated[str | None, typer.Option(
        help="Task: arith, countdown, code, agent, search, anagram (default source: arith; its own reward unless "
             "--reward).")]
    = None,
    prompts: PromptsOpt = None,
    dataset: DatasetOpt = None,
    split: Annotated[str | None, typer.Option(help="The dataset's split.")] = None,
    field: FieldOpt = None,
    model: Annotated[str | None, typer.Option(help="SFT policy directory to start from.")] = None,
    mtp: Annotated[str | None, typer.Option(help="MTP head directory (needed by --mtp-strategy frozen).")] = None,
    out: Annotated[str | None, typer.Option(help="Run directory: rl.jsonl, checkpoint/, policy/, mtp/.")] = None,
    mtp_strategy: Annotated[str | None, typer.Option(help="none, frozen, online-ce or online-tv.")] = None,
    rule: Annotated[str | None, typer.Option(help="Verification rule: rejection or target_only.")] = None,
    gamma: Annotated[int | None, typer.Option(help="Draft length γ.")] = None,
    steps: Annotated[int | None, typer.Option(help="RL steps.")] = None,
    prompts_per_step: Annotated[int | None, typer.Option(help="Prompts per step.")] = None,
    group_size: Annotated[int | None, typer.Option(help="Samples per prompt (G).")] = None,
    temperature: Annotated[float | None, typer.Option(help="Rollout temperature.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(
        help="Completion length limit (TRL's max_completion_length); default: the task's completion budget, at "
             "least 96 (96 for your prompts).")] = None,
    lr: Annotated[float | None, typer.Option(help="Policy learning rate.")] = None,
    rollout_batch: Annotated[int | None, typer.Option(
        help="Rows in flight per rollout worker (continuous batching; 0 = one static batch).")] = None,
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
    eval_samples: Annotated[int | None, typer.Option(
        help="Samples evaluated before/after: task accuracy, or mean reward on held-out prompts (0 = skip).")]
    = None,
    reward: Annotated[list[str] | None, typer.Option(
        help="Reward function in TRL's form f(prompts, completions, **columns), one float per completion: "
             "module:function or path/to/file.py:function; repeatable (needed with --prompts/--dataset; default: "
             "the task's).")]
    = None,
    reward_weights: Annotated[str | None, typer.Option(
        help="Comma-separated weight per --reward (default 1 each): a row's reward is Σ wᵢ·fᵢ.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed.")] = None,
    device: TomlDeviceOpt = None,
    dtype: TomlDtypeOpt = None,
    resume: Annotated[Path | None, typer.Option(help="Resume the run in this directory from its checkpoint.")]
    = None,
    convert_checkpoint: Annotated[bool, typer.Option(
        "--convert-checkpoint", help="With --resume: first convert a legacy pickle checkpoint.pt (read with "
        "torch.load(weights_only=True): tensors and plain containers only, never code).")] = False,
    config: ConfigOpt = None,
) -> None:
    """GRPO with MTP-accelerated rollouts (DESIGN §5) on a task, or on your prompts (--prompts/--dataset) with
    reward functions in TRL's form (--reward); resumable with --resume DIR."""
    from bebop.config import from_dict, make_config
    from bebop.rl.config import RLConfig
    from bebop.rl.trainer import train_rl

    announce_paths()
    if convert_checkpoint and resume is None:
        raise BebopError("--convert-checkpoint needs --resume DIR: it converts that run's legacy checkpoint.pt")
    if resume is not None:
        saved = resume / "rl_config.json"
        if not saved.is_file():
            raise BebopError(f"cannot resume: {resume} has no rl_config.json")
        # the run continues where it lies now (a run directory may have been moved or handed over)
        cfg = from_dict(RLConfig, {**json.loads(saved.read_text()), "out": str(resume)}, str(saved))
    else:
        cfg = make_config(
            RLConfig, config, task=task, prompts=prompts, dataset=dataset, split=split, field=field, model=model,
            mtp=mtp, out=out, mtp_strategy=mtp_strategy, rule=rule, gamma=gamma, steps=steps,
            prompts_per_step=prompts_per_step, group_size=group_size, temperature=temperature,
            max_new_tokens=max_new_tokens, lr=lr,
            rollout_batch=rollout_batch, kl_coef=kl_coef, async_rollouts=async_rollouts, max_staleness=max_staleness,
            online_every=online_every, backend=backend, ray_address=ray_address, ray_workers=ray_workers,
            checkpoint_every=checkpoint_every, eval_samples=eval_samples, reward=reward or None,
            reward_weights=reward_weights, seed=seed, device=device, dtype=dtype,
        )
    if resume is None:
        check_inputs(cfg)
    summary = train_rl(cfg, resume=resume is not None, console=console, convert=convert_checkpoint)
    print_dict(f"rl {cfg.label} · {cfg.mtp_strategy}", {k: v for k, v in summary.items() if k != "config"})
    for when in ("eval_before", "eval_after"):
        if when in summary:
            print_dict(when, summary[when])
