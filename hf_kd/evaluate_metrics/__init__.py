"""hf_kd's uncertainty metrics as Hugging Face `evaluate` modules: one folder per metric, `<name>/<name>.py` and its
metric card `<name>/README.md`, named after the `hf_kd.metrics` (or `hf_kd.prediction_sets`) function it wraps.

One module per metric rather than one family module, because that is how `evaluate` users pick metrics
(`evaluate.load(...)` of one name, `evaluate.combine([...])` of several, one Hub repo per metric) and how the results
are keyed (`{"expected_calibration_error": ...}`). The scripts hold no math: each calls its hf_kd function, so the
numbers and the bad-input errors are hf_kd's. What the scripts share (options, input stacking, the evaluator that
passes probabilities) is in [`hf_kd.evaluate_metrics.base`]; this package itself imports nothing, so that
`hf_kd.metrics.module_path` and `hf-kd push-metrics` work without `evaluate` installed.

Modules (each wraps the `hf_kd.metrics` function of its name unless said; inputs; options):

- `expected_calibration_error`, `maximum_calibration_error`: probabilities, labels; `n_bins` (15).
- `negative_log_likelihood`: probabilities, labels; `eps` (1e-12). `brier_score`: probabilities, labels.
- `predictive_entropy`: probabilities.
- `confidence_preservation` (result `sigma`): student probabilities, labels, `teacher_predictions`; `class_index` (0).
- `human_distribution_divergence` (`kl`, `js_distance`): probabilities, human label distributions as `references`.
- `prediction_set_metrics` (`hf_kd.prediction_sets`): per-example, per-exit set masks `(N, L, K)`, labels.
- `lm_metrics`: next-token **logits** `(N, seq, vocab)` (the one module that takes logits), token labels; `n_bins`.

Load one offline with `evaluate.load(hf_kd.metrics.module_path("expected_calibration_error"))`; options (`n_bins`,
...) are keyword arguments of `evaluate.load` or of `compute`. The human label distributions are the `references` of
`human_distribution_divergence` (one row per example, batched and gathered with the predictions), not an option.
"""
