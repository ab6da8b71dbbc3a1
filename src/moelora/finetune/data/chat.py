"""Conversations: parsing chat, instruction and completion rows, and rendering them for training.

Rows in three public layouts become one list of messages ``[{"role", "content"}, ...]``:

- chat: ``{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}``, or ShareGPT's
  ``{"conversations": [{"from": "system" | "human" | "gpt", "value": ...}, ...]}``;
- instruction (Alpaca): ``{"instruction", "input" (optional), "output"}`` -> a user turn (the instruction,
  then a blank line and the input when there is one) and an assistant turn;
- completion: ``{"prompt", "completion"}`` -> a user turn and an assistant turn.

A conversation is an optional system message, then user and assistant turns alternating, starting with
the user and ending with the assistant; every content is a non-empty string (``parse_conversation``
raises ``MalformedRowError`` otherwise, which the file readers locate at file and line).

``encode_conversation`` renders a conversation with the tokenizer's own chat template (or the one chosen,
e.g. the documented fallback ``CHATML_TEMPLATE``, see ``resolve_chat_template``) and labels the tokens of the assistant turns only (every turn, or
only the last), so that the loss is on what the model should say. Truncation keeps the last assistant turn
whole and drops the oldest tokens of the context; a conversation whose last answer alone does not fit is
an error (``ConversationTooLongError``) that a loader may count and skip.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .collate import IGNORE_INDEX
from .errors import DataError, MalformedRowError
from .io import parse_rows, read_json_records, read_jsonl

ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

# The fallback template (ChatML, as SmolLM2 and many instruction models use) for tokenizers that have none.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TrainOn = Literal["all", "last"]


def resolve_chat_template(tokenizer: Any, chat_template: str | None = None) -> str:
    """The template a run renders with: ``chat_template`` when given (``"chatml"`` names the fallback
    ``CHATML_TEMPLATE``, a name ending in ``.jinja`` a template file; anything else is Jinja template
    text), else the tokenizer's own.

    Raises ``DataError`` when there is neither: a conversation is never rendered in an ad-hoc format.
    """
    if chat_template == "chatml":
        return CHATML_TEMPLATE
    if chat_template and chat_template.endswith(".jinja"):
        path = Path(chat_template).expanduser()
        if not path.is_file():
            raise DataError(f"data.chat_template: no template file {path}")
        return path.read_text(encoding="utf-8")
    if chat_template:
        if "{%" not in chat_template and "{{" not in chat_template:
            raise DataError(f"data.chat_template must be 'chatml', a .jinja file or a Jinja chat template, got "
                            f"{chat_template!r}")
        return chat_template
    own = getattr(tokenizer, "chat_template", None)
    if not own:
        raise DataError(
            "the tokenizer has no chat template: choose one with data.chat_template (a Jinja template, or "
            "'chatml' for the documented ChatML fallback)"
        )
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default") or next(iter(own.values()))
    return str(own)


def parse_conversation(row: dict[str, Any]) -> list[dict[str, str]]:
    """The messages of a chat, ShareGPT, instruction or completion row (see the module docstring)."""
    if "messages" in row:
        raw = row["messages"]
        if not isinstance(raw, list):
            raise MalformedRowError(f"'messages' must be a list of {{role, content}} objects, got {type(raw).__name__}")
        messages = [_message(m, i, "role", "content", {r: r for r in ROLES}) for i, m in enumerate(raw)]
    elif "conversations" in row:
        raw = row["conversations"]
        if not isinstance(raw, list):
            raise MalformedRowError(f"'conversations' must be a list of {{from, value}} objects, got {type(raw).__name__}")
        messages = [_message(m, i, "from", "value", _SHAREGPT_ROLES) for i, m in enumerate(raw)]
    elif "instruction" in row:
        instruction, extra = _text(row, "instruction"), row.get("input") or ""
        if not isinstance(extra, str):
            raise MalformedRowError(f"'input' must be a string, got {type(extra).__name__}")
        user = instruction + (f"\n\n{extra}" if extra.strip() else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row, "output")}]
    elif "prompt" in row and "completion" in row:
        messages = [{"role": "user", "content": _text(row, "prompt")},
                    {"role": "assistant", "content": _text(row, "completion")}]
    else:
        raise MalformedRowError(
            f"a conversation row needs 'messages', 'conversations', 'instruction' + 'output' or 'prompt' + "
            f"'completion'; this one has {sorted(row)}"
        )
    check_conversation(messages)
    return messages


def check_conversation(messages: list[dict[str, str]]) -> None:
    """An optional system message, then user / assistant alternating from the user, ending with the assistant."""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not any(m["role"] == "assistant" for m in turns):
        raise MalformedRowError("the conversation has no assistant turn: there is nothing to learn from it")
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            position = i + (len(messages) - len(turns))
            raise MalformedRowError(
                f"message {position} is from {message['role']!r} where {expected!r} was due: a conversation is an "
                f"optional system message, then user and assistant turns alternating, starting with the user"
            )
    if turns[-1]["role"] != "assistant":
        raise MalformedRowError("the conversation ends with a user turn: it must end with the assistant's answer")


def _message(item: Any, index: int, role_key: str, content_key: str, roles: dict[str, str]) -> dict[str, str]:
    if not isinstance(item, dict):
        raise MalformedRowError(f"message {index} must be an object, got {type(item).__name__}")
    role = item.get(role_key)
    if role not in roles:
        raise MalformedRowError(f"message {index} has {role_key}={role!r}; expected one of {sorted(roles)}")
    content = item.get(content_key)
    if not isinstance(content, str) or not content.strip():
        raise MalformedRowError(f"message {index} ({role}) has an empty or missing {content_key!r}")
    return {"role": roles[role], "content": content}


def _text(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise MalformedRowError(f"{key!r} must be a non-empty string, got {value!r}")
    return value


class ConversationTooLongError(DataError):
    """The last assistant turn (with what must precede it) does not fit in ``max_length`` tokens."""


@dataclass(frozen=True)
class EncodedConversation:
    """Token ids of a rendered conversation and their labels (``IGNORE_INDEX`` but on assistant tokens).

    ``labels[t]`` is the token at position ``t`` where the model should produce it (``transformers``'
    convention: the model shifts), so ``labels`` align with ``input_ids``.
    """

    input_ids: list[int]
    labels: list[int]
    truncated: int  # tokens dropped from the start of the context

    @property
    def n_targets(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def render(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool = False,
           template: str | None = None) -> str:
    """The conversation as text, through ``resolve_chat_template(tokenizer, template)``."""
    chosen = resolve_chat_template(tokenizer, template)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         chat_template=chosen)


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]], template: str | None = None
                    ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character span ``(start, end)`` of every assistant turn in it.

    A turn's span is what the template adds after the generation prompt that precedes it, up to and
    including its end-of-turn marker: what the model must produce. Templates that do not render a
    conversation's prefix as a prefix of the whole (rare) are refused.
    """
    text = render(tokenizer, messages, template=template)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True, template=template)
        through = render(tokenizer, messages[: i + 1], template=template)
        if not text.startswith(through) or not through.startswith(before):
            raise DataError("the chat template does not render a conversation's prefix as a prefix of it; the "
                            "assistant turns cannot be located: use another template (data.options.chat_template)")
        spans.append((len(before), len(through)))
    return text, spans


def encode_conversation(tokenizer: Any, messages: list[dict[str, str]], *, max_length: int | None = None,
                        train_on: TrainOn = "all", template: str | None = None) -> EncodedConversation:
    """Token ids and assistant-only labels of a conversation (see the module docstring).

    ``train_on="last"`` labels only the last assistant turn. A fast tokenizer is needed (its offsets map
    tokens to the characters of the rendered text).
    """
    if train_on not in ("all", "last"):
        raise DataError(f"train_on must be 'all' or 'last', got {train_on!r}")
    text, spans = assistant_spans(tokenizer, messages, template)
    if train_on == "last":
        spans = spans[-1:]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
    labels = [
        token if any(start <= begin and end <= stop for start, stop in spans) and end > begin else IGNORE_INDEX
        for token, (begin, end) in zip(ids, offsets)
    ]
    truncated = 0
    if max_length is not None and len(ids) > max_length:
        # Keep the end (the last answer); drop the oldest context. The last answer itself must fit.
        last_start = next(i for i, (begin, end) in enumerate(offsets) if end > spans[-1][0])
        if len(ids) - last_start + 1 > max_length:
            raise ConversationTooLongError(
                f"the conversation's last answer takes {len(ids) - last_start} tokens and needs at least one of "
                f"context, more than max_length={max_length}: raise data.max_length or shorten it"
            )
        truncated = len(ids) - max_length
        ids, labels = ids[truncated:], labels[truncated:]
    labels[0] = IGNORE_INDEX  # nothing predicts a sequence's first token (and, packed, it follows another one)
    return EncodedConversation(input_ids=ids, labels=labels, truncated=truncated)


def read_conversations(path: str | Path) -> list[list[dict[str, str]]]:
    """Every conversation of a JSON Lines (``.jsonl``) or JSON file, in any of the three layouts; a bad row
    is a ``MalformedRowError`` naming the file and line (or record)."""
    path = Path(path)
    jsonl = ".jsonl" in path.suffixes
    rows: Iterable[tuple[int | str, dict]] = read_jsonl(path) if jsonl else read_json_records(path)
    return parse_rows(path, rows, parse_conversation)


def end_of_turn(tokenizer: Any, template: str | None = None) -> tuple[list[int], str | None]:
    """``(stop token ids, marker text)`` of the template's end of an assistant turn (e.g. ``<|im_end|>``).

    Found by rendering a one-turn conversation: what the template writes after the answer's text. The
    marker is a stop token for generation when it is a single token of the tokenizer; either way a
    generated text is cut where the marker starts.
    """
    probe = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    text, spans = assistant_spans(tokenizer, probe, template)
    start, end = spans[-1]
    answer = text[start:end]
    marker = answer[answer.index("A") + 1 :].strip() if "A" in answer else ""
    if not marker:
        return [], None
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
    return (list(ids) if len(ids) == 1 else []), marker
