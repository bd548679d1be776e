"""Top-label expected calibration error (Guo et al., 2017) as an `evaluate` module:
`hf_kd.metrics.expected_calibration_error`."""

# evaluate reads this script's dependencies line by line: one import per line. `import ... as` (not `from ... import`)
# keeps the base class out of this module's namespace, where evaluate takes the first metric class it finds.
import datasets

import hf_kd.evaluate_metrics.base as base
import hf_kd.metrics

_DESCRIPTION = """
Top-label expected calibration error (ECE): how far a classifier's confidence is from its accuracy.
Confidence is the largest class probability of each example and a prediction is correct when that class is the label.
The examples are put in `n_bins` equal-width confidence bins (right-closed, `(b/n, (b+1)/n]`, the first one also
holds 0) and ECE = sum over the bins of (bin size / N) * |accuracy in the bin - mean confidence in the bin|.
Lower is better; 0 is perfect calibration. Always report the number of bins with an ECE (the result carries it).
Computed by `hf_kd.metrics.expected_calibration_error`.
"""

_CITATION = base.GUO_2017

_KWARGS_DESCRIPTION = "\nArgs:\n" + base.PROBABILITY_INPUTS + """\
    n_bins (`int`, *optional*, defaults to the load-time `n_bins`, itself 15 by default): number of equal-width bins.
Returns:
    expected_calibration_error (`float` in `[0, 1]`): the ECE.
    n_bins (`int`): the number of bins it was computed with.
Examples:
    >>> ece = evaluate.load(hf_kd.metrics.module_path("expected_calibration_error"), n_bins=10)
    >>> ece.compute(predictions=[[0.75, 0.25], [0.25, 0.75]], references=[0, 0])
    {'expected_calibration_error': 0.25, 'n_bins': 10}
"""


class ExpectedCalibrationError(base.HfKdMetric):
    DESCRIPTION, CITATION, INPUTS_DESCRIPTION = _DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION
    FEATURES = datasets.Features({"predictions": base.PROBABILITIES, "references": base.CLASS_INDEX})
    REFERENCE_URLS = ["https://huggingface.co/papers/1706.04599"]
    OPTIONS = {"n_bins": 15}

    def _compute(self, predictions, references, n_bins=base.UNSET):
        n_bins = self.option("n_bins", n_bins)
        probs = base.stack_rows(predictions, "predictions")
        value = hf_kd.metrics.expected_calibration_error(probs, references, n_bins)
        return {"expected_calibration_error": value, "n_bins": n_bins}
