"""Coverage, size and nestedness of per-exit prediction sets (Jazbec et al., 2024) as an `evaluate` module:
`hf_kd.prediction_sets.prediction_set_metrics`."""

# One import per line (evaluate reads the dependencies line by line); `import ... as` keeps the base class out of
# this module's namespace, where evaluate takes the first metric class it finds.
import datasets
import numpy as np

import hf_kd.evaluate_metrics.base as base
import hf_kd.prediction_sets

_DESCRIPTION = """
Quality of the prediction sets of an early-exit classifier, with the conventions of Jazbec et al.'s code: per exit
(lists with one entry per exit) the marginal `coverage` (fraction of examples whose label is in the set), the mean set
`size` and the `nestedness` (mean of |C_t ∩ (C_1 ∩ ... ∩ C_{t-1})| / |C_t|, 1 for an empty set and at the first
exit), plus `fully_nested` (fraction of examples whose sets never grow back) and `all_exit_coverage` (fraction whose
label is in the set at every exit, the event of the anytime-valid guarantee).
Computed by `hf_kd.prediction_sets.prediction_set_metrics`; the sets come from e.g.
`hf_kd.prediction_sets.avcs_prediction_sets` or `raps_prediction_sets`.
"""

_CITATION = """
@inproceedings{jazbec2024early,
  title     = {Early-Exit Neural Networks with Nested Prediction Sets},
  author    = {Jazbec, Metod and Forr{\\'e}, Patrick and Mandt, Stephan and Zhang, Dan and Nalisnick, Eric},
  booktitle = {Proceedings of the Fortieth Conference on Uncertainty in Artificial Intelligence (UAI)},
  year      = {2024}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of shape `(N, L, K)`): for each example, its prediction set at each of the `L` exits as a
        membership mask over the `K` classes (booleans, or 0/1; scores or probabilities are rejected).
    references (`list` of `int`, shape `(N,)`): gold class indices in `[0, K)`.
Returns:
    coverage, size, nestedness (`list` of `float`, one per exit), fully_nested, all_exit_coverage (`float`).
Examples:
    >>> sets = evaluate.load(hf_kd.metrics.module_path("prediction_set_metrics"))
    >>> sets.compute(predictions=[[[1, 1], [1, 0]], [[0, 1], [1, 1]]], references=[0, 1])
    {'coverage': [1.0, 1.0], 'size': [1.5, 1.5], 'nestedness': [1.0, 0.75], 'fully_nested': 0.5,
     'all_exit_coverage': 1.0}
"""


class PredictionSetMetrics(base.HfKdMetric):
    DESCRIPTION, CITATION, INPUTS_DESCRIPTION = _DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION
    # float64, not bool: casting to bool would turn scores into "non-zero = in the set" before hf_kd could reject them.
    FEATURES = datasets.Features(
        {"predictions": datasets.Sequence(base.PROBABILITIES), "references": base.CLASS_INDEX}
    )
    REFERENCE_URLS = ["https://huggingface.co/papers/2311.05931", "https://github.com/metodj/EENN-AVCS"]

    def _compute(self, predictions, references):
        sets = base.stack_rows(predictions, "predictions")  # (N, L, K): one row per example
        if sets.ndim != 3:
            raise ValueError(f"predictions must have shape (N, L exits, K classes), got {sets.shape}")
        # Contiguous (L, N, K), as hf_kd's callers hold it: the means then add in the same order, to the last digit.
        return hf_kd.prediction_sets.prediction_set_metrics(np.ascontiguousarray(sets.transpose(1, 0, 2)), references)
