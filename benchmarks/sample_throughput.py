"""Policy-sample generation for head training on a user's prompts: samples/s and tokens/s of the batched sampler
at several batch sizes, and the time to read the same samples back from the on-disk cache.

    python benchmarks/sample_throughput.py --model runs/arith/base --samples 512 --batches 32,128 --json out.json

The prompts are the arith task's, written to a JSONL file as a user would give them; every configuration
samples the same prompts at the same temperature and length with the cache in a fresh temp directory, then reads
them again (second pass, no generation). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/arith/base")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--prompts", type=int, default=256, help="distinct prompts (arith task)")
    ap.add_argument("--batches", default="32,128")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from bebop.models.policy import load_policy
    from bebop.tasks import get_task, sample_problems
    from bebop.training.options import DataSource
    from bebop.training.samples import source_rows

    model, tok = load_policy(args.model, args.device, args.dtype)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prompts.jsonl"
        path.write_text("".join(json.dumps({"prompt": p.prompt}) + "\n"
                                for p in sample_problems(get_task("arith"), args.prompts, 0)))
        src = DataSource(prompts=str(path))
        for batch in (int(b) for b in args.batches.split(",")):
            cache = str(Path(tmp) / f"cache{batch}")
            row = {"batch": batch}
            for name in ("generate", "cached"):
                t0 = time.perf_counter()
                rows = source_rows(model, tok, src, args.samples, args.temperature, args.max_new_tokens, 0,
                                   cache_dir=cache, model_dir=args.model, batch=batch)
                row[f"{name}_seconds"] = time.perf_counter() - t0
            tokens = sum(len(ids) - n for ids, n in rows)
            row.update(samples=len(rows), completion_tokens=tokens,
                       samples_per_s=len(rows) / row["generate_seconds"],
                       tokens_per_s=tokens / row["generate_seconds"])
            results.append(row)
    table = Table(title=f"policy samples for head training: {args.model} on {model.device}, "
                        f"τ={args.temperature}, ≤{args.max_new_tokens} new tokens")
    for c in ("batch", "samples", "tokens", "generate s", "samples/s", "tokens/s", "cached read s"):
        table.add_column(c, justify="right")
    for r in results:
        table.add_row(str(r["batch"]), str(r["samples"]), str(r["completion_tokens"]), f"{r['generate_seconds']:.1f}",
                      f"{r['samples_per_s']:.1f}", f"{r['tokens_per_s']:.0f}", f"{r['cached_seconds']:.2f}")
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": str(model.device),
                                               "results": results}, indent=2))


if __name__ == "__main__":
    main()
