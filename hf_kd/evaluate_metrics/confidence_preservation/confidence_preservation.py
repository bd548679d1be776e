"""Confidence-preservation sigma (Vengertsev & Sherman, 2024) as an `evaluate` module:
`hf_kd.metrics.confidence_preservation`."""

# One import per line (evaluate reads the dependencies line by line); `import ... as` keeps the base class out of
# this module's namespace, where evaluate takes the first metric class it finds.
import datasets

import hf_kd.evaluate_metrics.base as base
import hf_kd.metrics

_DESCRIPTION = """
Confidence-preservation statistic sigma of a distilled student: the population standard deviation, over the examples
that both the teacher and the student classify correctly, of delta = p_teacher(c) - p_student(c), with c class 0 by
default (the reference code), or the gold class with `class_index=None`. A student preserves the teacher's confidence
when sigma on the training set is at most a threshold kappa (0.05 in the paper's experiments). NaN when no example is
classified correctly by both models. Computed by `hf_kd.metrics.confidence_preservation`.
"""

_CITATION = """
@article{vengertsev2024confidence,
  title   = {Confidence Preservation Property in Knowledge Distillation Abstractions},
  author  = {Vengertsev, Dmitry and Sherman, Elena},
  journal = {arXiv preprint arXiv:2401.11365},
  year    = {2024}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`, shape `(N, K)`): the student's class probabilities, rows summing to 1.
    references (`list` of `int`, shape `(N,)`): gold class indices in `[0, K)`.
    teacher_predictions (`list` of `list` of `float`, shape `(N, K)`): the teacher's class probabilities.
    class_index (`int` or `None`, *optional*, defaults to the load-time `class_index`, itself 0 by default): the class
        whose probability is compared, or `None` for the gold class.
Returns:
    sigma (`float` >= 0, or NaN): the confidence-preservation statistic.
Examples:
    >>> sigma = evaluate.load(hf_kd.metrics.module_path("confidence_preservation"))
    >>> sigma.compute(predictions=[[0.75, 0.25], [0.5, 0.5]], references=[0, 0],
    ...               teacher_predictions=[[1.0, 0.0], [1.0, 0.0]])
    {'sigma': 0.125}
"""


class ConfidencePreservation(base.HfKdMetric):
    DESCRIPTION, CITATION, INPUTS_DESCRIPTION = _DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION
    FEATURES = datasets.Features(
        {"predictions": base.PROBABILITIES, "references": base.CLASS_INDEX, "teacher_predictions": base.PROBABILITIES}
    )
    REFERENCE_URLS = [
        "https://huggingface.co/papers/2401.11365", "https://github.com/vengertsev/distill_abstraction_sgai23"
    ]
    OPTIONS = {"class_index": 0}

    def _compute(self, predictions, references, teacher_predictions, class_index=base.UNSET):
        sigma = hf_kd.metrics.confidence_preservation(
            base.stack_rows(teacher_predictions, "teacher_predictions"),
            base.stack_rows(predictions, "predictions"),
            references,
            class_index=self.option("class_index", class_index),
        )
        return {"sigma": sigma}
