"""hf_kd's uncertainty metrics as Hugging Face `evaluate` modules: one folder per metric, `<name>/<name>.py` and its
metric card `<name>/README.md`, named after the `hf_kd.metrics` (or `hf_kd.prediction_sets`) function it wraps.

One module per metric rather than one family module, because that is how `evaluate` users pick metrics
(`evaluate.load(...)` of one name, `evaluate.combine([...])` of several, one Hub repo per metric) and how the results
are keyed (`{"expected_calibration_error": ...}`). The scripts hold no math: each calls its hf_kd function, so the
numbers and the bad-input errors are hf_kd's. What the scripts share (options, input stacking, the evaluator that
passes probabilities) is in [`hf_kd.evaluate_metrics.base`]; this package itself imports nothing, so that
`hf_kd.metrics.module_path` and `hf-kd push-metrics` work without `evaluate` installed.

Load one offline with `evaluate.load(hf_kd.metrics.module_path("expected_calibration_error"))`.
"""
