"""Agent: multi-turn tool use. The model looks prices up, multiplies with a calculator and answers.

Prompt: ``Q: agent: cost of 3 apple and 2 pear\\n`` (one or two items, quantities 1..9). Prices are per
problem (``Problem.data["prices"]``, 2..9 for every item in ``ITEMS``) and never shown in the prompt, so
the model has to call the lookup tool. A full transcript (the text after the prompt)::

    {"tool":"lookup","key":"apple"}          <- model, ends with the terminator "}"
    result: 4                                <- environment: "\\nresult: 4\\n"
    {"tool":"lookup","key":"pear"}
    result: 7
    {"tool":"calc","expr":"3*4+2*7"}
    result: 26
    A: 26                                    <- model, then EOS

Tool-call format: one line holding one flat JSON object with string values, ``{"tool": NAME, ...}``:
``{"tool":"calc","expr":E}`` evaluates ``E`` with the whitelist grammar of ``bebop.tasks.grammar`` (never
``eval``); ``{"tool":"lookup","key":K}`` returns the price of item ``K``. Whitespace inside the JSON is
allowed; keys may come in any order; other keys are an error. The environment answers every call with
``"\\nresult: <int>\\n"`` or ``"\\nerror: <reason>\\n"`` (a fixed set of reasons, see ``ERRORS``) — a
malformed call never raises. At most ``MAX_TURNS`` calls per episode.

Reward: 1.0 iff the last ``A:`` line of the whole transcript is the exact integer answer (as ``arith``),
else ``format_reward`` if it is an integer, else 0.0. Tools are not required by the reward.

Reference transcripts are varied: lookups in random order, one calculator call over both products
(``3*4+2*7``, operands and terms randomly commuted) or a calculator call after the first lookup whose
result the second call reuses (``12+2*7``); a single item with quantity 1 may skip the calculator.

Engine interface for multi-turn rollouts (implemented by ``bebop.engine.turns.generate_turns``, driven by
``bebop.training.multiturn.rollout_multi_turn`` for evaluation and by ``bebop.rl.rollout`` for RL):

1. Stop token: ``TERMINATOR`` (``"}"``) is a single token of the project tokenizer (punctuation is always
   split into single characters) and appears in model text only as the end of a tool call. Its id is
   ``tokenizer.convert_tokens_to_ids(TERMINATOR)``. Decode each row until EOS, the token budget, or the
   terminator.
2. When a row emits the terminator, decode the row's completion so far (model and environment tokens,
   without the prompt) to text and call ``step(problem, text)``. ``None`` ends the row (final answer
   given, no call pending, or more than ``MAX_TURNS`` calls). Otherwise tokenize the returned string with
   ``add_special_tokens=False``, append its tokens to the row as *prefilled* context (not sampled: no
   log-probs, masked out of RL losses and acceptance counts) and resume decoding the row.
3. ``step`` is pure and deterministic; rows pause and resume independently. The reward is
   ``task.reward(problem, text)`` on the full transcript. ``split_transcript`` recovers which characters
   were model-written and which came from the environment (for loss masks and prefill); segment
   boundaries fall on token boundaries, so tokenizing segments one by one gives the transcript's tokens.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

from bebop.tasks.arith import check_format_reward
from bebop.tasks.base import Problem
from bebop.tasks.grammar import evaluate, integer_answer_reward

ITEMS = ("apple", "pear", "plum", "lemon", "melon", "grape", "peach", "mango")
MIN_PRICE, MAX_PRICE = 2, 9
MAX_QUANTITY = 9
MAX_TURNS = 4
MAX_CALL_CHARS = 200
TERMINATOR = "}"
TOOLS = {"calc": "expr", "lookup": "key"}  # tool name -> its one argument
ERRORS = ("bad json", "unknown tool", "bad args", "bad expr", "unknown key", "too long")
_RESPONSE = re.compile(r"\n(?:result: -?\d+|error: [a-z ]+)\n")


@dataclass(frozen=True)
class ToolCall:
    """A well-formed call: the tool's name and its single string argument."""

    tool: str
    arg: str


@dataclass(frozen=True)
class ToolError:
    """Why a call could not be parsed or run; ``reason`` is one of ``ERRORS``."""

    reason: str


def call_text(tool: str, arg: str) -> str:
    """The canonical one-line JSON of a call, e.g. ``{"tool":"calc","expr":"3*4"}``."""
    return json.dumps({"tool": tool, TOOLS[tool]: arg}, separators=(",", ":"))


def parse_tool_call(text: str) -> ToolCall | ToolError:
    """Parse the last line of ``text`` as a tool call; malformed input gives a ``ToolError``, never raises."""
    if not isinstance(text, str):
        return ToolError("bad json")
    line = text.rsplit("\n", 1)[-1].strip(" \t\r")
    if len(line) > MAX_CALL_CHARS:
        return ToolError("too long")
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return ToolError("bad json")
    if not isinstance(obj, dict) or not isinstance(obj.get("tool"), str):
        return ToolError("bad json")
    if obj["tool"] not in TOOLS:
        return ToolError("unknown tool")
    key = TOOLS[obj["tool"]]
    if set(obj) != {"tool", key} or not isinstance(obj[key], str):
        return ToolError("bad args")
    return ToolCall(obj["tool"], obj[key])


def run_tool(call: ToolCall | ToolError, problem: Problem) -> str:
    """The environment's response text to a parsed call: ``"\\nresult: <int>\\n"`` or ``"\\nerror: ...\\n"``."""
    if isinstance(call, ToolError):
        return f"\nerror: {call.reason}\n"
    if call.tool == "calc":
        value = evaluate(call.arg)
        return f"\nresult: {value}\n" if value is not None else "\nerror: bad expr\n"
    price = problem.data.get("prices", {}).get(call.arg)
    return f"\nresult: {price}\n" if isinstance(price, int) else "\nerror: unknown key\n"


def step(problem: Problem, completion: str) -> str | None:
    """Environment step after the model's text ``completion`` (everything after the prompt so far).

    If ``completion`` ends with ``TERMINATOR`` and holds at most ``MAX_TURNS`` of them, the tool response
    to append (an error message for a malformed call); otherwise ``None``: the episode is over.
    """
    if not isinstance(completion, str) or not completion.endswith(TERMINATOR):
        return None
    if completion.count(TERMINATOR) > MAX_TURNS:
        return None
    return run_tool(parse_tool_call(completion), problem)


def split_transcript(completion: str) -> list[tuple[str, bool]]:
    """Split a transcript into ``(text, is_model)`` segments, in order; concatenated they give it back.

    Environment segments are the tool responses that directly follow a ``TERMINATOR``.
    """
    segments: list[tuple[str, bool]] = []
    start = pos = 0
    while (end := completion.find(TERMINATOR, pos)) != -1:
        pos = end + 1
        m = _RESPONSE.match(completion, pos)
        if m:
            segments.append((completion[start:pos], True))
            segments.append((m.group(), False))
            start = pos = m.end()
    if start < len(completion) or not segments:
        segments.append((completion[start:], True))
    return segments


class AgentTask:
    """Answer a shopping question by calling lookup and calc tools; reward 1.0 iff ``A:`` is exact."""

    name = "agent"
    extra_texts = tuple(f"\nerror: {reason}\n" for reason in ERRORS)  # for the tokenizer's vocabulary
    split_transcript = staticmethod(split_transcript)  # SFT masks the environment segments out of the loss
    step = staticmethod(step)  # the environment; pause decoding at ``terminator``
    terminator = TERMINATOR
    completion_tokens = 144  # token budget of a full transcript (references stay under ~115)

    def __init__(self, format_reward: float = 0.0) -> None:
        self.format_reward = check_format_reward(format_reward)

    def sample_problem(self, rng: random.Random) -> Problem:
        prices = {item: rng.randint(MIN_PRICE, MAX_PRICE) for item in ITEMS}
        items = rng.sample(ITEMS, rng.choice((1, 2)))
        order = tuple((rng.randint(1, MAX_QUANTITY), item) for item in items)
        answer = sum(q * prices[item] for q, item in order)
        spec = " and ".join(f"{q} {item}" for q, item in order)
        return Problem(
            prompt=f"Q: agent: cost of {spec}\n",
            answer=str(answer),
            data={"prices": prices, "order": order},
        )

    def reference_solution(self, problem: Problem, rng: random.Random) -> str:
        prices, order = problem.data["prices"], list(problem.data["order"])
        rng.shuffle(order)
        parts: list[str] = []

        def call(tool: str, arg: str) -> None:
            text = call_text(tool, arg)
            parts.append(text + run_tool(parse_tool_call(text), problem))

        def product(q: int, item: str) -> str:
            return f"{q}*{prices[item]}" if rng.random() < 0.5 else f"{prices[item]}*{q}"

        if len(order) == 1:
            (q, item), = order
            call("lookup", item)
            if q > 1 or rng.random() < 0.5:
                call("calc", product(q, item))
        elif rng.random() < 0.5:
            for _, item in order:
                call("lookup", item)
            call("calc", "+".join(product(q, item) for q, item in order))
        else:
            (q1, i1), (q2, i2) = order
            call("lookup", i1)
            call("calc", product(q1, i1))
            call("lookup", i2)
            first, second = str(q1 * prices[i1]), product(q2, i2)
            call("calc", f"{first}+{second}" if rng.random() < 0.5 else f"{second}+{first}")
        return "".join(parts) + f"A: {problem.answer}"

    def reward(self, problem: Problem, completion: str) -> float:
        return integer_answer_reward(completion, problem.answer, self.format_reward)
