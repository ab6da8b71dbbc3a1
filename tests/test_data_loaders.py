"""Loaders: every public format from its fixture, the splits, and the bad-input errors."""

from __future__ import annotations

import io
import json
import sys
import tarfile
import types
from pathlib import Path

import pytest

from moelora.finetune.data import (
    DataError,
    DataFileNotFoundError,
    EmptySplitError,
    Example,
    LabelOutOfRangeError,
    MalformedRowError,
    TaskData,
    UnknownOptionError,
    UnknownTaskError,
    available_tasks,
    bigbench,
    load_task,
)
from moelora.finetune.data.io import read_delimited
from moelora.finetune.data.prompts import mc_prompt, split_context_question
from moelora.finetune.data.splits import hash_order

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def all_examples(task: TaskData) -> list[Example]:
    return task.train + task.validation + task.test


# --- prompt format ---------------------------------------------------------------------------------------

def test_paper_prompt_format_and_clean_answer_suffix():
    prompt = mc_prompt("Where is the cat?", ["on the mat", "in the box"], context="A  cat\nsits.")
    assert prompt == (
        "Context: A cat sits.\nQuestion: Where is the cat?\nOptions: (A) on the mat (B) in the box\nAnswer:"
    )
    example = load_task("mc_file", train_file=FIXTURES / "generic/mc/train.jsonl",
                        test_file=FIXTURES / "generic/mc/test.csv").test[0]
    assert example.prompt.endswith("\nAnswer:")
    assert example.options == (" The answer is A.", " The answer is B.", " The answer is C.")
    assert (example.prompt + example.answer).endswith("Answer: The answer is A.")


def test_split_context_question():
    assert split_context_question("Kim ran home. It rained. Why did Kim run? ") == (
        "Kim ran home. It rained.", "Why did Kim run?")
    assert split_context_question("Why?") == (None, "Why?")


def test_example_validation_and_answer():
    e = Example("p", (" a", " b"), 1, "t")
    assert e.answer == " b"
    with pytest.raises(LabelOutOfRangeError, match="outside the options"):
        Example("p", (" a", " b"), 2, "t")
    with pytest.raises(LabelOutOfRangeError):
        Example("p", (" a", " b"), True, "t")
    regression = Example("p", (), 3.5, "t", "u")
    with pytest.raises(ValueError):
        regression.answer


def test_registry_lists_tasks_and_rejects_unknown():
    names = available_tasks()
    for name in ("rotten_tomatoes", "siqa", "bigbench:<name>", "glue:<name>", "scienceqa", "commonsense_qa",
                 "openbookqa", "boolq", "mc_file", "classification_file", "hf:<name>"):
        assert name in names
    with pytest.raises(UnknownTaskError, match="available"):
        load_task("no_such_task")
    with pytest.raises(UnknownOptionError, match="does not take 'bogus'; it takes: .*answer_format") as err:
        load_task("boolq", data_dir=FIXTURES / "boolq", bogus=1)
    assert isinstance(err.value, DataError) and isinstance(err.value, TypeError)
    with pytest.raises(UnknownOptionError, match="does not read local files"):
        load_task("siqa", data_dir=FIXTURES)


# --- the paper's datasets in their public formats -------------------------------------------------------

def test_scienceqa_text_only_official_splits():
    task = load_task("scienceqa", data_dir=FIXTURES / "scienceqa")
    assert task.sizes() == {"train": 3, "validation": 2, "test": 2}  # 2 problems with images dropped
    assert all("Look at the picture" not in e.prompt for e in all_examples(task))
    e = next(e for e in task.train if "boiling" in e.prompt)
    assert e.prompt.startswith("Context: Water boils when heated.\nQuestion: What is the boiling point")
    assert "Options: (A) 100 degrees Celsius (B) 50 degrees Celsius" in e.prompt
    assert e.label == 0 and task.kind == "multiple_choice"
    no_hint = next(e for e in task.train if "farthest north" in e.prompt)
    assert no_hint.prompt.startswith("Question:")  # no Context line without a hint


def test_commonsense_qa_dev_is_test_and_validation_from_train():
    task = load_task("commonsense_qa", data_dir=FIXTURES / "commonsense_qa")
    assert len(task.test) == 3 and len(task.train) + len(task.validation) == 7 and len(task.validation) == 1
    e = task.test[0]
    assert e.options[e.label] == " The answer is A." and "(E) oven" in e.prompt
    assert task.num_labels == 5


def test_openbookqa_and_cloze_format():
    task = load_task("openbookqa", data_dir=FIXTURES / "openbookqa")
    assert task.sizes() == {"train": 4, "validation": 2, "test": 2}
    cloze = load_task("openbookqa", data_dir=FIXTURES / "openbookqa", answer_format="text")
    e = cloze.train[0]
    assert "Options:" not in e.prompt and e.answer == " make food"


def test_boolq():
    task = load_task("boolq", data_dir=FIXTURES / "boolq")
    assert task.kind == "classification" and task.label_names == ("yes", "no")
    e = next(e for e in all_examples(task) if "penguins" in e.prompt)
    assert "Question: Can penguins fly?" in e.prompt and e.label == 1 and e.text_pair.startswith("Penguins")


@pytest.mark.parametrize(
    "name, metric, kind, n_train_file, n_dev",
    [("cola", "mcc", "classification", 5, 3), ("sst2", "accuracy", "classification", 5, 3),
     ("mrpc", "f1", "classification", 5, 3), ("qqp", "f1", "classification", 5, 3),
     ("qnli", "accuracy", "classification", 5, 3), ("stsb", "pearson_spearman", "regression", 5, 3),
     ("wnli", "accuracy", "classification", 4, 2), ("rte", "accuracy", "classification", 4, 2),
     ("mnli", "accuracy", "classification", 6, 3)],
)
def test_glue_tsvs(name, metric, kind, n_train_file, n_dev):
    task = load_task(f"glue:{name}", data_dir=FIXTURES / "glue")  # the GLUE root: the task folder is found
    assert task.metric == metric and task.kind == kind
    assert len(task.test) == n_dev and len(task.train) + len(task.validation) == n_train_file
    assert len(task.validation) == 1
    for e in all_examples(task):
        assert e.text and "\t" not in e.prompt


def test_glue_columns_and_labels():
    cola = load_task("glue:cola", data_dir=FIXTURES / "glue/CoLA")
    bad = next(e for e in all_examples(cola) if e.text.startswith("Slept the cat"))
    assert bad.label == 0 and bad.text_pair is None and cola.label_names == ("unacceptable", "acceptable")
    mrpc = load_task("glue:mrpc", data_dir=FIXTURES / "glue")  # BOM before the header
    e = next(e for e in all_examples(mrpc) if e.text.startswith("The bridge"))
    assert e.label == 1 and '" pillar "' in e.text and e.text_pair.startswith("A truck")  # quotes are plain text
    qnli = load_task("glue:qnli", data_dir=FIXTURES / "glue")
    assert {e.label for e in all_examples(qnli)} == {0, 1}
    stsb = load_task("glue:stsb", data_dir=FIXTURES / "glue")
    assert sorted(e.label for e in stsb.test) == [3.0, 4.2, 4.8] and stsb.test[0].options == ()
    mnli = load_task("glue:mnli", data_dir=FIXTURES / "glue")
    labels = {e.text: e.label for e in all_examples(mnli)}
    assert labels["The lake was completely frozen this morning."] == 2
    assert mnli.test[0].options == (" The answer is A.", " The answer is B.", " The answer is C.")
    mismatched = load_task("glue:mnli", data_dir=FIXTURES / "glue", mnli_dev="mismatched")
    assert {e.text for e in mismatched.test} != {e.text for e in mnli.test}


def test_generic_mc_answer_styles_and_carved_validation():
    task = load_task("mc_file", data_dir=FIXTURES / "generic/mc")
    by_q = {e.text: e for e in all_examples(task)}
    assert by_q["How many legs does a cat have?"].label == 1  # letter
    assert by_q["Which one is a fruit?"].label == 0  # option text
    assert by_q["Which one is a fruit?"].prompt.startswith("Context: We are at the market.")
    assert by_q["What do bees make?"].label == 1  # choice label "2"
    assert by_q["What do you use to see, in the dark?"].label == 0  # CSV with option columns A, B, C
    assert len(task.test) == 2 and len(task.validation) == 1 and len(task.train) == 4


def test_generic_classification_infers_labels():
    task = load_task("classification_file", data_dir=FIXTURES / "generic/cls", question="Is it good?",
                     answer_format="text")
    assert task.label_names == ("negative", "positive")
    assert task.test[2].label == 0  # index label
    e = task.test[0]
    assert e.options == (" negative", " positive") and e.label == 1 and "Question: Is it good?" in e.prompt


def test_rotten_tomatoes_sample_file_drops_plot_and_repeats():
    task = load_task("rotten_tomatoes", path=FIXTURES / "rotten_tomatoes/sample.csv", num_test=4, num_validation=2)
    assert task.info["rows"] == 12 and task.info["unique"] == 11
    assert task.sizes() == {"train": 5, "validation": 2, "test": 4}
    e = all_examples(task)[0]
    assert e.prompt == f"Review: {e.text}\nIs this review positive or negative? Answer:"
    assert e.options == (" positive", " negative") and task.answer_format == "text"
    fresh = next(x for x in all_examples(task) if "warm" in x.text)
    assert fresh.label == 0 and fresh.answer == " positive"
    assert not any("heist" in x.text for x in all_examples(task))
    again = load_task("rotten_tomatoes", path=FIXTURES / "rotten_tomatoes/sample.csv", num_test=4, num_validation=2)
    assert again.test == task.test  # fixed split


def test_limits_are_seeded_and_nested():
    kwargs = dict(path=FIXTURES / "rotten_tomatoes/sample.csv", num_test=4, num_validation=2)
    full = load_task("rotten_tomatoes", **kwargs)
    small = load_task("rotten_tomatoes", max_train=3, max_eval=2, seed=1, **kwargs)
    assert small.test == full.test[:2] and small.validation == full.validation[:2]
    assert len(small.train) == 3 and all(e in full.train for e in small.train)
    assert load_task("rotten_tomatoes", max_train=3, seed=1, **kwargs).train == small.train
    with pytest.raises(ValueError, match="max_train"):
        load_task("rotten_tomatoes", max_train=0, **kwargs)


def test_hash_order_is_stable_under_reordering():
    items = [f"item {i}" for i in range(20)]
    assert hash_order(items, str) == hash_order(list(reversed(items)), str)
    assert hash_order(items, str, split_seed=1) != hash_order(items, str)


# --- BIG-bench archive ----------------------------------------------------------------------------------

@pytest.fixture()
def bigbench_cache(tmp_path: Path) -> Path:
    """A cache folder holding a small archive with the sdist's layout."""
    archive = tmp_path / bigbench.ARCHIVE_NAME
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted((FIXTURES / "bigbench").rglob("task.json")):
            rel = path.relative_to(FIXTURES / "bigbench")
            tar.add(path, arcname=f"bigbench-1.0.0/bigbench/benchmark_tasks/{rel}")
        data = b"print('not a task')\n"
        info = tarfile.TarInfo("bigbench-1.0.0/bigbench/api/model.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return tmp_path


def test_siqa_from_archive_then_from_extracted_file(bigbench_cache: Path):
    task = load_task("siqa", cache_dir=bigbench_cache, download=False)
    assert sum(task.sizes().values()) == 6 and task.sizes() == {"train": 2, "validation": 1, "test": 3}
    e = next(e for e in all_examples(task) if "Morgan" in e.prompt)
    assert e.prompt == (
        "Context: Morgan shared lunch with a classmate who forgot theirs. Morgan smiled afterwards.\n"
        "Question: How would you describe Morgan?\n"
        "Options: (A) Generous (B) Like a person who was hungry (C) Forgetful\nAnswer:"
    )
    assert e.label == 0  # SIQA keeps the source order of options
    two = next(e for e in all_examples(task) if "Jordan wanted" in e.prompt)
    assert len(two.options) == 2
    assert (bigbench_cache / "bigbench/social_iqa/task.json").is_file()
    (bigbench_cache / bigbench.ARCHIVE_NAME).unlink()  # later loads read the extracted file only
    again = load_task("siqa", cache_dir=bigbench_cache, download=False)
    assert again.test == task.test
    cloze = load_task("siqa", cache_dir=bigbench_cache, download=False, answer_format="text")
    assert [e.text for e in cloze.test] == [e.text for e in task.test]  # split independent of the format
    assert cloze.test[0].options[cloze.test[0].label] in {" Leave the house", " Generous", " Thank Casey",
                                                          " To share a confidence", " Speak up", " Grateful"}


def test_bigbench_generic_task_shuffles_and_skips(bigbench_cache: Path):
    task = load_task("bigbench:toy_arithmetic", cache_dir=bigbench_cache, download=False)
    examples = all_examples(task)
    assert len(examples) == 4  # a tied item and a generative item are skipped
    assert task.info["skipped"] == {"no target_scores": 1, "tied best score": 1}
    assert all(e.prompt.startswith("Context: Answer the arithmetic question.") for e in examples)
    assert {e.label for e in examples} != {0}  # the correct first option is permuted per item
    fixed = load_task("bigbench:toy_arithmetic", cache_dir=bigbench_cache, download=False, shuffle_options=False)
    assert {e.label for e in all_examples(fixed)} == {0}
    sub = load_task("bigbench:toy_parent/sub", cache_dir=bigbench_cache, download=False)
    assert sum(sub.sizes().values()) == 4


def test_bigbench_errors(bigbench_cache: Path, tmp_path: Path):
    with pytest.raises(UnknownTaskError, match="close matches: toy_arithmetic"):
        load_task("bigbench:toy_arithmetik", cache_dir=bigbench_cache, download=False)
    with pytest.raises(DataError, match="choose a subtask: bigbench:toy_parent/sub"):
        load_task("bigbench:toy_parent", cache_dir=bigbench_cache, download=False)
    empty = tmp_path / "empty_cache"
    with pytest.raises(DataFileNotFoundError, match="pip download --no-deps bigbench==1.0.0") as err:
        load_task("siqa", cache_dir=empty, download=False)
    assert str(empty / bigbench.ARCHIVE_NAME) in str(err.value)


# --- bad input ------------------------------------------------------------------------------------------

def test_missing_file_error_names_the_path(tmp_path: Path):
    with pytest.raises(DataFileNotFoundError) as err:
        load_task("commonsense_qa", data_dir=tmp_path)
    assert str(tmp_path / "train_rand_split.jsonl") in str(err.value)
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_task("mc_file", train_file=missing)
    with pytest.raises(DataFileNotFoundError, match="nope.csv"):
        load_task("rotten_tomatoes", path=tmp_path / "nope.csv")
    with pytest.raises(DataError, match="data_dir"):
        load_task("glue:cola")


def test_malformed_row_error_names_file_and_line():
    path = FIXTURES / "bad/malformed.jsonl"
    with pytest.raises(MalformedRowError) as err:
        load_task("mc_file", train_file=path)
    assert err.value.path == path and err.value.line == 3
    assert f"{path}, line 3: invalid JSON" in str(err.value)
    with pytest.raises(MalformedRowError, match=r"missing_field.jsonl, line 2: missing field 'answer'"):
        load_task("mc_file", train_file=FIXTURES / "bad/missing_field.jsonl")
    with pytest.raises(MalformedRowError, match=r"short_row.tsv, line 3: expected 2 tab-separated fields"):
        list(read_delimited(FIXTURES / "bad/short_row.tsv", delimiter="\t"))


def test_malformed_tsv_row_in_a_glue_task(tmp_path: Path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\na fine film\t1\nno label here\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\ngood\t1\n")
    with pytest.raises(MalformedRowError) as err:
        load_task("glue:sst2", data_dir=tmp_path)
    assert err.value.line == 3 and str(tmp_path / "train.tsv") in str(err.value)


def test_label_outside_the_options():
    path = FIXTURES / "bad/label_out_of_range.jsonl"
    with pytest.raises(LabelOutOfRangeError) as err:
        load_task("mc_file", train_file=path)
    assert err.value.line == 3 and "outside the 3 choices" in str(err.value) and str(path) in str(err.value)
    with pytest.raises(LabelOutOfRangeError, match=r"cls_bad_label.csv, line 4: label 'sideways' is not one of"):
        load_task("classification_file", train_file=FIXTURES / "bad/cls_bad_label.csv", labels=["positive", "negative"])


def test_label_outside_the_options_scienceqa(tmp_path: Path):
    problems = {"1": {"question": "q?", "choices": ["a", "b"], "answer": 2, "hint": "", "image": None, "split": "train"}}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    with pytest.raises(LabelOutOfRangeError, match=r"problems.json, record 1: answer 2 is outside the 2 choices"):
        load_task("scienceqa", data_dir=tmp_path)


def test_empty_split():
    with pytest.raises(EmptySplitError, match="the test split is empty"):
        load_task("boolq", data_dir=FIXTURES / "bad/empty_dev")
    with pytest.raises(EmptySplitError, match="validation split is empty"):
        TaskData("x", "classification", [Example("p", (" a", " b"), 0, "t")], [], [Example("p", (" a", " b"), 0, "t")])


def test_hub_needs_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match="needs the `datasets` library"):
        load_task("hf:boolq")
    with pytest.raises(DataError, match="row_format"):
        load_task("hf:someone/unknown-set")


def test_hub_rows_go_through_the_same_parsers(monkeypatch):
    """A stand-in for ``datasets`` returning the hub layouts (lists of row dicts per split)."""
    boolq = {"train": [{"question": f"is {i} even", "passage": "Numbers.", "answer": i % 2 == 0} for i in range(6)],
             "validation": [{"question": "is 7 even", "passage": "Numbers.", "answer": False}]}
    cola = {"train": [{"sentence": f"Sentence {i}.", "label": i % 2, "idx": i} for i in range(6)],
            "validation": [{"sentence": "Good one.", "label": 1, "idx": 0}],
            "test": [{"sentence": "Unknown.", "label": -1, "idx": 0}]}
    calls = []

    def load_dataset(path, config=None, cache_dir=None):
        calls.append((path, config))
        if path == "offline/missing":
            raise ConnectionError("hub unreachable")
        return {"google/boolq": boolq, "nyu-mll/glue": cola}[path]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    task = load_task("hf:google/boolq")
    assert task.kind == "classification" and len(task.test) == 1 and task.test[0].label == 1
    assert len(task.train) + len(task.validation) == 6
    glue = load_task("hf:nyu-mll/glue:cola")
    assert calls[-1] == ("nyu-mll/glue", "cola")
    assert glue.metric == "mcc" and [e.text for e in glue.test] == ["Good one."]  # unlabelled test replaced
    with pytest.raises(DataError, match="could not load 'offline/missing' from the hub"):
        load_task("hf:offline/missing", row_format="mc")
