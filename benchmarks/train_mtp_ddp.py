"""Head-training step time at 1 and 2 processes (torchrun, DDP) with the same global batch, side by side in one run.

    python benchmarks/train_mtp_ddp.py --model runs/arith/base --global-batch 32 --steps 40 --json out.json

Each configuration is a real ``torchrun --standalone -m bebop.cli train-mtp`` run on the same policy, data
(sampled once into a shared cache before timing), seed and global batch (``--batch-size`` = global / processes),
from a fresh head with no warm stage. ``step_seconds`` from the run's summary counts only the optimizer steps
(forward of the frozen backbone, head unroll, loss, backward, all-reduce, AdamW), not sampling or held-out
evaluation. On a CPU the processes share its cores: ``threads`` is each process's OMP_NUM_THREADS. Prints a table
and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def train(model: str, out: Path, nproc: int, threads: int, args, cache: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "bebop.cli", "train-mtp", "--model", model, "--out", str(out), "--device", args.device,
           "--batch-size", str(args.global_batch // nproc), "--steps", str(args.steps), "--warm-steps", "0",
           "--loss", "e2e_tv", "--data-samples", str(args.data_samples), "--heldout-samples", "64",
           "--eval-every", str(args.steps), "--checkpoint-every", "0", "--cache-dir", str(cache),
           "--prompts", str(cache.parent / "prompts.jsonl")]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    s = json.loads((out / "train_mtp_summary.json").read_text())
    return {"processes": nproc, "threads_per_process": threads, "batch_per_process": args.global_batch // nproc,
            "step_seconds_total": s["step_seconds"], "ms_per_step": 1000 * s["step_seconds"] / args.steps,
            "heldout_alpha": s["heldout_alpha"], "world_size": s["world_size"],
            "same_head_on_all_ranks": len(set(s["rank_head_digests"])) == 1}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/arith/base")
    ap.add_argument("--global-batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--data-samples", type=int, default=512)
    ap.add_argument("--configs", default="1x1,1x2,2x1", help="PROCESSESxTHREADS, comma-separated")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from bebop.tasks import get_task, sample_problems

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p.prompt}) + "\n"
                                                    for p in sample_problems(get_task("arith"), 512, 0)))
        cache = root / "cache"
        train(args.model, root / "warmup", 1, 2, args, cache)  # fills the sample cache, warms the file cache
        for spec in args.configs.split(","):
            nproc, threads = (int(x) for x in spec.split("x"))
            results.append(train(args.model, root / spec, nproc, threads, args, cache))
    base = results[0]["ms_per_step"]
    table = Table(title=f"train-mtp step time, global batch {args.global_batch}, {args.steps} steps, {args.model} "
                        f"on {args.device}")
    for c in ("processes", "threads each", "batch each", "ms / step", f"vs {args.configs.split(',')[0]}",
              "same head on all ranks"):
        table.add_column(c, justify="right")
    for r in results:
        table.add_row(str(r["processes"]), str(r["threads_per_process"]), str(r["batch_per_process"]),
                      f"{r['ms_per_step']:.1f}", f"{base / r['ms_per_step']:.2f}×", str(r["same_head_on_all_ranks"]))
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
