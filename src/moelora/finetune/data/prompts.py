"""Prompt formats.

The paper's multiple-choice format (``method.md`` section 7) is, for a causal LM::

    Context: <context>
    Question: <question>
    Options: (A) <option 1> (B) <option 2> (C) <option 3>
    Answer: The answer is B.

The prompt ends with ``"Answer:"`` (no trailing space) and each option continuation starts with a space,
``" The answer is X."``, so that the answer is a clean suffix: the prompt is identical for every option
and a byte-level BPE tokenizer (GPT-2 / Llama-3 / SmolLM2 style, where a word carries its leading space)
splits the boundary the same way whether prompt and answer are tokenized together or apart. The
``Context`` line is left out when an example has no context. Fields are whitespace-normalised (runs of
spaces and newlines become one space) so that every example has exactly this line layout.

The ``"text"`` (cloze) variant drops the ``Options`` line and scores the option's own words, e.g.
``" Find somewhere to go"``; it is the better zero-shot protocol for small models (which rarely map an
answer to its letter), the letter format is the paper's protocol.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from .errors import LabelOutOfRangeError, MalformedRowError
from .example import Example

LETTERS = string.ascii_uppercase
ANSWER_FORMATS = ("letter", "text")
ANSWER_CUE = "Answer:"


def normalize_space(text: str) -> str:
    """``text`` with every run of whitespace replaced by one space, stripped."""
    return " ".join(str(text).split())


def format_options(options: Sequence[str]) -> str:
    """``"(A) first (B) second ..."``."""
    if len(options) > len(LETTERS):
        raise MalformedRowError(f"at most {len(LETTERS)} options are supported, got {len(options)}")
    return " ".join(f"({LETTERS[i]}) {normalize_space(o)}" for i, o in enumerate(options))


def letter_answer(index: int) -> str:
    """The continuation naming option ``index``: ``" The answer is X."``."""
    return f" The answer is {LETTERS[index]}."


def mc_prompt(question: str, options: Sequence[str], context: str | None = None, answer_format: str = "letter") -> str:
    """The paper's prompt, ending in ``"Answer:"`` (see the module docstring)."""
    check_answer_format(answer_format)
    lines = []
    if context is not None and normalize_space(context):
        lines.append(f"Context: {normalize_space(context)}")
    lines.append(f"Question: {normalize_space(question)}")
    if answer_format == "letter":
        lines.append(f"Options: {format_options(options)}")
    lines.append(ANSWER_CUE)
    return "\n".join(lines)


def mc_continuations(options: Sequence[str], answer_format: str = "letter") -> tuple[str, ...]:
    """The option continuations: ``" The answer is X."`` (letter) or ``" " + option`` (text)."""
    check_answer_format(answer_format)
    if answer_format == "letter":
        if len(options) > len(LETTERS):
            raise MalformedRowError(f"at most {len(LETTERS)} options are supported, got {len(options)}")
        return tuple(letter_answer(i) for i in range(len(options)))
    return tuple(" " + normalize_space(o) for o in options)


def mc_example(
    question: str,
    options: Sequence[str],
    label: int,
    context: str | None = None,
    *,
    answer_format: str = "letter",
    uid: str = "",
) -> Example:
    """A multiple-choice ``Example`` in the paper's format.

    For an encoder, ``text`` is the question and ``text_pair`` the context.
    """
    options = [normalize_space(o) for o in options]
    if len(options) < 2:
        raise MalformedRowError(f"a multiple-choice row needs at least 2 options, got {len(options)}")
    if any(not o for o in options):
        raise MalformedRowError("an option is empty")
    if not normalize_space(question):
        raise MalformedRowError("the question is empty")
    return Example(
        prompt=mc_prompt(question, options, context, answer_format),
        options=mc_continuations(options, answer_format),
        label=label,
        text=normalize_space(question),
        text_pair=normalize_space(context) if context and normalize_space(context) else None,
        uid=uid,
    )


def check_answer_format(answer_format: str) -> None:
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")


def split_context_question(text: str) -> tuple[str | None, str]:
    """Split ``"<context> <question>"`` into ``(context, question)``; the question is the last sentence.

    Used for Social IQa in BIG-bench, whose ``input`` is the situation followed by the question.
    Returns ``(None, text)`` when there is a single sentence.
    """
    text = normalize_space(text)
    parts = _SENTENCE_END.split(text)
    if len(parts) < 2:
        return None, text
    return " ".join(parts[:-1]), parts[-1]


def label_index(value, names: Sequence[str], *, aliases: dict[str, int] | None = None) -> int:
    """The class index of a raw label: an index, a class name, or an alias (e.g. ``"true"``).

    Raises ``LabelOutOfRangeError`` when the label is none of them.
    """
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        index = value
    else:
        key = str(value).strip()
        lowered = {n.lower(): i for i, n in enumerate(names)}
        if aliases:
            lowered.update({k.lower(): v for k, v in aliases.items()})
        if key.lower() in lowered:
            index = lowered[key.lower()]
        elif re.fullmatch(r"-?\d+", key):
            index = int(key)
        else:
            raise LabelOutOfRangeError(f"label {value!r} is not one of {list(names)}")
    if not 0 <= index < len(names):
        raise LabelOutOfRangeError(f"label {value!r} is outside the {len(names)} classes {list(names)}")
    return index


def letter_index(value, num_options: int) -> int:
    """The option index of an answer key given as a letter (``"B"``), a 0-based int or a digit string."""
    if isinstance(value, bool):
        raise LabelOutOfRangeError(f"answer key {value!r} is not a letter or an index")
    if isinstance(value, int):
        index = value
    else:
        key = str(value).strip()
        if len(key) == 1 and key.upper() in LETTERS:
            index = LETTERS.index(key.upper())
        elif re.fullmatch(r"\d+", key):
            index = int(key)
        else:
            raise LabelOutOfRangeError(f"answer key {value!r} is not a letter or an index")
    if not 0 <= index < num_options:
        raise LabelOutOfRangeError(
            f"answer key {value!r} is outside the {num_options} options ({LETTERS[0]}..{LETTERS[num_options - 1]})"
        )
    return index
