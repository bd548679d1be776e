"""Mean negative log-likelihood of the gold labels as an `evaluate` module: `hf_kd.metrics.negative_log_likelihood`."""

# One import per line (evaluate reads the dependencies line by line); `import ... as` keeps the base class out of
# this module's namespace, where evaluate takes the first metric class it finds.
import datasets

import hf_kd.evaluate_metrics.base as base
import hf_kd.metrics

_DESCRIPTION = """
Negative log-likelihood (NLL, the cross-entropy of the gold labels): the mean over examples of -log p(label), natural
log, a proper scoring rule that rewards calibrated confidence. The gold probability is clipped to `[eps, 1]` before the
log, so a zero probability gives a large finite value instead of infinity. Lower is better.
Computed by `hf_kd.metrics.negative_log_likelihood`.
"""

_CITATION = """
@inproceedings{quinonero2006evaluating,
  title     = {Evaluating Predictive Uncertainty Challenge},
  author    = {Qui{\\~n}onero-Candela, Joaquin and Rasmussen, Carl Edward and Sinz, Fabian and Bousquet, Olivier and
               Sch{\\"o}lkopf, Bernhard},
  booktitle = {Machine Learning Challenges Workshop (MLCW 2005)},
  series    = {Lecture Notes in Computer Science},
  volume    = {3944},
  pages     = {1--27},
  year      = {2006}
}
"""

_KWARGS_DESCRIPTION = "\nArgs:\n" + base.PROBABILITY_INPUTS + """\
    eps (`float`, *optional*, defaults to the load-time `eps`, itself 1e-12 by default): lower clipping bound of the
        gold probability.
Returns:
    negative_log_likelihood (`float` >= 0): the mean NLL in nats.
Examples:
    >>> nll = evaluate.load(hf_kd.metrics.module_path("negative_log_likelihood"))
    >>> nll.compute(predictions=[[0.5, 0.5], [0.5, 0.5]], references=[0, 1])
    {'negative_log_likelihood': 0.6931471805599453}
"""


class NegativeLogLikelihood(base.HfKdMetric):
    DESCRIPTION, CITATION, INPUTS_DESCRIPTION = _DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION
    FEATURES = datasets.Features({"predictions": base.PROBABILITIES, "references": base.CLASS_INDEX})
    REFERENCE_URLS = ["https://doi.org/10.1007/11736790_1"]
    OPTIONS = {"eps": 1e-12}

    def _compute(self, predictions, references, eps=base.UNSET):
        value = hf_kd.metrics.negative_log_likelihood(
            base.stack_rows(predictions, "predictions"), references, eps=self.option("eps", eps)
        )
        return {"negative_log_likelihood": value}
