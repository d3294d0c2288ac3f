"""Tests of the search task: every reference is a complete, valid depth-first search, references vary, their
lengths fit the context, the tokenizer covers them, and the reward grades the final answer only."""

from __future__ import annotations

import random
import re
import statistics

import pytest

from bebop.models.tokenizer import SPLIT_PATTERN
from bebop.tasks import TASKS, SearchTask, completion_budget, get_task, sample_problems
from bebop.tasks import search as S
from bebop.tasks.countdown import _combine
from bebop.training.sft import SFTConfig, task_corpus

LINE = re.compile(r"( *)(\d+)([-+*/])(\d+)=(\d+)(?: \(([\d ]+)\))?")


def check_trace(numbers: tuple[int, ...], target: int, text: str) -> str:
    """Replay ``text`` as a depth-first search and fail on any deviation; returns the ``A:`` expression.

    Each line must be a canonical move on two numbers of the current node's pool, with the right value and the
    right child pool; a node's lines are distinct moves; the search only backtracks out of a node after trying all
    its moves; it stops exactly at the first step whose value is the target."""
    *lines, answer = text.split("\n")
    assert answer.startswith("A: ")
    pools = [list(numbers)]        # pool of the node at each depth on the current path
    tried: list[set] = [set()]     # moves tried at each depth on the current path
    for k, line in enumerate(lines):
        m = LINE.fullmatch(line)
        assert m, line
        depth = len(m[1])
        assert depth < len(pools), f"line {k} jumps deeper: {line!r}"
        while len(pools) > depth + 1:  # backtrack: the deeper node must be exhausted
            assert tried[-1] == _all_moves(pools[-1]), f"left a node before trying all its moves at line {k}"
            pools.pop()
            tried.pop()
        pool = pools[depth]
        a, op, b, value = int(m[2]), m[3], int(m[4]), int(m[5])
        x, y = max(a, b), min(a, b)
        assert (op, value) in _combine(x, y), line
        assert op in "+*" or (a, b) == (x, y), f"{op} keeps the larger operand first: {line!r}"
        rest = _in_order(pool, a, b)
        move = (tuple(sorted(rest)), op, value)
        assert move not in tried[depth], f"repeated move {line!r}"
        tried[depth].add(move)
        if value == target:
            assert k == len(lines) - 1, "the search went on after reaching the target"
            assert m[6] is None
            return answer[3:]
        child = [*rest, value]
        if len(child) == 1:
            assert m[6] is None
            continue
        assert m[6] is not None and [int(v) for v in m[6].split()] == child, line
        pools.append(child)
        tried.append(set())
    raise AssertionError("the trace ends without reaching the target")


def _in_order(pool: list[int], a: int, b: int) -> list[int]:
    """``pool`` without one ``a`` and one ``b``, in order."""
    rest = list(pool)
    rest.remove(a)
    rest.remove(b)
    return rest


def _all_moves(pool: list[int]) -> set:
    out = set()
    for i in range(len(pool)):
        for j in range(i + 1, len(pool)):
            x, y = max(pool[i], pool[j]), min(pool[i], pool[j])
            rest = tuple(sorted(v for k, v in enumerate(pool) if k not in (i, j)))
            out |= {(rest, op, value) for op, value in _combine(x, y)}
    return out


@pytest.fixture(scope="module")
def problems():
    return sample_problems(get_task("search"), 120, seed=3)


def test_registered_with_its_context() -> None:
    task = get_task("search")
    assert isinstance(task, SearchTask) and TASKS["search"] is task
    assert task.context == 4096 and task.completion_tokens + 32 <= task.context


def test_prompts_and_problem_knobs(problems) -> None:
    for p in problems:
        numbers, target = p.data["numbers"], p.data["target"]
        assert p.prompt == f"Q: {' '.join(map(str, numbers))} -> {target}\n"
        assert len(numbers) == S.NUMBERS and all(S.MIN_NUMBER <= n <= S.MAX_NUMBER for n in numbers)
        assert S.MIN_TARGET <= target <= S.MAX_TARGET and target not in numbers
        assert not S._one_step(numbers, target)


def test_references_are_complete_valid_searches_with_correct_answers(problems) -> None:
    task = get_task("search")
    rng = random.Random(0)
    for p in problems:
        text = task.reference_solution(p, rng)
        expression = check_trace(p.data["numbers"], p.data["target"], text)
        assert task.reward(p, text) == 1.0
        assert task.reward(p, f"A: {expression}") == 1.0       # the answer alone is graded, not the trace


def test_check_trace_catches_a_broken_search() -> None:
    """The replay is strict: dropping a dead end (an early backtrack) or a wrong value fails it."""
    task = get_task("search")
    p = next(p for p in sample_problems(task, 50, 1) if task.reference_solution(p, random.Random(0)).count("\n") > 8)
    text = task.reference_solution(p, random.Random(0))
    lines = text.split("\n")
    leaf = next(i for i, line in enumerate(lines[:-2]) if "(" not in line)
    with pytest.raises(AssertionError):
        check_trace(p.data["numbers"], p.data["target"], "\n".join(lines[:leaf] + lines[leaf + 1:]))
    m = LINE.fullmatch(lines[0])
    bad = lines[0].replace(f"={m[5]}", f"={int(m[5]) + 1}", 1)
    with pytest.raises(AssertionError):
        check_trace(p.data["numbers"], p.data["target"], "\n".join([bad, *lines[1:]]))


def test_references_branch_differently(problems) -> None:
    """The search order is drawn per trace: the same problem gets different traces (real entropy)."""
    task = get_task("search")
    distinct = [len({task.reference_solution(p, random.Random(s)) for s in range(4)}) for p in problems[:40]]
    assert statistics.mean(distinct) > 3.0
    assert task.reference_solution(problems[0], random.Random(9)) == task.reference_solution(problems[0],
                                                                                           random.Random(9))


def test_lengths_span_hundreds_to_thousands_of_tokens_and_fit_the_context() -> None:
    task = get_task("search")
    rng = random.Random(4)
    probs = sample_problems(task, 300, 11)
    lengths = sorted(S.count_tokens(task.reference_solution(p, rng)) for p in probs)
    assert lengths[-1] <= S.MAX_TRACE_TOKENS
    assert 400 <= statistics.median(lengths) <= 1600
    assert lengths[int(0.9 * len(lengths))] >= 1500
    assert lengths[int(0.1 * len(lengths))] >= 100
    longest_prompt = max(S.count_tokens(p.prompt) + 1 for p in probs)        # + BOS
    assert longest_prompt + S.MAX_TRACE_TOKENS + 1 <= task.completion_tokens + longest_prompt <= task.context


def test_tokenizer_covers_the_traces_without_new_tokens(tiny_tokenizer) -> None:
    """The task adds nothing to the shared vocabulary (left out of the corpus) yet every piece is known, and
    ``count_tokens`` is the tokenizer's own count."""
    assert S.SPLIT_PATTERN == SPLIT_PATTERN
    task = get_task("search")
    rng = random.Random(2)
    unk = tiny_tokenizer.unk_token_id
    for p in sample_problems(task, 30, 5):
        text = task.reference_solution(p, rng)
        ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert unk not in ids and len(ids) == S.count_tokens(text)
    corpus = task_corpus(n_per_task=5)
    assert not any(re.search(r"=\d+ \(", text) for text in corpus)
    in_corpus = [t for t in TASKS.values() if getattr(t, "in_tokenizer_corpus", True)]
    assert len(corpus) == 5 * len(in_corpus) + len(get_task("agent").extra_texts)


def test_reward_grades_only_the_final_expression() -> None:
    task = SearchTask()
    rng = random.Random(0)
    p, ref = next((p, r) for p in sample_problems(task, 50, 0)
                  if len(re.findall(r"\d+", (r := task.reference_solution(p, rng)).rsplit("A: ", 1)[1])) == 4)
    expression, numbers, target = ref.rsplit("A: ", 1)[1], p.data["numbers"], p.data["target"]
    assert task.reward(p, ref) == 1.0
    assert task.reward(p, ref.rsplit("\n", 1)[0]) == 0.0                     # no answer line
    assert task.reward(p, ref + f"\nA: {target}") == 0.0                      # literal not a given number
    a = numbers[0]
    assert task.reward(p, f"A: ({expression})*{a}/{a}") == 0.0                 # right value, a number used twice
    assert task.reward(p, f"A: {expression}+1") == 0.0                         # wrong value
    assert task.reward(p, f"A: {expression}\nA: 1") == 0.0                     # the last answer line counts
    long_ok = "1+1=2\n" * 2000 + ref.rsplit("\n", 1)[1]                     # 12k characters: still graded
    assert len(long_ok) > 4096 and task.reward(p, long_ok) == 1.0
    assert task.reward(p, "x" * (S.MAX_COMPLETION_CHARS + 1) + "\n" + ref) == 0.0
    for junk in ("", "A:", "A: 1/0", "A: (" * 300, "\x00", "A: __import__('os')"):
        assert task.reward(p, junk) == 0.0
    assert SearchTask(format_reward=0.1).reward(p, "A: 1") == 0.1


def test_unreachable_target_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="not reachable"):
        S.dfs_trace((1, 1, 1, 1), 97, random.Random(0))


def test_sft_widens_the_context_for_search_only() -> None:
    assert SFTConfig(task="search").model.max_positions == 4096
    assert SFTConfig(task="arith").model.max_positions == 256
    assert SFTConfig(task="agent").model.max_positions == 256
    assert completion_budget(get_task("search")) == S.COMPLETION_TOKENS
    assert completion_budget(get_task("arith")) == 96


def test_eval_and_rl_default_budgets_are_the_tasks() -> None:
    """`bebop eval` and `bebop rl` decode a long-trace (or multi-turn) task's completions whole by default; an
    explicit limit wins, and a user's prompts get 96."""
    from bebop.rl.config import RLConfig
    from bebop.training.options import EvalConfig

    for task, budget in (("search", S.COMPLETION_TOKENS), ("agent", 144), ("arith", 96), ("anagram", 96)):
        assert EvalConfig(task=task).max_new_tokens == budget
        assert RLConfig(task=task, mtp_strategy="none").max_new_tokens == budget
    assert EvalConfig(task="search", max_new_tokens=10).max_new_tokens == 10
    assert RLConfig(task="search", mtp_strategy="none", max_new_tokens=10).max_new_tokens == 10


def test_search_policy_context_holds_the_budget_and_refuses_more(tiny_tokenizer) -> None:
    """A policy built the way ``bebop sft --task search`` builds it holds a prompt plus the task's completion
    budget; a limit beyond its 4,096 positions is refused before any decoding."""
    from bebop.engine.forwards import check_context
    from bebop.errors import BebopError
    from bebop.models.policy import ModelConfig, build_policy

    tiny = ModelConfig(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)
    model = build_policy(SFTConfig(task="search", model=tiny).model, tiny_tokenizer)
    assert model.config.max_position_embeddings == 4096
    task = get_task("search")
    prompts = [tiny_tokenizer(p.prompt)["input_ids"] for p in sample_problems(task, 8, 0)]
    check_context(model, prompts, task.completion_tokens)
    with pytest.raises(BebopError, match="beyond the model's context of 4096"):
        check_context(model, prompts, 4096)
