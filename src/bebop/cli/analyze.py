"""``bebop analyze sweep | entropy``: entropy–acceptance analyses of one or more heads, written as JSON and PNG.

Each option's default is read from the analysis's config dataclass."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bebop.cli.generate import load_model_and_head
from bebop.cli.options import DeviceOpt, DtypeOpt, JsonOpt, MtpListOpt
from bebop.cli.render import (
    announce_paths,
    console,
    entropy_table,
    print_dict,
    sweep_fits,
    sweep_table,
    write_json,
    wrote,
)
from bebop.errors import BebopError
from bebop.experiments.options import EntropyConfig, SweepConfig

S, E = SweepConfig, EntropyConfig


def load_heads(model_dir: Path, mtp_dirs: list[Path], device: str = "auto", dtype: str = "auto"):
    """Policy, tokenizer and ``{name: head}`` (name = the head's directory/file name, or its path if ambiguous),
    on ``device`` in ``dtype``."""
    from bebop.models.checkpoint import load_head

    if not mtp_dirs:
        raise BebopError("give at least one --mtp head")
    announce_paths()
    model, tokenizer, _ = load_model_and_head(model_dir, None, device, dtype)
    names = [p.stem if p.suffix == ".safetensors" else p.name for p in mtp_dirs]
    if len(set(names)) < len(names):
        names = [str(p) for p in mtp_dirs]
    return model, tokenizer, {n: load_head(p, model).eval() for n, p in zip(names, mtp_dirs, strict=True)}


def _floats(flag: str, text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise BebopError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise BebopError(f"{flag} is empty: {text!r}")
    return values


def sweep_cmd(
    model: Annotated[Path, typer.Option(help="Policy directory.")],
    mtp: MtpListOpt,
    task: Annotated[str, typer.Option(help="Task whose held-out prompts are decoded.")] = S.task,
    temperatures: Annotated[str, typer.Option(help="Comma-separated τ values.")] = ",".join(map(str, S.temperatures)),
    gamma: Annotated[int, typer.Option(help="Draft tokens per verification.")] = S.gamma,
    prompts: Annotated[int, typer.Option(help="Held-out prompts per (head, τ, rule).")] = S.prompts,
    batch_size: Annotated[int, typer.Option(help="Prompts decoded per batch.")] = S.batch_size,
    max_new_tokens: Annotated[int, typer.Option(help="Completion length cap.")] = S.max_new_tokens,
    seed: Annotated[int, typer.Option(help="Seed of prompts and sampling.")] = S.seed,
    json_path: JsonOpt = None,
    plot: Annotated[Path | None, typer.Option(help="Write the RS-vs-TO-over-τ PNG here.")] = None,
    entropy_plot: Annotated[Path | None, typer.Option(help="Write accept length vs entropy (one point per τ, "
                                                           "fitted lines) here.")] = None,
    device: DeviceOpt = S.device,
    dtype: DtypeOpt = S.dtype,
) -> None:
    """RS vs TO acceptance of each head over a temperature sweep, measured through the engine; accept length
    is fitted against the policy's mean entropy over τ."""
    from bebop.experiments.analysis import sweep_series, temperature_sweep

    cfg = SweepConfig(task=task, temperatures=_floats("--temperatures", temperatures), gamma=gamma, prompts=prompts,
                      batch_size=batch_size, max_new_tokens=max_new_tokens, seed=seed, device=device, dtype=dtype)
    the_model, tokenizer, heads = load_heads(model, mtp, cfg.device, cfg.dtype)
    res = temperature_sweep(the_model, tokenizer, heads, cfg)
    console.print(sweep_table(res, f"analyze sweep: {task}, γ={gamma}, {prompts} prompts (accept length incl. "
                                   "bonus)"))
    fits = sweep_fits(res)
    if fits:
        print_dict("accept length vs mean entropy over τ", fits)
    write_json(json_path, res)
    if plot is not None:
        from bebop.experiments.plots import plot_temperature_sweep

        wrote(plot_temperature_sweep(res, plot))
    if entropy_plot is not None:
        from bebop.experiments.plots import plot_entropy_accept

        taus = ", ".join(f"{t:g}" for t in cfg.temperatures)
        wrote(plot_entropy_accept(sweep_series(res), entropy_plot, title=f"Accept length vs entropy (τ = {taus})"))


def entropy_cmd(
    model: Annotated[Path, typer.Option(help="Policy directory.")],
    mtp: MtpListOpt,
    task: Annotated[str, typer.Option(help="Task whose prompts the policy samples on.")] = E.task,
    samples: Annotated[int, typer.Option(help="Policy samples (teacher-forced through each head).")] = E.samples,
    temperature: Annotated[float, typer.Option(help="Sampling temperature of the samples and of p, q.")] =
        E.temperature,
    gamma: Annotated[int, typer.Option(help="Draft steps per position.")] = E.gamma,
    buckets: Annotated[int, typer.Option(help="Equal-width entropy buckets.")] = E.buckets,
    max_new_tokens: Annotated[int, typer.Option(help="Completion length cap.")] = E.max_new_tokens,
    seed: Annotated[int, typer.Option(help="Seed of prompts and sampling.")] = E.seed,
    json_path: JsonOpt = None,
    plot: Annotated[Path | None, typer.Option(help="Write the entropy-vs-accept-length PNG here.")] = None,
    device: DeviceOpt = E.device,
    dtype: DtypeOpt = E.dtype,
) -> None:
    """Per-token entropy buckets: RS/TO acceptance and accept length vs H(p), fitted slopes, and the
    RS-vs-TO decision-boundary check TV(p,q) < 1 − p(argmax q)."""
    from bebop.experiments.analysis import entropy_analysis, entropy_series

    cfg = EntropyConfig(task=task, samples=samples, temperature=temperature, gamma=gamma, buckets=buckets,
                        max_new_tokens=max_new_tokens, seed=seed, device=device, dtype=dtype)
    the_model, tokenizer, heads = load_heads(model, mtp, cfg.device, cfg.dtype)
    res = entropy_analysis(the_model, tokenizer, heads, cfg)
    console.print(entropy_table(res, f"analyze entropy: {task}, τ={temperature}, γ={gamma} (per-token fits vs "
                                     "H(p_1))"))
    write_json(json_path, res)
    if plot is not None:
        from bebop.experiments.plots import plot_entropy_accept

        wrote(plot_entropy_accept(entropy_series(res), plot,
                                  title=f"Accept length vs entropy (token buckets, τ = {temperature:g})"))
