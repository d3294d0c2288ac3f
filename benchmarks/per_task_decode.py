"""MTP decoding per kind of work, side by side in one run: for each task with a policy and a head under
``--runs`` (``<runs>/<task>/base`` and ``<runs>/<task>/<head>``), ``bebop.experiments.bench_decode.bench_decode``
at the given batch sizes, plus the policy's SFT accuracy and entropy from its ``sft_summary.json``.

    python benchmarks/per_task_decode.py --tasks arith,countdown,code,agent --json runs/bench_per_task.json

The agent task runs real multi-turn episodes (``turns.generate_turns`` with the task's environment, plain
and MTP alike); its tokens/s counts the model's sampled tokens, not the environment's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bebop.experiments.bench_decode import DecodeBenchConfig, bench_decode
from bebop.models.checkpoint import load_head
from bebop.models.policy import load_policy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="arith,countdown,code,agent")
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--head", default="mtp_e2e_tv", help="head directory name under <runs>/<task>/")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--json", default="runs/bench_per_task.json")
    args = ap.parse_args()
    sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    results: dict[str, dict] = {}
    for task in args.tasks.split(","):
        base, head_dir = Path(args.runs) / task / "base", Path(args.runs) / task / args.head
        if not (base.is_dir() and head_dir.is_dir()):
            results[task] = {"skipped": f"missing {base} or {head_dir}"}
            continue
        model, tok = load_policy(base)
        head = load_head(head_dir, model).eval()
        cfg = DecodeBenchConfig(task=task, gamma=args.gamma, batch_sizes=sizes, repeats=args.repeats,
                                num_prompts=args.prompts)
        sft = json.loads((base / "sft_summary.json").read_text()).get("eval", {}) \
            if (base / "sft_summary.json").is_file() else {}
        results[task] = {"sft_accuracy": sft.get("accuracy"), "entropy": sft.get("entropy"),
                         "decode": bench_decode(model, tok, head, cfg)}
    table = Table(title=f"MTP-RS decoding per task (γ={args.gamma}, τ=1; accept length counts the bonus token)")
    for col in ("task", "SFT acc τ=1", "entropy", *[f"bs{b} {c}" for b in sizes for c in ("accept len", "speedup")]):
        table.add_column(col, justify="right")
    for task, r in results.items():
        if "skipped" in r:
            table.add_row(task, r["skipped"])
            continue
        cells = [f"{r['decode'][str(b)][k]:.2f}" for b in sizes for k in ("accept_length", "speedup")]
        acc, ent = (("-" if v is None else f"{v:.3f}") for v in (r["sft_accuracy"], r["entropy"]))
        table.add_row(task, acc, ent, *cells)
    Console().print(table)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
