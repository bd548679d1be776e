"""The one place that names the metrics of an hf_kd model card and parses the metric keys that `Trainer` logs.

`Trainer.evaluate(metric_key_prefix=split)` logs `{split}_{metric}` keys (`eval_ece`, `test_teacher_accuracy`);
multi-exit trainers also evaluate each exit as a split of its own (`eval_exit_0`, `eval_exit_0_laplace`), whose
metrics the card folds back into their parent split as `exit_{i}_{metric}` / `exit_{i}_laplace_{metric}` keys.
[`split_metric_key`], [`is_card_split`], [`split_exit_split`] and [`parse_exit_key`] read those keys for the trainers
(`hf_kd.trainer`) and the cards (`hf_kd.hub`). This module imports no other hf_kd module.
"""

from __future__ import annotations

import re

__all__ = [
    "CARD_METRICS",
    "EXIT_METRICS",
    "LM_METRICS",
    "STUDENT_METRICS",
    "is_card_split",
    "parse_exit_key",
    "split_exit_split",
    "split_metric_key",
]

STUDENT_METRICS = ("accuracy", "ece", "mce", "nll", "brier", "entropy", "kl", "js_distance", "sigma")
"""The metrics of a model, in the order in which they are reported everywhere (reports, tables, model cards)."""

LM_METRICS = ("perplexity", "token_accuracy", "token_ece", "token_entropy", "top1_agreement")
"""The next-token metrics of a causal LM (`hf_kd.metrics.lm_metrics`), in the order in which they are reported."""

CARD_METRICS = STUDENT_METRICS + LM_METRICS + ("ece_bins",) + tuple(f"teacher_{m}" for m in STUDENT_METRICS if m != "sigma")
"""The metrics a card can report, as `hf_kd.metrics.make_compute_metrics` names them; teacher metrics carry a
`teacher_` prefix (sigma already compares the student with its teacher)."""

EXIT_METRICS = ("accuracy", "ece", "nll")
"""Per-exit metrics that a card reports (its per-exit table; the Laplace-calibrated ones also in the model-index)."""

# Longest first, so that `eval_teacher_ece` is read as (eval, teacher_ece), not (eval_teacher, ece).
_SUFFIXES = sorted(CARD_METRICS, key=len, reverse=True)
# `exit_{i}_{metric}` and `exit_{i}_laplace_{metric}`: groups (exit index, "laplace_" or None, metric).
_EXIT_KEY = re.compile(rf"exit_(\d+)_(laplace_)?({'|'.join(EXIT_METRICS)})")
# A split that is one exit of another split: `eval_exit_0`, `eval_exit_0_laplace`: groups (parent split, exit name).
_EXIT_SPLIT = re.compile(r"(.+)_(exit_\d+(?:_laplace)?)")
# Evaluation keys that are not a split's card metrics: `eval_group_1_accuracy` reads as the metric `accuracy` of a split
# `eval_group_1` (likewise the other group metrics and DEDIER's `dedier_readout_accuracy`).
_NON_CARD_SPLIT = re.compile(r"(^|_)(group_\d+|worst_group|mean_group)$|^dedier")


def split_metric_key(key: str) -> tuple[str, str] | None:
    """`"eval_ece"` -> `("eval", "ece")`, `"test_teacher_accuracy"` -> `("test", "teacher_accuracy")`; `None` for
    keys that are not card metrics (losses, runtimes, learning rate) and for training-set metrics (`train_*`)."""
    for metric in _SUFFIXES:
        if key.endswith("_" + metric):
            prefix = key[: -len(metric) - 1]
            # The longest metric name decides: `train_teacher_ece` is the train split's, not a `train_teacher` split.
            return (prefix, metric) if prefix and prefix != "train" else None
    return None


def is_card_split(split: str) -> bool:
    """`False` for the evaluation "splits" of group and DEDIER statistics (`eval_group_1`, `eval_worst_group`,
    `eval_mean_group`, `dedier_readout`), which a card leaves out; `True` otherwise."""
    return _NON_CARD_SPLIT.search(split) is None


def split_exit_split(split: str) -> tuple[str, str] | None:
    """A multi-exit trainer's per-exit evaluation split as (parent split, exit): `"eval_exit_0"` -> `("eval",
    "exit_0")`, `"eval_exit_0_laplace"` -> `("eval", "exit_0_laplace")`; `None` for a split of its own (`"eval"`)."""
    match = _EXIT_SPLIT.fullmatch(split)
    return (match.group(1), match.group(2)) if match else None


def parse_exit_key(key: str) -> tuple[int, bool, str] | None:
    """`"exit_2_ece"` -> `(2, False, "ece")`, `"exit_0_laplace_nll"` -> `(0, True, "nll")` (calibrated by the
    per-exit last-layer Laplace approximation); `None` for any other key."""
    match = _EXIT_KEY.fullmatch(key)
    return (int(match.group(1)), match.group(2) is not None, match.group(3)) if match else None
