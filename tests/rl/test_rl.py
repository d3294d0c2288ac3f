"""GRPO maths on hand-computed cases, gradient isolation between head and policy, rollout/trainer log-prob
alignment, checkpoint atomicity, kill-and-resume, async staleness, the Ray backend, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from rl_runs import local_ray

from bebop.core.grpo import completion_logprobs, group_advantages, grpo_loss
from bebop.errors import BebopError
from bebop.models.checkpoint import load_head, save_head
from bebop.models.mtp import MTPHead
from bebop.models.policy import load_policy, save_policy
from bebop.rl.config import RLConfig
from bebop.rl.rollout import RolloutBatch, RolloutWorker, check_ray_address, merge_batches, snapshot
from bebop.rl.trainer import (
    CHECKPOINT,
    STATE_JSON,
    head_update,
    policy_update,
    read_checkpoint,
    save_checkpoint,
    train_rl,
    training_batch,
)

TESTS = Path(__file__).parent
REWARD = "rl_rewards:digit_fraction"


@pytest.fixture(autouse=True)
def _rewards_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


@pytest.fixture(scope="session")
def policy_dirs(tiny_tokenizer, tmp_path_factory):
    """A tiny random policy and a warm-start head for it, on disk."""
    from conftest import build_tiny_policy

    root = tmp_path_factory.mktemp("rl")
    model = build_tiny_policy(tiny_tokenizer, seed=3, logit_scale=3.0)
    save_policy(model, tiny_tokenizer, root / "policy")
    save_head(MTPHead.from_base(model), root / "mtp", model.config)
    return root / "policy", root / "mtp"


def small_config(policy_dirs, out: Path, **kw) -> RLConfig:
    policy, mtp = policy_dirs
    base = dict(model=str(policy), mtp=str(mtp), out=str(out), steps=3, prompts_per_step=4, group_size=4,
                max_new_tokens=8, eval_samples=0, reward=REWARD, lr=1e-2, warmup=1, checkpoint_every=1)
    base.update(kw)
    return RLConfig(**base)


# ---------------------------------------------------------------- GRPO maths

def test_group_advantages_hand_computed():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0]), group_size=4, eps=0.0)
    # group 1: mean 0.25, unbiased std sqrt((0.75² + 3·0.25²)/3) = 0.5; group 2: all equal → 0 (0/0 guarded)
    assert torch.allclose(adv[:4], torch.tensor([1.5, -0.5, -0.5, -0.5]))
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0]), group_size=4)
    assert torch.equal(adv[4:], torch.zeros(4))
    assert abs(float(adv[:4].sum())) < 1e-6


def test_group_advantages_bad_input():
    with pytest.raises(BebopError, match="group_size must be >= 2"):
        group_advantages(torch.ones(4), 1)
    with pytest.raises(BebopError, match="do not split into groups of 3"):
        group_advantages(torch.ones(4), 3)


def test_grpo_loss_hand_computed():
    logp = torch.log(torch.tensor([[1.1, 1.5, 1.0], [0.5, 1.0, 1.0]]))   # ratios (behaviour logp = 0)
    beh = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, st = grpo_loss(logp, beh, adv, mask, clip_low=0.2, clip_high=0.2)
    # row 0: tokens with r=1.1 (unclipped, -1.1) and r=1.5 (clipped to 1.2 for A>0: min(1.5,1.2)=1.2 → -1.2)
    # row 1: r=0.5, A=-2: min(0.5·-2, 0.8·-2) = -1.6 → +1.6
    expected = ((-1.1 - 1.2) / 2 + 1.6) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert st.clip_fraction == pytest.approx(2 / 3)
    assert st.ratio_mean == pytest.approx((1.1 + 1.5 + 0.5) / 3, abs=1e-6)


def test_grpo_loss_gradient_is_policy_gradient_on_policy():
    """At ratio 1 the gradient w.r.t. logp_t is −A / |o| (REINFORCE with the group baseline)."""
    logp = torch.zeros(2, 4, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    adv = torch.tensor([0.5, -1.0])
    loss, _ = grpo_loss(logp, torch.zeros(2, 4), adv, mask)
    loss.backward()
    expected = torch.tensor([[-0.5 / 4] * 4, [1.0 / 2, 1.0 / 2, 0, 0]]) / 2
    assert torch.allclose(logp.grad, expected)


def test_grpo_kl_term_is_k3_and_zero_at_reference():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    _, st = grpo_loss(logp, logp.clone(), torch.zeros(1), torch.ones(1, 2), kl_coef=0.1, ref_logp=ref)
    d = torch.log(torch.tensor(0.5))        # ref − logp for token 0
    assert st.kl == pytest.approx(float((torch.exp(d) - d - 1) / 2), abs=1e-6)
    _, st = grpo_loss(ref, ref, torch.zeros(1), torch.ones(1, 2), kl_coef=0.1, ref_logp=ref)
    assert st.kl == 0.0


# ---------------------------------------------------------------- rollouts ↔ trainer

def test_behaviour_logprobs_match_the_trainer_forward(policy_dirs, tmp_path):
    """The engine's (MTP-RS) behaviour log-probs equal the trainer's fresh forward: ratio 1 on-policy."""
    cfg = small_config(policy_dirs, tmp_path)
    batch = RolloutWorker(replace(cfg, temperature=0.8)).rollout(step=0, version=0)
    model, tok = load_policy(cfg.model)
    ids, mask, comp, blp = training_batch(batch, tok.pad_token_id, "cpu")
    with torch.no_grad():
        lp = completion_logprobs(model, ids, mask, comp, temperature=0.8)
    m = comp[:, 1:].bool()
    assert m.sum() == batch.num_tokens
    assert torch.allclose(lp[m], blp[m], atol=1e-4)


def test_rollout_is_deterministic_per_step(policy_dirs, tmp_path):
    w = RolloutWorker(small_config(policy_dirs, tmp_path, prompts_per_step=2, group_size=3, max_new_tokens=6))
    a, b, c = w.rollout(5, 0), w.rollout(5, 0), w.rollout(6, 0)
    assert a.completions == b.completions and a.rewards == b.rewards
    assert a.prompts != c.prompts or a.completions != c.completions
    assert len(a.completions) == 6 and all(a.prompts[i] == a.prompts[i - i % 3] for i in range(6))


def test_gradient_isolation_between_head_and_policy(policy_dirs, tmp_path):
    cfg = small_config(policy_dirs, tmp_path, mtp_strategy="online-ce", online_steps=2)
    model, tok = load_policy(cfg.model)
    model.train()
    head = load_head(cfg.mtp, model)
    batch = RolloutWorker(cfg).rollout(0, 0)
    adv = group_advantages(torch.tensor(batch.rewards), 4)
    assert adv.abs().sum() > 0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    head_opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    head_before, policy_before = snapshot(head), snapshot(model)

    policy_update(model, None, opt, batch, adv, cfg, tok.pad_token_id)
    assert all(p.grad is None for p in head.parameters())                   # no policy gradient reached the head
    assert all(torch.equal(v, snapshot(head)[k]) for k, v in head_before.items())
    assert any(not torch.equal(v, snapshot(model)[k]) for k, v in policy_before.items())

    opt.zero_grad(set_to_none=True)
    policy_mid = snapshot(model)
    head_update(model, head, head_opt, batch, cfg, tok.pad_token_id, torch.Generator().manual_seed(0))
    assert all(p.grad is None for p in model.parameters())                   # no head gradient reached the policy
    assert all(torch.equal(v, snapshot(model)[k]) for k, v in policy_mid.items())
    assert any(not torch.equal(v, snapshot(head)[k]) for k, v in head_before.items())
    assert all(p.requires_grad for p in model.parameters())                  # policy trainable again


# ---------------------------------------------------------------- checkpoints, runs, resume

def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    from bebop.rl import trainer

    path = tmp_path / CHECKPOINT
    state = {"step": 1, "policy": {"w": torch.ones(2)}, "opt": None, "head": None, "head_opt": None,
             "head_gen": torch.Generator().get_state(), "torch_rng": torch.get_rng_state(), "py_rng": (3, (1,), None),
             "summary": {}}
    save_checkpoint(path, state)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(trainer, "save_file", boom)
    with pytest.raises(RuntimeError):
        save_checkpoint(path, {**state, "step": 2})
    assert read_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in path.iterdir()) == ["state-00000001.safetensors", "state.json"]


def read_log(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "rl.jsonl").read_text().splitlines()]


def test_sync_run_logs_every_step_and_saves(policy_dirs, tmp_path):
    cfg = small_config(policy_dirs, tmp_path / "run", steps=3)
    summary = train_rl(cfg)
    rows = read_log(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert r["staleness"] == 0 and r["ratio_mean"] == pytest.approx(1.0, abs=1e-3)
        assert len(r["alpha"]) == 3 and r["accept_length"] >= 1.0
        for k in ("reward", "entropy", "rollout_tokens_per_s", "rollout_s", "train_s", "step_s", "grad_norm"):
            assert k in r
    assert (tmp_path / "run" / "policy" / "config.json").is_file()
    assert (tmp_path / "run" / "mtp").is_dir()
    assert summary["steps_run"] == 3


def test_async_rollouts_respect_the_staleness_bound(policy_dirs, tmp_path):
    cfg = small_config(policy_dirs, tmp_path / "run", steps=4, async_rollouts=True, max_staleness=2)
    train_rl(cfg)
    rows = read_log(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert [r["staleness"] for r in rows] == [0, 1, 2, 2]
    assert all(r["version"] == r["step"] - r["staleness"] for r in rows)


def test_resume_continues_without_lost_or_repeated_steps(policy_dirs, tmp_path):
    """Resuming from the step-2 checkpoint of a run reproduces the uninterrupted run exactly (sync mode)."""
    full = small_config(policy_dirs, tmp_path / "full", steps=4)
    train_rl(full)
    part = replace(full, out=str(tmp_path / "part"), steps=2)
    train_rl(part)
    # a crash after step 2's log line but before any newer checkpoint: a stale extra line must be dropped
    with (tmp_path / "part" / "rl.jsonl").open("a") as f:
        f.write(json.dumps({"step": 2, "reward": -1}) + "\n")
    train_rl(replace(part, steps=4), resume=True)
    a, b = read_log(tmp_path / "full"), read_log(tmp_path / "part")
    assert [r["step"] for r in b] == [0, 1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        assert ra["reward"] == rb["reward"] and ra["loss"] == pytest.approx(rb["loss"], abs=1e-6)


def run_cli(*args: str, **kw) -> subprocess.Popen:
    """``python -m bebop.cli ARGS`` as a process (so it can be killed), with the test rewards importable and torch
    on one thread, as in the test process: more threads than free cores only slows a shared machine down."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "bebop.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_kill_and_resume_subprocess(policy_dirs, tmp_path):
    policy, mtp = policy_dirs
    out = tmp_path / "run"
    args = ["rl", "--model", str(policy), "--mtp", str(mtp), "--out", str(out), "--steps", "40",
            "--prompts-per-step", "4", "--group-size", "4", "--eval-samples", "0", "--reward", REWARD,
            "--checkpoint-every", "2", "--lr", "1e-2"]
    proc = run_cli(*args)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / CHECKPOINT / STATE_JSON).exists() and (out / "rl.jsonl").exists() and \
                len((out / "rl.jsonl").read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(read_log(out))
    assert 5 <= killed_at < 40
    assert read_checkpoint(out / CHECKPOINT)["step"] <= killed_at   # the last committed checkpoint reads back
    proc = run_cli("rl", "--resume", str(out))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    rows = read_log(out)
    assert [r["step"] for r in rows] == list(range(40))
    assert (out / "policy" / "config.json").is_file()
    names = sorted(p.name for p in (out / CHECKPOINT).iterdir())
    assert names == ["state-00000040.safetensors", STATE_JSON]           # no half-written or superseded file left


# ---------------------------------------------------------------- Ray

@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """One local Ray instance for the module's Ray tests (starting one takes seconds); the test rewards are
    importable in its workers. Each run's rollout actors are killed when the run closes its workers."""
    with local_ray(tmp_path_factory) as ray:
        yield ray


@pytest.mark.slow
def test_ray_backend_matches_local(ray_cluster, policy_dirs, tmp_path):
    """Two RL steps with rollouts on a Ray actor (weights pushed through the object store each step) give
    the same rollouts, rewards and losses as the in-process backend for the same seed."""
    local = small_config(policy_dirs, tmp_path / "local", steps=2, rollout_threads=1)
    train_rl(local)
    train_rl(replace(local, out=str(tmp_path / "ray"), backend="ray"))
    a, b = read_log(tmp_path / "local"), read_log(tmp_path / "ray")
    assert [r["step"] for r in b] == [0, 1]
    for ra, rb in zip(a, b, strict=True):
        assert ra["rollout_tokens"] == rb["rollout_tokens"] and ra["reward"] == rb["reward"]
        assert ra["alpha"] == rb["alpha"] and ra["loss"] == pytest.approx(rb["loss"], abs=1e-6)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kw, match", [
    ({"max_staleness": -1}, "max_staleness must be >= 0, got -1"),
    ({"group_size": 1}, "group_size must be >= 2"),
    ({"mtp_strategy": "sometimes"}, "unknown mtp_strategy 'sometimes'"),
    ({"rule": "greedy"}, "unknown rule 'greedy'"),
    ({"reward": "no_such_module:fn"}, "cannot load reward 'no_such_module:fn'"),
    ({"reward": "rl_rewards:nope"}, "cannot load reward 'rl_rewards:nope'"),
    ({"task": "chess"}, "chess"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"mtp": None}, "needs a trained head"),
    ({"backend": "slurm"}, "unknown backend 'slurm'"),
    ({"gamma": 0}, "gamma must be >= 1, got 0"),
    ({"gamma": 2.5}, "gamma must be an integer, got 2.5"),
])
def test_bad_config(policy_dirs, tmp_path, kw, match):
    with pytest.raises(BebopError, match=match):
        small_config(policy_dirs, tmp_path, **kw)


def test_unreachable_ray_address_is_a_clear_error():
    with pytest.raises(BebopError, match="Ray address 127.0.0.1:1 is unreachable"):
        check_ray_address("127.0.0.1:1")
    with pytest.raises(BebopError, match="bad Ray address"):
        check_ray_address("nonsense")


def test_resume_without_checkpoint_is_a_clear_error(policy_dirs, tmp_path):
    cfg = small_config(policy_dirs, tmp_path / "empty")
    with pytest.raises(BebopError, match="cannot resume: no checkpoint in"):
        train_rl(cfg, resume=True)


@pytest.mark.slow
def test_bench_rl_runs_methods_side_by_side(policy_dirs, tmp_path):
    from bebop.experiments.bench_rl import RLBenchConfig, bench_rl

    policy, mtp = policy_dirs
    base = replace(small_config(policy_dirs, tmp_path), mtp_strategy="none")
    cfg = RLBenchConfig(model=str(policy), mtp=str(mtp), mtp_ce=str(mtp), out=str(tmp_path / "bench"),
                        methods="none,rs-e2e_tv,to-ce,rs-online-ce", steps=3, eval_samples=0,
                        rl=replace(base, online_every=1, online_steps=1))
    res = bench_rl(cfg)
    assert list(res) == ["none", "rs-e2e_tv", "to-ce", "rs-online-ce"]
    assert res["none"]["step_speedup"] == 1.0 and "accept_length_step0" not in res["none"]
    for name in ("rs-e2e_tv", "to-ce", "rs-online-ce"):
        r = res[name]
        assert r["mean_step_s"] > 0 and r["accept_length_step0"] >= 1.0 and len(r["per_step"]) == 3
    saved = json.loads((tmp_path / "bench" / "bench_rl.json").read_text())
    assert saved["results"]["rs-e2e_tv"]["per_step"][0]["accept_length"] == res["rs-e2e_tv"]["accept_length_step0"]
    with pytest.raises(BebopError, match="unknown RL bench method 'fast'"):
        RLBenchConfig(methods="none,fast").method_list()
    with pytest.raises(BebopError, match="needs --mtp-ce DIR"):
        RLBenchConfig(methods="rs-ce").method_list()


def test_rollout_batch_runs_continuous_batching(policy_dirs, tmp_path):
    """``rollout_batch`` B: the step's rows go through B slots (continuous batching), in request order; at τ = 0 the
    rollouts equal one static batch's."""
    from bebop.core.sampling import SamplingParams

    def greedy(**kw):
        worker = RolloutWorker(small_config(policy_dirs, tmp_path, **kw))
        worker.params = SamplingParams(temperature=0.0)           # RL refuses τ = 0; the comparison needs it
        return worker.rollout(0, 0)

    whole, slots = greedy(), greedy(rollout_batch=3)
    assert slots.prompts == whole.prompts and slots.completions == whole.completions
    assert slots.rewards == whole.rewards and slots.metrics.prefills > 5 and whole.metrics.prefills == 0
    sampled = RolloutWorker(small_config(policy_dirs, tmp_path, rollout_batch=3)).rollout(0, 0)
    assert len(sampled.completions) == 16 and sampled.metrics.tokens == sampled.num_tokens
    assert sum(sampled.metrics.reached) > 0 and 0 < sampled.metrics.utilization <= 1


def test_bench_rl_config_flags_override_the_shared_rl_settings():
    from bebop.config import make_config
    from bebop.experiments.bench_rl import RLBenchConfig

    cfg = make_config(RLBenchConfig, None, **{"rl.lr": 1e-3, "rl.rollout_batch": 16, "rl.seed": None})
    assert cfg.rl.lr == 1e-3 and cfg.rl.rollout_batch == 16
    assert cfg.rl.mtp_strategy == "none"                # the factory's own defaults are kept
    with pytest.raises(BebopError, match="group_size must be >= 2"):
        make_config(RLBenchConfig, None, **{"rl.group_size": 1})


@pytest.fixture(scope="module")
def tool_caller_dir(tiny_tokenizer, tmp_path_factory):
    """A tiny policy that often emits the agent task's terminator ``}``, so rollouts get environment replies."""
    from conftest import build_tiny_policy

    model = build_tiny_policy(tiny_tokenizer, seed=0)
    emb = model.get_input_embeddings().weight
    newline = tiny_tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        emb[tiny_tokenizer.convert_tokens_to_ids("}")] = 1.03 * emb[newline]
    root = tmp_path_factory.mktemp("agent")
    save_policy(model, tiny_tokenizer, root / "policy")
    save_head(MTPHead.from_base(model), root / "mtp", model.config)
    return root / "policy", root / "mtp"


def test_multi_turn_rl_masks_environment_tokens(tool_caller_dir, tmp_path):
    """Agent-task rollouts: environment replies are in the transcript but not in the loss mask, and the
    behaviour log-probs of the model's tokens equal the trainer's forward over the whole transcript."""
    cfg = small_config(tool_caller_dir, tmp_path / "run", task="agent", temperature=0.7, max_new_tokens=24)
    batch = RolloutWorker(cfg).rollout(0, 0)
    assert batch.sampled is not None and any(0 in m for m in batch.sampled)
    assert batch.num_tokens == sum(sum(m) for m in batch.sampled) < sum(len(c) for c in batch.completions)
    model, tok = load_policy(cfg.model)
    ids, mask, comp, blp = training_batch(batch, tok.pad_token_id, "cpu")
    assert int(comp.sum()) == batch.num_tokens
    with torch.no_grad():
        lp = completion_logprobs(model, ids, mask, comp, temperature=0.7)
    m = comp[:, 1:].bool()
    assert torch.allclose(lp[m], blp[m], atol=1e-4)
    train_rl(replace(cfg, steps=2))
    rows = read_log(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1] and rows[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-3)


def _part(n_rows: int, sampled: bool, seconds: float) -> RolloutBatch:
    """A hand-made worker shard of ``n_rows`` rows; multi-turn shards mark their last completion token as an
    environment token."""
    comps = [[10 + i, 20 + i, 30 + i] for i in range(n_rows)]
    return RolloutBatch(step=0, version=0, prompts=[[1, 2]] * n_rows, completions=comps,
                        logprobs=[[-0.5, -0.5, -0.5]] * n_rows, rewards=[float(i) for i in range(n_rows)],
                        entropy_sum=1.0, seconds=seconds, sampled=[[1, 1, 0]] * n_rows if sampled else None)


def test_merge_batches_keeps_the_multi_turn_sampled_mask():
    """Merging workers' multi-turn shards keeps each row's sampled mask, so environment tokens stay out of
    the loss and out of the token count."""
    merged = merge_batches([_part(2, True, 1.0), _part(3, True, 2.0)], step=4, version=3)
    assert merged.sampled == [[1, 1, 0]] * 5
    assert merged.num_tokens == 10 and len(merged.completions) == 5
    assert (merged.step, merged.version, merged.seconds, merged.entropy_sum) == (4, 3, 2.0, 2.0)
    plain = merge_batches([_part(2, False, 1.0), _part(1, False, 1.0)], step=0, version=0)
    assert plain.sampled is None and plain.num_tokens == 9
    with pytest.raises(BebopError, match="multi-turn"):
        merge_batches([_part(1, True, 1.0), _part(1, False, 1.0)], step=0, version=0)


@pytest.mark.slow
def test_ray_backend_masks_environment_tokens_like_local(ray_cluster, tool_caller_dir, tmp_path, monkeypatch):
    """An agent-task RL step on two Ray workers trains on the same loss mask as the workers' rollouts taken
    in-process: environment replies stay context, never loss terms, after the shards are merged."""
    from bebop.rl import trainer

    cfg = small_config(tool_caller_dir, tmp_path / "ray", task="agent", temperature=0.7, max_new_tokens=24, steps=1,
                       backend="ray", ray_workers=2, rollout_threads=1)
    trained: list[RolloutBatch] = []
    real_update = trainer.policy_update

    def spy(model, ref_model, opt, batch, *args):
        trained.append(batch)
        return real_update(model, ref_model, opt, batch, *args)

    monkeypatch.setattr(trainer, "policy_update", spy)
    train_rl(cfg)
    (batch,) = trained
    worker = RolloutWorker(replace(cfg, backend="local"))
    per = cfg.prompts_per_step // 2
    shards = [worker.rollout(0, 0, i * per, per) for i in range(2)]
    masks = [m for s in shards for m in s.sampled]
    assert batch.completions == [c for s in shards for c in s.completions]
    assert any(0 in m for m in masks)                                     # environment replies happened
    _, tok = load_policy(cfg.model)
    _, _, comp, _ = training_batch(batch, tok.pad_token_id, "cpu")
    for row, prompt, m in zip(comp, batch.prompts, masks, strict=True):
        assert row[len(prompt) : len(prompt) + len(m)].tolist() == m and int(row.sum()) == sum(m)
    assert read_log(tmp_path / "ray")[0]["rollout_tokens"] == sum(map(sum, masks))


def test_crash_right_after_a_checkpoint_loses_no_log_line(policy_dirs, tmp_path, monkeypatch):
    """A run killed just after writing a checkpoint resumes with every step logged exactly once."""
    from bebop.rl import trainer

    cfg = small_config(policy_dirs, tmp_path / "run", steps=3, checkpoint_every=2)
    real_save = trainer.save_checkpoint

    def save_then_crash(path, state):
        real_save(path, state)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_rl(cfg)
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    train_rl(cfg, resume=True)
    assert [r["step"] for r in read_log(tmp_path / "run")] == [0, 1, 2]
