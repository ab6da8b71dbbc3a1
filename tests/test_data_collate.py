"""Collation and the answer-token loss on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from fixtures.data.tiny_lm import tiny_llama, tiny_tokenizer
from moelora.finetune.data import IGNORE_INDEX, CausalLMCollator, EncoderCollator, Example
from moelora.finetune.loss import answer_logits_to_keep, answer_loss, answer_positions

EXAMPLES = [
    Example("Review: a warm and funny film.\nIs this review positive or negative? Answer:", (" positive", " negative"), 0, "x"),
    Example("Review: dull.\nIs this review positive or negative? Answer:", (" positive", " negative"), 1, "x"),
    Example("Question: Which one is a fruit?\nOptions: (A) apple (B) carrot\nAnswer:",
            (" The answer is A.", " The answer is B."), 0, "x"),
    Example("Question: How many legs does a cat have?\nOptions: (A) two (B) four (C) six\nAnswer:",
            (" The answer is A.", " The answer is B.", " The answer is C."), 1, "x"),
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(tok)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("side", ["left", "right"])
def test_labels_mark_exactly_the_answer_tokens(tok, side):
    batch = CausalLMCollator(tok, padding_side=side)(EXAMPLES)
    lengths = [len(ids(tok, e.prompt)) + len(ids(tok, e.answer)) for e in EXAMPLES]
    assert batch["input_ids"].shape == (4, max(lengths))  # dynamic padding to the longest
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, e in enumerate(EXAMPLES):
        real = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        assert real == ids(tok, e.prompt) + ids(tok, e.answer)
        labels = batch["labels"][row]
        answer = labels[labels != IGNORE_INDEX].tolist()
        assert answer == ids(tok, e.answer)
        positions = batch["position_ids"][row][batch["attention_mask"][row].bool()]
        assert positions.tolist() == list(range(lengths[row]))
    if side == "left":  # answers end in the last column
        assert (batch["labels"][:, -1] != IGNORE_INDEX).all()


def test_masking_does_not_use_the_pad_id(tok):
    """The pad token is also eos (<|im_end|>); an eos that ends the answer is still a label."""
    assert tok.pad_token_id == tok.eos_token_id
    batch = CausalLMCollator(tok, padding_side="right", append_eos=True)(EXAMPLES)
    for row, e in enumerate(EXAMPLES):
        labels = batch["labels"][row]
        assert labels[labels != IGNORE_INDEX].tolist() == ids(tok, e.answer) + [tok.eos_token_id]
    shortest = int(batch["attention_mask"].sum(1).argmin())
    padded = batch["attention_mask"][shortest] == 0
    assert (batch["input_ids"][shortest][padded] == tok.pad_token_id).all()
    assert (batch["labels"][shortest][padded] == IGNORE_INDEX).all()


def test_truncation_keeps_prefix_and_answer():
    tok = tiny_tokenizer(bos=True)
    collator = CausalLMCollator(tok, max_length=12)
    batch = collator(EXAMPLES[2:3])
    row = batch["input_ids"][0].tolist()
    answer = ids(tok, EXAMPLES[2].answer)
    assert len(row) == 12 and row[0] == tok.bos_token_id and row[-len(answer):] == answer
    assert row[1 : 12 - len(answer)] == ids(tok, EXAMPLES[2].prompt)[-(11 - len(answer)) :]
    assert collator.num_truncated == 1
    with pytest.raises(ValueError, match="does not fit"):
        CausalLMCollator(tok, max_length=4)(EXAMPLES[2:3])


def test_token_lengths(tok):
    collator = CausalLMCollator(tok)
    assert collator.token_lengths(EXAMPLES) == collator(EXAMPLES)["attention_mask"].sum(1).tolist()


def test_logits_to_keep_with_left_padding(tok):
    batch = CausalLMCollator(tok)(EXAMPLES)
    longest_answer = max(len(ids(tok, e.answer)) for e in EXAMPLES)
    assert answer_logits_to_keep(batch["labels"]) == longest_answer + 1
    rows, cols = answer_positions(batch["labels"])
    assert len(rows) == sum(len(ids(tok, e.answer)) for e in EXAMPLES)
    assert (batch["labels"][rows, cols + 1] != IGNORE_INDEX).all()


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("strategy", ["gather", "logits_to_keep", "auto"])
def test_answer_loss_equals_transformers_loss(tok, model, side, strategy):
    batch = CausalLMCollator(tok, padding_side=side)(EXAMPLES)
    model.zero_grad()
    reference = model(**batch).loss  # full (B, T, V) logits, transformers' shift-and-mean
    reference.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ours = answer_loss(model, batch, strategy=strategy)
    ours.backward()
    torch.testing.assert_close(ours, reference.float(), rtol=1e-5, atol=1e-6)
    for p, g in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    model.zero_grad()
    n_answer = int((batch["labels"] != IGNORE_INDEX).sum())
    total = answer_loss(model, batch, strategy=strategy, reduction="sum")
    torch.testing.assert_close(total / n_answer, reference.float().detach(), rtol=1e-5, atol=1e-6)


def test_answer_loss_with_a_bos_tokenizer_and_a_wrapper():
    """A BOS-adding tokenizer, and a DDP-like ``.module`` wrapper (which must go through forward)."""
    tok = tiny_tokenizer(bos=True)
    model = tiny_llama(tok, seed=1)
    batch = CausalLMCollator(tok)(EXAMPLES)
    assert (batch["input_ids"][batch["attention_mask"].bool()] == tok.bos_token_id).sum() == len(EXAMPLES)

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module
            self.calls = 0

        def forward(self, **kwargs):
            self.calls += 1
            return self.module(**kwargs)

    wrapped = Wrapper(model)
    with torch.no_grad():
        loss = answer_loss(wrapped, batch)
        reference = model(**batch).loss
    assert wrapped.calls == 1
    torch.testing.assert_close(loss, reference.float(), rtol=1e-5, atol=1e-6)


def test_answer_loss_rejects_batches_without_answers(tok, model):
    batch = CausalLMCollator(tok)(EXAMPLES[:1])
    batch["labels"][:] = IGNORE_INDEX
    for strategy in ("gather", "logits_to_keep"):
        with pytest.raises(ValueError, match="no answer tokens"):
            answer_loss(model, batch, strategy=strategy)


# --- encoder collation ----------------------------------------------------------------------------------

def tiny_wordpiece_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "warm", "film", "dull", "the", "cat", "is", "good", "bad"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")


def test_encoder_collator_pairs_and_regression():
    tok = tiny_wordpiece_tokenizer()
    examples = [Example("", (" a", " b"), 1, "a warm film", "the cat is good"), Example("", (" a", " b"), 0, "dull", "bad")]
    batch = EncoderCollator(tok, max_length=16)(examples)
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [1, 0]
    assert batch["input_ids"].shape == (2, 10) and batch["attention_mask"][1].sum() == 5
    assert batch["input_ids"][0, 0] == 2 and (batch["input_ids"][1, 5:] == 0).all()
    regression = [Example("", (), 4.5, "a film", "a film"), Example("", (), 0.0, "dull", "good")]
    labels = EncoderCollator(tok)(regression)["labels"]
    assert labels.dtype == torch.float32 and labels.tolist() == [4.5, 0.0]
