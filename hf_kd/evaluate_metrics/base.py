"""What hf_kd's `evaluate` modules share: [`HfKdMetric`] (the `MetricInfo`, options at load or compute time, stacking
the per-example rows `evaluate` stores back into arrays), and [`ProbabilityTextClassificationEvaluator`], the
`text-classification` evaluator that passes class probabilities instead of predicted labels.

Inputs: `predictions` are **probabilities** `(N, K)` (rows summing to 1, e.g. `softmax(logits)` or a pipeline's
scores), never logits, exactly what the wrapped `hf_kd.metrics` functions take; their checks name a row that is not a
distribution ("Pass probabilities, e.g. softmax(logits), not logits"), which also catches logits mixed with
probabilities. `references` are class indices `(N,)`, or what the metric compares with (human label distributions).
"""

from __future__ import annotations

import inspect

import datasets
import evaluate
import numpy as np
from evaluate.evaluator import TextClassificationEvaluator

__all__ = [
    "CLASS_INDEX",
    "GUO_2017",
    "PROBABILITY_INPUTS",
    "PROBABILITIES",
    "UNSET",
    "HfKdMetric",
    "ProbabilityTextClassificationEvaluator",
    "stack_rows",
]

PROBABILITIES = datasets.Sequence(datasets.Value("float64"))
"""One example's class probabilities, `(K,)`."""
CLASS_INDEX = datasets.Value("int64")
"""One example's gold class index in `[0, K)`."""


PROBABILITY_INPUTS = """\
    predictions (`list` of `list` of `float`, shape `(N, K)`): class probabilities of each example, rows summing to
        1 (e.g. the softmax of the logits); logits are rejected.
    references (`list` of `int`, shape `(N,)`): gold class indices in `[0, K)`.
"""
"""The `Args:` lines of `predictions` (probabilities) and `references` (class indices), shared by the modules."""

GUO_2017 = """
@inproceedings{guo2017calibration,
  title     = {On Calibration of Modern Neural Networks},
  author    = {Guo, Chuan and Pleiss, Geoff and Sun, Yu and Weinberger, Kilian Q.},
  booktitle = {Proceedings of the 34th International Conference on Machine Learning},
  pages     = {1321--1330},
  year      = {2017}
}
"""
"""The citation of the top-label ECE (classification and next-token)."""


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset()
"""Default of the options of `_compute`: "not given at compute time, use the one given at load time" (`None` is a
value of some options, e.g. `class_index=None`)."""

# What evaluate.load passes to every module's __init__ (config_name, cache_dir, process_id, ...).
_MODULE_ARGUMENTS = frozenset(inspect.signature(evaluate.EvaluationModule.__init__).parameters) - {"self", "kwargs"}


def stack_rows(values, name: str) -> np.ndarray:
    """
    The rows `evaluate` stored for one input, as one float64 array `(N, ...)`.

    `evaluate` keeps a `Sequence` input row by row; rows of different lengths come back as an object array, which
    is an input error here (every row must have the same number of classes), reported with the first row that
    differs rather than as numpy's "inhomogeneous shape".
    """
    if isinstance(values, np.ndarray) and values.dtype != object:
        return values.astype(np.float64, copy=False)
    rows = [np.asarray(row, dtype=np.float64) for row in values]
    for i, row in enumerate(rows):
        if row.shape != rows[0].shape:
            raise ValueError(
                f"every row of {name} must have the same shape (one entry per class); row 0 has {rows[0].shape} and "
                f"row {i} has {row.shape}"
            )
    return np.stack(rows) if rows else np.zeros((0, 0))


class HfKdMetric(evaluate.Metric):
    """
    Base of hf_kd's `evaluate` metric modules: a subclass sets the class attributes below and writes `_compute`,
    which calls its `hf_kd.metrics` function.

    Options (`OPTIONS`, e.g. `n_bins`) are given at load time, `evaluate.load(path, n_bins=10)`, which is the only way
    through `evaluate.combine` (it passes the same keyword arguments to every module) and `evaluate.evaluator`, or at
    compute time, `metric.compute(..., n_bins=10)`, which wins for that call. An unknown load-time keyword is an
    error rather than being ignored (`evaluate.EvaluationModule` would drop it silently).

    Class attributes:
        DESCRIPTION, CITATION, INPUTS_DESCRIPTION (`str`): the `MetricInfo` texts (the citation names the paper).
        FEATURES (`datasets.Features`): the inputs, one row per example.
        REFERENCE_URLS (`list[str]`): the paper (and the reference code whose conventions the function follows).
        OPTIONS (`dict[str, Any]`): option name -> default (the wrapped function's default).
    """

    DESCRIPTION = ""
    CITATION = ""
    INPUTS_DESCRIPTION = ""
    FEATURES: datasets.Features
    REFERENCE_URLS: list[str] = []
    OPTIONS: dict = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.__doc__ = cls.DESCRIPTION + cls.INPUTS_DESCRIPTION  # what evaluate's add_start_docstrings would write

    def __init__(self, config_name=None, **kwargs):
        unknown = sorted(set(kwargs) - _MODULE_ARGUMENTS - set(self.OPTIONS))
        if unknown:
            raise ValueError(
                f"{type(self).__name__} got unknown option(s) {unknown}; its options are {sorted(self.OPTIONS)}"
            )
        self.options = {name: kwargs.pop(name, default) for name, default in self.OPTIONS.items()}
        super().__init__(config_name=config_name, **kwargs)

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=self.DESCRIPTION,
            citation=self.CITATION,
            inputs_description=self.INPUTS_DESCRIPTION,
            features=self.FEATURES,
            reference_urls=self.REFERENCE_URLS,
            license="apache-2.0",
        )

    def option(self, name: str, value):
        """`value` when it was given to `_compute`, else the option given at load time (or its default)."""
        return self.options[name] if value is UNSET else value


class ProbabilityTextClassificationEvaluator(TextClassificationEvaluator):
    """
    The `text-classification` evaluator of `evaluate`, passing each example's **class probabilities** `(K,)` to the
    metrics instead of its predicted label, so that calibration metrics (ECE, NLL, Brier, ...) see the confidences.

    `evaluate.evaluator("text-classification")` calls the pipeline with its default `top_k=1` and keeps only the label:
    an ECE of labels is meaningless. This subclass calls the pipeline with `top_k=None` (every class's score: the
    softmax of a single-label classifier) and orders the scores by class index, with `label_mapping` (pipeline label ->
    class index, as in the parent) or, when it is not given, the model's `config.label2id`. Everything else is the
    parent's `compute` (data, `input_column`, `label_column`, bootstrap, timings). A ready pipeline, a model folder or
    a Hub id can be passed (the parent fails on a ready pipeline under transformers 5).

    Example:

    ```python
    >>> import evaluate
    >>> from transformers import pipeline
    >>> from hf_kd.evaluate_metrics.base import ProbabilityTextClassificationEvaluator
    >>> from hf_kd.metrics import module_path
    >>> metrics = evaluate.combine([evaluate.load(module_path(name)) for name in
    ...                             ("expected_calibration_error", "negative_log_likelihood", "brier_score")])
    >>> results = ProbabilityTextClassificationEvaluator().compute(
    ...     pipeline("text-classification", model="outputs/student"), data=test_split, metric=metrics)
    ```
    """

    PIPELINE_KWARGS = {"truncation": True, "top_k": None}
    _model_label2id: dict = {}  # the pipeline model's config.label2id, read by prepare_pipeline

    def prepare_pipeline(self, model_or_pipeline, tokenizer=None, feature_extractor=None, device=None):
        from transformers import Pipeline

        if isinstance(model_or_pipeline, Pipeline):
            # evaluate 0.4.6 tests isinstance(..., transformers.TFPreTrainedModel) first, an AttributeError under
            # transformers 5 (TensorFlow support is gone): a ready pipeline is used as it is, as the parent would.
            pipe = model_or_pipeline
            if pipe.task != self.task:
                raise ValueError(f"the pipeline's task is {pipe.task!r}; this evaluator needs {self.task!r}")
        else:
            pipe = super().prepare_pipeline(model_or_pipeline, tokenizer, feature_extractor, device)
        config = getattr(getattr(pipe, "model", None), "config", None)
        self._model_label2id = dict(getattr(config, "label2id", None) or {})
        return pipe

    def predictions_processor(self, predictions, label_mapping):
        mapping = label_mapping if label_mapping is not None else self._model_label2id
        if not mapping:
            raise ValueError("label_mapping is needed (pipeline label -> class index): the model has no label2id")
        num_classes = len(mapping)
        if sorted(mapping.values()) != list(range(num_classes)):
            raise ValueError(
                f"label_mapping must map the {num_classes} labels onto the class indices 0..{num_classes - 1}, got "
                f"{mapping}"
            )
        probabilities = np.zeros((len(predictions), num_classes))
        for i, scores in enumerate(predictions):
            if isinstance(scores, dict):  # a pipeline that ignored top_k=None returns the top label only
                raise ValueError(f"prediction {i} holds one label's score ({scores}); the pipeline must return "
                                 "every class's score (top_k=None)")
            for score in scores:
                if score["label"] not in mapping:
                    raise ValueError(f"pipeline label {score['label']!r} is not in label_mapping {mapping}")
                probabilities[i, mapping[score["label"]]] = score["score"]
        return {"predictions": probabilities}
