"""``bebop rl`` on a user's prompts (``--prompts`` / ``--dataset``) with reward functions in TRL's form
(``--reward module:function`` or ``file.py:function``, ``--reward-weights``): what reaches the functions, the
seeded prompt order, a failing reward stopping the run before the update and any checkpoint, bad input, resume."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import cli
from rl_runs import assert_same_run, local_ray, make_policy_dirs, read_log

from bebop.errors import BebopError
from bebop.rl.config import RLConfig
from bebop.rl.data import split_heldout, step_positions
from bebop.rl.rewards import Rewards, Row
from bebop.rl.rollout import RolloutWorker
from bebop.rl.trainer import CHECKPOINT, STATE_JSON, read_checkpoint, train_rl

TESTS = Path(__file__).parent
ROOT = TESTS.parent.parent
PROMPTS = "tests/rl/data/prompts.jsonl"          # paths as a user in the repository root types them
REWARDS = "tests/rl/my_rewards.py"
LINES = [json.loads(ln) for ln in (ROOT / PROMPTS).read_text().splitlines()]


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch, tmp_path):
    """Relative paths as typed in the repository root; the test rewards log into a fresh directory."""
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(TESTS))
    log = tmp_path / "rewards"
    log.mkdir()
    monkeypatch.setenv("BEBOP_TEST_REWARDS", str(log))
    return log


@pytest.fixture(scope="module")
def policy_dirs(tiny_tokenizer, tmp_path_factory):
    return make_policy_dirs(tiny_tokenizer, tmp_path_factory.mktemp("rl_user"))


def user_config(policy_dirs, out: Path, **kw) -> RLConfig:
    policy, mtp = policy_dirs
    base = dict(prompts=PROMPTS, reward=[f"{REWARDS}:digits"], model=str(policy), mtp=str(mtp), out=str(out),
                steps=4, prompts_per_step=4, group_size=2, max_new_tokens=6, eval_samples=0, lr=1e-2, warmup=1,
                checkpoint_every=1)
    base.update(kw)
    return RLConfig(**base)


def calls(log: Path) -> list[dict]:
    return [json.loads(ln) for ln in (log / "calls.jsonl").read_text().splitlines()]


def prompt_of(line: dict):
    return line.get("prompt", line.get("messages"))


# ---------------------------------------------------------------- through the command line

def test_cli_prompts_and_reward_file_run_two_steps(dirs, tmp_path, _in_repo_root):
    """``bebop rl --prompts FILE --reward file.py:fn`` (twice, weighted) runs 2 steps on the tiny policy; each
    call gets the step's prompts as written in the file (text, or messages with messages-form completions), the
    completions and their ids, and the other JSONL keys as columns aligned row by row; the logged reward is the
    weighted sum; the held-out prompts are evaluated before and after."""
    out = tmp_path / "run"
    r = cli("rl", "--model", str(dirs / "base"), "--mtp", str(dirs / "head"), "--prompts", PROMPTS,
            "--reward", f"{REWARDS}:record", "--reward", f"{REWARDS}:digits", "--reward-weights", "2,0.5",
            "--steps", "2", "--prompts-per-step", "4", "--group-size", "2", "--max-new-tokens", "6",
            "--eval-samples", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = read_log(out)
    assert [row["step"] for row in rows] == [0, 1]
    by_prompt = {json.dumps(prompt_of(line)): line for line in LINES}
    seen = calls(_in_repo_root)
    assert len(seen) == 2 + 2                        # one call per RL step, one per evaluation (before, after)
    for call in seen[1:3]:                           # the RL steps (the first and last calls are evaluations)
        n = len(call["prompts"])
        assert n == 8 and len(call["completions"]) == n and len(call["completion_ids"]) == n
        assert call["prompts"][0::2] == call["prompts"][1::2]                  # G = 2 rows per prompt
        lines = [by_prompt[json.dumps(p)] for p in call["prompts"]]             # every prompt is one of the file's
        assert set(call["columns"]) == {"answer", "level"}
        assert call["columns"]["answer"] == [line["answer"] for line in lines]
        assert call["columns"]["level"] == [line.get("level") for line in lines]   # a missing key is None
        for p, c, ids in zip(call["prompts"], call["completions"], call["completion_ids"], strict=True):
            assert all(isinstance(t, int) for t in ids)
            if isinstance(p, list):       # a messages prompt: TRL's conversational completion
                assert isinstance(c, list) and c[0]["role"] == "assistant"
            else:
                assert isinstance(c, str)
    for row, call in zip(rows, seen[1:3], strict=True):
        texts = [c if isinstance(c, str) else c[0]["content"] for c in call["completions"]]
        lengths = [len(t) / 10 for t in texts]
        digit = [sum(ch.isdigit() for ch in t) / len(t) for t in texts if t]
        assert row["rewards/tests/rl/my_rewards.py:record"] == pytest.approx(sum(lengths) / 8)
        assert row["rewards/tests/rl/my_rewards.py:digits"] == pytest.approx(sum(digit) / len(digit))
        # the row reward Σ wᵢ·fᵢ, a None (empty completion) counted as 0
        total = [2 * n + 0.5 * (sum(ch.isdigit() for ch in t) / len(t) if t else 0.0)
                 for n, t in zip(lengths, texts, strict=True)]
        assert row["reward"] == pytest.approx(sum(total) / 8)
        assert "accuracy" not in row
    summary = json.loads((out / "rl_summary.json").read_text())
    for when in ("eval_before", "eval_after"):
        ev = summary[when]
        assert ev["heldout_prompts"] == 1 and ev["samples"] == 3
        assert {"reward", "rewards/tests/rl/my_rewards.py:record", "rewards/tests/rl/my_rewards.py:digits"} <= set(ev)
    held = {json.dumps(p) for p in seen[0]["prompts"]}
    assert len(held) == 1 and held == {json.dumps(p) for p in seen[-1]["prompts"]}   # the same held-out prompt
    assert not held & {json.dumps(p) for call in seen[1:3] for p in call["prompts"]}  # never trained on


def _stderr_error(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def _step1_prompt(row: int) -> str:
    """The prompt of ``row`` (G = 2) of RL step 1 in the failure runs: the seeded order over the 9 prompts."""
    return prompt_of(LINES[step_positions(len(LINES), 4, 0, 1)[row // 2]])


@pytest.mark.parametrize("fn, expect", [
    ("raises", r"raised ZeroDivisionError: division by zero \(at my_rewards.py:\d+\) on row 2 of 8 \(prompt {p2}, "
               r"tests/rl/data/prompts.jsonl line \d+\)"),
    ("nan_at_5", r"returned nan for row 5 of 8 \(prompt {p5}, tests/rl/data/prompts.jsonl line \d+\)"),
    ("inf_at_2", r"returned inf for row 2 of 8 \(prompt {p2}, tests/rl/data/prompts.jsonl line \d+\)"),
    ("text_at_1", r"returned 'high' \(str\), not a number, for row 1 of 8 \(prompt {p1}, "),
    ("short", r"returned 7 values for 8 completions \(one per completion expected\)"),
], ids=["raises", "nan", "inf", "not-a-number", "wrong-length"])
def test_failing_reward_stops_before_the_update_and_the_checkpoint(dirs, tmp_path, fn, expect):
    """A reward function failing while grading step 1 stops the run with one error naming the function and the
    row: step 1 is not logged, the step-1 checkpoint (after step 0) is the last one and intact, no policy is
    saved, and ``--resume`` is offered."""
    import re

    out = tmp_path / "run"
    r = cli("rl", "--model", str(dirs / "base"), "--mtp", str(dirs / "head"), "--prompts", PROMPTS,
            "--reward", f"{REWARDS}:{fn}", "--steps", "3", "--prompts-per-step", "4", "--group-size", "2",
            "--max-new-tokens", "6", "--eval-samples", "0", "--checkpoint-every", "1", "--out", str(out))
    line = _stderr_error(r)
    subs = {f"p{i}": re.escape(repr(_step1_prompt(i))) for i in (1, 2, 5)}
    assert re.search(f"^error: RL step 1: reward 'tests/rl/my_rewards.py:{fn}' " + expect.format(**subs), line), line
    assert line.endswith(f"the run stopped, the last checkpoint (step 1) in {out / CHECKPOINT} is intact: continue "
                         f"with `bebop rl --resume {out}`")
    assert [row["step"] for row in read_log(out)] == [0]
    assert read_checkpoint(out / CHECKPOINT)["step"] == 1
    assert sorted(p.name for p in (out / CHECKPOINT).iterdir()) == ["state-00000001.safetensors", STATE_JSON]
    assert not (out / "policy").exists()


@pytest.mark.parametrize("args, message", [
    (["--reward", "tests/rl/nope.py:fn"], "cannot load reward 'tests/rl/nope.py:fn': no such file tests/rl/nope.py"),
    (["--reward", "no_such_module:fn"], "cannot load reward 'no_such_module:fn': no module named 'no_such_module'"),
    (["--reward", f"{REWARDS}:nope"], f"cannot load reward '{REWARDS}:nope': {REWARDS} has no function 'nope'"),
    (["--reward", f"{REWARDS}:NOT_CALLABLE"], f"reward '{REWARDS}:NOT_CALLABLE' is not callable (it is a int)"),
    (["--reward", f"{REWARDS}:old_form"], f"reward '{REWARDS}:old_form' does not take TRL's reward arguments "
                                          "f(prompts, completions, **kwargs)"),
    (["--reward", "digits"], "reward 'digits' is not 'module:function' or 'path/to/file.py:function'"),
    (["--reward", f"{REWARDS}:digits", "--reward", f"{REWARDS}:record", "--reward-weights", "1"],
     "--reward-weights has 1 weight for 2 reward functions (--reward); give one weight per --reward"),
    (["--reward", f"{REWARDS}:digits", "--reward-weights", "heavy"], "--reward-weights: 'heavy' is not a number"),
    (["--reward", f"{REWARDS}:digits", "--task", "arith"], "give one data source, got --task and --prompts"),
    ([], "--prompts needs a reward function: pass --reward module:function"),
], ids=["no-such-file", "no-such-module", "no-such-function", "not-callable", "old-signature", "not-module-function",
        "weight-count", "weight-not-number", "task-and-prompts", "prompts-without-reward"])
def test_bad_reward_input_is_one_error_and_writes_nothing(dirs, tmp_path, args, message):
    out = tmp_path / "run"
    r = cli("rl", "--model", str(dirs / "base"), "--mtp", str(dirs / "head"), "--prompts", PROMPTS, *args,
            "--steps", "1", "--out", str(out))
    assert _stderr_error(r).startswith(f"error: {message}")
    assert not out.exists()


def test_empty_prompts_file_is_one_error_and_writes_nothing(dirs, tmp_path):
    out = tmp_path / "run"
    r = cli("rl", "--model", str(dirs / "base"), "--mtp", str(dirs / "head"), "--prompts", "tests/rl/data/empty.jsonl",
            "--reward", f"{REWARDS}:digits", "--steps", "1", "--out", str(out))
    assert _stderr_error(r) == "error: no prompts in tests/rl/data/empty.jsonl"
    assert not out.exists()


# ---------------------------------------------------------------- the pieces

def test_step_prompts_are_a_seeded_permutation_per_epoch():
    """Each epoch visits every training prompt once, in an order that depends on the seed and the epoch only; a
    step's prompts are a function of (n, per step, seed, step), whatever ran before."""
    n, per = 9, 4
    stream = [i for step in range(9) for i in step_positions(n, per, 0, step)]     # 36 positions = 4 epochs
    epochs = [stream[e * n:(e + 1) * n] for e in range(4)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 4                                     # reshuffled every epoch
    assert step_positions(n, per, 0, 5) == stream[20:24]                            # no state: resumable
    assert step_positions(n, per, 1, 0) != step_positions(n, per, 0, 0)
    train, held = split_heldout(25, 256, seed=0)
    assert len(held) == 2 and sorted(train + held) == list(range(25))              # min(asked, n // 10)
    assert split_heldout(25, 256, seed=0) == (train, held) and split_heldout(25, 0, 0) == (list(range(25)), [])


def test_rewards_weighted_sum_and_none_rows():
    """Σ wᵢ·fᵢ per row; None (TRL's "not applicable") counts 0 in the sum and is left out of the function's mean;
    an async function is awaited."""
    from bebop.rl.rewards import reward_means

    rw = Rewards([f"{REWARDS}:digits", "rl_rewards:digit_fraction"], [2.0, -1.0])
    total, parts = rw.score(["p"] * 3, ["12ab", "", "9"], [[1], [], [2]], {}, [Row("p")] * 3)
    assert parts[f"{REWARDS}:digits"] == [0.5, None, 1.0]
    assert total == pytest.approx([2 * 0.5 - 0.5, 0.0, 2 * 1.0 - 1.0])
    assert reward_means(parts)[f"rewards/{REWARDS}:digits"] == pytest.approx(0.75)


def test_async_reward_is_awaited(tmp_path, monkeypatch):
    (tmp_path / "async_rewards.py").write_text(
        "async def score(prompts, completions, **kw):\n    return [float(len(c)) for c in completions]\n")
    total, _ = Rewards([f"{tmp_path}/async_rewards.py:score"]).score(["p", "p"], ["ab", "abc"], [[], []], {},
                                                                      [Row("p")] * 2)
    assert total == [2.0, 3.0]


def test_task_with_trl_rewards_gets_the_problem_fields(policy_dirs, tmp_path, _in_repo_root):
    """``--task`` with ``--reward``: the TRL-form function replaces the task's reward and gets the problem's
    prompt text and ``answer`` as a column."""
    from bebop.rl.rollout import step_seed
    from bebop.tasks import get_task, sample_problems

    cfg = user_config(policy_dirs, tmp_path, prompts=None, task="arith", reward=f"{REWARDS}:record")
    batch = RolloutWorker(cfg).rollout(0, 0)
    (call,) = calls(_in_repo_root)
    problems = sample_problems(get_task("arith"), 4, step_seed(0, 0))
    assert call["prompts"] == [p.prompt for p in problems for _ in range(2)]
    assert call["columns"]["answer"] == [p.answer for p in problems for _ in range(2)]
    assert batch.rewards == [len(c) / 10 for c in call["completions"]]


def test_dataset_columns_reach_the_rewards(policy_dirs, tmp_path, _in_repo_root):
    """``--dataset FILE --field question``: the chosen column is the prompt, every other column a keyword."""
    rows = [{"question": f"Q: {i}+1\n", "answer": str(i + 1), "source": "gen"} for i in range(5)]
    path = tmp_path / "ds.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = user_config(policy_dirs, tmp_path / "out", prompts=None, dataset=str(path), field="question",
                      reward=f"{REWARDS}:record")
    RolloutWorker(cfg).rollout(0, 0)
    (call,) = calls(_in_repo_root)
    by_q = {r["question"]: r for r in rows}
    assert set(call["columns"]) == {"answer", "source"}
    assert call["columns"]["answer"] == [by_q[p]["answer"] for p in call["prompts"]]


def test_resume_on_user_prompts_reproduces_the_uninterrupted_run(policy_dirs, tmp_path):
    """4 steps over 9 prompts (the epoch boundary falls inside step 2) in one go, and 2 + resume to 4: the same
    prompts, rewards, log and final weights bit for bit."""
    full = user_config(policy_dirs, tmp_path / "full")
    train_rl(full)
    part = replace(full, out=str(tmp_path / "part"), steps=2)
    train_rl(part)
    train_rl(replace(part, steps=4), resume=True)
    assert_same_run(tmp_path / "part", tmp_path / "full")
    assert all("rewards/tests/rl/my_rewards.py:digits" in r for r in read_log(tmp_path / "full"))


def test_config_bad_input():
    with pytest.raises(BebopError, match="give one data source, got --prompts and --dataset"):
        RLConfig(prompts=PROMPTS, dataset="x", reward=f"{REWARDS}:digits")
    with pytest.raises(BebopError, match="--reward-weights needs --reward"):
        RLConfig(reward_weights=[1.0])
    with pytest.raises(BebopError, match="--reward-weights: 'nan' is not finite"):
        RLConfig(reward=f"{REWARDS}:digits", reward_weights="nan")


# ---------------------------------------------------------------- Ray

@pytest.fixture(scope="module")
def ray_rewards(tmp_path_factory):
    """A local Ray whose workers import the test rewards and log into one directory (shared with the driver)."""
    log = tmp_path_factory.mktemp("ray_rewards")
    with local_ray(tmp_path_factory, BEBOP_TEST_REWARDS=str(log)):
        yield log


@pytest.mark.slow
def test_ray_workers_take_the_local_runs_prompts_and_report_reward_errors(ray_rewards, policy_dirs, tmp_path,
                                                                         monkeypatch):
    """Two Ray workers (the user's prompts shipped to them once) give the local run's rewards step by step; a
    reward failing inside a worker is the same one error as in-process, not a Ray traceback."""
    monkeypatch.setenv("BEBOP_TEST_REWARDS", str(ray_rewards))
    local = user_config(policy_dirs, tmp_path / "local", steps=2, rollout_threads=1,
                        reward=[f"{REWARDS}:digits", f"{REWARDS}:record"])
    train_rl(local)
    train_rl(replace(local, out=str(tmp_path / "ray2"), backend="ray", ray_workers=2))
    seen = calls(ray_rewards)               # 2 local calls, then 2 per step (one per worker, either order)
    assert len(seen) == 6
    for step in (0, 1):
        halves = sorted(json.dumps(c["prompts"]) for c in seen[2 + 2 * step : 4 + 2 * step])
        assert sorted(json.dumps(p) for p in seen[step]["prompts"]) == \
            sorted(json.dumps(p) for h in halves for p in json.loads(h))    # the same prompts, split in two
    (ray_rewards / "calls.jsonl").unlink()
    train_rl(replace(local, out=str(tmp_path / "ray1"), backend="ray"))
    for a, b in zip(read_log(tmp_path / "local"), read_log(tmp_path / "ray1"), strict=True):
        assert a["reward"] == b["reward"] and a["rewards/tests/rl/my_rewards.py:digits"] == \
            b["rewards/tests/rl/my_rewards.py:digits"] and a["rollout_tokens"] == b["rollout_tokens"]
    bad = replace(local, out=str(tmp_path / "bad"), backend="ray", reward=[f"{REWARDS}:nan_at_5"], steps=3)
    with pytest.raises(BebopError, match=r"^RL step 1: reward 'tests/rl/my_rewards.py:nan_at_5' returned nan for "
                                         r"row 5 of 8 \(prompt .*\); the run stopped, the last checkpoint \(step 1\)"):
        train_rl(bad)
