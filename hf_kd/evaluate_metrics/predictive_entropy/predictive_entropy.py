"""Mean predictive entropy (the measure of Sultan, 2023) as an `evaluate` module:
`hf_kd.metrics.predictive_entropy`."""

# One import per line (evaluate reads the dependencies line by line); `import ... as` keeps the base class out of
# this module's namespace, where evaluate takes the first metric class it finds.
import datasets

import hf_kd.evaluate_metrics.base as base
import hf_kd.metrics

_DESCRIPTION = """
Mean predictive (Shannon) entropy of the class probabilities, -sum_k p_k log p_k in nats (0 log 0 = 0), averaged over
the examples: how uncertain the model is, whatever the labels. It needs no references; `references` given by
`evaluate.combine` (which passes the same inputs to every module) are ignored.
Computed by `hf_kd.metrics.predictive_entropy`.
"""

_CITATION = """
@inproceedings{sultan2023knowledge,
  title     = {Knowledge Distillation $\\approx$ Label Smoothing: Fact or Fallacy?},
  author    = {Sultan, Md Arafat},
  booktitle = {Proceedings of the 2023 Conference on Empirical Methods in Natural Language Processing},
  year      = {2023}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`, shape `(N, K)`): class probabilities of each example, rows summing to
        1 (e.g. the softmax of the logits); logits are rejected.
Returns:
    predictive_entropy (`float` >= 0): the mean entropy in nats (at most log K).
Examples:
    >>> entropy = evaluate.load(hf_kd.metrics.module_path("predictive_entropy"))
    >>> entropy.compute(predictions=[[1.0, 0.0], [0.5, 0.5]])
    {'predictive_entropy': 0.34657359027997264}
"""


class PredictiveEntropy(base.HfKdMetric):
    DESCRIPTION, CITATION, INPUTS_DESCRIPTION = _DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION
    FEATURES = datasets.Features({"predictions": base.PROBABILITIES})
    REFERENCE_URLS = ["https://huggingface.co/papers/2301.12609"]

    def _compute(self, predictions):
        return {"predictive_entropy": hf_kd.metrics.predictive_entropy(base.stack_rows(predictions, "predictions"))}
