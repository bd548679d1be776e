"""KL divergence and Jensen-Shannon distance to human label distributions (ChaosNLI, Nie et al., 2020) as an
`evaluate` module: `hf_kd.metrics.human_distribution_divergence`."""

# One import per line (evaluate reads the dependencies line by line); `import ... as` keeps the base class out of
# this module's namespace, where evaluate takes the first metric class it finds.
import datasets

import hf_kd.evaluate_metrics.base as base
import hf_kd.metrics

_DESCRIPTION = """
How far a model's class probabilities are from the distribution of human annotations (e.g. ChaosNLI's 100 labels per
example), with exactly ChaosNLI's conventions: model probabilities floored at 1e-15 and renormalised, `kl` the mean of
KL(human || model) in nats (scipy.stats.entropy), `js_distance` the mean Jensen-Shannon distance (the square root of
the JS divergence, natural log; scipy.spatial.distance.jensenshannon). Lower is better for both.
The human distributions are the references: one row per example, like the predictions, so that they are batched
(`add_batch`) and gathered across processes with them. Computed by `hf_kd.metrics.human_distribution_divergence`.
"""

_CITATION = """
@inproceedings{nie2020what,
  title     = {What Can We Learn from Collective Human Opinions on Natural Language Inference Data?},
  author    = {Nie, Yixin and Zhou, Xiang and Bansal, Mohit},
  booktitle = {Proceedings of the 2020 Conference on Empirical Methods in Natural Language Processing (EMNLP)},
  pages     = {9131--9143},
  year      = {2020}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`, shape `(N, K)`): the model's class probabilities, rows summing to 1
        (e.g. the softmax of the logits); logits are rejected.
    references (`list` of `list` of `float`, shape `(N, K)`): the human label distributions, rows summing to 1 and
        as wide as the predictions (zeros are allowed).
Returns:
    kl (`float` >= 0): mean KL(human || model), nats.
    js_distance (`float` in `[0, sqrt(log 2)]`): mean Jensen-Shannon distance.
Examples:
    >>> divergence = evaluate.load(hf_kd.metrics.module_path("human_distribution_divergence"))
    >>> divergence.compute(predictions=[[0.5, 0.5]], references=[[0.5, 0.5]])
    {'kl': 0.0, 'js_distance': 0.0}
"""


class HumanDistributionDivergence(base.HfKdMetric):
    DESCRIPTION, CITATION, INPUTS_DESCRIPTION = _DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION
    FEATURES = datasets.Features({"predictions": base.PROBABILITIES, "references": base.PROBABILITIES})
    REFERENCE_URLS = ["https://huggingface.co/papers/2010.03532", "https://github.com/easonnie/ChaosNLI"]

    def _compute(self, predictions, references):
        return hf_kd.metrics.human_distribution_divergence(
            base.stack_rows(references, "references"), base.stack_rows(predictions, "predictions")
        )
