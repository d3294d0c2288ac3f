"""Tests of the code task (and its interpreter) and the multi-turn agent task (tools, environment step)."""

from __future__ import annotations

import json
import random
import re
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bebop.tasks import TASKS, AgentTask, CodeTask, Problem, get_task, interp, sample_problems
from bebop.tasks.agent import (
    ERRORS,
    MAX_TURNS,
    TERMINATOR,
    ToolCall,
    ToolError,
    call_text,
    parse_tool_call,
    run_tool,
    split_transcript,
    step,
)
from bebop.tasks.code import program_value, split_program
from bebop.tasks.interp import evaluate_expression, run
from bebop.training.sft import completion_loss_mask, sft_batch

FAST = 0.5  # seconds: every rejected program must come back at least this fast
RESPONSE = re.compile(r"\n(?:result: -?\d+|error: (?:" + "|".join(ERRORS) + r"))\n")


@pytest.fixture(params=["code", "agent"])
def task(request: pytest.FixtureRequest):
    return get_task(request.param)


def code_problem(kind: str, a: int, b: int, n: int, answer: int) -> Problem:
    return Problem("Q: code: test\n", str(answer), {"kind": kind, "a": a, "b": b, "n": n})


def agent_problem() -> Problem:
    data = {"prices": {"apple": 4, "pear": 7}, "order": ((3, "apple"), (2, "pear"))}
    return Problem("Q: agent: cost of 3 apple and 2 pear\n", "26", data)


# --- both tasks -----------------------------------------------------------------------------------------


def test_registered() -> None:
    assert isinstance(TASKS["code"], CodeTask) and isinstance(TASKS["agent"], AgentTask)
    assert get_task("code").name == "code" and get_task("agent").name == "agent"


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), name=st.sampled_from(["code", "agent"]))
def test_reference_solutions_get_full_reward(seed: int, name: str) -> None:
    task, rng = get_task(name), random.Random(seed)
    for p in sample_problems(task, 10, seed):
        ref = task.reference_solution(p, rng)
        assert task.reward(p, ref) == 1.0, (p, ref)
        assert ref.split("\n")[-1].startswith("A: ")


def test_reference_solutions_are_varied(task) -> None:
    problems = sample_problems(task, 20, 5)
    rng = random.Random(0)
    distinct = [len({task.reference_solution(p, rng) for _ in range(100)}) for p in problems]
    assert sum(d >= 2 for d in distinct) >= 16, distinct
    assert sum(distinct) >= 60, distinct


def test_texts_tokenize_short_and_without_unknowns(tiny_tokenizer, task) -> None:
    rng = random.Random(4)
    limit = {"code": 90, "agent": 160}[task.name]
    for p in sample_problems(task, 200, 2):
        text = p.prompt + task.reference_solution(p, rng)
        ids = tiny_tokenizer(text)["input_ids"]
        assert tiny_tokenizer.unk_token_id not in ids
        assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == text
        assert len(ids) <= limit, text
    for extra in getattr(task, "extra_texts", ()):
        assert tiny_tokenizer.unk_token_id not in tiny_tokenizer(extra, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("completion", ["", "A:", "A: ", "x" * 100_000, "A: 1\n" * 20_000, "\x00\ud7ff", "A: 1e9",
                                        "A: __import__('os').system('true')", "A: " + "9" * 10_000])
def test_garbage_gets_zero_quickly(task, completion: str) -> None:
    for p in sample_problems(task, 3, 0):
        start = time.perf_counter()
        assert task.reward(p, completion) == 0.0
        assert time.perf_counter() - start < FAST


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=300), prefix=st.sampled_from(["", "A: ", "x = 1\nrepeat 3:\n  x = x*", '{"tool":"']))
def test_rewards_never_raise(text: str, prefix: str) -> None:
    for name in ("code", "agent"):
        task = get_task(name)
        p = sample_problems(task, 1, 0)[0]
        assert task.reward(p, prefix + text) in (0.0, 1.0)


# --- interpreter -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "variables", "output"),
    [
        ("x = 5\nrepeat 4:\n  x = x+3\nprint x", {"x": 17}, (17,)),
        ("", {}, ()),
        ("\n\nx = 1\n\n", {"x": 1}, ()),
        ("a = 2\nb = a*(a+3)-4\nprint -b\nprint b*b", {"a": 2, "b": 6}, (-6, 36)),
        ("s = 0\ni = 0\nrepeat 5:\n    i = i+1\n    s = s+i\nprint s", {"s": 15, "i": 5}, (15,)),
        ("n = 0\nrepeat 3:\n  repeat 4:\n    n = n+1\n  n = n*1\nprint n", {"n": 12}, (12,)),
        ("x = 7\nrepeat 0:\n  x = 0\nprint x", {"x": 7}, (7,)),
        ("x = 3  \n  \nprint x--3", {"x": 3}, (6,)),
    ],
)
def test_interpreter_runs(source: str, variables: dict, output: tuple) -> None:
    result = run(source)
    assert result.ok, result.error
    assert (result.variables, result.output) == (variables, output)


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ("repeat 100:\n repeat 100:\n  repeat 100:\n   repeat 100:\n    x = 1", "step limit"),
        ("x = 0\nrepeat 100:\n repeat 100:\n  x = x+1", "step limit"),
        ("repeat 101:\n  x = 1", "loop count limit"),
        ("repeat 99999999:\n  x = 1", "bad integer literal"),
        ("x = 999999*999999", "value limit"),
        ("x = 2\nrepeat 40:\n  x = x*x", "value limit"),
        ("x = 1\nrepeat 100:\n  x = x*7", "value limit"),
        ("x = 1000*1000*1000\ny = -x-x", "value limit"),
        ("".join(" " * d + "repeat 2:\n" for d in range(5)) + " " * 5 + "x = 1", "nesting limit"),
        ("x = " + "(" * 17 + "1" + ")" * 17, "expression too deep"),
        ("x = " + "-" * 17 + "1", "expression too deep"),
        ("x = 1\n" * 65, "too many lines"),
        ("x = 1" + " " * 2000, "program too long"),
        ("x = " + "1+" * 60 + "1", "line too long"),
        ("print 1\n" * 17, "output limit"),
        ("\n".join(f"{c} = 1" for c in "abcdefghijklmnopq"), "too many variables"),
        ("x = y+1", "undefined variable"),
        ("x = 1\nprint X", "bad character"),
        ("import os", "bad statement"),
        ("__import__('os').system('true')", "bad character"),
        ("x = 1\tprint x", "bad character"),
        ("x = ٣", "bad character"),
        ("x = 2**3", "unexpected token"),
        ("x = 7/2", "bad character"),
        ("x = 1.5", "bad character"),
        ("x = 012", "bad integer literal"),
        ("x = (1", "incomplete expression"),
        ("x = 1)", "unexpected token"),
        ("x = (1 2)", "unbalanced parenthesis"),
        ("x =", "incomplete expression"),
        ("repeat 3:", "empty repeat body"),
        ("repeat 3:\nx = 1", "empty repeat body"),
        ("repeat x:\n  x = 1", "bad repeat"),
        ("repeat 3\n  x = 1", "bad repeat"),
        ("  x = 1", "unexpected indent"),
        ("repeat 2:\n    x = 1\n  x = 2", "unexpected indent"),
        ("repeat = 3", "bad repeat"),
        ("print = 3", "unexpected token"),
        ("x = print", "unexpected token"),
        ("abcdefghi = 1", "name too long"),
        ("x = 1 2", "unexpected token"),
        ("while 1:\n  x = 1", "bad statement"),
    ],
)
def test_interpreter_limits_and_errors(source: str, error: str) -> None:
    start = time.perf_counter()
    result = run(source)
    assert time.perf_counter() - start < FAST
    assert result.error == error
    assert not result.ok
    assert program_value(source + "\nA: 1") is None
    assert CodeTask(format_reward=0.1).reward(code_problem("add", 0, 1, 1, 1), source + "\nA: 1") == 0.0


def test_limits_are_exact() -> None:
    assert run("x = 1000*1000*1000\ny = -x").ok
    assert run("repeat 100:\n  x = 1").ok
    assert run("".join(" " * d + "repeat 1:\n" for d in range(4)) + " " * 4 + "x = 1").ok
    assert run("x = " + "(" * 16 + "1" + ")" * 16).ok
    assert run("print 1\n" * 16).ok
    assert run("x = 0\n" * 18 + "x = 0\nrepeat 99:\n  repeat 19:\n    x = x+1").steps == interp.MAX_STEPS
    assert run("x = 0\n" * 19 + "x = 0\nrepeat 99:\n  repeat 19:\n    x = x+1").error == "step limit"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="abxy0123456789+-*()=: \nrepeatprint", max_size=200) | st.text(max_size=200))
def test_interpreter_never_raises(source: str) -> None:
    result = run(source)
    assert result.error is None or isinstance(result.error, str)
    assert all(abs(v) <= interp.MAX_ABS for v in [*result.variables.values(), *result.output])
    assert result.steps <= interp.MAX_STEPS


@settings(max_examples=150, deadline=None)
@given(st.integers(-999, 999), st.integers(-999, 999), st.integers(0, 20), st.integers(-9, 9))
def test_interpreter_matches_python(a: int, b: int, n: int, c: int) -> None:
    source = f"x = {a}\ny = {b}\nrepeat {n}:\n  x = x+y*({c})\n  y = -y\nprint x-y"
    x, y = a, b
    for _ in range(n):
        x, y = x + y * c, -y
    assert run(source).output == (x - y,)
    assert evaluate_expression("x*y-(x+3)", {"x": a, "y": b}) == a * b - (a + 3)


# --- code task --------------------------------------------------------------------------------------------


def test_code_prompts() -> None:
    pattern = re.compile(r"Q: code: (start at \d+, then \d times (add|subtract|multiply by) \d|sum of \d to \d+)\n")
    for p in sample_problems(get_task("code"), 300, 0):
        assert pattern.fullmatch(p.prompt), p.prompt
        assert abs(int(p.answer)) <= 500


def test_code_reward() -> None:
    task = CodeTask()
    p = code_problem("add", 12, 7, 5, 47)
    assert task.reward(p, "x = 12\nrepeat 5:\n  x = x+7\nA: x") == 1.0
    assert task.reward(p, "s = 0\nrepeat 5:\n  s = s+7\nA: 12+s") == 1.0
    assert task.reward(p, "A: 12+7*5") == 1.0  # the value is graded, not the program's shape
    assert task.reward(p, "A: 47") == 1.0
    assert task.reward(p, "x = 12\nrepeat 5:\n  x = x+7\nA: x\n") == 1.0
    for wrong in [
        "x = 12\nrepeat 4:\n  x = x+7\nA: x",   # off by one loop
        "x = 12\nrepeat 5:\nx = x+7\nA: x",     # body not indented
        "x = 12\nrepeat 5:\n  x = x+7\nA: y",   # undefined variable
        "x = 12\nrepeat 5:\n  x = x+7",         # no answer line
        "x = 12\nrepeat 5:\n  x = x+7\nprint x",
        "x = 12\nrepeat 5:\n  x = x+7\nA: x\nA: 46",
        "x = 12\nA: 47\nrepeat 5:\n  x = x+7\nA: x",  # an earlier A: line is not code
        "A: 47/1",
        "A: ",
    ]:
        assert task.reward(p, wrong) == 0.0, wrong
    assert CodeTask(format_reward=0.1).reward(p, "x = 12\nrepeat 4:\n  x = x+7\nA: x") == 0.1
    assert CodeTask(format_reward=0.1).reward(p, "x = 12\nrepeat 4:\nA: x") == 0.0


def test_split_program() -> None:
    assert split_program("x = 1\n  A:  x+1 \r\nfoo") == ("x = 1", "x+1")
    assert split_program("no answer") is None
    assert program_value("x = 2\nrepeat 3:\n  x = x*x\nA: x-1") == 255


def test_code_references_run_clean() -> None:
    task, rng = CodeTask(), random.Random(9)
    for p in sample_problems(task, 300, 3):
        program, answer = split_program(task.reference_solution(p, rng))
        result = run(program)
        assert result.ok and result.steps <= 40
        assert evaluate_expression(answer, result.variables) == int(p.answer)


# --- agent task -------------------------------------------------------------------------------------------


def test_agent_prompts_and_prices() -> None:
    pattern = re.compile(r"Q: agent: cost of \d [a-z]+( and \d [a-z]+)?\n")
    for p in sample_problems(get_task("agent"), 300, 0):
        assert pattern.fullmatch(p.prompt), p.prompt
        assert int(p.answer) == sum(q * p.data["prices"][item] for q, item in p.data["order"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"tool":"calc","expr":"3*4+2*7"}', ToolCall("calc", "3*4+2*7")),
        ('{"tool": "lookup", "key": "apple"}', ToolCall("lookup", "apple")),
        ('{"key":"apple","tool":"lookup"}', ToolCall("lookup", "apple")),
        ('result: 4\n  {"tool":"lookup","key":"pear"}  ', ToolCall("lookup", "pear")),
        ('{"tool":"calc","expr":"3*4"', ToolError("bad json")),
        ('{"tool":"calc","expr":3*4}', ToolError("bad json")),
        ("{'tool':'calc','expr':'3*4'}", ToolError("bad json")),
        ('call {"tool":"calc","expr":"3*4"}', ToolError("bad json")),
        ('{"tool":"calc","expr":"3*4"}}', ToolError("bad json")),
        ('["tool","calc"]', ToolError("bad json")),
        ('{"expr":"3*4"}', ToolError("bad json")),
        ('{"tool":3}', ToolError("bad json")),
        ('{"tool":"python","code":"import os"}', ToolError("unknown tool")),
        ('{"tool":"Calc","expr":"3*4"}', ToolError("unknown tool")),
        ('{"tool":"calc"}', ToolError("bad args")),
        ('{"tool":"calc","key":"apple"}', ToolError("bad args")),
        ('{"tool":"calc","expr":"1","x":"2"}', ToolError("bad args")),
        ('{"tool":"calc","expr":12}', ToolError("bad args")),
        ('{"tool":"lookup","key":null}', ToolError("bad args")),
        ('{"tool":"lookup","key":["apple"]}', ToolError("bad args")),
        ("[" * 150 + "]" * 150, ToolError("too long")),
        ("[" * 99 + "]" * 99, ToolError("bad json")),
        ("", ToolError("bad json")),
        ("}", ToolError("bad json")),
    ],
)
def test_parse_tool_call(text: str, expected: ToolCall | ToolError) -> None:
    assert parse_tool_call(text) == expected


@pytest.mark.parametrize(
    ("call", "response"),
    [
        (ToolCall("calc", "3*4+2*7"), "\nresult: 26\n"),
        (ToolCall("calc", "2-9"), "\nresult: -7\n"),
        (ToolCall("calc", "1/0"), "\nerror: bad expr\n"),
        (ToolCall("calc", "__import__('os').system('true')"), "\nerror: bad expr\n"),
        (ToolCall("calc", "9" * 1000), "\nerror: bad expr\n"),
        (ToolCall("lookup", "pear"), "\nresult: 7\n"),
        (ToolCall("lookup", "banana"), "\nerror: unknown key\n"),
        (ToolCall("lookup", "__class__"), "\nerror: unknown key\n"),
        (ToolError("unknown tool"), "\nerror: unknown tool\n"),
    ],
)
def test_run_tool(call: ToolCall | ToolError, response: str) -> None:
    assert run_tool(call, agent_problem()) == response
    assert RESPONSE.fullmatch(response)


def test_step() -> None:
    p = agent_problem()
    call = call_text("lookup", "apple")
    assert call == '{"tool":"lookup","key":"apple"}'
    assert step(p, call) == "\nresult: 4\n"
    assert step(p, call + "\nresult: 4\n" + '{"tool":"lookup","key":"kiwi"}') == "\nerror: unknown key\n"
    assert step(p, '{"tool":"sh","cmd":"ls"}') == "\nerror: unknown tool\n"
    assert step(p, "garbage }") == "\nerror: bad json\n"
    assert step(p, call + "\nresult: 4\nA: 26") is None  # final answer: episode over
    assert step(p, "") is None
    assert step(p, "A: 26\n") is None
    turns = "".join(call + "\nresult: 4\n" for _ in range(MAX_TURNS - 1))
    assert step(p, turns + call) == "\nresult: 4\n"
    assert step(p, turns + call + "\nresult: 4\n" + call) is None  # turn budget spent


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=250), prefix=st.sampled_from(["", '{"tool":"calc","expr":"', '{"tool":"lookup","key":"']),
       end=st.sampled_from(["", "}", '"}']))
def test_tool_parser_and_step_never_raise(text: str, prefix: str, end: str) -> None:
    p = agent_problem()
    completion = prefix + text + end
    call = parse_tool_call(completion)
    assert isinstance(call, ToolCall | ToolError)
    if isinstance(call, ToolError):
        assert call.reason in ERRORS
    response = step(p, completion)
    assert response is None or RESPONSE.fullmatch(response)
    assert response is None or TERMINATOR not in response
    assert "".join(t for t, _ in split_transcript(completion)) == completion


def test_agent_reward() -> None:
    task, p = AgentTask(), agent_problem()
    transcript = (
        '{"tool":"lookup","key":"apple"}\nresult: 4\n{"tool":"lookup","key":"pear"}\nresult: 7\n'
        '{"tool":"calc","expr":"3*4+2*7"}\nresult: 26\nA: 26'
    )
    assert task.reward(p, transcript) == 1.0
    assert task.reward(p, "A: 26") == 1.0
    for wrong in [transcript[:-2] + "25", transcript[:-6], "A: 3*4+2*7", "A: 026", "result: 26"]:
        assert task.reward(p, wrong) == 0.0, wrong
    assert AgentTask(format_reward=0.1).reward(p, "A: 25") == 0.1


def replay(task: AgentTask, problem: Problem, reference: str) -> str:
    """Drive the environment with the reference's model segments, as a multi-turn engine would."""
    text = ""
    for segment, is_model in split_transcript(reference):
        if not is_model:
            continue
        text += segment
        response = step(problem, text)
        if response is not None:
            text += response
    assert step(problem, text) is None
    return text


def test_references_replay_through_the_environment() -> None:
    task, rng = AgentTask(), random.Random(5)
    for p in sample_problems(task, 300, 6):
        ref = task.reference_solution(p, rng)
        segments = split_transcript(ref)
        assert "".join(t for t, _ in segments) == ref
        assert [m for _, m in segments] == [True, False] * (len(segments) // 2) + [True]
        assert 2 <= len(segments) // 2 + 1 <= MAX_TURNS + 1
        assert all(RESPONSE.fullmatch(t) for t, m in segments if not m)
        assert replay(task, p, ref) == ref


def test_sft_masks_environment_tokens(tiny_tokenizer) -> None:
    task, rng = AgentTask(), random.Random(0)
    for p in sample_problems(task, 50, 1):
        ref = task.reference_solution(p, rng)
        mask = completion_loss_mask(task, tiny_tokenizer, ref)
        ids = tiny_tokenizer(ref, add_special_tokens=False)["input_ids"]
        assert len(mask) == len(ids)
        env = [tiny_tokenizer.convert_ids_to_tokens(i) for i, m in zip(ids, mask, strict=True) if not m]
        assert env.count("result") == ref.count("result") and "tool" not in env and TERMINATOR not in env
    batch = sft_batch(task, tiny_tokenizer, random.Random(1), 8)
    result_id = tiny_tokenizer.convert_tokens_to_ids("result")
    stop_id = tiny_tokenizer.convert_tokens_to_ids(TERMINATOR)
    assert (batch["input_ids"] == result_id).any() and not (batch["labels"] == result_id).any()
    assert ((batch["labels"] == stop_id) == (batch["input_ids"] == stop_id)).all()  # the terminator is trained
    assert ((batch["labels"] == tiny_tokenizer.eos_token_id).sum(1) == 1).all()
    code = sft_batch(get_task("code"), tiny_tokenizer, random.Random(1), 8)
    assert ((code["labels"] != -100) == (code["attention_mask"] == 1) & (code["labels"] == code["input_ids"])).all()


def test_terminator_is_one_token(tiny_tokenizer) -> None:
    stop_id = tiny_tokenizer.convert_tokens_to_ids(TERMINATOR)
    assert stop_id != tiny_tokenizer.unk_token_id
    assert tiny_tokenizer('{"tool":"calc","expr":"1"}', add_special_tokens=False)["input_ids"][-1] == stop_id
    assert json.loads(call_text("calc", "1")) == {"tool": "calc", "expr": "1"}


# --- multi-turn rollouts by re-prefilling ---------------------------------------------------------------------


class ScriptedRollout:
    """What ``engine.generate`` returns, for a scripted policy that writes the reference's model segments."""

    def __init__(self, rows: list[list[int]]) -> None:
        self.rows = rows
        self.entropy = torch.ones((len(rows), max(map(len, rows))))

    def completions(self) -> list[list[int]]:
        return self.rows


def test_multi_turn_driver_replays_references(tiny_tokenizer, monkeypatch) -> None:
    """A scripted policy emitting the references' model segments (then junk after EOS, as ``generate`` would
    when it only stops at the terminator) gets the references back as transcripts, with full reward."""
    from bebop.core.sampling import SamplingParams
    from bebop.training import multiturn

    task, rng = AgentTask(), random.Random(2)
    problems = sample_problems(task, 12, 3)
    refs = {p.prompt: task.reference_solution(p, rng) for p in problems}
    tok = tiny_tokenizer
    junk = tok("A: 1", add_special_tokens=False)["input_ids"]

    def scripted_generate(model, prompts, params, max_new_tokens, stop_id, pad_id, generator):
        assert stop_id == tok.convert_tokens_to_ids(TERMINATOR) and max_new_tokens >= 1
        rows = []
        for ids in prompts:
            text = tok.decode(ids, skip_special_tokens=True)
            prompt = next(p for p in refs if text.startswith(p))
            done = text[len(prompt):]
            rest = refs[prompt][len(done):]
            cut = rest.find(TERMINATOR)
            if cut == -1:
                row = tok(rest, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] + junk
            else:
                row = tok(rest[: cut + 1], add_special_tokens=False)["input_ids"]
            rows.append(row[:max_new_tokens])
        return ScriptedRollout(rows)

    monkeypatch.setattr(multiturn, "generate", scripted_generate)
    assert multiturn.is_multi_turn(task) and not multiturn.is_multi_turn(CodeTask())
    texts, ent, n = multiturn.rollout_multi_turn_reprefill(None, tok, task, problems, SamplingParams(), 200)
    assert texts == [refs[p.prompt] for p in problems]
    model_tokens = sum(sum(m for m in completion_loss_mask(task, tok, t)) + 1 for t in texts)  # + EOS
    assert n == model_tokens and ent == float(n)
    assert all(task.reward(p, t) == 1.0 for p, t in zip(problems, texts, strict=True))
    short, _, _ = multiturn.rollout_multi_turn_reprefill(None, tok, task, problems, SamplingParams(), 20)
    assert all(len(tok(t, add_special_tokens=False)["input_ids"]) <= 20 + 8 for t in short)


def test_multi_turn_rollouts_with_a_random_policy(tiny_model, tiny_tokenizer) -> None:
    from bebop.core.sampling import SamplingParams
    from bebop.training.multiturn import rollout_multi_turn

    task = AgentTask()
    problems = sample_problems(task, 4, 0)
    gen = torch.Generator().manual_seed(0)
    texts, ent, n = rollout_multi_turn(tiny_model, tiny_tokenizer, task, problems, SamplingParams(), 24, gen)
    assert len(texts) == 4 and 0 < n <= 4 * 24 and ent > 0
    for p, t in zip(problems, texts, strict=True):
        assert task.reward(p, t) in (0.0, 1.0)


def test_evaluate_runs_agent_multi_turn(tiny_model, tiny_tokenizer) -> None:
    from bebop.training.evaluate import evaluate

    res = evaluate(tiny_model, tiny_tokenizer, AgentTask(), samples=4, max_new_tokens=12, batch_size=4)
    assert res["task"] == "agent" and 0.0 <= res["accuracy"] <= 1.0 and res["mean_tokens"] > 0
