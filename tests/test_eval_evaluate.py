"""Evaluators on a tiny random Llama (and a tiny BERT): option scoring, generation, classification."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fixtures.data.tiny_lm import tiny_llama, tiny_tokenizer
from moelora.finetune.data import CausalLMCollator, Example, TaskData, load_task
from moelora.finetune.eval import (
    evaluate,
    extract_answer,
    extract_letter,
    extract_text_option,
    generate_texts,
    score_options,
)
from moelora.finetune.loss import answer_loss

FIXTURES = Path(__file__).parent / "fixtures" / "data"

MIXED = [  # single-token options (one forward per prompt) and multi-token options (one row per option)
    Example("Review: a warm and funny film.\nIs this review positive or negative? Answer:", (" positive", " negative"), 0, "x"),
    Example("Review: dull.\nIs this review positive or negative? Answer:", (" positive", " negative"), 1, "x"),
    Example("Question: Which one is a fruit?\nOptions: (A) apple (B) carrot\nAnswer:",
            (" The answer is A.", " The answer is B."), 0, "x"),
    Example("Context: the cat sat on the mat.\nQuestion: How many legs does a cat have?\nAnswer:",
            (" two", " four legs in total", " six"), 1, "x"),
    Example("Question: What colour is the sky?\nAnswer:", (" blue", " a clear red colour"), 0, "x"),
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(tok)


def reference_scores(model, tok, example, normalize):
    """Each option scored alone, unpadded, from full logits."""
    prompt = tok(example.prompt, add_special_tokens=False)["input_ids"]
    out = []
    for option in example.options:
        answer = tok(option, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)
        total = sum(float(logprobs[len(prompt) - 1 + j, t]) for j, t in enumerate(answer))
        out.append(total / len(answer) if normalize == "mean" else total)
    return out


@pytest.mark.parametrize("normalize", ["mean", "sum"])
def test_scores_match_unpadded_reference(tok, model, normalize):
    scores = score_options(model, tok, MIXED, batch_size=8, normalize=normalize)
    for example, got in zip(MIXED, scores):
        assert got == pytest.approx(reference_scores(model, tok, example, normalize), abs=1e-4)


def test_left_padded_batch_scores_like_one_by_one(tok, model):
    batched = score_options(model, tok, MIXED, batch_size=16)
    single = score_options(model, tok, MIXED, batch_size=1)
    for b, s in zip(batched, single):
        assert b == pytest.approx(s, abs=1e-5)


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_shared_prompt_scoring_matches_one_row_per_option(tok, model, batch_size):
    """Each prompt run once, options continued from its cache, against full (prompt + option) rows; and
    the prompt tokens of a multi-token example go through the model once instead of once per option."""
    shared = score_options(model, tok, MIXED, batch_size=batch_size)
    rows = score_options(model, tok, MIXED, batch_size=batch_size, share_prompts=False)
    for a, b in zip(shared, rows):
        assert a == pytest.approx(b, abs=1e-5)
    seen = []  # token positions (padding included) that go through the model
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    example = MIXED[3]  # three multi-token options
    try:
        score_options(model, tok, [example], batch_size=16)
        shared_tokens = sum(seen)
        seen.clear()
        score_options(model, tok, [example], batch_size=16, share_prompts=False)
        row_tokens = sum(seen)
    finally:
        hook.remove()
    collator = CausalLMCollator(tok, None, padding_side="left")
    prompt_ids = collator.tokenize([example.prompt])[0]
    prefix, _ = collator.join(prompt_ids, collator.tokenize([example.options[0]])[0])
    # rows: 3 x (prompt + longest option); shared: 1 x prompt + 3 x longest option
    assert row_tokens - shared_tokens == 2 * len(prefix)


def test_evaluate_loglik_restores_training_mode(tok, model):
    task = TaskData("toy", "multiple_choice", MIXED, MIXED, MIXED)
    model.train()
    result = evaluate(model, tok, task, MIXED, batch_size=4)
    assert model.training
    model.eval()
    scores = score_options(model, tok, MIXED)
    assert result.method == "loglik" and result.metric == "accuracy"
    assert result.predictions == [max(range(len(s)), key=s.__getitem__) for s in scores]
    assert result.correct == [p == e.label for p, e in zip(result.predictions, MIXED)]
    assert result.value == sum(result.correct) / len(MIXED)
    assert result.interval.low <= result.value <= result.interval.high and result.interval.method == "wilson"
    d = result.to_dict()
    assert d["n"] == 5 and len(d["interval"]) == 2 and d["correct"] == result.correct
    assert "n=5" in result.summary()


def test_batch_generation_matches_one_by_one(tok, model):
    prompts = [e.prompt for e in MIXED]
    batched = generate_texts(model, tok, prompts, max_new_tokens=6, batch_size=8)
    single = generate_texts(model, tok, prompts, max_new_tokens=6, batch_size=1)
    assert batched == single and all(isinstance(t, str) for t in batched)


def test_extract_letter():
    assert extract_letter(" The answer is B.", 3) == 1
    assert extract_letter("the answer is (c)", 3) == 2
    assert extract_letter("Answer: (A) apple", 2) == 0
    assert extract_letter("B) because", 3) == 1
    assert extract_letter(" The answer is D.", 3) == -1  # not an option
    assert extract_letter("I think so", 3) == -1  # "I" is not a valid letter here and not an answer
    assert extract_letter("", 3) == -1


def test_extract_text_option():
    options = (" positive", " negative")
    assert extract_text_option(" positive.", options) == 0
    assert extract_text_option(" Negative review", options) == 1
    assert extract_text_option(" it is mostly negative, not positive", options) == 1  # mentioned first
    assert extract_text_option(" unsure", options) == -1
    assert extract_text_option(" not equivalent", (" equivalent", " not equivalent")) == 1
    assert extract_answer(" The answer is B.", (" a", " b"), "letter") == 1
    with pytest.raises(ValueError):
        extract_answer("x", (" a",), "none")


class ScriptedGenerator(torch.nn.Module):
    """A stand-in causal LM whose greedy output is a fixed text, to test the generation pipeline."""

    def __init__(self, tok, text):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.reply = tok(text, add_special_tokens=False)["input_ids"]
        self.seen = []

    def can_generate(self):
        return True

    def generate(self, input_ids, attention_mask, generation_config):
        self.seen.append((input_ids.clone(), attention_mask.clone(), generation_config))
        reply = torch.tensor(self.reply).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, reply], dim=1)


def test_evaluate_generate_extracts_letters(tok):
    examples = [e for e in MIXED if e.options[0].startswith(" The answer")]
    examples += [Example("Question: q?\nOptions: (A) x (B) y\nAnswer:", (" The answer is A.", " The answer is B."), 1, "x")]
    task = TaskData("toy", "multiple_choice", examples, examples, examples)
    fake = ScriptedGenerator(tok, " The answer is B.<|im_end|>")
    result = evaluate(fake, tok, task, examples, method="generate", max_new_tokens=10)
    assert result.predictions == [1, 1] and result.correct == [False, True]
    assert result.generations == [" The answer is B."] * 2  # special tokens removed
    input_ids, mask, config = fake.seen[0]
    assert config.max_new_tokens == 10 and config.do_sample is False
    assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()  # left padding


def test_a_trained_tiny_model_scores_and_generates_the_answers():
    """End to end: a few steps of answer-token training make both evaluators right on held-out reviews."""
    tok = tiny_tokenizer()
    model = tiny_llama(tok, seed=2, hidden_size=48)
    task = load_task("rotten_tomatoes", path=FIXTURES / "rotten_tomatoes/sample.csv", num_test=4, num_validation=2)
    collator = CausalLMCollator(tok)
    batch = collator(task.train + task.validation)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    model.train()
    for _ in range(40):
        optimizer.zero_grad()
        answer_loss(model, batch).backward()
        optimizer.step()
    loglik = evaluate(model, tok, task)
    generated = evaluate(model, tok, task, method="generate", max_new_tokens=3)
    assert model.training
    assert loglik.value == 1.0, loglik.scores
    assert generated.value == 1.0, generated.generations


def tiny_bert(num_labels):
    from transformers import BertConfig, BertForSequenceClassification

    from test_data_collate import tiny_wordpiece_tokenizer

    tok = tiny_wordpiece_tokenizer()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=num_labels, max_position_embeddings=64)
    return BertForSequenceClassification(config).eval(), tok


def test_evaluate_classifier_and_regression():
    model, tok = tiny_bert(2)
    examples = [Example("", (" no", " yes"), i % 2, t, p) for i, (t, p) in enumerate(
        [("a warm film", "good"), ("dull", "bad"), ("the cat", None), ("a film", "the cat is good")])]
    task = TaskData("toy", "classification", examples, examples, examples, metric="mcc", label_names=("no", "yes"))
    result = evaluate(model, tok, task, batch_size=3)
    assert result.method == "classifier"
    from moelora.finetune.data import EncoderCollator

    batch = EncoderCollator(tok)(examples)
    batch.pop("labels")
    with torch.no_grad():
        expected = model(**batch).logits.argmax(-1).tolist()
    assert result.predictions == expected and result.metric == "mcc" and "accuracy" in result.metrics
    assert result.interval.method == "percentile bootstrap"

    reg_model, _ = tiny_bert(1)
    reg_examples = [Example("", (), float(i), t, "good") for i, t in enumerate(["a", "warm film", "dull", "the cat"])]
    reg = TaskData("sts", "regression", reg_examples, reg_examples, reg_examples, metric="pearson_spearman",
                   num_labels=1, answer_format="none")
    out = evaluate(reg_model, tok, reg)
    assert out.correct is None and set(out.metrics) == {"pearson_spearman", "pearson", "spearman"}
    assert all(isinstance(p, float) for p in out.predictions)
    with pytest.raises(ValueError, match="regression task"):
        evaluate(reg_model, tok, reg, method="loglik")
