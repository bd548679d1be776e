"""Next-token metrics of a causal language model (perplexity, token accuracy, token-level ECE, entropy) as an
`evaluate` module: `hf_kd.metrics.lm_metrics`."""

# One import per line (evaluate reads the dependencies line by line); `import ... as` keeps the base class out of
# this module's namespace, where evaluate takes the first metric class it finds.
import datasets
import numpy as np

import hf_kd.evaluate_metrics.base as base
import hf_kd.metrics

_DESCRIPTION = """
Next-token metrics of a causal language model over the counted tokens (label != -100): `perplexity` (exp of the mean
token NLL), `token_accuracy` (top-1 next token = gold token), `token_ece` (the top-label ECE of Guo et al. with every
counted token as one prediction: confidence = top-1 next-token probability, `n_bins` equal-width bins),
`token_entropy` (mean next-token entropy, nats) and `ece_bins`.
Unlike hf_kd's classification modules this one takes LOGITS, as `hf_kd.metrics.lm_metrics` does (a vocabulary-sized
softmax per token is its job), aligned with the labels: the caller shifts (`logits[:-1]`, `labels[1:]`). Sequences of
different lengths are padded with ignored tokens. It keeps every logit of the evaluation set, so it suits small
evaluations; in a `Trainer`, use `hf_kd.metrics.make_lm_compute_metrics`, which keeps five numbers per token.
Computed by `hf_kd.metrics.lm_metrics`.
"""

_CITATION = base.GUO_2017

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of shape `(N, seq, vocab)`): next-token logits of each sequence, aligned with `references`.
    references (`list` of shape `(N, seq)`): gold next tokens, -100 for tokens that are not counted.
    n_bins (`int`, *optional*, defaults to the load-time `n_bins`, itself 15 by default): number of ECE bins.
Returns:
    perplexity, token_accuracy, token_ece, token_entropy, ece_bins (`float`).
Examples:
    >>> lm = evaluate.load(hf_kd.metrics.module_path("lm_metrics"))
    >>> round(lm.compute(predictions=[[[0.0, 0.0], [0.0, 0.0]]], references=[[0, -100]])["perplexity"], 6)
    2.0
"""


class LmMetrics(base.HfKdMetric):
    DESCRIPTION, CITATION, INPUTS_DESCRIPTION = _DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION
    FEATURES = datasets.Features(
        {
            "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
            "references": datasets.Sequence(datasets.Value("int64")),
        }
    )
    REFERENCE_URLS = ["https://huggingface.co/papers/1706.04599"]
    OPTIONS = {"n_bins": 15}

    def _compute(self, predictions, references, n_bins=base.UNSET):
        logits = [np.asarray(row, dtype=np.float32) for row in predictions]
        length, vocab = max(len(row) for row in references), logits[0].shape[-1]
        padded_logits = np.zeros((len(logits), length, vocab), dtype=np.float32)
        padded_labels = np.full((len(logits), length), -100, dtype=np.int64)
        for i, (row, labels) in enumerate(zip(logits, references)):
            if row.shape != (len(labels), vocab):
                raise ValueError(
                    f"predictions[{i}] must be ({len(labels)} tokens, {vocab} vocabulary) logits to match "
                    f"references[{i}] and predictions[0], got {row.shape}"
                )
            padded_logits[i, : len(labels)], padded_labels[i, : len(labels)] = row, labels
        return hf_kd.metrics.lm_metrics(padded_logits, padded_labels, n_bins=self.option("n_bins", n_bins))
