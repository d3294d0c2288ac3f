"""The ``bebop`` app: every command registered in the order ``--help`` lists it, and the entry point."""

from __future__ import annotations

import typer

from bebop.cli import analyze, bench, demo, evalmtp, export, generate, rl, train
from bebop.cli.render import run_app

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Bebop: exact MTP speculative decoding for fast RL rollouts.")
app.command("sft")(train.sft)
app.command("eval")(train.eval_cmd)
app.command("train-mtp")(train.train_mtp_cmd)
app.command("eval-mtp")(evalmtp.eval_mtp_cmd)
app.command("generate")(generate.generate_cmd)
app.command("export")(export.export_cmd)

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print a table and write JSON.")
app.add_typer(bench_app, name="bench")
bench_app.command("decode")(bench.bench_decode_cmd)
bench_app.command("losses")(bench.bench_losses_cmd)
bench_app.command("rl")(bench.bench_rl_cmd)
bench_app.command("batching")(bench.bench_batching_cmd)

app.command("rl")(rl.rl_cmd)
app.command("demo")(demo.demo_cmd)

analyze_app = typer.Typer(no_args_is_help=True, help="Entropy–acceptance analyses that write JSON and a PNG.")
app.add_typer(analyze_app, name="analyze")
analyze_app.command("sweep")(analyze.sweep_cmd)
analyze_app.command("entropy")(analyze.entropy_cmd)


def main() -> None:
    """Entry point: run the app, turning a BebopError into one clear line and exit code 2."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # rich shows Bebop's own progress
    run_app(app)
