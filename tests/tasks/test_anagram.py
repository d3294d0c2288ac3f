"""Tests of the anagram task: deterministic problems, references that are correct and uniform over the arrangements
(their entropy is the exact ln n!/Π c!), a reward that accepts any order and refuses everything else, and texts the
shared tokenizer covers without new tokens."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter

import pytest

from bebop.tasks import TASKS, AnagramTask, get_task, sample_problems
from bebop.tasks import anagram as A
from bebop.tasks.base import Problem
from bebop.tasks.search import count_tokens
from bebop.training.sft import task_corpus


def problem(digits: tuple[int, ...]) -> Problem:
    return Problem(prompt=f"Q: {' '.join(map(str, digits))}\n", answer="".join(map(str, digits)),
                   data={"digits": digits})


def test_registered_and_deterministic() -> None:
    task = get_task("anagram")
    assert isinstance(task, AnagramTask) and TASKS["anagram"] is task
    assert sample_problems(task, 50, 3) == sample_problems(task, 50, 3)
    assert sample_problems(task, 50, 3) != sample_problems(task, 50, 4)
    probs = sample_problems(task, 20, 0)
    refs = [[task.reference_solution(p, random.Random(7)) for p in probs] for _ in range(2)]
    assert refs[0] == refs[1]


def test_problems_respect_their_bounds() -> None:
    for p in sample_problems(get_task("anagram"), 500, 1):
        digits = p.data["digits"]
        assert A.MIN_LENGTH <= len(digits) <= A.MAX_LENGTH
        assert 2 <= len(set(digits)) <= A.MAX_KINDS and all(1 <= d <= 9 for d in digits)
        assert list(digits) == sorted(digits)
        assert p.prompt == f"Q: {' '.join(map(str, digits))}\n" and p.answer == "".join(map(str, digits))


def test_every_reference_earns_the_reward() -> None:
    task = get_task("anagram")
    rng = random.Random(5)
    for p in sample_problems(task, 300, 2):
        ref = task.reference_solution(p, rng)
        assert ref.startswith("A: ") and task.reward(p, ref) == 1.0
        assert task.reward(p, f"A: {p.answer}") == 1.0


@pytest.mark.parametrize("completion", [
    "", "A:", "A: ", "no answer line", "A: 1124", "A: 112477", "A: 11248", "A: 112479", "A: 1 1 2 4 7",
    "A: 11+247", "A: -11247", "A: 1124７", "A: " + "1" * 5000, None, 12,
])
def test_reward_refuses_garbage(completion) -> None:
    p = problem((1, 1, 2, 4, 7))
    assert get_task("anagram").reward(p, completion) == 0.0


def test_reward_reads_the_last_answer_line_and_format_reward() -> None:
    p = problem((1, 1, 2, 4, 7))
    task = get_task("anagram")
    assert task.reward(p, "A: 99\nA: 71412") == 1.0
    assert task.reward(p, "A: 71412\nA: 99") == 0.0
    assert AnagramTask(format_reward=0.1).reward(p, "A: 99") == 0.1
    assert AnagramTask(format_reward=0.1).reward(p, "A: x") == 0.0


def test_references_are_uniform_over_arrangements_with_the_exact_entropy() -> None:
    """(1, 1, 2, 3) has 4!/2! = 12 arrangements: 12,000 references hit each about 1,000 times, their plug-in entropy
    is ln 12, and the first digit follows ``next_digit_probs``."""
    p = problem((1, 1, 2, 3))
    assert A.arrangements(p.data["digits"]) == 12
    assert A.reference_entropy(p) == pytest.approx(math.log(12))
    rng = random.Random(0)
    counts = Counter(get_task("anagram").reference_solution(p, rng) for _ in range(12_000))
    assert len(counts) == 12 and all(800 < c < 1200 for c in counts.values())
    plug_in = -sum(c / 12_000 * math.log(c / 12_000) for c in counts.values())
    assert plug_in == pytest.approx(math.log(12), abs=0.01)
    first = Counter(ref[3] for ref in counts.elements())
    probs = A.next_digit_probs(p.data["digits"], "")
    assert probs == {1: 0.5, 2: 0.25, 3: 0.25}
    assert all(abs(first[str(d)] / 12_000 - q) < 0.02 for d, q in probs.items())


def test_next_digit_probs_follow_the_remaining_copies() -> None:
    assert A.next_digit_probs((1, 1, 2, 3), "12") == {1: 0.5, 3: 0.5}
    assert A.next_digit_probs((1, 1, 2, 3), "1213") == {}
    assert A.next_digit_probs((1, 1, 2, 3), "22") == {}
    # chain rule: over the (equally likely) arrangements, the per-digit entropies sum on average to the entropy of
    # the whole reference, which is what a policy that learned the references has per completion
    digits = (1, 1, 2, 2, 2, 5)
    orders = {"".join(map(str, o)) for o in itertools.permutations(digits)}
    assert len(orders) == A.arrangements(digits) == 60

    def path_entropy(order: str) -> float:
        return sum(-sum(q * math.log(q) for q in A.next_digit_probs(digits, order[:i]).values())
                   for i in range(len(order)))

    assert sum(map(path_entropy, orders)) / len(orders) == pytest.approx(math.log(60))


def test_reference_entropy_per_token_is_as_documented() -> None:
    """docs/tasks.md: the references carry about 0.59 nats per completion token (EOS counted), 14 tokens each."""
    task = get_task("anagram")
    probs = sample_problems(task, 2000, 0)
    rng = random.Random(0)
    tokens = [count_tokens(task.reference_solution(p, rng)) + 1 for p in probs]
    per_token = sum(A.reference_entropy(p) for p in probs) / sum(tokens)
    assert 0.57 <= per_token <= 0.61
    assert 13.5 <= sum(tokens) / len(tokens) <= 14.5
    assert max(tokens) + 1 <= A.COMPLETION_TOKENS


def test_tokenizer_covers_the_task_without_new_tokens(tiny_tokenizer) -> None:
    """Left out of the tokenizer's corpus (so every other task keeps its token ids), yet every piece is known."""
    task = get_task("anagram")
    assert task.in_tokenizer_corpus is False
    rng = random.Random(1)
    for p in sample_problems(task, 50, 6):
        for text in (p.prompt, task.reference_solution(p, rng)):
            ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tiny_tokenizer.unk_token_id not in ids and len(ids) == count_tokens(text)
    in_corpus = [t for t in TASKS.values() if getattr(t, "in_tokenizer_corpus", True)]
    assert len(task_corpus(n_per_task=5)) == 5 * len(in_corpus) + len(get_task("agent").extra_texts)
