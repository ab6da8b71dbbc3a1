"""The GLUE tasks, read from their TSV files as distributed (``<task>/train.tsv``, ``dev.tsv``).

Column layouts (the GLUE files; quote characters are plain text, so they are read with
``csv.QUOTE_NONE``):

==========  ==========================================  ===========================  =====================
task        columns used                                label values                 metric
==========  ==========================================  ===========================  =====================
CoLA        no header: source, label, author label,     0 / 1                        Matthews correlation
            sentence
SST-2       sentence, label                             0 / 1                        accuracy
MRPC        #1 String, #2 String, Quality               0 / 1                        F1 (class 1)
QQP         question1, question2, is_duplicate          0 / 1                        F1 (class 1)
QNLI        question, sentence, label                   entailment / not_entailment  accuracy
STS-B       sentence1, sentence2, score                 0.0 .. 5.0                   Pearson / Spearman
WNLI        sentence1, sentence2, label                 0 / 1                        accuracy
RTE         sentence1, sentence2, label                 entailment / not_entailment  accuracy
MNLI        sentence1, sentence2, gold_label            entailment / neutral /       accuracy
                                                        contradiction
==========  ==========================================  ===========================  =====================

GLUE's test labels are not public, so the dev file is the held-out test split (MNLI: ``dev_matched.tsv``,
or ``dev_mismatched.tsv`` with ``mnli_dev="mismatched"``) and validation is a fixed hash-chosen 5 % of
train (at most 1,000). Prompts use the paper's format with the label names as options; the sentence
(pair) is the context. For an encoder, ``text`` / ``text_pair`` are the raw sentences.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError, MalformedRowError, UnknownTaskError
from .example import Example, TaskData
from .io import find_file, parse_rows, read_delimited
from .prompts import label_index, mc_example, normalize_space
from .registry import register_task
from .splits import DEFAULT_SPLIT_SEED, example_key, validation_from_train

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GlueTask:
    """How to read one GLUE task."""

    folder: str
    text: str
    text_pair: str | None
    label: str
    label_names: tuple[str, ...]  # option words in label order; empty for regression
    question: str
    metric: str = "accuracy"
    pair_names: tuple[str, str] = ("Sentence 1", "Sentence 2")
    aliases: tuple[tuple[str, int], ...] = ()
    columns: tuple[str, ...] | None = None  # for files without a header row
    dev_file: str = "dev.tsv"


_ENTAILMENT = (("entailment", 0), ("not_entailment", 1))

GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("CoLA", "sentence", None, "label", ("unacceptable", "acceptable"),
                     "Is this sentence grammatically acceptable or unacceptable?", metric="mcc",
                     columns=("source", "label", "author_label", "sentence")),
    "sst2": GlueTask("SST-2", "sentence", None, "label", ("negative", "positive"),
                     "Is the sentiment of this sentence negative or positive?"),
    "mrpc": GlueTask("MRPC", "#1 String", "#2 String", "Quality", ("no", "yes"),
                     "Do Sentence 1 and Sentence 2 mean the same thing?", metric="f1"),
    "qqp": GlueTask("QQP", "question1", "question2", "is_duplicate", ("no", "yes"),
                    "Do Question 1 and Question 2 ask the same thing?", metric="f1",
                    pair_names=("Question 1", "Question 2")),
    "qnli": GlueTask("QNLI", "question", "sentence", "label", ("yes", "no"),
                     "Does the sentence contain the answer to the query?", pair_names=("Query", "Sentence"),
                     aliases=_ENTAILMENT),
    "stsb": GlueTask("STS-B", "sentence1", "sentence2", "score", (),
                     "How similar are Sentence 1 and Sentence 2, from 0 to 5?", metric="pearson_spearman"),
    "wnli": GlueTask("WNLI", "sentence1", "sentence2", "label", ("no", "yes"),
                     "Does the premise entail the hypothesis?", pair_names=("Premise", "Hypothesis")),
    "rte": GlueTask("RTE", "sentence1", "sentence2", "label", ("yes", "no"),
                    "Does the premise entail the hypothesis?", pair_names=("Premise", "Hypothesis"),
                    aliases=_ENTAILMENT),
    "mnli": GlueTask("MNLI", "sentence1", "sentence2", "gold_label", ("yes", "maybe", "no"),
                     "Does the premise entail the hypothesis?", pair_names=("Premise", "Hypothesis"),
                     aliases=(("entailment", 0), ("neutral", 1), ("contradiction", 2)),
                     dev_file="dev_matched.tsv"),
}
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli_matched": "mnli", "mnli-m": "mnli"}


def glue_parser(spec: GlueTask, answer_format: str = "letter"):
    """Row parser for one GLUE task (rows as dicts keyed by the task's column names)."""
    def parse(row: dict) -> Example:
        text = normalize_space(row[spec.text])
        pair = normalize_space(row[spec.text_pair]) if spec.text_pair else None
        if not text or (spec.text_pair and not pair):
            raise MalformedRowError("a sentence is empty")
        if pair is None:
            context = text
        else:
            context = f"{spec.pair_names[0]}: {text} {spec.pair_names[1]}: {pair}"
        raw = row[spec.label]
        if not spec.label_names:
            try:
                score = float(raw)
            except (TypeError, ValueError):
                raise MalformedRowError(f"score {raw!r} is not a number") from None
            prompt = f"Context: {context}\nQuestion: {spec.question}\nAnswer:"
            return Example(prompt=prompt, options=(), label=score, text=text, text_pair=pair)
        label = label_index(raw, spec.label_names, aliases=dict(spec.aliases))
        example = mc_example(spec.question, spec.label_names, label, context, answer_format=answer_format)
        return Example(example.prompt, example.options, example.label, text, pair)
    return parse


def _read(path: Path, spec: GlueTask, parse) -> list[Example]:
    rows = read_delimited(path, delimiter="\t", quoting=csv.QUOTE_NONE, columns=spec.columns)
    return parse_rows(path, rows, parse)


@register_task("glue:", prefix=True)
def load_glue(
    name: str,
    *,
    data_dir: str | Path | None = None,
    answer_format: str = "letter",
    mnli_dev: str = "matched",
    split_seed: int = DEFAULT_SPLIT_SEED,
) -> TaskData:
    """``glue:<task>`` from ``data_dir`` (the task's folder, or the GLUE root holding it)."""
    key = name.split(":", 1)[1].lower()
    key = _ALIASES.get(key, key)
    if key not in GLUE_TASKS:
        raise UnknownTaskError(f"unknown GLUE task {key!r}; available: {', '.join('glue:' + k for k in GLUE_TASKS)}")
    spec = GLUE_TASKS[key]
    if data_dir is None:
        raise DataError(f"task {name!r} reads the GLUE TSV files: pass data_dir=<folder with train.tsv and dev.tsv>")
    root = Path(data_dir).expanduser()
    if not (root / "train.tsv").is_file() and (root / spec.folder).is_dir():
        root = root / spec.folder
    dev_file = spec.dev_file
    if key == "mnli":
        if mnli_dev not in ("matched", "mismatched"):
            raise ValueError(f"mnli_dev must be 'matched' or 'mismatched', got {mnli_dev!r}")
        dev_file = f"dev_{mnli_dev}.tsv"
    parse = glue_parser(spec, answer_format)
    train = _read(find_file(root, ["train.tsv"], f"GLUE {spec.folder} train file"), spec, parse)
    test = _read(find_file(root, [dev_file], f"GLUE {spec.folder} dev file"), spec, parse)
    train, validation = validation_from_train(train, example_key, split_seed=split_seed)
    regression = not spec.label_names
    return TaskData(
        name=f"glue:{key}",
        kind="regression" if regression else "classification",
        train=train,
        validation=validation,
        test=test,
        metric=spec.metric,
        num_labels=1 if regression else len(spec.label_names),
        label_names=spec.label_names,
        answer_format="none" if regression else answer_format,
        description=(
            f"GLUE {spec.folder}; test = {dev_file}; validation = hash-chosen 5 % of train.tsv "
            f"(split seed {split_seed})"
        ),
    )
