"""Peak memory of e2e_tv forward+backward: chunked (bebop.core.losses.e2e_tv_loss_chunked) vs the naive
full-softmax version, each in its own subprocess, at Qwen's vocabulary, in float32 or bfloat16 (hidden states and
LM head in bf16, as under autocast in training; the loss upcasts each chunk's logits to float32).

    python benchmarks/e2e_tv_memory.py --positions 4096 --gamma 3 --vocab 151936 --dtype bfloat16 --json out.json

On CPU the peak is the process's peak RSS (getrusage); with ``--device cuda`` it is
``torch.cuda.max_memory_allocated`` above the memory held after the inputs were allocated.

Prints a table and writes JSON. ``bf16_logits_bytes`` = positions × γ × V × 2 is the yardstick of the
issue ("peak ≤ 1.5 × the size of bf16 logits"); ``extra_peak_bytes`` = peak RSS minus the RSS after the
inputs were allocated. The naive version may not fit in RAM at full size: ``--naive-positions`` runs it
smaller and the table reports its bytes per position too.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def child(variant: str, positions: int, gamma: int, vocab: int, hidden: int, chunk: int, dtype: str,
          device: str) -> None:
    import torch

    from bebop.core.losses import e2e_tv_loss_chunked, mtp_loss

    torch.manual_seed(0)
    torch.set_num_threads(2)
    dt = getattr(torch, dtype)
    weight = (torch.randn(vocab, hidden) * 0.05).to(device, dt)
    hp = torch.randn(positions, gamma, hidden).to(device, dt)
    hq = (hp + 0.3 * torch.randn(positions, gamma, hidden).to(device, dt)).requires_grad_()
    mask = torch.ones(positions, device=device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if variant == "chunked":
        loss = e2e_tv_loss_chunked(hq, hp, weight, 1.0, mask, chunk=chunk)
    else:
        p = torch.softmax((hp @ weight.T).float(), -1)
        loss = mtp_loss("e2e_tv", (hq @ weight.T).float(), p,
                        torch.zeros(positions, gamma, dtype=torch.long, device=device), mask)
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"loss": loss.item(), "extra_peak_bytes": peak - base, "peak_rss_bytes": peak}))


def run(variant: str, positions: int, args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", variant, "--positions", str(positions),
                          "--gamma", str(args.gamma), "--vocab", str(args.vocab), "--hidden", str(args.hidden),
                          "--chunk", str(args.chunk), "--dtype", args.dtype, "--device", args.device],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--positions", type=int, default=4096)
    ap.add_argument("--naive-positions", type=int, default=512)
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.positions, args.gamma, args.vocab, args.hidden, args.chunk, args.dtype, args.device)
        return
    from rich.console import Console
    from rich.table import Table

    rows = {}
    for variant, n in (("chunked", args.positions), ("naive", args.naive_positions)):
        r = run(variant, n, args)
        r["positions"] = n
        r["bf16_logits_bytes"] = n * args.gamma * args.vocab * 2
        if "extra_peak_bytes" in r:
            r["peak_over_bf16_logits"] = r["extra_peak_bytes"] / r["bf16_logits_bytes"]
        rows[variant] = r
    table = Table(title=f"e2e_tv fwd+bwd peak memory, {args.dtype} on {args.device}, V={args.vocab}, γ={args.gamma}, "
                        f"chunk={args.chunk}")
    for c in ("variant", "positions", "extra peak (MB)", "bf16 logits (MB)", "peak / bf16 logits"):
        table.add_column(c, justify="right")
    for v, r in rows.items():
        table.add_row(v, str(r["positions"]), f"{r.get('extra_peak_bytes', float('nan')) / 2**20:.0f}",
                      f"{r['bf16_logits_bytes'] / 2**20:.0f}", f"{r.get('peak_over_bf16_logits', float('nan')):.2f}")
    Console().print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
