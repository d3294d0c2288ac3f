"""Tests of the toy tasks: generators, reference solutions, rewards and the whitelist grammar."""

from __future__ import annotations

import random
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bebop.errors import BebopError
from bebop.tasks import TASKS, AgentTask, ArithTask, CodeTask, CountdownTask, Problem, get_task, sample_problems
from bebop.tasks.grammar import (
    MAX_COMPLETION_CHARS,
    evaluate,
    evaluate_with_literals,
    final_answer,
    parse_int,
)

TASK_NAMES = ["arith", "countdown"]
ALPHABET = re.compile(r"[0-9A-Za-z+\-*/()=:,. \n]*")
ADVERSARIAL = [
    "",
    "A:",
    "A: ",
    "\x00\xff\ud7ff\U0001f600",
    "A: \x00\xff",
    "A: 9999999999999999999999",
    "A: -9999999999999999999999",
    "A: 1/0",
    "A: 7/2",
    "A: " + "(" * 5000 + "1" + ")" * 5000,
    "A: " + "(" * 40 + "1" + ")" * 40,
    "A: " + "-" * 100 + "1",
    "A: __import__('os').system('true')",
    "A: 1e9",
    "A: 0x10",
    "A: 1_000",
    "A: ٣",
    "A: 99999*99999*99999",
    "A: " + "9" * 100_000,
    "x" * 100_000,
    "A: 28\n" * 20_000,
    "A: 28" + " " * 100_000,
    "B: 28",
    "A: 28.0",
]


@pytest.fixture(params=TASK_NAMES)
def task(request: pytest.FixtureRequest):
    return get_task(request.param)


# --- generators -------------------------------------------------------------------------------------


def test_registry() -> None:
    assert set(TASK_NAMES) <= set(TASKS)  # code and agent: tests/tasks/test_tasks_code_agent.py
    for name in TASK_NAMES:
        assert get_task(name).name == name


def test_unknown_task_names_the_value() -> None:
    with pytest.raises(BebopError, match="'nope'"):
        get_task("nope")


@pytest.mark.parametrize("cls", [ArithTask, CountdownTask, CodeTask, AgentTask])
@pytest.mark.parametrize("bad", [-0.1, 1.0, 2.0, float("nan")])
def test_bad_format_reward(cls: type, bad: float) -> None:
    with pytest.raises(BebopError, match="format_reward"):
        cls(format_reward=bad)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_deterministic_by_seed(name: str) -> None:
    task = get_task(name)
    a, b, c = (sample_problems(task, 50, seed) for seed in (7, 7, 8))
    assert a == b
    assert a != c
    refs = [[task.reference_solution(p, random.Random(3)) for p in a] for _ in range(2)]
    assert refs[0] == refs[1]


def test_prompt_formats() -> None:
    for p in sample_problems(get_task("arith"), 200, 0):
        assert re.fullmatch(r"Q: \d+[-+*]\d+[-+*]\d+\n", p.prompt)
        assert parse_int(p.answer) == evaluate(p.prompt[3:-1])
    for p in sample_problems(get_task("countdown"), 200, 0):
        m = re.fullmatch(r"Q: (\d+(?: \d+){2,3}) -> (\d+)\n", p.prompt)
        assert m
        numbers = tuple(map(int, m.group(1).split()))
        assert numbers == p.data["numbers"] and all(1 <= n <= 12 for n in numbers)
        assert 1 <= p.data["target"] <= 100 and p.data["target"] not in numbers
        assert int(m.group(2)) == p.data["target"]


# --- reference solutions ------------------------------------------------------------------------------


def test_reference_solutions_are_correct(task) -> None:
    rng = random.Random(1)
    for p in sample_problems(task, 500, 0):
        ref = task.reference_solution(p, rng)
        assert task.reward(p, ref) == 1.0, (p, ref)
        assert ALPHABET.fullmatch(ref), ref
        assert ref.split("\n")[-1].startswith("A: ")


def test_arith_reference_steps_are_true() -> None:
    task, rng = ArithTask(), random.Random(2)
    for p in sample_problems(task, 300, 1):
        lines = task.reference_solution(p, rng).split("\n")
        for line in lines[:-1]:
            lhs, rhs = line.removeprefix("so ").removeprefix("then ").split("=")
            assert evaluate(lhs) == parse_int(rhs.strip()), line
        assert lines[-1] == f"A: {p.answer}"
        assert len(re.findall(r"\d|[A-Za-z]+|\S", "\n".join(lines))) <= 40


def test_countdown_reference_steps_are_true() -> None:
    task, rng = CountdownTask(), random.Random(2)
    for p in sample_problems(task, 300, 1):
        lines = task.reference_solution(p, rng).split("\n")
        for line in lines[:-1]:
            lhs, rhs = line.removeprefix("so ").removeprefix("then ").split("=")
            assert evaluate(lhs) == int(rhs) > 0, line


def test_reference_solutions_are_varied(task) -> None:
    problems = sample_problems(task, 20, 5)
    rng = random.Random(0)
    distinct = [len({task.reference_solution(p, rng) for _ in range(200)}) for p in problems]
    assert sum(d >= 3 for d in distinct) >= 18, distinct


# --- rewards ------------------------------------------------------------------------------------------


def test_arith_reward() -> None:
    task = ArithTask()
    p = Problem("Q: 12+7*3-5\n", "28", {"operands": (12, 7, 3, 5), "ops": ("+", "*", "-")})
    assert task.reward(p, "7*3=21\n12+21=33\n33-5=28\nA: 28") == 1.0
    assert task.reward(p, "A: 28\n") == 1.0
    assert task.reward(p, "A: 5\nA: 28") == 1.0
    assert task.reward(p, "A: 28\nA: 5") == 0.0
    assert task.reward(p, "  A:  28 \r\n") == 1.0
    for wrong in ["A: 27", "A: -28", "A: 028", "A: +28", "A: 20+8", "A: 2 8", "28", "a: 28", "A 28"]:
        assert task.reward(p, wrong) == 0.0, wrong
    assert ArithTask(format_reward=0.1).reward(p, "A: 27") == 0.1
    assert ArithTask(format_reward=0.1).reward(p, "A: twenty") == 0.0
    neg = Problem("Q: 3-10-18\n", "-25", {})
    assert task.reward(neg, "A: -25") == 1.0


def test_countdown_reward() -> None:
    task = CountdownTask()
    p = Problem("Q: 3 5 7 -> 22\n", "(5*3)+7", {"numbers": (3, 5, 7), "target": 22})
    assert task.reward(p, "5*3=15\n15+7=22\nA: (5*3)+7") == 1.0
    assert task.reward(p, "A: 7+3*5") == 1.0  # an alternative form, not the reference string
    assert task.reward(p, "A: 5*5-3") == 0.0  # 5 used twice
    assert task.reward(p, "A: 3*5+7+3-3") == 0.0  # 3 used three times
    assert task.reward(p, "A: 2*11") == 0.0  # numbers not given
    assert task.reward(p, "A: 15+7") == 0.0
    assert task.reward(p, "A: 3*5+7*1") == 0.0
    assert task.reward(p, "A: 22") == 0.0
    assert task.reward(p, "A: 3*5+5") == 0.0  # wrong value
    assert CountdownTask(format_reward=0.1).reward(p, "A: 3*5+5") == 0.1
    q = Problem("Q: 2 3 4 6 -> 9\n", "", {"numbers": (2, 3, 4, 6), "target": 9})
    assert task.reward(q, "A: 6+3") == 1.0  # each number at most once: unused numbers are fine
    assert task.reward(q, "A: (6*3)/2") == 1.0
    assert task.reward(q, "A: 4/2*3+6-3") == 0.0  # 3 used twice


def test_countdown_alternative_solutions_accepted() -> None:
    task = CountdownTask()
    for p in sample_problems(task, 30, 4):
        refs = {task.reference_solution(p, random.Random(s)).split("\n")[-1] for s in range(50)}
        assert all(task.reward(p, r) == 1.0 for r in refs)


@pytest.mark.parametrize("completion", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_adversarial_completions(task, completion: str) -> None:
    for p in sample_problems(task, 3, 0):
        start = time.perf_counter()
        assert task.reward(p, completion) == 0.0
        assert time.perf_counter() - start < 0.5


@settings(max_examples=200, deadline=None)
@given(text=st.text(), prefix=st.sampled_from(["", "A: ", "A:", "7*3=21\nA: ("]))
def test_random_text_never_raises(text: str, prefix: str) -> None:
    completion = prefix + text
    for name in TASK_NAMES:
        task = get_task(name)
        p = sample_problems(task, 1, 0)[0]
        r = task.reward(p, completion)
        answer = final_answer(completion)
        if answer is None or evaluate(answer) is None:
            assert r == 0.0
        else:
            assert r in (0.0, 1.0)


# --- grammar ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1+2*3", 7),
        ("(1+2)*3", 9),
        ("10-4-3", 3),
        ("10-(4-3)", 9),
        ("24/4/2", 3),
        ("24/(4/2)", 12),
        ("8/4*3", 6),
        ("2*3+4*5", 26),
        ("-3+5", 2),
        ("5*-3", -15),
        ("5--3", 8),
        ("-(2+3)", -5),
        (" 12 + 7 * 3 - 5 ", 28),
        ("\t0", 0),
        ("999999", 999999),
        ("999999*1000", 999999000),
        ("(" * 32 + "1" + ")" * 32, 1),
    ],
)
def test_grammar_accepts(text: str, value: int) -> None:
    assert evaluate(text) == value


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "1+",
        "+1",
        "()",
        "(1",
        "1)",
        "1 2",
        "7/2",
        "1/0",
        "0/0",
        "1234567",
        "012",
        "1.5",
        "1e3",
        "2**3",
        "1//1",
        "x",
        "__import__('os')",
        "٣",
        "1\n+2",
        "999999*999999*999999",
        "(" * 33 + "1" + ")" * 33,
        "-" * 40 + "1",
        "1+" * 200 + "1",
    ],
)
def test_grammar_rejects(text: str) -> None:
    assert evaluate(text) is None


def test_grammar_literals() -> None:
    assert evaluate_with_literals("(5*3)+7") == (22, [5, 3, 7])
    assert evaluate_with_literals("-(10/2)") == (-5, [10, 2])


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789+-*/() \t", max_size=60) | st.text(max_size=60))
def test_grammar_never_raises(text: str) -> None:
    result = evaluate(text)
    assert result is None or (isinstance(result, int) and abs(result) <= 10**9)


@settings(max_examples=200, deadline=None)
@given(st.integers(-(10**6) + 1, 10**6 - 1), st.integers(-999, 999).filter(bool), st.integers(-999, 999))
def test_grammar_matches_python(a: int, b: int, c: int) -> None:
    def lit(x: int) -> str:
        return f"({x})" if x < 0 else str(x)

    assert evaluate(f"{lit(a)}+{lit(b)}*{lit(c)}") == a + b * c
    assert evaluate(f"({lit(a)}-{lit(c)})*{lit(b)}") == (a - c) * b
    assert evaluate(f"{lit(a * b)}/{lit(b)}") == (a if abs(a * b) < 10**6 else None)
    assert evaluate(f"{lit(a)}/{lit(b)}") == (a // b if a % b == 0 else None)


def test_parse_int_and_final_answer() -> None:
    assert parse_int("-25") == -25 and parse_int("0") == 0
    for bad in ["", "-", "+3", "03", "1_0", "٣", " 3", "12345678", "1.0"]:
        assert parse_int(bad) is None, bad
    assert final_answer("7*3=21\nA: 21") == "21"
    assert final_answer("A: 1\nfoo\n  A:  2 \r\nbar") == "2"
    assert final_answer("no answer") is None
    assert final_answer("A: 1" + " " * MAX_COMPLETION_CHARS) is None
