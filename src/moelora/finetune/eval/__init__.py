"""Evaluation: metrics, confidence intervals, option scoring, generation with answer extraction, and the
``evaluate`` entry point."""

from .evaluate import EvalResult, evaluate
from .generation import extract_answer, extract_letter, extract_text_option, generate_texts
from .intervals import (
    Difference,
    Interval,
    bootstrap_interval,
    paired_bootstrap,
    paired_bootstrap_difference,
    wilson_interval,
)
from .metrics import (
    METRICS,
    accuracy,
    f1_score,
    get_metric,
    matthews_corrcoef,
    pearson,
    pearson_spearman,
    rankdata,
    spearman,
)
from .scoring import score_options

__all__ = [
    "METRICS",
    "Difference",
    "EvalResult",
    "Interval",
    "accuracy",
    "bootstrap_interval",
    "evaluate",
    "extract_answer",
    "extract_letter",
    "extract_text_option",
    "f1_score",
    "generate_texts",
    "get_metric",
    "matthews_corrcoef",
    "paired_bootstrap",
    "paired_bootstrap_difference",
    "pearson",
    "pearson_spearman",
    "rankdata",
    "score_options",
    "spearman",
    "wilson_interval",
]
