"""Metrics of a generated answer against reference answers: normalised exact match, contains, token F1.

Normalisation (SQuAD's): lower case, punctuation removed, the articles "a", "an", "the" removed,
whitespace collapsed; so ``"The answer: 12."`` and ``"12"`` differ, ``"12."`` and ``"12"`` do not. A
number keeps its sign and decimal point (``"-765"``, ``"0.5"``): removing them would make wrong answers
right. With several references an answer scores its best match.

``contains`` asks whether a reference appears in the generation as whole words, so that a model which
knows the answer but wraps it in a sentence is visible next to one that also learnt the answer format.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def _number_mark(text: str, i: int) -> bool:
    """Whether ``text[i]`` is a minus sign starting a number or a decimal point inside one."""
    before = text[i - 1] if i > 0 else " "
    after = text[i + 1] if i + 1 < len(text) else " "
    if text[i] == "-":
        return after.isdigit() and not before.isalnum()
    return text[i] == "." and before.isdigit() and after.isdigit()


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed (see the module docstring)."""
    text = text.lower()
    kept = "".join(ch for i, ch in enumerate(text) if ch not in _PUNCTUATION or _number_mark(text, i))
    return " ".join(_ARTICLES.sub(" ", kept).split())


def extract_answer_text(generation: str, pattern: re.Pattern[str] | None = None) -> str:
    """The answer in ``generation``: ``pattern``'s first group (or whole match) at its first match, or the
    stripped generation when there is no pattern; ``""`` when the pattern does not match."""
    if pattern is None:
        return generation.strip()
    match = pattern.search(generation)
    if match is None:
        return ""
    return (match.group(1) if match.groups() else match.group(0)).strip()


def exact_match(answer: str, references: Sequence[str]) -> bool:
    """Whether the normalised answer equals a normalised reference."""
    normalized = normalize_answer(answer)
    return any(normalized == normalize_answer(r) for r in references)


def contains(generation: str, references: Sequence[str]) -> bool:
    """Whether a normalised reference occurs in the normalised generation as whole words."""
    text = f" {normalize_answer(generation)} "
    return any(f" {ref} " in text for ref in map(normalize_answer, references) if ref)


def token_f1(answer: str, references: Sequence[str]) -> float:
    """The best F1 over the references of the normalised tokens' overlap (SQuAD's token F1)."""
    predicted = normalize_answer(answer).split()
    best = 0.0
    for reference in references:
        gold = normalize_answer(reference).split()
        if not predicted or not gold:
            best = max(best, float(predicted == gold))
            continue
        common = sum((Counter(predicted) & Counter(gold)).values())
        if common:
            precision, recall = common / len(predicted), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best
