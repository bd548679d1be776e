"""Maximum calibration error (Naeini et al., 2015) as an `evaluate` module:
`hf_kd.metrics.maximum_calibration_error`."""

# One import per line (evaluate reads the dependencies line by line); `import ... as` keeps the base class out of
# this module's namespace, where evaluate takes the first metric class it finds.
import datasets

import hf_kd.evaluate_metrics.base as base
import hf_kd.metrics

_DESCRIPTION = """
Maximum calibration error (MCE): the largest gap between accuracy and mean confidence over the non-empty bins of
the same equal-width confidence binning as the expected calibration error (confidence = largest class probability,
correct = that class is the label, bins `(b/n, (b+1)/n]`). The worst case that ECE averages away; lower is better.
Computed by `hf_kd.metrics.maximum_calibration_error`.
"""

_CITATION = """
@inproceedings{naeini2015obtaining,
  title     = {Obtaining Well Calibrated Probabilities Using Bayesian Binning},
  author    = {Naeini, Mahdi Pakdaman and Cooper, Gregory F. and Hauskrecht, Milos},
  booktitle = {Proceedings of the Twenty-Ninth AAAI Conference on Artificial Intelligence},
  pages     = {2901--2907},
  year      = {2015}
}
"""

_KWARGS_DESCRIPTION = "\nArgs:\n" + base.PROBABILITY_INPUTS + """\
    n_bins (`int`, *optional*, defaults to the load-time `n_bins`, itself 15 by default): number of equal-width bins.
Returns:
    maximum_calibration_error (`float` in `[0, 1]`): the MCE.
    n_bins (`int`): the number of bins it was computed with.
Examples:
    >>> mce = evaluate.load(hf_kd.metrics.module_path("maximum_calibration_error"), n_bins=10)
    >>> mce.compute(predictions=[[0.75, 0.25], [0.25, 0.75]], references=[0, 0])
    {'maximum_calibration_error': 0.25, 'n_bins': 10}
"""


class MaximumCalibrationError(base.HfKdMetric):
    DESCRIPTION, CITATION, INPUTS_DESCRIPTION = _DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION
    FEATURES = datasets.Features({"predictions": base.PROBABILITIES, "references": base.CLASS_INDEX})
    REFERENCE_URLS = ["https://ojs.aaai.org/index.php/AAAI/article/view/9602"]
    OPTIONS = {"n_bins": 15}

    def _compute(self, predictions, references, n_bins=base.UNSET):
        n_bins = self.option("n_bins", n_bins)
        probs = base.stack_rows(predictions, "predictions")
        value = hf_kd.metrics.maximum_calibration_error(probs, references, n_bins)
        return {"maximum_calibration_error": value, "n_bins": n_bins}
