"""Verifiable toy tasks for RL of tiny language models, looked up by name."""

from __future__ import annotations

from bebop.errors import BebopError
from bebop.tasks.agent import AgentTask
from bebop.tasks.anagram import AnagramTask
from bebop.tasks.arith import ArithTask
from bebop.tasks.base import Problem, Task, completion_budget, sample_problems
from bebop.tasks.code import CodeTask
from bebop.tasks.countdown import CountdownTask
from bebop.tasks.search import SearchTask

__all__ = [
    "TASKS", "AgentTask", "AnagramTask", "ArithTask", "CodeTask", "CountdownTask", "Problem", "SearchTask", "Task",
    "completion_budget", "get_task", "sample_problems",
]

TASKS: dict[str, Task] = {
    "arith": ArithTask(),
    "countdown": CountdownTask(),
    "code": CodeTask(),
    "agent": AgentTask(),
    "search": SearchTask(),  # long completions: a written depth-first search (context 4,096)
    "anagram": AnagramTask(),  # short completions whose entropy is the references' own: digits in any order
}


def get_task(name: str) -> Task:
    """The registered task called ``name``; a ``BebopError`` naming it if there is none."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise BebopError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}") from None
