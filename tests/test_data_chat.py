"""Conversations: the three row layouts, their checks, and assistant-only labels under a chat template."""

import json

import pytest

from moelora.finetune.base_models import byte_level_tokenizer
from moelora.finetune.data import IGNORE_INDEX, DataError, MalformedRowError
from moelora.finetune.data.chat import (
    CHATML_TEMPLATE,
    ConversationTooLongError,
    encode_conversation,
    parse_conversation,
    read_conversations,
    render,
)

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]


def labelled_text(tokenizer, encoded) -> str:
    return tokenizer.decode([t for t in encoded.labels if t != IGNORE_INDEX])


def test_the_three_layouts_give_the_same_messages():
    assert parse_conversation({"messages": CHAT}) == CHAT
    sharegpt = {"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                                   "value": m["content"]} for m in CHAT]}
    assert parse_conversation(sharegpt) == CHAT
    assert parse_conversation({"instruction": "Add", "input": "2 and 2", "output": "4"}) == [
        {"role": "user", "content": "Add\n\n2 and 2"}, {"role": "assistant", "content": "4"}]
    assert parse_conversation({"instruction": "Say hi", "output": "hi"})[0]["content"] == "Say hi"
    assert parse_conversation({"prompt": "2+2=", "completion": "4"})[1] == {"role": "assistant", "content": "4"}


@pytest.mark.parametrize("messages,message", [
    ([{"role": "user", "content": "Hi"}], "no assistant turn"),
    ([{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "x"}], "'assistant' where 'user' was due"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}], "empty or missing 'content'"),
    ([{"role": "robot", "content": "Hi"}], "role='robot'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
     "ends with a user turn"),
])
def test_bad_conversations_are_refused(messages, message):
    with pytest.raises(MalformedRowError, match=message):
        parse_conversation({"messages": messages})


def test_a_bad_row_names_the_file_and_line(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"messages": CHAT[:2]}) + "\n")
    with pytest.raises(MalformedRowError, match=r"chat.jsonl, line 2: the conversation has no assistant turn"):
        read_conversations(path)
    (tmp_path / "ok.json").write_text(json.dumps([{"messages": CHAT}, {"prompt": "a", "completion": "b"}]))
    assert len(read_conversations(tmp_path / "ok.json")) == 2


def test_labels_cover_the_assistant_turns_only():
    tokenizer = byte_level_tokenizer()
    all_turns = encode_conversation(tokenizer, CHAT, template=CHATML_TEMPLATE)
    assert labelled_text(tokenizer, all_turns) == "Hello!<|im_end|>\n4<|im_end|>\n"
    last = encode_conversation(tokenizer, CHAT, template=CHATML_TEMPLATE, train_on="last")
    assert labelled_text(tokenizer, last) == "4<|im_end|>\n"
    # the labelled tokens are exactly the input's tokens at those positions (transformers' convention)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(all_turns.input_ids, all_turns.labels))
    assert tokenizer.decode(all_turns.input_ids) == render(tokenizer, CHAT, template=CHATML_TEMPLATE)


def test_the_tokenizers_own_template_is_used_and_a_missing_one_is_an_error():
    tokenizer = byte_level_tokenizer()
    with pytest.raises(DataError, match="no chat template"):
        encode_conversation(tokenizer, CHAT)
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}" \
                              "{% if add_generation_prompt %}[assistant] {% endif %}"
    encoded = encode_conversation(tokenizer, CHAT)
    assert labelled_text(tokenizer, encoded) == "Hello!\n4\n"


def test_truncation_keeps_the_last_answer_and_refuses_when_it_cannot():
    tokenizer = byte_level_tokenizer()
    full = encode_conversation(tokenizer, CHAT, template=CHATML_TEMPLATE)
    cut = encode_conversation(tokenizer, CHAT, template=CHATML_TEMPLATE, max_length=40)
    assert len(cut.input_ids) == 40 and cut.truncated == len(full.input_ids) - 40
    assert cut.input_ids == full.input_ids[-40:] and labelled_text(tokenizer, cut).endswith("4<|im_end|>\n")
    with pytest.raises(ConversationTooLongError, match="max_length=3"):
        encode_conversation(tokenizer, CHAT, template=CHATML_TEMPLATE, max_length=3)


@pytest.mark.slow
def test_smollm2s_own_chat_template():
    from moelora.finetune.base_models import load_model_and_tokenizer

    _, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct")
    encoded = encode_conversation(tokenizer, CHAT)
    assert "Hello!" in labelled_text(tokenizer, encoded) and "Hi" not in labelled_text(tokenizer, encoded)
