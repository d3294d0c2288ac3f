"""A user's prompts as token ids: JSONL (text, messages, TRL conversational), local `datasets` files, chat templates
(and the plain fallback), completions files, and a clear error for every bad input."""

from __future__ import annotations

import copy
import json

import pytest

from bebop.errors import BebopError
from bebop.training.options import DataSource
from bebop.training.prompts import PromptSet, load_prompts, read_dataset, read_jsonl, render, render_completion

# Only words and characters the toy tokenizer knows (so the hand-rendered ids hold no <unk>).
TEMPLATE = ("{% for m in messages %}{{ bos_token if loop.first else '' }}{{ 'Q' if m['role'] == 'user' else 'A' }}"
            ": {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}")
ADD = [{"role": "user", "content": "add 1 and 2"}]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network, and `datasets` keeps its Arrow copies in the test's directory."""
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


@pytest.fixture(scope="module")
def chat_tok(tiny_tokenizer):
    """The toy tokenizer with a small chat template (a copy: the session's tokenizer stays template-free)."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = TEMPLATE
    return tok


def by_hand(tok, pieces: list[str]) -> list[int]:
    """Token ids looked up piece by piece in the vocabulary (independent of the tokenizer's pipeline)."""
    ids = tok.convert_tokens_to_ids(pieces)
    assert tok.unk_token_id not in ids
    return ids


def write_jsonl(path, lines: list) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


# ------------------------------------------------------------------------------------------------------------ JSONL
def test_read_jsonl_both_shapes_and_trl_conversational(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "add 1 and 2"}, "", "   ", {"messages": ADD},
                                           {"prompt": ADD, "id": 7}])
    assert read_jsonl(f) == [{"prompt": "add 1 and 2"}, {"messages": ADD}, {"prompt": ADD, "id": 7}]


def test_render_plain_text_as_tasks_tokenise(chat_tok, tiny_tokenizer):
    # Plain text ignores the chat template; special tokens as the tokenizer adds them (the toy one: BOS first).
    for tok in (chat_tok, tiny_tokenizer):
        ids = render(tok, {"prompt": "add 1 and 2"})
        assert ids == tok("add 1 and 2")["input_ids"]
        assert ids == by_hand(tok, ["<s>", "add", " ", "1", " ", "and", " ", "2"])


def test_render_messages_with_chat_template_equals_hand_rendering(chat_tok):
    # "<s>Q: add 1 and 2\nA:" — the template writes BOS itself, so no second BOS is added.
    want = by_hand(chat_tok, ["<s>", "Q", ":", " ", "add", " ", "1", " ", "and", " ", "2", "\n", "A", ":"])
    assert render(chat_tok, {"messages": ADD}) == want
    assert render(chat_tok, {"prompt": ADD}) == want  # TRL conversational: a list-valued prompt is messages
    two = [*ADD, {"role": "assistant", "content": "3"}, {"role": "user", "content": "times 2"}]
    assert render(chat_tok, {"messages": two}) == by_hand(chat_tok, [
        "<s>", "Q", ":", " ", "add", " ", "1", " ", "and", " ", "2", "\n", "A", ":", " ", "3", "\n",
        "Q", ":", " ", "times", " ", "2", "\n", "A", ":"])


def test_render_messages_without_chat_template_uses_plain_fallback(tiny_tokenizer):
    assert not tiny_tokenizer.chat_template
    msgs = [{"role": "tool", "content": "add 1 and 2"}, {"role": "agent", "content": "3"}]
    ids = render(tiny_tokenizer, {"messages": msgs})
    assert ids == tiny_tokenizer("tool: add 1 and 2\nagent: 3\nassistant: ")["input_ids"]
    # "assistant" is not in the toy vocabulary: the rest is looked up by hand.
    assert ids[:-3] == by_hand(tiny_tokenizer, ["<s>", "tool", ":", " ", "add", " ", "1", " ", "and", " ", "2", "\n",
                                                "agent", ":", " ", "3", "\n"])
    assert ids[-3:] == [tiny_tokenizer.unk_token_id, *by_hand(tiny_tokenizer, [":", " "])]


def test_load_prompts_jsonl(chat_tok, tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "add 1 and 2"}, {"messages": ADD}, {"prompt": ADD}])
    ps = load_prompts(chat_tok, DataSource(prompts=f), max_prompt_len=64)
    assert isinstance(ps, PromptSet) and len(ps) == 3
    assert ps.ids == [render(chat_tok, {"prompt": "add 1 and 2"}), render(chat_tok, {"messages": ADD}),
                      render(chat_tok, {"messages": ADD})]
    assert ps.index == [0, 1, 2] and ps.skipped == 0 and ps.completions is None


def test_long_prompts_are_skipped_and_counted_and_all_long_is_an_error(tiny_tokenizer, tmp_path):
    long = "add " * 20  # 41 tokens with BOS
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": long}, {"prompt": "add 1"}, {"prompt": long}, {"prompt": "1"}])
    ps = load_prompts(tiny_tokenizer, DataSource(prompts=f), max_prompt_len=8)
    assert ps.index == [1, 3] and ps.skipped == 2
    assert ps.ids == [tiny_tokenizer("add 1")["input_ids"], tiny_tokenizer("1")["input_ids"]]
    with pytest.raises(BebopError, match=r"all 4 prompts in .*p\.jsonl are longer than max_prompt_len=1 tokens "
                                         r"\(the longest has 41\)"):
        load_prompts(tiny_tokenizer, DataSource(prompts=f), max_prompt_len=1)
    with pytest.raises(BebopError, match="max_prompt_len must be a positive integer, got 0"):
        load_prompts(tiny_tokenizer, DataSource(prompts=f), max_prompt_len=0)


@pytest.mark.parametrize(("lines", "message"), [
    (['{"prompt": "a"}', "", '{"prompt": "b"', '{"prompt": "c"}'], r"line 3 is not JSON \(Expecting"),
    (['{"prompt": "a"}', '["prompt", "b"]'], r"line 2 is a JSON list, not an object"),
    (['{"prompt": "a"}', "", "", '{"text": "b", "id": 1}'], r"line 4 has no 'prompt' or 'messages' field; "
                                                            r"its fields: text, id"),
    (['{"prompt": 3}'], r"line 1: 'prompt' must be text or a list of messages, got 3"),
    (['{"messages": "hi"}'], r"line 1: 'messages' must be a non-empty list of messages, got 'hi'"),
    (['{"messages": []}'], r"line 1: 'messages' must be a non-empty list of messages, got \[\]"),
    (['{"messages": [{"role": "user"}]}'], r"line 1: 'messages' message 0 must be an object with text 'role' and "
                                           r"'content', got \{'role': 'user'\}"),
    (['{"prompt": "a", "messages": []}'], r"line 1 has both 'prompt' and 'messages'"),
])
def test_bad_jsonl_lines_name_the_file_and_line(tiny_tokenizer, tmp_path, lines, message):
    f = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(BebopError, match=r"bad\.jsonl " + message):
        read_jsonl(f)
    with pytest.raises(BebopError, match=message):  # the same error through load_prompts
        load_prompts(tiny_tokenizer, DataSource(prompts=f), max_prompt_len=64)


def test_empty_or_missing_prompts_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(BebopError, match=r"no prompts in .*empty\.jsonl"):
        read_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(BebopError, match=r"no such file: .*nope\.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_chat_template_error_names_the_line(chat_tok, tmp_path):
    tok = copy.deepcopy(chat_tok)
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1"}, {"messages": ADD}])
    with pytest.raises(BebopError, match=r"p\.jsonl line 2: the tokenizer's chat template rejects these messages: "
                                         r".*roles must alternate"):
        load_prompts(tok, DataSource(prompts=f), max_prompt_len=64)


def test_one_data_source():
    with pytest.raises(BebopError, match="give one data source, got --task and --prompts"):
        load_prompts(None, DataSource(task="arith", prompts="p.jsonl"), max_prompt_len=8)
    with pytest.raises(BebopError, match="task 'arith' has no prompt file"):
        load_prompts(None, DataSource(task="arith"), max_prompt_len=8)


# ---------------------------------------------------------------------------------------------------------- datasets
def test_read_dataset_local_jsonl_with_field(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"question": "add 1 and 2", "answer": 3},
                                           {"question": "times 2", "answer": 4}])
    assert read_dataset(f, field="question", cache_dir=tmp_path / "c") == [{"prompt": "add 1 and 2"},
                                                                           {"prompt": "times 2"}]
    with pytest.raises(BebopError, match=r"dataset .*d\.jsonl split 'train' has no column 'q'; "
                                         r"its columns: question, answer"):
        read_dataset(f, field="q", cache_dir=tmp_path / "c")
    with pytest.raises(BebopError, match=r"has no 'prompt' or 'messages' column; pick one with --field; "
                                         r"its columns: question, answer"):
        read_dataset(f, cache_dir=tmp_path / "c")
    with pytest.raises(BebopError, match=r"dataset .*d\.jsonl has no split 'test'; its splits: train"):
        read_dataset(f, split="test", cache_dir=tmp_path / "c")


def test_read_dataset_parquet_messages_and_csv(tmp_path):
    import pandas as pd

    pq = tmp_path / "chat.parquet"
    pd.DataFrame({"messages": [ADD, [{"role": "user", "content": "times 2"}]], "n": [1, 2]}).to_parquet(pq)
    assert read_dataset(str(pq)) == [{"messages": ADD}, {"messages": [{"role": "user", "content": "times 2"}]}]
    csv = tmp_path / "p.csv"
    csv.write_text("id,prompt,text\n1,add 1 and 2,x\n2,times 2,y\n")
    assert read_dataset(str(csv)) == [{"prompt": "add 1 and 2"}, {"prompt": "times 2"}]
    assert read_dataset(str(csv), field="text") == [{"prompt": "x"}, {"prompt": "y"}]
    with pytest.raises(BebopError, match=r"row 0 \(column 'id'\): 'prompt' must be text or a list of messages, "
                                         r"got 1"):
        read_dataset(str(csv), field="id")


def test_read_dataset_directory_splits(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [{"prompt": "add 1"}, {"prompt": "add 2"}])
    write_jsonl(d / "test.jsonl", [{"prompt": "times 2"}])
    assert read_dataset(str(d), split="test") == [{"prompt": "times 2"}]
    assert len(read_dataset(str(d))) == 2
    with pytest.raises(BebopError, match=r"dataset .*data has no split 'validation'; its splits: (train, test|"
                                         r"test, train)"):
        read_dataset(str(d), split="validation")


def test_read_dataset_bad_inputs(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(BebopError, match=r"dataset .*empty\.jsonl is empty"):
        read_dataset(str(tmp_path / "empty.jsonl"))
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(BebopError, match=r"dataset .*blank\.jsonl.* is empty"):
        read_dataset(str(tmp_path / "blank.jsonl"))
    (tmp_path / "header.csv").write_text("prompt,x\n")
    with pytest.raises(BebopError, match=r"dataset .*header\.csv.* is empty"):
        read_dataset(str(tmp_path / "header.csv"))
    (tmp_path / "p.xml").write_text("<a/>")
    with pytest.raises(BebopError, match=r"dataset file .*p\.xml: unknown format; use one of .*\.jsonl"):
        read_dataset(str(tmp_path / "p.xml"))
    with pytest.raises(BebopError, match=r"cannot load dataset no-such-user/no-such-set"):
        read_dataset("no-such-user/no-such-set")


def test_load_prompts_dataset_with_chat_template(chat_tok, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"chat": ADD}, {"chat": ADD}])
    ps = load_prompts(chat_tok, DataSource(dataset=f, field="chat"), max_prompt_len=64)
    assert ps.ids == [render(chat_tok, {"messages": ADD})] * 2 and ps.skipped == 0


# ------------------------------------------------------------------------------------------------------- completions
def test_completions_text_and_exact_ids(chat_tok, tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [
        {"prompt": "add 1 and 2", "completion": " 3"},
        {"messages": ADD, "completion": " 3"},
        {"prompt_ids": [1, 2, 3], "completion_ids": [4, 5, 2]},
    ])
    ps = load_prompts(chat_tok, DataSource(completions=f), max_prompt_len=64)
    three = by_hand(chat_tok, [" ", "3"])
    assert ps.ids == [chat_tok("add 1 and 2")["input_ids"], render(chat_tok, {"messages": ADD}), [1, 2, 3]]
    assert ps.completions == [three, three, [4, 5, 2]]  # text as it is (no EOS added); ids exactly as given
    assert ps.index == [0, 1, 2]
    # Skipping by prompt length keeps prompts and completions aligned.
    ps = load_prompts(chat_tok, DataSource(completions=f), max_prompt_len=4)
    assert ps.index == [2] and ps.ids == [[1, 2, 3]] and ps.completions == [[4, 5, 2]] and ps.skipped == 2


def test_completions_conversational_split_at_the_generation_prompt(chat_tok, tiny_tokenizer, tmp_path):
    record = {"prompt": ADD, "completion": [{"role": "assistant", "content": "3"}]}
    prompt, completion = render_completion(chat_tok, record)
    assert prompt == render(chat_tok, {"messages": ADD})
    assert completion == by_hand(chat_tok, [" ", "3", "\n"])  # the template's end of turn is the completion's
    prompt, completion = render_completion(tiny_tokenizer, record)  # fallback: "...assistant: " then "3\n"
    assert completion == by_hand(tiny_tokenizer, ["3", "\n"])


@pytest.mark.parametrize(("line", "message"), [
    ({"prompt": "add"}, r"line 1 has no 'completion' field; its fields: prompt"),
    ({"completion": "3"}, r"line 1 has no 'prompt' or 'messages' field \(or 'prompt_ids' and 'completion_ids'\)"),
    ({"prompt_ids": [1, 2]}, r"line 1 has no 'completion_ids' field"),
    ({"prompt_ids": [1, "a"], "completion_ids": [2]}, r"line 1: 'prompt_ids' must be a list of non-negative token "
                                                      r"ids, got \[1, 'a'\]"),
    ({"prompt_ids": [1], "completion_ids": [-2]}, r"line 1: 'completion_ids' must be a list of non-negative"),
    ({"prompt": "add", "completion": 3}, r"line 1: 'completion' must be text or a list of messages, got 3"),
    ({"prompt_ids": [1], "completion_ids": [99999]}, r"line 1: token id 99999 is outside the tokenizer's "
                                                     r"vocabulary of {vocab}"),
    ({"prompt_ids": [], "completion_ids": [2]}, r"line 1: the prompt has no tokens"),
    ({"prompt": "add", "completion": [{"role": "assistant", "content": "3"}]},
     r"line 1: a message-list 'completion' needs a message-list prompt"),
])
def test_bad_completions_lines(tiny_tokenizer, tmp_path, line, message):
    f = write_jsonl(tmp_path / "c.jsonl", [line])
    with pytest.raises(BebopError, match=r"c\.jsonl " + message.replace("{vocab}", str(len(tiny_tokenizer)))):
        load_prompts(tiny_tokenizer, DataSource(completions=f), max_prompt_len=64)
