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
console = Console()

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
    task: Annotated[str | None, typer.Option(help="Task: arith, countdown.")] = None,
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
    from bebop.sft import SFTConfig, train_sft

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
    from bebop.evaluate import evaluate
    from bebop.model import load_policy
    from bebop.sampling import SamplingParams
    from bebop.tasks import get_task

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


def main() -> None:
    """Entry point: run the app, turning BebopError into one clear line and exit code 2."""
    try:
        app()
    except BebopError as e:
        Console(stderr=True).print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
