"""A bad-input sweep of the whole command line: each malformed invocation — a value of the wrong
type, out of range, a missing or corrupt file, a head made for another model, an unreadable ``--config``, clashing
options, an unknown device or dtype — ends with exit code 2 and exactly one ``error: …`` line on stderr that names
the bad value, shows no traceback, and writes nothing (no ``--out``, no JSON, no cache, no file beside the inputs).

Runs in-process through the real entry point (``cli`` in tests/conftest.py), on the tiny saved policy and head of
``dirs`` plus a few broken copies of them made once for the module."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import cli

# id → (command line, what its error line must name). Placeholders: {base} / {head} the good policy and head,
# {out} an output path that must not appear, {bad} the directory of broken inputs (the ``bad`` fixture).
M, MH, NAT = "--model {base}", "--model {base} --mtp {head}", "--model {bad}/native_model"
FEW = "--data-samples 8 --heldout-samples 4 --max-new-tokens 8"
CASES = {
    # sft
    "sft-steps-not-int": ("sft --steps abc --out {out}", "'abc'"),
    "sft-batch-size-negative": ("sft --batch-size -1 --out {out}", "-1"),
    "sft-eval-samples-negative": ("sft --eval-samples -1 --out {out}", "-1"),
    "sft-unknown-task": ("sft --task poetry --out {out}", "'poetry'"),
    "sft-unknown-arch": ("sft --arch gpt2 --out {out}", "'gpt2'"),
    "sft-unknown-device": ("sft --device tpu --out {out}", "'tpu'"),
    "sft-config-not-toml": ("sft --config {bad}/bad.toml --out {out}", "bad.toml"),
    "sft-config-missing": ("sft --config {bad}/nope.toml --out {out}", "nope.toml"),
    "sft-config-unknown-key": ("sft --config {bad}/unknown_key.toml --out {out}", "'stepz'"),
    # eval
    "eval-model-missing": ("eval {bad}/nope --json", "nope"),
    "eval-samples-zero": ("eval {base} --samples 0 --json", "0"),
    "eval-temperature-negative": ("eval {base} --temperature -1 --json", "-1"),
    "eval-unknown-dtype": ("eval {base} --dtype fp8 --json", "'fp8'"),
    # train-mtp
    "train-mtp-task-and-prompts": (f"train-mtp {M} --out {{out}} --task arith --prompts {{bad}}/prompts.jsonl",
                                   "--task and --prompts"),
    "train-mtp-prompts-bad-line": (f"train-mtp {M} --out {{out}} --prompts {{bad}}/prompts.jsonl --steps 1",
                                   "prompts.jsonl line 2"),
    "train-mtp-prompts-missing": (f"train-mtp {M} --out {{out}} --prompts {{bad}}/nope.jsonl", "nope.jsonl"),
    "train-mtp-unknown-loss": (f"train-mtp {M} --out {{out}} --loss mse", "'mse'"),
    "train-mtp-gamma-train-zero": (f"train-mtp {M} --out {{out}} --gamma-train 0", "0"),
    "train-mtp-head-layers-zero": (f"train-mtp {M} --out {{out}} --head-layers 0", "head_layers"),
    "train-mtp-patience-negative": (f"train-mtp {M} --out {{out}} --patience -2", "-2"),
    "train-mtp-min-delta-negative": (f"train-mtp {M} --out {{out}} --min-delta -0.5", "-0.5"),
    "train-mtp-min-steps-negative": (f"train-mtp {M} --out {{out}} --min-steps -7", "-7"),
    "train-mtp-model-missing": ("train-mtp --model {bad}/nope --out {out}", "nope"),
    # (train-mtp draws its policy samples before it reads --init: few and short ones keep these fast)
    "train-mtp-init-truncated": (f"train-mtp {M} --out {{out}} {FEW} --init {{bad}}/truncated_head",
                                 "truncated_head"),
    "train-mtp-init-wide-head": (f"train-mtp {M} --out {{out}} {FEW} --init {{bad}}/wide_head", "hidden size 48"),
    # eval-mtp
    "eval-mtp-gamma-zero": (f"eval-mtp {MH} --gamma 0 --json {{out}}/r.json", "0"),
    "eval-mtp-temperature-zero": (f"eval-mtp {MH} --temperature 0 --json {{out}}/r.json", "0"),
    "eval-mtp-head-other-family": (f"eval-mtp {M} --mtp {{bad}}/llama_head --json {{out}}/r.json", "'llama'"),
    "eval-mtp-completions-missing": (f"eval-mtp {MH} --completions {{bad}}/nope.jsonl --json {{out}}/r.json",
                                     "nope.jsonl"),
    "eval-mtp-dataset-and-completions": (f"eval-mtp {MH} --dataset x --completions y.jsonl",
                                         "--dataset and --completions"),
    "eval-mtp-missing-mtp": (f"eval-mtp {M}", "'--mtp'"),
    # generate
    "generate-top-p-above-1": (f"generate {M} --top-p 1.5", "1.5"),
    "generate-temperature-negative": (f"generate {M} --temperature -1", "-1"),
    "generate-max-new-tokens-zero": (f"generate {M} --max-new-tokens 0", "0"),
    "generate-n-zero": (f"generate {M} --n 0", "0"),
    "generate-n-not-int": (f"generate {M} --n 1.5", "'1.5'"),
    "generate-gamma-not-int": (f"generate {MH} --gamma three", "'three'"),
    "generate-unknown-rule": (f"generate {MH} --rule lucky", "'lucky'"),
    "generate-truncated-weights": ("generate --model {bad}/truncated_model", "truncated_model"),
    "generate-config-not-json": ("generate --model {bad}/badjson_model", "config.json"),
    "generate-head-wide": (f"generate {M} --mtp {{bad}}/wide_head", "hidden size 48"),
    "generate-unknown-device": (f"generate {M} --device cuda:x", "'cuda:x'"),
    "generate-unknown-flag": (f"generate {M} --tempreature 1", "--tempreature"),
    # export
    "export-head-missing": (f"export {NAT} --out {{out}} --mtp {{bad}}/nope", "nope"),
    "export-head-truncated": (f"export {NAT} --out {{out}} --mtp {{bad}}/truncated_head", "truncated_head"),
    "export-head-other-family": (f"export {NAT} --out {{out}} --mtp {{head}}", "'qwen3'"),
    "export-gamma-zero": (f"export {NAT} --out {{out}} --mtp {{bad}}/native_head --gamma 0", "0"),
    "export-shard-size-words": (f"export {NAT} --out {{out}} --mtp {{bad}}/native_head --max-shard-size big",
                                "'big'"),
    "export-model-missing": ("export --model {bad}/nope --out {out} --mtp {head}", "nope"),
    # bench decode / losses / rl
    "bench-decode-batch-sizes-zero": (f"bench decode {MH} --batch-sizes 0 --json {{out}}/r.json", "[0]"),
    "bench-decode-batch-sizes-words": (f"bench decode {MH} --batch-sizes 1,two --json {{out}}/r.json", "'1,two'"),
    "bench-decode-max-new-tokens-zero": (f"bench decode {MH} --max-new-tokens 0 --json {{out}}/r.json", "0"),
    "bench-decode-ignore-eos-multi-turn": (f"bench decode {MH} --task agent --ignore-eos --json {{out}}/r.json",
                                           "'agent'"),
    "bench-decode-continuous-auto": (f"bench decode {MH} --continuous --gamma auto --json {{out}}/r.json",
                                     "--gamma auto"),
    "bench-decode-head-wide": (f"bench decode {M} --mtp {{bad}}/wide_head --json {{out}}/r.json", "hidden size 48"),
    "bench-losses-unknown-loss": (f"bench losses {M} --out {{out}} --losses ce,l2", "'l2'"),
    "bench-losses-steps-negative": (f"bench losses {M} --out {{out}} --steps -1", "-1"),
    "bench-losses-eval-prompts-zero": (f"bench losses {M} --out {{out}} --eval-prompts 0", "0"),
    "bench-rl-unknown-method": (f"bench rl {M} --out {{out}} --methods rs-magic", "'rs-magic'"),
    "bench-rl-model-missing": ("bench rl --model {bad}/nope --out {out} --methods none --steps 1", "nope"),
    "bench-rl-head-missing": (f"bench rl {M} --mtp {{bad}}/nope --out {{out}} --steps 1", "nope"),
    # bench batching
    "bench-batching-batch-zero": (f"bench batching {MH} --batch 0 --json {{out}}/b.json", "0"),
    "bench-batching-unknown-task": (f"bench batching {MH} --task chess --json {{out}}/b.json", "'chess'"),
    # rl
    "rl-gamma-zero": (f"rl {MH} --out {{out}} --gamma 0", "0"),
    "rl-unknown-strategy": (f"rl {M} --out {{out}} --mtp-strategy sometimes", "'sometimes'"),
    "rl-temperature-negative": (f"rl {MH} --out {{out}} --temperature -1", "-1"),
    "rl-unknown-backend": (f"rl {MH} --out {{out}} --backend slurm", "'slurm'"),
    "rl-eval-samples-negative": (f"rl {MH} --out {{out}} --eval-samples -1", "-1"),
    "rl-kl-coef-negative": (f"rl {MH} --out {{out}} --kl-coef -0.5", "-0.5"),
    "rl-rollout-batch-negative": (f"rl {MH} --out {{out}} --rollout-batch -1", "-1"),
    "rl-reward-not-importable": (f"rl {MH} --out {{out}} --reward nomodule:fn", "'nomodule:fn'"),
    "rl-resume-empty-dir": ("rl --resume {bad}/empty", "empty"),
    "rl-model-missing": ("rl --model {bad}/nope --mtp {head} --out {out} --steps 1", "nope"),
    "rl-head-missing-existing-out": (f"rl {M} --mtp {{bad}}/nope --out {{bad}}/empty --steps 1", "nope"),
    # demo
    "demo-config-not-toml": ("demo --out {out} --config {bad}/bad.toml", "bad.toml"),
    "demo-unknown-dtype": ("demo --quick --out {out} --dtype half", "'half'"),
    "demo-model-missing": ("demo --quick --out {out} --model {bad}/nope", "nope"),
    "demo-gpu-costs-missing": ("demo --quick --out {out} --gpu-costs {bad}/nope_costs.json", "nope_costs.json"),
    "demo-unknown-ablation": ("demo --quick --out {out} --config {bad}/demo_ablation.toml", "'depth'"),
    # analyze sweep / entropy
    "analyze-sweep-temperatures-words": (f"analyze sweep {MH} --temperatures 0.5,hot --json {{out}}/r.json",
                                         "'0.5,hot'"),
    "analyze-sweep-gamma-zero": (f"analyze sweep {MH} --gamma 0 --json {{out}}/r.json", "0"),
    "analyze-sweep-head-truncated": (f"analyze sweep {M} --mtp {{bad}}/truncated_head --json {{out}}/r.json",
                                     "truncated_head"),
    "analyze-entropy-buckets-zero": (f"analyze entropy {MH} --buckets 0 --json {{out}}/r.json", "0"),
    "analyze-entropy-head-other-family": (f"analyze entropy {M} --mtp {{bad}}/llama_head --json {{out}}/r.json",
                                          "'llama'"),
}


@pytest.fixture(scope="module")
def bad(dirs, tmp_path_factory, tiny_tokenizer):
    """Broken inputs beside the good ``dirs``: a policy with truncated weights, one whose config.json is not JSON,
    a truncated head, heads made for a wider model and for another family, an unparsable TOML, a TOML with an
    unknown key, a prompts JSONL with a bad line and an empty run directory."""
    import torch

    from bebop.models.checkpoint import save_head
    from bebop.models.mtp import MTPHead
    from bebop.models.policy import ModelConfig, build_policy, save_policy

    root = tmp_path_factory.mktemp("bad")
    for name, broken in (("truncated_model", "model.safetensors"), ("badjson_model", "config.json")):
        shutil.copytree(dirs / "base", root / name)
        f = root / name / broken
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2] if broken.endswith(".safetensors") else b"{not json")
    shutil.copytree(dirs / "head", root / "truncated_head")
    f = root / "truncated_head" / "mtp.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    torch.manual_seed(0)
    wide = build_policy(ModelConfig(num_layers=1, hidden_size=48, num_heads=2, num_kv_heads=1,
                                    intermediate_size=64), tiny_tokenizer)
    save_head(MTPHead.from_base(wide), root / "wide_head", wide.config)
    llama = build_policy(ModelConfig(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1,
                                     intermediate_size=64), tiny_tokenizer, arch="llama")
    save_head(MTPHead.from_base(llama), root / "llama_head", llama.config)
    native = build_policy(ModelConfig(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1,
                                      intermediate_size=64), tiny_tokenizer, arch="qwen3_5")
    save_policy(native, tiny_tokenizer, root / "native_model")
    save_head(MTPHead.from_base(native), root / "native_head", native.config)
    (root / "bad.toml").write_text("steps = = 3\n")
    (root / "unknown_key.toml").write_text("stepz = 3\n")
    (root / "demo_ablation.toml").write_text('ablations = "budget,depth"\n')
    (root / "prompts.jsonl").write_text('{"prompt": "1+1="}\n{"prompt": "2+2=\n')
    (root / "empty").mkdir()
    return root


def tree(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under ``roots``: path → (size, mtime_ns)."""
    return {str(p): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for root in roots for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize(("line", "names"), CASES.values(), ids=CASES.keys())
def test_bad_input_is_one_error_line_exit_2_and_nothing_written(line, names, dirs, bad, tmp_path, monkeypatch):
    work, out = tmp_path / "cwd", tmp_path / "out"
    work.mkdir()
    monkeypatch.chdir(work)                                   # a relative default output would land here
    monkeypatch.setenv("BEBOP_CACHE", str(tmp_path / "cache"))
    args = [a.format(base=dirs / "base", head=dirs / "head", out=out, bad=bad) for a in line.split()]
    before = tree(dirs, bad, tmp_path)
    r = cli(*args)
    lines = r.stderr.splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    assert names in lines[0], lines[0]
    assert "Traceback" not in r.stdout + r.stderr
    assert not out.exists()
    assert tree(dirs, bad, tmp_path) == before                # inputs, cwd, cache: nothing added or touched


def test_the_sweep_covers_every_command():
    from test_cli_help import COMMANDS

    covered = {tuple(line.split()[:2 if line.startswith(("bench", "analyze")) else 1]) for line, _ in CASES.values()}
    assert covered == {tuple(c) for c in COMMANDS if c not in ([], ["bench"], ["analyze"])}
    assert len(CASES) >= 30


def test_a_batch_too_large_for_memory_is_one_error_before_decoding(dirs, monkeypatch):
    """``generate`` under a memory limit: one ``error:`` line naming the batch and the largest one that fits."""
    monkeypatch.setenv("BEBOP_MEMORY_LIMIT", "2MiB")
    r = cli("generate", "--model", str(dirs / "base"), "--mtp", str(dirs / "head"), "--task", "arith", "--n", "64",
            "--max-new-tokens", "64")
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "a batch of 64 rows" in lines[0] and "largest batch that fits is" in lines[0]
    assert "Traceback" not in r.stderr
