"""Multi-class Brier score (Brier, 1950) as an `evaluate` module: `hf_kd.metrics.brier_score`."""

# One import per line (evaluate reads the dependencies line by line); `import ... as` keeps the base class out of
# this module's namespace, where evaluate takes the first metric class it finds.
import datasets

import hf_kd.evaluate_metrics.base as base
import hf_kd.metrics

_DESCRIPTION = """
Multi-class Brier score: the mean over examples of the squared distance between the predicted class probabilities and
the one-hot gold label, sum_k (p_k - 1[k = label])^2, in [0, 2]. A proper scoring rule; lower is better. For two
classes it is twice the binary Brier score of `sklearn.metrics.brier_score_loss(y, p[:, 1])`.
Computed by `hf_kd.metrics.brier_score`.
"""

_CITATION = """
@article{brier1950verification,
  title   = {Verification of Forecasts Expressed in Terms of Probability},
  author  = {Brier, Glenn W.},
  journal = {Monthly Weather Review},
  volume  = {78},
  number  = {1},
  pages   = {1--3},
  year    = {1950}
}
"""

_KWARGS_DESCRIPTION = "\nArgs:\n" + base.PROBABILITY_INPUTS + """\
Returns:
    brier_score (`float` in `[0, 2]`): the multi-class Brier score.
Examples:
    >>> brier = evaluate.load(hf_kd.metrics.module_path("brier_score"))
    >>> brier.compute(predictions=[[1.0, 0.0], [0.5, 0.5]], references=[0, 1])
    {'brier_score': 0.25}
"""


class BrierScore(base.HfKdMetric):
    DESCRIPTION, CITATION, INPUTS_DESCRIPTION = _DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION
    FEATURES = datasets.Features({"predictions": base.PROBABILITIES, "references": base.CLASS_INDEX})
    REFERENCE_URLS = ["https://doi.org/10.1175/1520-0493(1950)078<0001:VOFEIT>2.0.CO;2"]

    def _compute(self, predictions, references):
        return {"brier_score": hf_kd.metrics.brier_score(base.stack_rows(predictions, "predictions"), references)}
