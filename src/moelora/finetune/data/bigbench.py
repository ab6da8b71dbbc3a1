"""Multiple-choice tasks of BIG-bench, read from the ``bigbench==1.0.0`` source archive.

The archive (358 MB) is fetched once with ``pip download --no-deps bigbench==1.0.0 -d <cache>`` (it is
never installed: it pins old versions of many packages) and read by streaming it with ``tarfile``. A
task's ``task.json`` is extracted on first use to ``<cache>/bigbench/<task>/task.json``, so later loads
do not touch the archive.

A task file holds ``{"examples": [{"input": str, "target_scores": {option: score}}, ...]}``. An item's
correct option is the one with the highest score; items without ``target_scores``, with fewer than two
options or with a tie for the highest score are skipped (and counted in the log).

``siqa`` (Social IQa, ``social_iqa``) has only its 1,954 dev items: each ``input`` is the situation
followed by the question (its last sentence), which become the prompt's ``Context`` and ``Question``.
Its correct answers are spread evenly over the three positions, so options keep their order; for other
tasks, where the correct option is often listed first, options are permuted per item (seeded by the item
text, so the permutation is fixed).

With the option ``generative: true`` a task whose items have a text ``target`` (a string or a list of
acceptable strings; e.g. the ``arithmetic`` subtasks, ``word_unscrambling``, ``object_counting``) is read
as a generative chat task instead (``load_bigbench_generative``): the input as the user turn, the first
target as the assistant's answer, scored by exact match, contains and token F1 against every target.

Splits (none are given): items are hash-ordered (``splits.py``); the first half is the held-out test set,
the next tenth validation, the rest train. For SIQA: 977 test, 195 validation, 782 train.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import random
import subprocess
import sys
import tarfile
from pathlib import Path

from ...atomic import write_bytes_atomic
from ..cache import resolve_cache_dir
from .errors import DataError, DataFileNotFoundError, MalformedRowError, UnknownTaskError
from .example import Example, TaskData
from .io import parse_rows
from .prompts import LETTERS, mc_example, normalize_space, split_context_question
from .registry import register_task
from .splits import DEFAULT_SPLIT_SEED, hash_order, split_sizes

logger = logging.getLogger(__name__)

REQUIREMENT = "bigbench==1.0.0"
ARCHIVE_NAME = "bigbench-1.0.0.tar.gz"
_TASKS_DIR = "bigbench/benchmark_tasks/"
_INDEX_NAME = "tasks.json"


def archive_path(cache_dir: str | Path | None = None, *, download: bool = True) -> Path:
    """The cached source archive, fetched with ``pip download`` the first time when ``download``."""
    cache = resolve_cache_dir(cache_dir)
    path = cache / ARCHIVE_NAME
    if path.is_file():
        return path
    command = [sys.executable, "-m", "pip", "download", "--no-deps", REQUIREMENT, "-d", str(cache)]
    if not download:
        raise DataFileNotFoundError(path, "BIG-bench archive", f"fetch it once with: {' '.join(command[2:])}")
    logger.info("fetching the BIG-bench archive (358 MB, once): %s", " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not path.is_file():
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise DataError(
            f"could not fetch {REQUIREMENT} into {cache} (pip exited with {result.returncode}); run "
            f"`{' '.join(command[2:])}` by hand or put {ARCHIVE_NAME} there.\n{tail}"
        )
    return path


def _task_name(member: str) -> str | None:
    """``"<task>"`` for a member ``".../bigbench/benchmark_tasks/<task>/task.json"``, else ``None``."""
    _, sep, tail = member.partition(_TASKS_DIR)
    if not sep or not tail.endswith("/task.json"):
        return None
    return tail[: -len("/task.json")]


def _scan_archive(archive: Path, wanted: str | None) -> tuple[list[str], bytes | None]:
    """Stream the archive once: every JSON task name, and the bytes of ``wanted``'s task file."""
    names, found = [], None
    with tarfile.open(archive, "r|gz") as tar:
        for member in tar:
            task = _task_name(member.name) if member.isfile() else None
            if task is None:
                continue
            names.append(task)
            if task == wanted:
                extracted = tar.extractfile(member)
                assert extracted is not None  # extractfile returns None only for non-regular members
                found = extracted.read()
    return sorted(names), found


def list_tasks(cache_dir: str | Path | None = None, *, download: bool = True) -> list[str]:
    """Names of the JSON tasks in the archive (subtasks as ``"<task>/<subtask>"``); cached after one scan."""
    root = resolve_cache_dir(cache_dir) / "bigbench"
    index = root / _INDEX_NAME
    if index.is_file():
        return json.loads(index.read_text())
    names, _ = _scan_archive(archive_path(cache_dir, download=download), None)
    write_bytes_atomic(index, json.dumps(names).encode())
    return names


def task_file(task: str, cache_dir: str | Path | None = None, *, download: bool = True) -> Path:
    """The extracted ``task.json`` of ``task``, extracted from the archive on first use."""
    if not task or ".." in Path(task).parts or task.startswith("/"):
        raise UnknownTaskError(f"invalid BIG-bench task name {task!r}")
    root = resolve_cache_dir(cache_dir) / "bigbench"
    path = root / task / "task.json"
    if path.is_file():
        return path
    archive = archive_path(cache_dir, download=download)
    logger.info("extracting BIG-bench task %s from %s", task, archive)
    names, data = _scan_archive(archive, task)
    write_bytes_atomic(root / _INDEX_NAME, json.dumps(names).encode())
    if data is None:
        close = difflib.get_close_matches(task, names, n=5)
        raise UnknownTaskError(
            f"BIG-bench has no JSON task {task!r}"
            + (f"; close matches: {', '.join(close)}" if close else "")
            + f" ({len(names)} tasks; list them with moelora.finetune.data.bigbench.list_tasks())"
        )
    write_bytes_atomic(path, data)
    return path


def _read_task(path: Path, task: str, cache_dir: str | Path | None) -> tuple[dict, list[tuple[str, dict]]]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise MalformedRowError(f"invalid JSON ({err.msg})", path, err.lineno) from None
    examples = doc.get("examples") if isinstance(doc, dict) else None
    if not examples:
        try:
            subtasks = [n for n in list_tasks(cache_dir, download=False) if n.startswith(task + "/")]
        except DataError:
            subtasks = []
        hint = f"; choose a subtask: {', '.join('bigbench:' + s for s in subtasks)}" if subtasks else ""
        raise DataError(f"BIG-bench task {task!r} ({path}) has no examples of its own{hint}")
    return doc, [(f"examples[{i}]", item) for i, item in enumerate(examples)]


def _permutation(key: str, n: int, split_seed: int) -> list[int]:
    seed = int.from_bytes(hashlib.sha256(f"{split_seed}:options:{key}".encode()).digest()[:8], "little")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def _split(keyed: list[tuple[str, Example]], test_fraction: float, validation_fraction: float, split_seed: int
           ) -> tuple[list[Example], list[Example], list[Example]]:
    """``(train, validation, test)``: items hash-ordered by key, then cut (see the module docstring)."""
    ordered = [example for _, example in hash_order(keyed, lambda pair: pair[0], split_seed)]
    n = len(ordered)
    n_test = split_sizes(n, test_fraction)
    n_val = min(split_sizes(n, validation_fraction), max(0, n - n_test - 1))
    return ordered[n_test + n_val :], ordered[n_test : n_test + n_val], ordered[:n_test]


def load_bigbench_generative(
    task: str,
    *,
    name: str | None = None,
    cache_dir: str | Path | None = None,
    system_prompt: str | None = None,
    answer_pattern: str | None = None,
    test_fraction: float = 0.5,
    validation_fraction: float = 0.1,
    split_seed: int = DEFAULT_SPLIT_SEED,
    download: bool = True,
) -> TaskData:
    """A BIG-bench task with text targets as a generative (chat) task: each item is a user turn (the task
    prefix, if any, then the input) and an assistant turn (the first target); every target counts as a
    right answer. Items without a text ``target`` are skipped (and counted in the log)."""
    from .chat_files import chat_example, generative_task

    path = task_file(task, cache_dir, download=download)
    doc, records = _read_task(path, task, cache_dir)
    prefix = str(doc.get("task_prefix", "") or "")
    skipped = 0

    def parse(item: dict) -> tuple[str, Example] | None:
        nonlocal skipped
        if not isinstance(item, dict) or "input" not in item:
            raise MalformedRowError("expected a JSON object with an 'input'")
        target = item.get("target")
        targets = [target] if isinstance(target, str) else target if isinstance(target, list) else []
        targets = [str(t).strip() for t in targets if str(t).strip()]
        if not targets:
            skipped += 1
            return None
        question = (prefix + str(item["input"])).strip()
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": targets[0]}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        return question + "\x1f" + "\x1f".join(targets), chat_example(messages, targets, uid=f"{task}:{question[:60]}")

    keyed = parse_rows(path, records, parse)
    if skipped:
        logger.info("BIG-bench %s: skipped %d items without a text target", task, skipped)
    if not keyed:
        raise DataError(f"BIG-bench task {task!r} ({path}) has no items with a text target")
    train, validation, test = _split(keyed, test_fraction, validation_fraction, split_seed)
    data = generative_task(
        name or f"bigbench:{task}", train, validation, test, answer_pattern=answer_pattern, split_seed=split_seed,
        source=(f"BIG-bench {task} ({REQUIREMENT}), {len(keyed)} items with text targets as chat turns, hash-ordered "
                f"with split seed {split_seed}: {len(test)} test, {len(validation)} validation, {len(train)} train"),
    )
    data.info.update(items=len(keyed), skipped=skipped, source=str(path))
    return data


def load_bigbench_task(
    task: str,
    *,
    name: str | None = None,
    cache_dir: str | Path | None = None,
    answer_format: str = "letter",
    shuffle_options: bool = True,
    split_context: bool = False,
    test_fraction: float = 0.5,
    validation_fraction: float = 0.1,
    split_seed: int = DEFAULT_SPLIT_SEED,
    download: bool = True,
) -> TaskData:
    """A BIG-bench multiple-choice task as ``TaskData`` (see the module docstring)."""
    path = task_file(task, cache_dir, download=download)
    doc, records = _read_task(path, task, cache_dir)
    prefix = normalize_space(doc.get("task_prefix", "") or "") or None
    skipped = {"no target_scores": 0, "tied best score": 0}

    def parse(item: dict) -> tuple[str, Example] | None:
        if not isinstance(item, dict):
            raise MalformedRowError(f"expected a JSON object, got {type(item).__name__}")
        scores = item.get("target_scores")
        if not isinstance(scores, dict) or len(scores) < 2:
            skipped["no target_scores"] += 1
            return None
        if "input" not in item:
            raise MalformedRowError("missing field 'input'")
        options = list(scores)
        values = [float(scores[o]) for o in options]
        best = max(values)
        if values.count(best) > 1:
            skipped["tied best score"] += 1
            return None
        if answer_format == "letter" and len(options) > len(LETTERS):
            raise MalformedRowError(
                f"{len(options)} options do not fit the letter format (at most {len(LETTERS)}); "
                "use answer_format='text'"
            )
        label = values.index(best)
        raw = str(item["input"])
        if shuffle_options:
            order = _permutation(raw + "\x1f" + "\x1f".join(options), len(options), split_seed)
            options = [options[i] for i in order]
            label = order.index(label)
        context, question = split_context_question(raw) if split_context else (prefix, raw)
        example = mc_example(question, options, label, context, answer_format=answer_format, uid=f"{task}:{raw[:60]}")
        # The split key is the raw item, so the split does not depend on the answer format.
        return raw + "\x1f" + "\x1f".join(scores), example

    keyed = parse_rows(path, records, parse)
    examples = [example for _, example in keyed]
    if any(skipped.values()):
        logger.info("BIG-bench %s: skipped %s", task, {k: v for k, v in skipped.items() if v})
    if not examples:
        raise DataError(f"BIG-bench task {task!r} ({path}) has no multiple-choice items (no target_scores)")
    n = len(keyed)
    train, validation, test = _split(keyed, test_fraction, validation_fraction, split_seed)
    num_options = max(len(e.options) for e in examples)
    logger.info("BIG-bench %s: %d items -> train %d / validation %d / test %d", task, n, len(train), len(validation), len(test))
    return TaskData(
        name=name or f"bigbench:{task}",
        kind="multiple_choice",
        train=train,
        validation=validation,
        test=test,
        metric="accuracy",
        num_labels=num_options,
        answer_format=answer_format,
        description=(
            f"BIG-bench {task} ({REQUIREMENT}), {n} multiple-choice items hash-ordered with split seed "
            f"{split_seed}: {len(test)} test, {len(validation)} validation, {len(train)} train"
        ),
        info={"items": n, "skipped": skipped, "source": str(path)},
    )


@register_task("bigbench:", prefix=True)
def _load_bigbench(
    name: str,
    *,
    cache_dir: str | Path | None = None,
    answer_format: str = "letter",
    shuffle_options: bool = True,
    generative: bool = False,
    system_prompt: str | None = None,
    answer_pattern: str | None = None,
    test_fraction: float = 0.5,
    validation_fraction: float = 0.1,
    split_seed: int = DEFAULT_SPLIT_SEED,
    download: bool = True,
) -> TaskData:
    if generative:
        return load_bigbench_generative(
            name.split(":", 1)[1], name=name, cache_dir=cache_dir, system_prompt=system_prompt,
            answer_pattern=answer_pattern, test_fraction=test_fraction, validation_fraction=validation_fraction,
            split_seed=split_seed, download=download,
        )
    if system_prompt is not None or answer_pattern is not None:
        raise DataError("system_prompt and answer_pattern apply to generative BIG-bench tasks (generative: true)")
    return load_bigbench_task(
        name.split(":", 1)[1],
        name=name,
        cache_dir=cache_dir,
        answer_format=answer_format,
        shuffle_options=shuffle_options,
        test_fraction=test_fraction,
        validation_fraction=validation_fraction,
        split_seed=split_seed,
        download=download,
    )


@register_task("siqa")
def load_siqa(
    name: str = "siqa",
    *,
    cache_dir: str | Path | None = None,
    answer_format: str = "letter",
    split_seed: int = DEFAULT_SPLIT_SEED,
    download: bool = True,
) -> TaskData:
    """Social IQa from BIG-bench (``social_iqa``): context and question split, options in source order."""
    return load_bigbench_task(
        "social_iqa",
        name=name,
        cache_dir=cache_dir,
        answer_format=answer_format,
        shuffle_options=False,
        split_context=True,
        split_seed=split_seed,
        download=download,
    )
