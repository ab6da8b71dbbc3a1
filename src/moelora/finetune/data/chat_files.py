"""Your own conversations as a generative task: ``chat_file``, ``instruction_file``, ``completion_file``.

Rows (one per line in JSON Lines, or a JSON list; instruction and completion rows may also be CSV / TSV)::

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}  # chat_file
    {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}      # chat_file
    {"instruction": "...", "input": "...", "output": "..."}                                     # instruction_file
    {"prompt": "...", "completion": "..."}                                                       # completion_file

See ``chat.parse_conversation`` for what a valid conversation is; a bad row is an error naming its file
and line. A row may add ``"references": ["...", ...]``: more answers that count as right when the last
turn is generated (the last assistant turn always counts).

Files are found as for ``mc_file``: ``train_file`` (required), ``validation_file`` and ``test_file``
(optional; a missing one is carved out of train by hash), or ``data_dir`` holding ``train.*``,
``validation.*`` / ``dev.*`` and ``test.*``.

Options: ``system_prompt`` adds a system message to every conversation that has none; ``answer_pattern``
is a regular expression that reads the answer out of a generation (its first group, or the whole match)
before exact match and token F1 compare it with the references.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .chat import check_conversation, parse_conversation
from .errors import DataError, MalformedRowError
from .example import Example, TaskData
from .generic import _assemble, _resolve_files, read_rows
from .io import parse_rows
from .registry import register_task
from .splits import DEFAULT_SPLIT_SEED


def chat_example(messages: Sequence[dict[str, str]], references: Sequence[str] = (), uid: str = "") -> Example:
    """The ``Example`` of a generative task: the conversation, and the answers that count as right for
    its last turn (that turn's text first)."""
    messages = [dict(m) for m in messages]
    check_conversation(messages)
    answer = messages[-1]["content"]
    options = (answer, *[r for r in references if r != answer])
    text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)  # identity for hashed splits
    return Example(prompt="", options=options, label=0, text=text, uid=uid, messages=tuple(messages))


def check_answer_pattern(pattern: str | None) -> re.Pattern[str] | None:
    """The compiled ``answer_pattern`` (``None`` for none); an invalid one is a ``DataError``."""
    if pattern is None:
        return None
    if not isinstance(pattern, str) or not pattern:
        raise DataError(f"answer_pattern must be a non-empty regular expression, got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as err:
        raise DataError(f"answer_pattern {pattern!r} is not a valid regular expression: {err}") from None


# The row keys of each file task, and which task a row with other keys belongs to.
LAYOUTS: dict[str, tuple[str, ...]] = {
    "chat_file": ("messages", "conversations"),
    "instruction_file": ("instruction",),
    "completion_file": ("prompt",),
}


def conversation_parser(task: str = "chat_file", system_prompt: str | None = None
                        ) -> Callable[[dict[str, Any]], Example]:
    """Row parser of the file task ``task``: ``parse_conversation`` of rows in that task's layout, plus
    optional ``references`` and ``id``."""
    def parse(row: dict[str, Any]) -> Example:
        if not any(key in row for key in LAYOUTS[task]):
            other = next((t for t, keys in LAYOUTS.items() if any(k in row for k in keys)), None)
            hint = f"; this row is in {other}'s layout: set data.task={other}" if other else ""
            raise MalformedRowError(f"a {task} row needs {' or '.join(map(repr, LAYOUTS[task]))}; it has "
                                    f"{sorted(row)}{hint}")
        messages = parse_conversation(row)
        if system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}, *messages]
        references = row.get("references") or []
        if not isinstance(references, list) or not all(isinstance(r, str) and r.strip() for r in references):
            raise MalformedRowError(f"'references' must be a list of non-empty strings, got {references!r}")
        return chat_example(messages, references, uid=str(row.get("id", "")))
    return parse


def generative_task(name: str, train: list[Example], validation: list[Example] | None, test: list[Example] | None,
                    *, source: str, answer_pattern: str | None = None, split_seed: int = DEFAULT_SPLIT_SEED
                    ) -> TaskData:
    """A ``TaskData`` of kind ``"generative"`` (exact match headline) from its splits (missing ones carved)."""
    check_answer_pattern(answer_pattern)
    train, validation, test, notes = _assemble(train, validation, test, split_seed)
    return TaskData(
        name=name, kind="generative", train=train, validation=validation, test=test, metric="exact_match",
        num_labels=1, answer_format="none", description=source + (f"; {notes}" if notes else ""),
        answer_pattern=answer_pattern,
    )


def _load_conversation_files(
    name: str, data_dir: str | Path | None, train_file: str | Path | None, validation_file: str | Path | None,
    test_file: str | Path | None, system_prompt: str | None, answer_pattern: str | None, split_seed: int,
) -> TaskData:
    check_answer_pattern(answer_pattern)  # before reading any file
    train_path, val_path, test_path = _resolve_files(data_dir, train_file, validation_file, test_file, name)
    parse = conversation_parser(name, system_prompt)

    def load(path: Path | None) -> list[Example] | None:
        return None if path is None else parse_rows(path, read_rows(path), parse)

    train = parse_rows(train_path, read_rows(train_path), parse)
    return generative_task(name, train, load(val_path), load(test_path), source=f"conversations from {train_path}",
                           answer_pattern=answer_pattern, split_seed=split_seed)


@register_task("chat_file")
def load_chat_file(
    name: str = "chat_file", *, data_dir: str | Path | None = None, train_file: str | Path | None = None,
    validation_file: str | Path | None = None, test_file: str | Path | None = None,
    system_prompt: str | None = None, answer_pattern: str | None = None, split_seed: int = DEFAULT_SPLIT_SEED,
) -> TaskData:
    """Chat conversations (``messages`` or ShareGPT ``conversations`` rows) from your files."""
    return _load_conversation_files(name, data_dir, train_file, validation_file, test_file, system_prompt,
                                    answer_pattern, split_seed)


@register_task("instruction_file")
def load_instruction_file(
    name: str = "instruction_file", *, data_dir: str | Path | None = None, train_file: str | Path | None = None,
    validation_file: str | Path | None = None, test_file: str | Path | None = None,
    system_prompt: str | None = None, answer_pattern: str | None = None, split_seed: int = DEFAULT_SPLIT_SEED,
) -> TaskData:
    """Alpaca-style ``instruction`` / ``input`` / ``output`` rows from your files."""
    return _load_conversation_files(name, data_dir, train_file, validation_file, test_file, system_prompt,
                                    answer_pattern, split_seed)


@register_task("completion_file")
def load_completion_file(
    name: str = "completion_file", *, data_dir: str | Path | None = None, train_file: str | Path | None = None,
    validation_file: str | Path | None = None, test_file: str | Path | None = None,
    system_prompt: str | None = None, answer_pattern: str | None = None, split_seed: int = DEFAULT_SPLIT_SEED,
) -> TaskData:
    """``prompt`` / ``completion`` rows from your files (posed as one user turn and one assistant turn)."""
    return _load_conversation_files(name, data_dir, train_file, validation_file, test_file, system_prompt,
                                    answer_pattern, split_seed)
