"""Forward costs of real model shapes on a GPU — c_1, c_verify(γ+1), c_draft — and the decode and RL-step speedups
they imply with a head's measured acceptance (DESIGN §8). Random-initialised models of real shapes, built from
configs written here; nothing is downloaded.

    python benchmarks/gpu_costs.py --device cuda --acceptance runs/arith/eval_mtp_task.json --rollout-share 0.7 \\
        --json runs/gpu_costs.json                      # one H100-class GPU: under 8 minutes
    python benchmarks/gpu_costs.py --device cpu --shape tiny     # the CPU check the tests run

Shapes: ``qwen3-8b`` (Qwen3-8B's published dimensions: 36 layers, hidden 4096, 32 query / 8 KV heads of 128,
MLP 12288, vocabulary 151,936) and ``qwen3.5-9b-like`` (a Qwen3.5 hybrid of similar size: 32 layers, 24 Gated
DeltaNet + 8 gated attention, 16 query / 4 KV heads of 256 with partial rotary 0.25, 16 key / 32 value linear heads
of 128, MLP 12288, vocabulary 248,320 — chosen to resemble the family, not copied from a release), each with one MTP
layer (``MTPHead.from_base``); ``tiny`` for the CPU. Every cell of batch × context (default 1, 8, 32, 128, 256 ×
1K, 4K, 16K, 32K tokens) whose estimated memory fits in 85 % of the free device memory is measured; the others are
listed as skipped with the estimate.

What is timed, through the engine's own forwards (``bebop.engine.forwards``: the lean path for Qwen3, the hybrid
path for Qwen3.5): c_1 = one target forward over 1 new token plus the LM head, c_verify = one over γ+1 tokens plus
the LM head on them, c_draft = one MTP step plus the LM head — each against a KV cache of ``context`` valid slots
(and zero linear-attention states: the cost does not depend on the values, so no prefill is run). Median of
``--repeats`` after warm-up, with ``torch.cuda.synchronize`` around each; ``--cuda-graphs`` captures each forward
in a CUDA graph and times its replay (at small batch a GPU forward is launch-bound, and graphs remove most of that),
falling back to eager with the reason recorded if capture fails.

With ``--acceptance JSON`` (``bebop bench decode --json``: the α of its batch-1 row; or ``bebop eval-mtp --json``:
its RS α), each cell gets the projected decode speedup ``(1 + E[A]) / (c_verify/c_1 + γ·c_draft/c_1)``
(``bebop.core.speed.speedup_limit``) and, for ``--rollout-share r``, the projected RL step speedup
``1 / ((1 − r) + r/s)`` (``rl_step_speedup``). These are projections: host work between forwards, which a real
engine adds, is not in them. Every input is printed and written to the JSON.

Offline install on the GPU machine (torch preinstalled): ``pip install --no-index --find-links WHEELS -e .``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

SHAPES: dict[str, dict] = {
    "qwen3-8b": dict(arch="qwen3", hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, intermediate_size=12288, vocab_size=151936),
    "qwen3.5-9b-like": dict(arch="qwen3_5", hidden_size=4096, num_hidden_layers=32, num_attention_heads=16,
                            num_key_value_heads=4, head_dim=256, intermediate_size=12288, vocab_size=248320,
                            linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
                            linear_value_head_dim=128, linear_conv_kernel_dim=4, partial_rotary_factor=0.25),
    "tiny": dict(arch="qwen3_5", hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, intermediate_size=128, vocab_size=512, linear_num_key_heads=2,
                 linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                 linear_conv_kernel_dim=4, partial_rotary_factor=0.25),
}
GIB = 2**30


def build_config(shape: dict):
    """The transformers config of a shape (rope theta 1e6, max positions 40K; hybrids: 3 linear layers per
    attention layer, one MTP layer)."""
    s = dict(shape)
    arch = s.pop("arch")
    common = dict(max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(**s, **common, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    from transformers import Qwen3_5TextConfig

    prf = s.pop("partial_rotary_factor")
    n = s["num_hidden_layers"]
    types = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n)]
    return Qwen3_5TextConfig(**s, **common, layer_types=types, mtp_num_hidden_layers=1,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                              "partial_rotary_factor": prf})


def build(shape_name: str, device: str, dtype):
    """A random model of ``shape_name`` on ``device`` in ``dtype``, its MTP head, and its config."""
    import torch
    from transformers import AutoModelForCausalLM

    from bebop.models.mtp import MTPHead

    cfg = build_config(SHAPES[shape_name])
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    return model, MTPHead.from_base(model).eval(), cfg


def estimate_bytes(model, cfg, batch: int, context: int, gamma: int) -> int:
    """Weights (model + one MTP layer) + KV slots of the attention layers and the head + linear-attention states
    (γ+2 per layer and row while a verify is pending) + float32 logits of a verify + 1 GiB of working space."""
    el = model.get_input_embeddings().weight.element_size()
    weights = sum(p.numel() for p in model.parameters()) * el
    layer = weights / max(1, cfg.num_hidden_layers)
    types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers)
    attn = types.count("full_attention") + 1                                    # + the MTP layer
    slots = context + 2 * (gamma + 1)
    kv = attn * 2 * cfg.num_key_value_heads * cfg.head_dim * el * slots * batch
    linear = types.count("linear_attention")
    states = 0
    if linear:
        states = linear * batch * cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4 \
            * (gamma + 2)
    logits = batch * (gamma + 1) * cfg.vocab_size * 4 * 3
    return int(weights + layer + kv + states + logits + GIB)


def measure(model, head, batch: int, context: int, gamma: int, repeats: int, graphs: bool) -> dict:
    """Median seconds of c_1, c_verify, c_draft (module doc) at ``batch`` rows over ``context`` valid slots."""
    import torch

    from bebop.engine.forwards import forwards

    device = model.get_input_embeddings().weight.device
    cuda = device.type == "cuda"
    V = model.config.vocab_size
    fw = forwards(model, head, batch, context + 2 * (gamma + 1), "auto", gamma)
    valid = torch.ones((batch, context + gamma + 1), dtype=torch.bool, device=device)
    tok = torch.randint(3, V, (batch, gamma + 1), device=device)
    pos = context + torch.arange(gamma + 1, device=device).expand(batch, gamma + 1)
    hid = torch.randn((batch, 1, model.config.hidden_size), device=device, dtype=model.dtype)

    def target(n: int):
        def run():
            fw.lm_head(fw.target(tok[:, :n], pos[:, :n], valid[:, : context + n], context)).float()
        return run

    def draft():
        fw.lm_head(fw.drafter(tok[:, :1], hid, pos[:, :1], valid[:, : context + 1], context)).float()

    out: dict = {"graphs": None}
    with torch.inference_mode():
        for name, fn in (("c_1", target(1)), ("c_verify", target(gamma + 1)), ("c_draft", draft)):
            run = fn
            if graphs and cuda:
                try:
                    run = _graphed(fn)
                    out["graphs"] = "cuda graphs"
                except Exception as e:  # noqa: BLE001 - record why and time eagerly
                    out["graphs"] = f"eager (capture failed: {type(e).__name__}: {str(e)[:120]})"
            out[name] = _median(run, repeats, cuda)
    return out


def _graphed(fn):
    """``fn`` captured in a CUDA graph after warm-up on a side stream; returns the replay."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _median(fn, repeats: int, cuda: bool) -> float:
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def read_alpha(path: str) -> tuple[list[float], str]:
    """Per-step RS α from a ``bench decode`` JSON (its batch-1 row) or an ``eval-mtp`` JSON, and where from."""
    data = json.loads(Path(path).read_text())
    if "results" in data:
        key = "1" if "1" in data["results"] else sorted(data["results"], key=int)[0]
        return list(data["results"][key]["alpha"]), f"bench decode {path}, batch {key}"
    if "rejection" in data:
        return list(data["rejection"]["alpha"]), f"eval-mtp {path}, rejection"
    raise SystemExit(f"error: {path} is neither a bench decode nor an eval-mtp JSON (no 'results' or 'rejection')")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--shape", action="append", choices=sorted(SHAPES),
                    help="repeatable; default qwen3-8b and qwen3.5-9b-like (tiny on the CPU)")
    ap.add_argument("--batch-sizes", default="1,8,32,128,256")
    ap.add_argument("--contexts", default="1024,4096,16384,32768")
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--acceptance", default=None, help="bench decode or eval-mtp JSON with the head's RS α")
    ap.add_argument("--rollout-share", type=float, default=None, help="fraction r of an RL step spent in rollout")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.table import Table

    from bebop.core.acceptance import accept_length
    from bebop.core.speed import rl_step_speedup, speedup_limit

    console = Console()
    cpu = args.device == "cpu"
    shapes = args.shape or (["tiny"] if cpu else ["qwen3-8b", "qwen3.5-9b-like"])
    dtype = getattr(torch, args.dtype)
    alpha, alpha_src = read_alpha(args.acceptance) if args.acceptance else (None, None)
    if alpha is not None and len(alpha) < args.gamma:
        raise SystemExit(f"error: {args.acceptance} has α for {len(alpha)} steps, fewer than --gamma {args.gamma}")
    length = float(accept_length(alpha[: args.gamma])) if alpha else None
    batches = [int(b) for b in args.batch_sizes.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    t_start = time.perf_counter()
    rows, info = [], {}
    for shape in shapes:
        t0 = time.perf_counter()
        model, head, cfg = build(shape, args.device, dtype)
        info[shape] = {"build_s": time.perf_counter() - t0, "params": sum(p.numel() for p in model.parameters()),
                       "head_params": sum(p.numel() for p in head.parameters()), "config": SHAPES[shape]}
        for B in batches:
            for ctx in contexts:
                need = estimate_bytes(model, cfg, B, ctx, args.gamma)
                row = {"shape": shape, "batch": B, "context": ctx, "estimated_bytes": need}
                if not cpu:
                    free = torch.cuda.mem_get_info(torch.device(args.device))[0] + torch.cuda.memory_allocated()
                    if need > 0.85 * free:
                        rows.append({**row, "skipped": f"needs ~{need / GIB:.0f} GiB of {free / GIB:.0f} GiB"})
                        continue
                row.update(measure(model, head, B, ctx, args.gamma, args.repeats, args.cuda_graphs))
                if length is not None:
                    s = speedup_limit(length, row["c_1"], row["c_verify"], row["c_draft"], args.gamma)
                    row["projected_decode_speedup"] = s
                    if args.rollout_share is not None:
                        row["projected_rl_step_speedup"] = rl_step_speedup(args.rollout_share, s)
                rows.append(row)
                if not cpu:
                    torch.cuda.empty_cache()
        del model, head
        if not cpu:
            torch.cuda.empty_cache()

    table = Table(title=f"forward costs, {args.dtype} on {args.device}, γ = {args.gamma}"
                  + (f"; accept length {length:.2f} from {alpha_src}" if length else ""))
    for col in ("shape", "batch", "context", "c_1 ms", "c_verify/c_1", "c_draft/c_1", "projected decode ×",
                "projected RL step ×", "note"):
        table.add_column(col, justify="right")
    for r in rows:
        if "skipped" in r:
            table.add_row(r["shape"], str(r["batch"]), str(r["context"]), *["-"] * 5, r["skipped"])
            continue
        table.add_row(r["shape"], str(r["batch"]), str(r["context"]), f"{1e3 * r['c_1']:.2f}",
                      f"{r['c_verify'] / r['c_1']:.2f}", f"{r['c_draft'] / r['c_1']:.2f}",
                      f"{r['projected_decode_speedup']:.2f}" if "projected_decode_speedup" in r else "-",
                      f"{r['projected_rl_step_speedup']:.2f}" if "projected_rl_step_speedup" in r else "-",
                      r["graphs"] or "eager")
    console.print(table)
    inputs = {"alpha": alpha, "alpha_source": alpha_src, "accept_length": length, "gamma": args.gamma,
              "rollout_share": args.rollout_share,
              "formulas": {"decode": "(1 + E[A]) / (c_verify/c_1 + γ·c_draft/c_1)", "rl_step": "1 / ((1 − r) + r/s)"}}
    console.print("inputs: " + json.dumps(inputs))
    device_name = torch.cuda.get_device_name(torch.device(args.device)) if not cpu else "cpu"
    out = {"command": "python benchmarks/gpu_costs.py " + " ".join(argv or []), "device": device_name,
           "torch": torch.__version__, "dtype": args.dtype, "inputs": inputs, "shapes": info, "rows": rows,
           "seconds": time.perf_counter() - t_start, "projection_note": "projections, not measured speedups"}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
