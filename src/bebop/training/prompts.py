"""A user's prompts (and, optionally, their existing completions) as token ids, for training and measuring a
head on the data the policy will really see (DESIGN §4: the head learns the policy's distribution on *its*
prompts).

Three inputs, one per :class:`~bebop.training.options.DataSource` kind:

- ``--prompts FILE.jsonl``: one JSON object per line, ``{"prompt": "text"}``, ``{"messages": [{"role": …,
  "content": …}, …]}`` or TRL's conversational ``{"prompt": [messages]}`` (a list-valued prompt is messages);
- ``--dataset NAME_OR_PATH [--split] [--field]``: a ``datasets`` dataset, a local json/jsonl/csv/parquet/text/arrow
  file or directory or a cached or hub name; the column holds text or a list of messages;
- ``--completions FILE.jsonl``: existing rollouts, ``{"prompt"|"messages": …, "completion": …}`` (re-tokenised)
  or ``{"prompt_ids": […], "completion_ids": […]}`` (exact tokens, used as they are).

Text is tokenised as Bebop's tasks tokenise prompts; messages go through the tokenizer's chat template
(:func:`render`). Every bad input is a :class:`~bebop.errors.BebopError` naming the file and 1-based line, or
the dataset row."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bebop.errors import BebopError
from bebop.training.options import DataSource

PROMPT_FIELDS = ("prompt", "messages")
ID_FIELDS = ("prompt_ids", "completion_ids")
# A local file's `datasets` builder, by extension (after any compression suffix).
DATASET_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text",
                    ".arrow": "arrow"}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip")


# ---------------------------------------------------------------------------------------------------------- JSONL
def _jsonl_rows(path: str | Path, need: Sequence[str] = PROMPT_FIELDS, *,
                completions: bool = False) -> list[tuple[str, dict]]:
    """``(where, record)`` for each non-blank line of ``path``, ``where`` naming the file and 1-based line."""
    path = Path(path)
    if not path.is_file():
        raise BebopError(f"no such file: {path}")
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise BebopError(f"{where} is not JSON ({e.msg.removesuffix(' at')}, column {e.colno})") from None
            if not isinstance(record, dict):
                raise BebopError(f"{where} is a JSON {type(record).__name__}, not an object")
            _check_record(record, where, need, completions=completions)
            rows.append((where, record))
    if not rows:
        raise BebopError(f"no prompts in {path}")
    return rows


def read_jsonl(path: str | Path, need: Sequence[str] = PROMPT_FIELDS, *, completions: bool = False) -> list[dict]:
    """The JSON objects of a JSONL file, one per non-blank line, each checked to hold one of the ``need`` fields
    with a usable value (text or a list of messages). ``completions=True`` reads a completions file instead: each
    line holds ``completion`` next to its prompt, or ``prompt_ids`` and ``completion_ids``. A line that is not
    JSON, not an object or lacks the field is an error naming the file and its 1-based line; so is a file with
    no records."""
    return [record for _, record in _jsonl_rows(path, need, completions=completions)]


def _check_messages(messages: Any, where: str, name: str) -> None:
    """Raise unless ``messages`` is a non-empty list of ``{"role": str, "content": str}`` objects."""
    if not isinstance(messages, list) or not messages:
        raise BebopError(f"{where}: {name!r} must be a non-empty list of messages, got {_short(messages)}")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise BebopError(f"{where}: {name!r} message {i} must be an object with text 'role' and 'content', "
                             f"got {_short(m)}")


def _check_text_or_messages(record: dict, name: str, where: str) -> None:
    """Raise unless ``record[name]`` is messages (``messages``) or text or messages (``prompt``)."""
    value = record[name]
    if isinstance(value, list) or name == "messages":
        _check_messages(value, where, name)
    elif not isinstance(value, str):
        raise BebopError(f"{where}: {name!r} must be text or a list of messages, got {_short(value)}")


def _check_ids(record: dict, name: str, where: str) -> None:
    value = record[name]
    if not (isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                            for t in value)):
        raise BebopError(f"{where}: {name!r} must be a list of non-negative token ids, got {_short(value)}")


def _check_record(record: dict, where: str, need: Sequence[str] = PROMPT_FIELDS, *, completions: bool = False) -> None:
    """Raise unless ``record`` is a usable prompt record (or, with ``completions``, a completion record)."""
    if completions and any(k in record for k in ID_FIELDS):
        missing = [k for k in ID_FIELDS if k not in record]
        if missing:
            raise BebopError(f"{where} has no {missing[0]!r} field (exact-token lines hold both "
                             f"'prompt_ids' and 'completion_ids')")
        for k in ID_FIELDS:
            _check_ids(record, k, where)
        return
    present = [k for k in need if k in record]
    if not present:
        fields = " or ".join(repr(k) for k in need)
        extra = " (or 'prompt_ids' and 'completion_ids')" if completions else ""
        raise BebopError(f"{where} has no {fields} field{extra}; its fields: {', '.join(record) or 'none'}")
    if "prompt" in present and "messages" in present:
        raise BebopError(f"{where} has both 'prompt' and 'messages'; give one")
    _check_text_or_messages(record, present[0], where)
    if completions:
        if "completion" not in record:
            raise BebopError(f"{where} has no 'completion' field; its fields: {', '.join(record)}")
        completion = record["completion"]
        if isinstance(completion, list):
            _check_messages(completion, where, "completion")
        elif not isinstance(completion, str):
            raise BebopError(f"{where}: 'completion' must be text or a list of messages, got {_short(completion)}")


def _short(value: Any, n: int = 60) -> str:
    """``value`` as a short repr for an error message."""
    text = repr(value)
    return text if len(text) <= n else text[: n - 1] + "…"


# -------------------------------------------------------------------------------------------------------- datasets
def _load(name_or_path: str, split: str, cache_dir: str | Path | None):
    """``datasets.load_dataset`` for a local file (builder by extension), a local directory or a hub/cached name."""
    import datasets

    path = Path(name_or_path)
    kwargs: dict[str, Any] = {"split": split, "cache_dir": str(cache_dir) if cache_dir is not None else None}
    if path.is_file():
        if path.stat().st_size == 0:
            raise BebopError(f"dataset {name_or_path} is empty")
        suffixes = [s for s in path.suffixes if s not in COMPRESSION_SUFFIXES]
        builder = DATASET_BUILDERS.get(suffixes[-1].lower() if suffixes else "")
        if builder is None:
            raise BebopError(f"dataset file {name_or_path}: unknown format; use one of "
                             f"{', '.join(sorted(DATASET_BUILDERS))}")
        return datasets.load_dataset(builder, data_files=str(path), **kwargs)
    return datasets.load_dataset(str(path) if path.is_dir() else name_or_path, **kwargs)


def _open_dataset(name_or_path: str, split: str, field: str | None, cache_dir: str | Path | None):
    """``(dataset, prompt column, label)`` of :func:`read_dataset`'s arguments, with its checks."""
    label = f"dataset {name_or_path} split {split!r}"
    try:
        ds = _load(name_or_path, split, cache_dir)
    except BebopError:
        raise
    except StopIteration:  # what `datasets` raises for a local file with no rows
        raise BebopError(f"dataset {name_or_path} is empty") from None
    except ValueError as e:
        found = re.search(r"Unknown split \"?([^\".]*)\"?\. Should be one of \[(.*)\]", str(e))
        if found:
            splits = ", ".join(s.strip().strip("'\"") for s in found.group(2).split(","))
            raise BebopError(f"dataset {name_or_path} has no split {split!r}; its splits: {splits}") from None
        if "corresponds to no data" in str(e):  # `datasets`' words for a split with no rows
            raise BebopError(f"{label} is empty") from None
        raise BebopError(f"cannot load dataset {name_or_path}: {e}") from e
    except Exception as e:  # noqa: BLE001 - `datasets` raises many types (missing file, hub unreachable, bad data)
        raise BebopError(f"cannot load dataset {name_or_path}: {type(e).__name__}: {e}") from e
    columns = list(ds.column_names)
    if field is None:
        field = next((f for f in PROMPT_FIELDS if f in columns), None)
        if field is None:
            raise BebopError(f"{label} has no 'prompt' or 'messages' column; pick one with --field; its columns: "
                             f"{', '.join(columns)}")
    elif field not in columns:
        raise BebopError(f"{label} has no column {field!r}; its columns: {', '.join(columns)}")
    if len(ds) == 0:
        raise BebopError(f"{label} is empty")
    return ds, field, label


def read_dataset(name_or_path: str, split: str = "train", field: str | None = None, *,
                 cache_dir: str | Path | None = None) -> list[dict]:
    """The prompts of a ``datasets`` dataset as records ``{"prompt": text}`` or ``{"messages": [...]}``, one per
    row of ``split``. ``name_or_path`` is a local json/jsonl/csv/parquet/text/arrow file (builder chosen by its
    extension), a local directory (``datasets`` infers the format and the splits from the file names) or a hub
    name (the offline cache when ``HF_DATASETS_OFFLINE=1``). ``field`` picks the column, by default ``prompt``,
    else ``messages``; its values are text or lists of messages. A missing split lists the splits, a missing
    column lists the columns, and an empty dataset is an error naming it. ``cache_dir`` is where ``datasets``
    keeps its Arrow copy (its default cache when None)."""
    ds, field, label = _open_dataset(name_or_path, split, field, cache_dir)
    records = []
    for i, value in enumerate(ds[field]):
        record = {"messages": value} if isinstance(value, list) else {"prompt": value}
        _check_text_or_messages(record, next(iter(record)), f"{label} row {i} (column {field!r})")
        records.append(record)
    return records


def dataset_columns(name_or_path: str, split: str = "train", field: str | None = None, *,
                    cache_dir: str | Path | None = None) -> tuple[str, str, dict[str, list]]:
    """``(label, prompt column, columns)`` of :func:`read_dataset`'s dataset: every column as a list with one value
    per row (``bebop rl`` hands the columns other than the prompt to its reward functions)."""
    ds, field, label = _open_dataset(name_or_path, split, field, cache_dir)
    return label, field, {c: list(ds[c]) for c in ds.column_names}


# ------------------------------------------------------------------------------------------------------- rendering
def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _plain_chat(messages: list[dict]) -> str:
    """The fallback rendering of messages for a tokenizer without a chat template."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def _chat_text(tokenizer, messages: list[dict], generation_prompt: bool = True) -> str:
    """``messages`` through the tokenizer's chat template as text (Jinja errors become a BebopError)."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except BebopError:
        raise
    except Exception as e:  # noqa: BLE001 - templates raise their own errors (e.g. roles must alternate)
        raise BebopError(f"the tokenizer's chat template rejects these messages: {type(e).__name__}: {e}") from e


def _messages(record: dict) -> list[dict] | None:
    """The record's messages (``messages`` or a list-valued ``prompt``), or None for a plain-text prompt."""
    if "messages" in record:
        return record["messages"]
    return record["prompt"] if isinstance(record["prompt"], list) else None


def render(tokenizer, record: dict) -> list[int]:
    """A prompt record's token ids, as the policy sees the prompt before it generates.

    - Plain text (``{"prompt": "text"}``): ``tokenizer(text)["input_ids"]``, special tokens added as the tokenizer
      adds them (as Bebop's tasks tokenise their prompts).
    - Messages (``{"messages": [...]}`` or TRL's ``{"prompt": [...]}``): the tokenizer's chat template with the
      generation prompt (``apply_chat_template(..., tokenize=False, add_generation_prompt=True)``), then
      ``tokenizer(text, add_special_tokens=False)``, since the template writes its own special tokens.
    - Messages with a tokenizer that has no chat template: a plain fallback, one ``"role: content\\n"`` line per
      message followed by ``"assistant: "``, tokenised as plain text (special tokens added), so base models
      without a template still get a readable conversation."""
    messages = _messages(record)
    if messages is None:
        return list(tokenizer(record["prompt"])["input_ids"])
    if not _has_chat_template(tokenizer):
        return list(tokenizer(_plain_chat(messages))["input_ids"])
    return list(tokenizer(_chat_text(tokenizer, messages), add_special_tokens=False)["input_ids"])


def render_completion(tokenizer, record: dict) -> tuple[list[int], list[int]]:
    """``(prompt ids, completion ids)`` of a completions record.

    - ``prompt_ids`` / ``completion_ids``: the exact tokens, as given.
    - A text ``completion``: the prompt by :func:`render`, the completion tokenised as it is
      (``add_special_tokens=False``; nothing, not even EOS, is added: give exact ids when the rollouts' end tokens
      matter).
    - A message-list ``completion`` (TRL's conversational prompt-completion): the whole conversation through the
      chat template, split where the prompt's rendering (with its generation prompt) ends, so the completion
      holds the template's end-of-turn tokens as the policy generated them. Without a chat template the fallback
      of :func:`render` continues with ``"content\\n"`` per completion message (roles after the first written as
      ``"role: "``)."""
    if "prompt_ids" in record:
        return list(record["prompt_ids"]), list(record["completion_ids"])
    prompt = render(tokenizer, record)
    completion = record["completion"]
    if isinstance(completion, str):
        return prompt, list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    messages = _messages(record)
    if messages is None:
        raise BebopError("a message-list 'completion' needs a message-list prompt, got a text 'prompt'")
    if not _has_chat_template(tokenizer):
        first, *rest = completion
        text = f"{first['content']}\n" + "".join(f"{m['role']}: {m['content']}\n" for m in rest)
        return prompt, list(tokenizer(text, add_special_tokens=False)["input_ids"])
    head = _chat_text(tokenizer, messages)
    full = _chat_text(tokenizer, messages + completion, generation_prompt=False)
    if not full.startswith(head):
        raise BebopError("the chat template renders the prompt differently with and without its completion, so "
                         "the completion's tokens cannot be split off; give 'prompt_ids' and 'completion_ids'")
    return prompt, list(tokenizer(full[len(head):], add_special_tokens=False)["input_ids"])


# ------------------------------------------------------------------------------------------------------ prompt set
@dataclass
class PromptSet:
    """The prompts a run keeps, as token ids: ``ids[i]`` is input record ``index[i]`` (0-based position among the
    records of the file or dataset); ``skipped`` counts those longer than the length limit; ``completions[i]`` are
    the existing completion ids of ``ids[i]`` for a ``--completions`` source, else None."""

    ids: list[list[int]]
    index: list[int]
    skipped: int
    completions: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.ids)


def _source_rows(source: DataSource) -> tuple[str, list[tuple[str, dict]]]:
    """``(label, [(where, record), ...])`` of a prompts, dataset or completions source."""
    source.check()
    if source.kind == "prompts":
        return str(source.prompts), _jsonl_rows(source.prompts)
    if source.kind == "completions":
        return str(source.completions), _jsonl_rows(source.completions, completions=True)
    if source.kind == "dataset":
        label = f"dataset {source.dataset} split {source.split!r}"
        records = read_dataset(source.dataset, source.split, source.field)
        return label, [(f"{label} row {i}", r) for i, r in enumerate(records)]
    raise BebopError(f"task {source.label!r} has no prompt file; its prompts come from bebop.tasks")


def source_records(source: DataSource) -> tuple[str, list[tuple[str, dict]]]:
    """``(label, [(where, record), ...])``: the checked records of a ``--prompts``, ``--dataset`` or ``--completions``
    source in input order (``where`` names the file and 1-based line, or the dataset row), as :func:`load_prompts`
    reads them; a JSONL record keeps all its keys, a dataset record only its prompt (see :func:`dataset_columns`)."""
    return _source_rows(source)


def load_prompts(tokenizer, source: DataSource, max_prompt_len: int) -> PromptSet:
    """The prompts of a ``--prompts``, ``--dataset`` or ``--completions`` source as token ids (:func:`render`;
    completions by :func:`render_completion`), keeping those of at most ``max_prompt_len`` tokens: longer ones are
    skipped and counted in ``skipped`` (the caller reports the count), and an error when every prompt is too long
    says how many there are, the longest length and the limit. A prompt that renders to no tokens, and a token id
    outside the tokenizer's vocabulary, are errors naming the line or row."""
    if isinstance(max_prompt_len, bool) or not isinstance(max_prompt_len, int) or max_prompt_len < 1:
        raise BebopError(f"max_prompt_len must be a positive integer, got {max_prompt_len!r}")
    label, rows = _source_rows(source)
    with_completions = source.kind == "completions"
    vocab = len(tokenizer)
    ids, index, completions, longest = [], [], [], 0
    for i, (where, record) in enumerate(rows):
        try:
            if with_completions:
                prompt, completion = render_completion(tokenizer, record)
            else:
                prompt, completion = render(tokenizer, record), []
        except BebopError as e:
            raise BebopError(f"{where}: {e}") from e
        if not prompt:
            raise BebopError(f"{where}: the prompt has no tokens")
        bad = next((t for t in (*prompt, *completion) if t >= vocab), None)
        if bad is not None:
            raise BebopError(f"{where}: token id {bad} is outside the tokenizer's vocabulary of {vocab}")
        longest = max(longest, len(prompt))
        if len(prompt) > max_prompt_len:
            continue
        ids.append(prompt)
        index.append(i)
        completions.append(completion)
    if not ids:
        raise BebopError(f"all {len(rows)} prompts in {label} are longer than max_prompt_len={max_prompt_len} "
                         f"tokens (the longest has {longest})")
    return PromptSet(ids, index, len(rows) - len(ids), completions if with_completions else None)
