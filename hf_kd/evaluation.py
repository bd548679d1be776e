"""Uncertainty reports for sequence classifiers: one batched forward pass, then every calibration metric.

[`evaluate_uncertainty`] runs a model (and optionally a teacher) over a tokenized dataset and returns an
[`UncertaintyReport`]: accuracy, ECE and MCE (with the number of bins), NLL, Brier score, mean predictive entropy,
KL and JS distance to human label distributions when the data has them, and, when a teacher is given, the
confidence-preservation sigma and the teacher's own metrics side by side. [`UncertaintyReport.save`] writes
`report.json`, a reliability diagram and a confidence histogram (Guo et al., 2017,
https://huggingface.co/papers/1706.04599, figure 1).

All metrics come from [`hf_kd.metrics`]; this module only collects logits and arranges the numbers.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import nn

from .metrics import (
    classification_metrics,
    confidence_preservation,
    human_distribution_divergence,
    reliability_bins,
    softmax,
    warn_if_teacher_disagrees,
)
from .teacher import (
    TEACHER_LOGITS_COLUMN,
    check_label_names,
    check_label_spaces,
    compute_teacher_logits,
    load_teacher,
)

if TYPE_CHECKING:
    import datasets


__all__ = ["REPORT_FILENAME", "UncertaintyReport", "compute_logits", "evaluate_uncertainty", "read_labels"]

REPORT_FILENAME = "report.json"
RELIABILITY_DIAGRAM_FILENAME = "reliability_diagram.png"
CONFIDENCE_HISTOGRAM_FILENAME = "confidence_histogram.png"



# --------------------------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------------------------


def record_max_length(config, max_length: int) -> None:
    """Record in `config.hf_kd["max_length"]` the truncation length (tokens) a model is trained, evaluated and
    calibrated with, so that `hf-kd evaluate` / `hf-kd calibrate` reuse it by default ([`recorded_max_length`]):
    the same text truncated at 128 instead of 64 tokens gives other numbers than the model's card. Other keys of
    `config.hf_kd` are kept; `save_pretrained` writes it into `config.json`."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be an integer >= 1, got {max_length!r}")
    config.hf_kd = {**(getattr(config, "hf_kd", None) or {}), "max_length": max_length}


def recorded_max_length(config) -> int | None:
    """The truncation length recorded by [`record_max_length`], `None` when the model records none."""
    return (getattr(config, "hf_kd", None) or {}).get("max_length")


def _check_dataset(dataset, name: str = "dataset") -> None:
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        raise TypeError(
            f"{name} is a DatasetDict with splits {list(dataset)}: pass one split, e.g. {name}['validation']."
        )
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"{name} must be a datasets.Dataset, got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty: there is nothing to evaluate or calibrate on.")
    if "input_ids" not in dataset.column_names:
        raise ValueError(
            f"{name} has no 'input_ids' column (columns: {dataset.column_names}): tokenize it first, e.g. with "
            "hf_kd.data.tokenize_dataset(dataset, tokenizer)."
        )


def _check_model(model, name: str = "model") -> None:
    if not isinstance(model, nn.Module):
        hint = " (a Hub id or folder: load it with AutoModelForSequenceClassification.from_pretrained)" if isinstance(
            model, (str, os.PathLike)) else ""
        raise TypeError(f"{name} must be a torch.nn.Module sequence classifier, got {type(model).__name__}{hint}")


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


def _check_n_bins(n_bins) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be an int >= 1, got {n_bins!r}")


def read_labels(dataset: datasets.Dataset, label_column: str = "label", purpose: str = "evaluation") -> np.ndarray:
    """
    The gold labels of a dataset as an int64 array of shape `(N,)`.

    Args:
        dataset ([`~datasets.Dataset`]):
            The data.
        label_column (`str`, *optional*, defaults to `"label"`):
            The column holding integer class indices (a `ClassLabel` or an int column).
        purpose (`str`, *optional*, defaults to `"evaluation"`):
            What the labels are for; only used in the error message.

    Raises:
        `ValueError`: the column is missing, or holds missing (None) or non-integer values.
    """
    if label_column not in dataset.column_names:
        raise ValueError(
            f"{purpose} needs gold labels, but the dataset has no {label_column!r} column (columns: "
            f"{dataset.column_names}). Pass label_column= to name the label column, or use data with labels."
        )
    values = dataset[label_column]
    missing = [i for i, value in enumerate(values) if value is None]
    if missing:
        raise ValueError(
            f"{purpose} needs a gold label for every row, but column {label_column!r} is empty (None) in "
            f"{len(missing)} row(s), e.g. row {missing[0]}."
        )
    labels = np.asarray(values)
    if labels.ndim != 1 or not (
        np.issubdtype(labels.dtype, np.integer)
        or (np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels)))
    ):
        raise ValueError(
            f"column {label_column!r} must hold one integer class index per row, got dtype {labels.dtype} and shape "
            f"{labels.shape}"
        )
    return labels.astype(np.int64)


def _read_distributions(dataset: datasets.Dataset, column: str, num_labels: int) -> np.ndarray:
    values = dataset[column]
    if any(value is None for value in values):
        raise ValueError(f"column {column!r} must hold a label distribution in every row; some rows are None")
    dists = np.asarray(values, dtype=np.float64)
    if dists.shape != (len(dataset), num_labels):
        raise ValueError(
            f"column {column!r} must hold one distribution over the model's {num_labels} labels per row, i.e. shape "
            f"({len(dataset)}, {num_labels}), got {dists.shape}"
        )
    return dists


def _pad_collator(pad_token_id: int) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """Right-pad `input_ids` with `pad_token_id` and the other token columns with 0 (masked positions)."""

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(row["input_ids"]) for row in rows)
        batch = {}
        for key in rows[0]:
            pad = pad_token_id if key == "input_ids" else 0
            batch[key] = torch.tensor([list(row[key]) + [pad] * (length - len(row[key])) for row in rows])
        return batch

    return collate


# --------------------------------------------------------------------------------------------------------------------
# Logits
# --------------------------------------------------------------------------------------------------------------------


def compute_logits(
    model: nn.Module,
    dataset: datasets.Dataset,
    batch_size: int = 64,
    data_collator: Callable | None = None,
    desc: str = "Logits",
) -> torch.Tensor:
    """
    Logits of a sequence classifier over a whole tokenized dataset, in one batched, gradient-free pass.

    Rows are run in order of length (little padding), in `eval()` mode (dropout off), on the device of the model's
    parameters; the model's training mode is restored afterwards. Only `input_ids`, `attention_mask` and
    `token_type_ids` reach the model.

    Args:
        model (`nn.Module`):
            A sequence classifier whose output has `logits` of shape `(batch, num_labels)`.
        dataset ([`~datasets.Dataset`]):
            Tokenized data with an `input_ids` column (see [`hf_kd.data.tokenize_dataset`]). Without an
            `attention_mask` column every token is attended.
        batch_size (`int`, *optional*, defaults to `64`):
            Rows per forward pass.
        data_collator (`Callable`, *optional*):
            Turns a list of rows into a batch of tensors. Defaults to right-padding with the model's
            `config.pad_token_id` (0 when unset) and a zero attention mask on padding.
        desc (`str`, *optional*, defaults to `"Logits"`):
            Progress-bar label.

    Returns:
        `torch.Tensor` of shape `(len(dataset), num_labels)`, float32, on the CPU, in dataset order.
    """
    _check_model(model)
    _check_dataset(dataset)
    _check_batch_size(batch_size)
    if "attention_mask" not in dataset.column_names:
        # compute_teacher_logits keeps only the dataset's own token columns: without a mask, padding would be attended.
        dataset = dataset.map(lambda batch: {"attention_mask": [[1] * len(ids) for ids in batch["input_ids"]]},
                              batched=True)
    if data_collator is None:
        config = getattr(model, "config", None)
        pad_token_id = getattr(config, "pad_token_id", None)
        data_collator = _pad_collator(0 if pad_token_id is None else pad_token_id)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        return compute_teacher_logits(model, dataset, data_collator, batch_size, device, desc=desc)
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------


def _metrics_of(probs: np.ndarray, labels: np.ndarray, n_bins: int, human: np.ndarray | None) -> dict[str, float]:
    metrics = classification_metrics(probs, labels, n_bins)
    if human is not None:
        metrics.update(human_distribution_divergence(human, probs))
    return metrics


def _bins_to_lists(bins: dict[str, np.ndarray]) -> dict[str, list]:
    return {key: np.asarray(value).tolist() for key, value in bins.items()}


def _json_safe(value):
    """NaN (empty bins, undefined sigma) becomes null: report.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def _from_json(value):
    if value is None:
        return float("nan")
    if isinstance(value, dict):
        return {key: _from_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_from_json(item) for item in value]
    return value


@dataclass(repr=False)
class UncertaintyReport:
    r"""
    Calibration and uncertainty metrics of a classifier on one dataset split.

    Args:
        metrics (`dict[str, float]`):
            The model's metrics: `accuracy`, `ece`, `mce` (top-label, `n_bins` equal-width bins), `nll` (natural log),
            `brier` (multi-class, in [0, 2]), `entropy` (mean predictive entropy, nats); with human label
            distributions also `kl` (KL(human || model)) and `js_distance` (ChaosNLI conventions, see
            [`hf_kd.metrics.human_distribution_divergence`]); with a teacher also `sigma`, the confidence-preservation
            statistic of Vengertsev & Sherman (2024, https://huggingface.co/papers/2401.11365), NaN when no example is
            right for both models.
        n_bins (`int`):
            Number of equal-width confidence bins of ECE, MCE and the diagrams.
        num_examples (`int`):
            Number of evaluated rows.
        reliability (`dict[str, dict[str, list]]`):
            Per-bin statistics ([`hf_kd.metrics.reliability_bins`]) for `"model"` and, with a teacher, `"teacher"`.
        teacher_metrics (`dict[str, float]`, *optional*):
            The teacher's metrics (same keys as `metrics`, without `sigma`).
        split (`str`, *optional*):
            Name of the evaluated split, e.g. `"test"`.
        calibration_temperature (`float`, *optional*):
            The temperature already folded into the evaluated model (its `config.hf_kd["temperature"]`), `None` for
            an uncalibrated model.
        model_name (`str`, *optional*):
            What was evaluated, for plot titles.

    `repr(report)` (and `print(report)`) is a short table of the metrics, the model's beside the teacher's; the
    per-bin statistics are in `report.reliability`, and `report.to_dict()` has everything.
    """

    metrics: dict[str, float]
    n_bins: int
    num_examples: int
    reliability: dict[str, dict[str, list]]
    teacher_metrics: dict[str, float] | None = None
    split: str | None = None
    calibration_temperature: float | None = None
    model_name: str | None = None

    @classmethod
    def from_logits(
        cls,
        logits,
        labels,
        *,
        teacher_logits=None,
        human_probs=None,
        n_bins: int = 15,
        split: str | None = None,
        calibration_temperature: float | None = None,
        model_name: str | None = None,
        class_index: int | None = 0,
    ) -> UncertaintyReport:
        """
        Build a report from logits already computed (probabilities are `softmax(logits)`, temperature 1).

        Args:
            logits (`np.ndarray` or `torch.Tensor` of shape `(N, K)`):
                The model's logits.
            labels (`np.ndarray` or `torch.Tensor` of shape `(N,)`):
                Gold class indices in `[0, K)`.
            teacher_logits (`np.ndarray` or `torch.Tensor` of shape `(N, K)`, *optional*):
                The teacher's logits: adds `sigma` and the teacher's metrics.
            human_probs (`np.ndarray` or `torch.Tensor` of shape `(N, K)`, *optional*):
                Human label distributions: adds `kl` and `js_distance`.
            n_bins (`int`, *optional*, defaults to `15`):
                Equal-width bins for ECE, MCE and the diagrams.
            split (`str`, *optional*):
                Name of the split.
            calibration_temperature (`float`, *optional*):
                The temperature folded into the model that produced `logits`, for the record (the logits are not
                divided by it here).
            model_name (`str`, *optional*):
                Name used in plot titles.
            class_index (`int` or `None`, *optional*, defaults to `0`):
                Passed to [`hf_kd.metrics.confidence_preservation`].
        """
        _check_n_bins(n_bins)
        probs = softmax(logits)
        if probs.ndim != 2:
            raise ValueError(f"logits must have shape (N, K), got {probs.shape}")
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
        human = None
        if human_probs is not None:
            human = np.asarray(human_probs.cpu() if isinstance(human_probs, torch.Tensor) else human_probs, np.float64)
        metrics = _metrics_of(probs, labels, n_bins, human)
        reliability = {"model": _bins_to_lists(reliability_bins(probs, labels, n_bins))}
        teacher_metrics = None
        if teacher_logits is not None:
            teacher_probs = softmax(teacher_logits)
            if teacher_probs.shape != probs.shape:
                raise ValueError(
                    f"teacher_logits must have the shape of logits {probs.shape}, got {teacher_probs.shape}"
                )
            metrics["sigma"] = confidence_preservation(teacher_probs, probs, labels, class_index=class_index)
            teacher_metrics = _metrics_of(teacher_probs, labels, n_bins, human)
            warn_if_teacher_disagrees(teacher_metrics["accuracy"], metrics["sigma"], len(labels))
            reliability["teacher"] = _bins_to_lists(reliability_bins(teacher_probs, labels, n_bins))
        return cls(
            metrics=metrics,
            n_bins=n_bins,
            num_examples=len(labels),
            reliability=reliability,
            teacher_metrics=teacher_metrics,
            split=split,
            calibration_temperature=calibration_temperature,
            model_name=model_name,
        )

    def __repr__(self) -> str:
        # A metrics table: the reliability bins (n_bins rows per model) would bury the numbers a print is read for.
        header = f"UncertaintyReport({self.model_name or 'model'}"
        if self.split:
            header += f", split={self.split!r}"
        header += f", {self.num_examples} examples, n_bins={self.n_bins}"
        if self.calibration_temperature is not None:
            header += f", calibrated T={self.calibration_temperature:.4g}"
        header += ")"
        teacher = self.teacher_metrics or {}
        rows = [f"  {'metric':<12} {'model':>10}" + (f" {'teacher':>10}" if teacher else "")]
        for key, value in self.metrics.items():
            row = f"  {key:<12} {value:>10.4f}"
            if teacher:
                row += f" {teacher[key]:>10.4f}" if key in teacher else f" {'':>10}"
            rows.append(row)
        return "\n".join([header, *rows, "  (reliability bins: report.reliability)"])

    def flat_metrics(self) -> dict[str, float]:
        """
        One flat dict in the vocabulary of [`hf_kd.metrics.make_compute_metrics`]: the model's metrics, `ece_bins`,
        and the teacher's prefixed with `teacher_`. This is what model cards are built from.
        """
        flat = dict(self.metrics)
        flat["ece_bins"] = float(self.n_bins)
        for key, value in (self.teacher_metrics or {}).items():
            flat[f"teacher_{key}"] = value
        return flat

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (NaN becomes `None`)."""
        return _json_safe(
            {
                "split": self.split,
                "num_examples": self.num_examples,
                "n_bins": self.n_bins,
                "calibration_temperature": self.calibration_temperature,
                "model_name": self.model_name,
                "metrics": self.metrics,
                "teacher_metrics": self.teacher_metrics,
                "reliability": self.reliability,
            }
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UncertaintyReport:
        """Inverse of [`~UncertaintyReport.to_dict`] (`None` metrics and bin values become NaN)."""
        missing = {"metrics", "n_bins", "num_examples", "reliability"} - set(data)
        if missing:
            raise ValueError(f"not an hf_kd uncertainty report: missing key(s) {sorted(missing)}")
        teacher_metrics = data.get("teacher_metrics")
        return cls(
            metrics=_from_json(data["metrics"]),
            n_bins=int(data["n_bins"]),
            num_examples=int(data["num_examples"]),
            reliability=_from_json(data["reliability"]),
            teacher_metrics=None if teacher_metrics is None else _from_json(teacher_metrics),
            split=data.get("split"),
            calibration_temperature=data.get("calibration_temperature"),
            model_name=data.get("model_name"),
        )

    @classmethod
    def load(cls, directory: str | os.PathLike) -> UncertaintyReport:
        """Read `directory/report.json` written by [`~UncertaintyReport.save`]."""
        path = Path(directory) / REPORT_FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"no {REPORT_FILENAME} in {directory}")
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))

    def _panel_titles(self) -> dict[str, str]:
        name = self.model_name or "model"
        if self.calibration_temperature is not None:
            name = f"{name} (calibrated, T={self.calibration_temperature:.3g})"
        titles = {"model": name}
        if "teacher" in self.reliability:
            titles["teacher"] = "teacher"
        return titles

    def save(self, directory: str | os.PathLike) -> dict[str, Path]:
        """
        Write `report.json`, `reliability_diagram.png` and `confidence_histogram.png` into `directory` (created if
        needed). With a teacher, both plots have a teacher panel next to the model's.

        Plots need matplotlib (`pip install hf_kd[plots]`); the JSON is written first either way.

        Returns:
            `dict[str, pathlib.Path]` with keys `report`, `reliability_diagram` and `confidence_histogram`.
        """
        from .plots import plot_confidence_histogram, plot_reliability_diagram

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        report_path = directory / REPORT_FILENAME
        tmp = report_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2), encoding="utf-8")
        os.replace(tmp, report_path)  # a reader never sees half a report

        titles = self._panel_titles()
        panels = {titles[key]: bins for key, bins in self.reliability.items()}
        split = f" ({self.split} split, {self.num_examples} examples)" if self.split else ""
        return {
            "report": report_path,
            "reliability_diagram": plot_reliability_diagram(
                panels, directory / RELIABILITY_DIAGRAM_FILENAME, title=f"Reliability diagram{split}"
            ),
            "confidence_histogram": plot_confidence_histogram(
                panels, directory / CONFIDENCE_HISTOGRAM_FILENAME, title=f"Confidence histogram{split}"
            ),
        }


def _teacher_logits(teacher, model: nn.Module, dataset, batch_size: int, data_collator) -> torch.Tensor:
    if teacher is None:
        logits = torch.tensor(dataset[TEACHER_LOGITS_COLUMN], dtype=torch.float32)
        if logits.ndim != 2 or logits.shape[0] != len(dataset):
            raise ValueError(
                f"column {TEACHER_LOGITS_COLUMN!r} must hold one row of logits per example, got shape "
                f"{tuple(logits.shape)}"
            )
        return logits
    teacher = load_teacher(teacher)
    config, teacher_config = getattr(model, "config", None), getattr(teacher, "config", None)
    if config is not None and teacher_config is not None:
        check_label_spaces(config, teacher_config)
        check_label_names(dataset, "dataset", {"teacher": teacher_config})
        if getattr(config, "vocab_size", None) != getattr(teacher_config, "vocab_size", None):
            raise ValueError(
                f"the teacher's vocabulary ({teacher_config.vocab_size} tokens) differs from the model's "
                f"({config.vocab_size}): it cannot read the same input_ids. Add a '{TEACHER_LOGITS_COLUMN}' column "
                "computed with the teacher's tokenizer instead (e.g. DistillTrainer.with_teacher_logits)."
            )
    parameter = next(model.parameters(), None)
    if parameter is not None and next(teacher.parameters()).device != parameter.device:
        teacher.to(parameter.device)
    return compute_logits(teacher, dataset, batch_size, data_collator, desc="Teacher logits")


def evaluate_uncertainty(
    model: nn.Module,
    dataset: datasets.Dataset,
    teacher: nn.Module | str | os.PathLike | None = None,
    n_bins: int = 15,
    batch_size: int = 64,
    label_column: str = "label",
    human_distribution_column: str = "human_label_dist",
    data_collator: Callable | None = None,
    split: str | None = None,
    model_name: str | None = None,
) -> UncertaintyReport:
    r"""
    Evaluate the calibration and uncertainty of a sequence classifier on a tokenized dataset.

    The model runs once over the data ([`compute_logits`]); probabilities are `softmax(logits)`. A model calibrated
    with [`hf_kd.fold_temperature`] therefore reports its calibrated numbers, and the report records the folded
    temperature. Metrics follow [`hf_kd.metrics`]: ECE/MCE over `n_bins` equal-width bins of top-label confidence
    (Guo et al., 2017, https://huggingface.co/papers/1706.04599), NLL in nats, the multi-class Brier score, mean
    predictive entropy; KL and JS distance to human label distributions as ChaosNLI computes them (Nie et al., 2020,
    https://huggingface.co/papers/2010.03532); sigma as Vengertsev & Sherman (2024,
    https://huggingface.co/papers/2401.11365).

    Args:
        model (`nn.Module`):
            The classifier, e.g. a [`~transformers.PreTrainedModel`] for sequence classification.
        dataset ([`~datasets.Dataset`]):
            Tokenized data (`input_ids`, optionally `attention_mask`/`token_type_ids`) with gold labels.
        teacher (`nn.Module`, `str` or `os.PathLike`, *optional*):
            A teacher model, Hub id or local folder, run on the same `input_ids` (so it must share the model's
            tokenizer). Without it, a `teacher_logits` column of the dataset is used when present.
        n_bins (`int`, *optional*, defaults to `15`):
            Number of equal-width confidence bins.
        batch_size (`int`, *optional*, defaults to `64`):
            Rows per forward pass.
        label_column (`str`, *optional*, defaults to `"label"`):
            Column of gold class indices.
        human_distribution_column (`str`, *optional*, defaults to `"human_label_dist"`):
            Column of human label distributions (one row of `num_labels` shares per example, as the
            [`hf_kd.data`] loaders write it); used when present.
        data_collator (`Callable`, *optional*):
            See [`compute_logits`].
        split (`str`, *optional*):
            Name of the split, recorded in the report.
        model_name (`str`, *optional*):
            Name used in plot titles; defaults to the last part of `model.config.name_or_path`.

    Returns:
        [`UncertaintyReport`].

    Example:

    ```python
    >>> from hf_kd import evaluate_uncertainty
    >>> report = evaluate_uncertainty(student, tokenized["test"], teacher="my-org/minilm-l6-rt", split="test")
    >>> report.metrics["ece"], report.n_bins
    >>> report.save("student/uncertainty/test")  # report.json + reliability_diagram.png + confidence_histogram.png
    ```
    """
    _check_model(model)
    _check_dataset(dataset)
    _check_n_bins(n_bins)
    _check_batch_size(batch_size)
    labels = read_labels(dataset, label_column, "evaluate_uncertainty")
    check_label_names(dataset, "dataset", {"model": getattr(model, "config", None)})
    logits = compute_logits(model, dataset, batch_size, data_collator)
    num_labels = logits.shape[-1]
    human = None
    if human_distribution_column in dataset.column_names:
        human = _read_distributions(dataset, human_distribution_column, num_labels)
    teacher_logits = None
    if teacher is not None or TEACHER_LOGITS_COLUMN in dataset.column_names:
        teacher_logits = _teacher_logits(teacher, model, dataset, batch_size, data_collator)

    config = getattr(model, "config", None)
    hf_kd_info = getattr(config, "hf_kd", None) or {}
    if model_name is None and config is not None and getattr(config, "name_or_path", None):
        model_name = Path(str(config.name_or_path)).name
    return UncertaintyReport.from_logits(
        logits,
        labels,
        teacher_logits=teacher_logits,
        human_probs=human,
        n_bins=n_bins,
        split=split,
        calibration_temperature=hf_kd_info.get("temperature"),
        model_name=model_name,
    )
