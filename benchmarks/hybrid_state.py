"""Where a hybrid model's linear-attention state lives during a verify step: ``store`` (the γ+1 states after each
token) against ``recompute`` (q, k, v, g, β of the γ+1 tokens; the recurrence runs again at ``keep``), measured
side by side on one model, plus the same memory at a released model's shapes.

    python benchmarks/hybrid_state.py --model runs/qwen35/base --gamma 3 --batch-sizes 1,8,64 --json out.json

For each batch size and mode it times one verify step as the engine runs it (a target forward over γ+1
tokens at slot P, then ``HybridCache.keep`` with random accepted counts), median of ``--repeats``, and counts the
bytes the linear layers hold between the forward and ``keep`` (:func:`pending_bytes`, counted from the tensors).
Without ``--model`` it builds a random 8-layer Qwen3.5 (6 Gated DeltaNet + 2 attention layers, hidden 128). The
last column gives the same bytes per row at Qwen3-Next-80B-A3B's shapes (36 Gated DeltaNet layers, 32 value
heads of 128 × 128, 16 key heads, kernel 4; float32 states, bfloat16 activations), computed from the formulas
the measured rows check. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

RELEASED = {"name": "Qwen3-Next-80B-A3B", "linear_layers": 36, "v_heads": 32, "k_heads": 16, "dk": 128, "dv": 128,
            "kernel": 4, "act_bytes": 2}


def pending_bytes(cache) -> int:
    """Bytes the linear layers hold between a verify forward and ``keep``: the convolution input and every
    recurrent state (store: the stack of γ+2, whose last is the current state; recompute: the state before and
    the current one) with q, k, v, g, β (recompute), counted exactly from the tensors."""
    total = 0
    for s in cache.linear:
        states = s.states if isinstance(s.states, list) else [s.states]
        held = [s.full, *states, *(s.qkvgb or ())] + ([s.rec] if s.states is None else [])
        total += sum(t.numel() * t.element_size() for t in held if t is not None)
    return total


def formula_bytes(mode: str, batch: int, gamma: int, linear_layers: int, v_heads: int, k_heads: int, dk: int,
                  dv: int, kernel: int, act_bytes: int) -> int:
    """The bytes held by one verify over γ+1 tokens: the convolution input of K−1+γ+1 positions, plus the
    γ+2 float32 states (store: before and after each token) or two states (before and after all) with q, k (per
    value head), v, g, β of the γ+1 tokens in float32 (recompute). Plain decoding holds one state."""
    T = gamma + 1
    conv = batch * (2 * k_heads * dk + v_heads * dv) * (kernel - 1 + T) * act_bytes
    state = batch * v_heads * dk * dv * 4
    per_token = batch * v_heads * (2 * dk + dv + 2) * 4
    own = (T + 1) * state if mode == "store" else T * per_token + 2 * state
    return linear_layers * (conv + own)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="hybrid policy directory (default: a random 8-layer Qwen3.5)")
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--batch-sizes", default="1,8,64")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table

    from bebop.models.hybrid import MODES, hybrid_decoder

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model:
        from bebop.models.policy import load_policy

        model = load_policy(args.model)[0].eval()
    else:
        from bebop.models.families import build_family_policy
        from bebop.models.policy import ModelConfig
        from bebop.models.tokenizer import build_tokenizer
        from bebop.training.sft import task_corpus

        tok = build_tokenizer(task_corpus(n_per_task=50))
        model = build_family_policy("qwen3_5", ModelConfig(num_layers=8, hidden_size=128, num_heads=4,
                                                           num_kv_heads=2, intermediate_size=384), tok).eval()
    dec = hybrid_decoder(model)
    if dec is None:
        raise SystemExit(f"error: {args.model} is not a hybrid model the engine covers")
    lin = next(layer.lin for layer in dec.layers if hasattr(layer, "lin"))
    shapes = {"linear_layers": sum(hasattr(layer, "lin") for layer in dec.layers), "v_heads": lin.num_v_heads,
              "k_heads": lin.num_k_heads, "dk": lin.head_k_dim, "dv": lin.head_v_dim, "kernel": lin.conv_kernel_size,
              "act_bytes": model.get_input_embeddings().weight.element_size()}
    V, P, G = model.config.vocab_size, args.prompt_len, args.gamma
    rows = []
    for B in (int(b) for b in args.batch_sizes.split(",")):
        ids = torch.randint(1, V, (B, P))
        pos = torch.arange(P).expand(B, P)
        valid = torch.ones((B, P + G + 1), dtype=torch.bool)
        draft = torch.randint(1, V, (B, G + 1))
        dpos = P + torch.arange(G + 1).expand(B, G + 1)
        gen = torch.Generator().manual_seed(0)
        for mode in MODES:
            cache = dec.new_cache(B, P + G + 1, mode)
            with torch.inference_mode():
                dec(ids, pos, valid[:, :P], cache, 0)
                times, held = [], 0
                for _ in range(args.repeats + 1):
                    last = torch.randint(-1, G + 1, (B,), generator=gen)
                    t0 = time.perf_counter()
                    dec(draft, dpos, valid, cache, P)
                    held = pending_bytes(cache)
                    cache.keep(last)
                    times.append(time.perf_counter() - t0)
            rows.append({"batch": B, "mode": mode, "verify_ms": 1e3 * statistics.median(times[1:]),
                         "pending_bytes": held, "formula_bytes": formula_bytes(mode, B, G, **shapes),
                         "released_bytes_per_row": formula_bytes(mode, 1, G, **{k: v for k, v in RELEASED.items()
                                                                               if k != "name"})})
    table = Table(title=f"hybrid verify state: γ={G}, prompt {P}, {shapes['linear_layers']} linear layers")
    for col in ("batch", "mode", "verify ms", "held MiB", "formula MiB", f"{RELEASED['name']} MiB/row"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["batch"]), r["mode"], f"{r['verify_ms']:.2f}", f"{r['pending_bytes'] / 2**20:.3f}",
                      f"{r['formula_bytes'] / 2**20:.3f}", f"{r['released_bytes_per_row'] / 2**20:.1f}")
    Console().print(table)
    out = {"command": "python benchmarks/hybrid_state.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "json"),
        "gamma": G, "prompt_len": P, "shapes": shapes, "released": RELEASED, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
