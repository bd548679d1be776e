"""Model cards with calibration metrics, and pushing calibrated students to the Hugging Face Hub.

- [`build_eval_results`] is the one place where `huggingface_hub.EvalResult`s are built. Every field but the value is a
  function of (split, metric, bins), so re-rendering a card, or `huggingface_hub.metadata_update`, replaces numbers
  instead of appending duplicates.
- [`generate_model_card`] renders the Jinja template of the model's task shipped in `hf_kd.model_cards` (the task,
  `pipeline_tag`, comes from the model: [`pipeline_tag_of`], [`TASKS`]) as `huggingface_hub.ModelCard.from_template`
  does: `model-index` with every metric of every evaluated split, the method, teacher, hyperparameters and
  calibration temperature under an `hf_kd` metadata key, a readable metrics table, the reliability diagram and the
  citations. `base_model`, `datasets` and the teacher are Hub ids, never local paths. What depends on the method
  (name, paper, tags, template) is passed in by the trainer that calls it: this module imports no trainer.
- [`update_model_card`] re-renders `folder/README.md` from what the folder holds: the existing card (its metadata,
  and the method's paper as it cites it), `config.json` (`architectures`, `hf_kd.temperature`), `calibration.json`
  and the reports under `uncertainty/<name>/report.json`.
- [`push_to_hub`] uploads a folder (student, tokenizer, card, plots) in one commit. The local folder is only read,
  so a failed push can simply be retried; the token never reaches a file, a card, a log or an error message.
- [`push_metrics`] publishes hf_kd's `evaluate` modules (`hf_kd/evaluate_metrics/`) as Hub metric repos, the Spaces
  that `evaluate.load("<namespace>/<name>")` reads.
"""

from __future__ import annotations

import fnmatch
import importlib.resources
import json
import logging
import math
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .evaluation import RELIABILITY_DIAGRAM_FILENAME, REPORT_FILENAME, UncertaintyReport
from .metric_keys import EXIT_METRICS, parse_exit_key
from .metrics import EVALUATE_MODULES, module_path
from .version import __version__

logger = logging.getLogger(__name__)

__all__ = [
    "CALIBRATION_FILENAME",
    "EXIT_CALIBRATION_FILENAME",
    "REPORTS_DIR",
    "TASKS",
    "before_after_table",
    "build_eval_results",
    "exit_calibration_table",
    "generate_model_card",
    "layer_selection_table",
    "load_reports",
    "metrics_table",
    "pipeline_tag_of",
    "push_metrics",
    "push_to_hub",
    "resolve_hub_id",
    "save_model_card",
    "update_model_card",
]

TEMPLATES_PACKAGE = "hf_kd.model_cards"
REPORTS_DIR = "uncertainty"
"""Reports live in `<model folder>/uncertainty/<name>/` (`report.json` and the two PNGs)."""
CALIBRATION_FILENAME = "calibration.json"
"""[`hf_kd.CalibrationResult`] of the temperature folded into the model, next to `config.json`."""
EXIT_CALIBRATION_FILENAME = "exit_calibration.json"
"""[`hf_kd.ExitCalibrationResult`] of an early-exit causal LM's per-exit temperatures, next to `config.json`; the
per-exit token reliability diagrams lie in `exit_calibration/exit_{i}_reliability.png`."""
EXIT_RELIABILITY_DIAGRAM = "exit_calibration/exit_{}_reliability.png"
"""Where a saved folder keeps exit `i`'s token reliability diagram (`.format(i)`), relative to its card."""
EXIT_CALIBRATION_METRICS = ("token_ece", "nll", "brier")
"""The per-exit next-token metrics, before and after temperature scaling, that a card's model-index reports."""
# `exit_{i}_uncalibrated_{metric}` / `exit_{i}_calibrated_{metric}`: the model-index keys of those metrics.
_EXIT_CALIBRATION_KEY = re.compile(rf"exit_\d+_(un)?calibrated_({'|'.join(EXIT_CALIBRATION_METRICS)})")

# Hub task (`pipeline_tag`) -> its name in the model-index and its card template in hf_kd.model_cards. A task's
# template extends `base_model_card.md` (the sections every card has) with the task's blocks; a new task adds a line here, its
# template, and its class-name suffix below.
TASKS = {
    "text-classification": {"name": "Text Classification", "template": "text_classification_model_card.md"},
    "image-classification": {"name": "Image Classification", "template": "image_classification_model_card.md"},
    "text-generation": {"name": "Text Generation", "template": "text_generation_model_card.md"},
}
# A model's task, from the name of its class (what `config.architectures` records when it is saved) ...
_ARCHITECTURE_TASKS = {
    "ForSequenceClassification": "text-classification",
    "ForImageClassification": "image-classification",
    "ForCausalLM": "text-generation",
}
# ... or, for a model class named otherwise (a plain torch module, a custom class), from its main input.
_INPUT_TASKS = {"input_ids": "text-classification", "pixel_values": "image-classification"}

# metric_type in model-index -> readable name. The order is the order of tables and of model-index entries.
METRIC_NAMES = {
    "accuracy": "Accuracy",
    "ece": "ECE",
    "mce": "MCE",
    "nll": "NLL",
    "brier": "Brier score",
    "entropy": "Mean predictive entropy",
    "kl": "KL(human || model)",
    "js_distance": "JS distance to human labels",
    "sigma": "Confidence preservation sigma",
    # Causal LMs (hf_kd.metrics.lm_metrics): next-token metrics over the completion tokens.
    "perplexity": "Perplexity",
    "token_accuracy": "Next-token accuracy",
    "token_ece": "Token-level ECE",
    "token_entropy": "Mean next-token entropy",
    "top1_agreement": "Top-1 agreement with the teacher",
}
_BINNED = ("ece", "mce", "token_ece")

# Papers cited by every card that reports the corresponding metrics.
GUO_2017 = {
    "title": "On Calibration of Modern Neural Networks",
    "id": "1706.04599",
    "citation": (
        "@inproceedings{guo2017calibration,\n  title={On Calibration of Modern Neural Networks},\n"
        "  author={Guo, Chuan and Pleiss, Geoff and Sun, Yu and Weinberger, Kilian Q.},\n"
        "  booktitle={Proceedings of the 34th International Conference on Machine Learning},\n"
        "  pages={1321--1330},\n  year={2017}\n}"
    ),
}
VENGERTSEV_2024 = {
    "title": "Confidence Preservation Property in Knowledge Distillation Abstractions",
    "id": "2401.11365",
    "citation": (
        "@article{vengertsev2024confidence,\n"
        "  title={Confidence Preservation Property in Knowledge Distillation Abstractions},\n"
        "  author={Vengertsev, Dmitry and Sherman, Elena},\n  journal={arXiv:2401.11365},\n  year={2024}\n}"
    ),
}
MERONEN_2024 = {
    "title": "Fixing Overconfidence in Dynamic Neural Networks",
    "id": "2302.06359",
    "citation": (
        "@inproceedings{meronen2024fixing,\n  title={Fixing Overconfidence in Dynamic Neural Networks},\n"
        "  author={Meronen, Lassi and Trapp, Martin and Pilzer, Andrea and Yang, Le and Solin, Arno},\n"
        "  booktitle={Proceedings of the IEEE/CVF Winter Conference on Applications of Computer Vision (WACV)},\n"
        "  year={2024}\n}"
    ),
}
NIE_2020 = {
    "title": "What Can We Learn from Collective Human Opinions on Natural Language Inference Data?",
    "id": "2010.03532",
    "citation": (
        "@inproceedings{nie2020chaosnli,\n"
        "  title={What Can We Learn from Collective Human Opinions on Natural Language Inference Data?},\n"
        "  author={Nie, Yixin and Zhou, Xiang and Bansal, Mohit},\n  booktitle={Proceedings of EMNLP},\n"
        "  year={2020}\n}"
    ),
}

# Never uploaded by push_to_hub: training state (optimizer, RNG, checkpoints) is not part of a model repo,
# training_args.bin pickles TrainingArguments, which can hold `hub_token`, and *.tmp / .hf_kd-save-* are what an
# interrupted atomic write leaves behind.
PUSH_IGNORE_PATTERNS = (
    "checkpoint-*",
    "training_args.bin",
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
    "rng_state*.pth",
    "trainer_state.json",
    "runs/*",
    ".git/*",
    ".cache/*",
    "_*",
    "*.tmp",
    "*.lock",
    ".hf_kd-save-*",
)
# Files above this size are weights; the token leak scan reads everything smaller.
_SCAN_LIMIT_BYTES = 50 * 2**20


# --------------------------------------------------------------------------------------------------------------------
# Hub ids
# --------------------------------------------------------------------------------------------------------------------


def _is_hub_id(value: str) -> bool:
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def _local_path(value: str) -> Path | None:
    """`value` as a local path when it names one (an existing path, or anything that looks like a path)."""
    path = Path(value).expanduser()
    if path.exists() or value.startswith((".", "/", "~")) or "\\" in value or value.count("/") > 1:
        return path
    return None


def resolve_hub_id(value: str | os.PathLike | None) -> str | None:
    """
    The Hub id of a model given as a Hub id or a local folder, or `None` when there is none.

    A Hub id that is not a local path is returned as is. A folder inside a Hugging Face cache
    (`.../models--org--name/snapshots/<sha>`) maps back to `org/name`. Any other local path gives `None`: a path
    means nothing on the Hub, which rejects it in `base_model` and `datasets`.
    """
    if value is None:
        return None
    value = str(value)
    path = _local_path(value)
    if path is None:
        return value if _is_hub_id(value) else None
    for part in path.resolve().parts:
        if part.startswith("models--"):
            candidate = part[len("models--") :].replace("--", "/")
            if _is_hub_id(candidate):
                return candidate
    return None


def _base_model_of_folder(value: str | os.PathLike | None) -> str | None:
    """For a local folder with a model card, the Hub id its card names as `base_model`."""
    if value is None or _local_path(str(value)) is None:
        return None
    readme = Path(value) / "README.md"
    if not readme.is_file():
        return None
    base = ModelCard.load(readme, ignore_metadata_errors=True).data.get("base_model")
    base = base[0] if isinstance(base, list) and base else base
    return resolve_hub_id(base) if isinstance(base, str) else None


# --------------------------------------------------------------------------------------------------------------------
# EvalResults
# --------------------------------------------------------------------------------------------------------------------


def _as_metrics(split: str, metrics: Mapping[str, Any] | UncertaintyReport) -> dict[str, float]:
    if isinstance(metrics, UncertaintyReport):
        return metrics.flat_metrics()
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"metrics of split {split!r} must be a dict of floats or an UncertaintyReport, "
            f"got {type(metrics).__name__}"
        )
    return dict(metrics)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _n_bins(split: str, metrics: Mapping[str, Any]) -> int:
    bins = metrics.get("ece_bins")
    if not _is_number(bins) or bins < 1 or bins != int(bins):
        raise ValueError(
            f"split {split!r} reports ECE/MCE without its number of bins: add 'ece_bins' (an int >= 1) to its metrics "
            f"(got {bins!r}). An ECE is meaningless without its binning."
        )
    return int(bins)


def build_eval_results(
    metrics_by_split: Mapping[str, Mapping[str, float] | UncertaintyReport],
    dataset_type: str,
    dataset_name: str,
    dataset_config: str | None = None,
    task_type: str = "text-classification",
    exit_calibration: Mapping[str, Any] | None = None,
) -> list[EvalResult]:
    r"""
    Build the `EvalResult`s of a model card's `model-index`: one per metric per split. This is the only place hf_kd
    builds them.

    Metrics are taken in the order of `METRIC_NAMES` (accuracy, ECE, MCE, NLL, Brier, entropy, KL, JS distance,
    sigma) when present and finite (an undefined sigma is left out). ECE and MCE carry their number of bins both in
    their name (`"ECE (15 bins)"`) and in `args: {n_bins: 15}`. Values are rounded to 4 decimals. Teacher metrics
    (`teacher_*` keys) describe another model and are left out. Since every field but the value is a function of
    (split, metric, bins, dataset), a card rebuilt with new numbers, or a `huggingface_hub.metadata_update` with these
    results, overwrites the old values instead of adding entries.

    Args:
        metrics_by_split (`Mapping[str, Mapping[str, float] | UncertaintyReport]`):
            `{split: metrics}`, metrics as flat dicts in the vocabulary of [`hf_kd.metrics.make_compute_metrics`]
            (`accuracy`, `ece`, `ece_bins`, `nll`, ...) or as [`~hf_kd.UncertaintyReport`]s.
        dataset_type (`str`):
            Dataset identifier (a Hub id where there is one).
        dataset_name (`str`):
            Readable dataset name.
        dataset_config (`str`, *optional*):
            Dataset configuration name (the Hub requires a string).
        task_type (`str`, *optional*, defaults to `"text-classification"`):
            Hub task id, e.g. [`pipeline_tag_of`] the model; a task of [`TASKS`] also gets its readable name.
        exit_calibration (`Mapping[str, Any]`, *optional*):
            An early-exit causal LM's per-exit temperature scaling ([`hf_kd.ExitCalibrationResult`]`.to_dict()`,
            optionally with `split`, default `"calibration"`): every exit's token ECE, NLL and Brier score before
            (`exit_{i}_uncalibrated_{metric}`) and after (`exit_{i}_calibrated_{metric}`) its temperature, on that
            split.

    Returns:
        `list[huggingface_hub.EvalResult]`.

    Raises:
        `ValueError`: an empty dataset type/name, a non-string config, or an ECE without `ece_bins`.
    """
    for name, value in (("dataset_type", dataset_type), ("dataset_name", dataset_name), ("task_type", task_type)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    if dataset_config is not None and not isinstance(dataset_config, str):
        raise ValueError(f"dataset_config must be a string or None (the Hub rejects others), got {dataset_config!r}")
    if not isinstance(metrics_by_split, Mapping):
        raise TypeError(
            f"metrics_by_split must be a mapping {{split: metrics}}, got {type(metrics_by_split).__name__}"
        )
    by_split = {split: [(metric, metric, readable) for metric, readable in METRIC_NAMES.items()]
                for split in metrics_by_split}
    metrics_by_split = {split: _as_metrics(split, metrics) for split, metrics in metrics_by_split.items()}
    if exit_calibration:
        split = str(exit_calibration.get("split") or "calibration")
        metrics = metrics_by_split.setdefault(split, {})
        by_split.setdefault(split, [])
        metrics.setdefault("ece_bins", exit_calibration["n_bins"])
        layers = exit_calibration["exit_layers"]
        for i, layer in enumerate(layers):
            for metric in EXIT_CALIBRATION_METRICS:
                for when, values in (("uncalibrated", exit_calibration["before"]),
                                     ("calibrated", exit_calibration["after"])):
                    key = f"exit_{i}_{when}_{metric}"
                    metrics[key] = values[i][metric]
                    # No temperature in the name: a refit must overwrite these entries, not add new ones.
                    how = "before" if when == "uncalibrated" else "after"
                    by_split[split].append(
                        (key, metric, f"{METRIC_NAMES[metric]}, exit {i} (layer {layer}), {how} temperature scaling")
                    )
    results = []
    for split, metrics in metrics_by_split.items():
        entries = by_split[split]
        # Per-exit metrics: only the Laplace-calibrated ones (`exit_{i}_laplace_{metric}`) go to the model-index.
        calibrated = [(key, parsed) for key in metrics if (parsed := parse_exit_key(key)) and parsed[1]]
        for key, (exit_index, _, metric) in sorted(calibrated, key=lambda e: (e[1][0], EXIT_METRICS.index(e[1][2]))):
            entries.append((key, metric, f"{METRIC_NAMES[metric]}, exit {exit_index}, last-layer Laplace"))
        for key, metric, readable in entries:
            value = metrics.get(key)
            if not _is_number(value):
                continue
            args = None
            if metric in _BINNED:
                n_bins = _n_bins(split, metrics)
                readable, args = f"{readable} ({n_bins} bins)", {"n_bins": n_bins}
            results.append(
                EvalResult(
                    task_type=task_type,
                    task_name=TASKS[task_type]["name"] if task_type in TASKS else None,
                    dataset_type=dataset_type,
                    dataset_name=dataset_name,
                    dataset_config=dataset_config,
                    dataset_split=str(split),
                    metric_type=key,
                    metric_value=round(float(value), 4),
                    metric_name=readable,
                    metric_args=args,
                )
            )
    return results


def _metrics_from_eval_results(eval_results: list[EvalResult] | None) -> dict[str, dict[str, float]]:
    """Inverse of [`build_eval_results`] (for a card re-rendered without new reports)."""
    by_split: dict[str, dict[str, float]] = {}
    for result in eval_results or []:
        if _EXIT_CALIBRATION_KEY.fullmatch(result.metric_type):
            continue  # rebuilt from exit_calibration.json
        metrics = by_split.setdefault(result.dataset_split or "eval", {})
        metrics[result.metric_type] = result.metric_value
        if result.metric_args and "n_bins" in result.metric_args:
            metrics["ece_bins"] = float(result.metric_args["n_bins"])
    return by_split


# --------------------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------------------


def _cell(value) -> str:
    return f"{value:.4f}" if _is_number(value) else "–"


def _row_name(metric: str, n_bins: int | None) -> str:
    return f"{METRIC_NAMES[metric]} ({n_bins} bins)" if metric in _BINNED and n_bins else METRIC_NAMES[metric]


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def metrics_table(metrics_by_split: Mapping[str, Mapping[str, float] | UncertaintyReport]) -> str:
    """
    A markdown table, one row per metric and one column per split, plus a teacher column per split that has teacher
    metrics (`teacher_*` keys), so the student and its teacher read side by side.
    """
    columns: list[tuple[str, dict[str, float]]] = []
    n_bins = None
    for split, metrics in metrics_by_split.items():
        metrics = _as_metrics(split, metrics)
        n_bins = n_bins or (int(metrics["ece_bins"]) if _is_number(metrics.get("ece_bins")) else None)
        columns.append((f"model ({split})", metrics))
        teacher = {key[len("teacher_") :]: value for key, value in metrics.items() if key.startswith("teacher_")}
        if teacher:
            columns.append((f"teacher ({split})", teacher))
    rows = [
        [_row_name(metric, n_bins)] + [_cell(values.get(metric)) for _, values in columns]
        for metric in METRIC_NAMES
        if any(_is_number(values.get(metric)) for _, values in columns)
    ]
    return _markdown_table(["metric"] + [name for name, _ in columns], rows)


def exit_metrics_table(metrics: Mapping[str, float]) -> str | None:
    """A markdown table of an early-exit model's per-exit metrics (`exit_{i}_accuracy`, `exit_{i}_ece`,
    `exit_{i}_nll` and their `exit_{i}_laplace_*` calibrated counterparts), one row per exit; `None` without any."""
    exits: dict[int, dict[str, float]] = {}
    for key, value in metrics.items():
        parsed = parse_exit_key(key)
        if parsed and _is_number(value):
            exit_index, calibrated, metric = parsed
            exits.setdefault(exit_index, {})[("laplace_" if calibrated else "") + metric] = value
    if not exits:
        return None
    n_bins = int(metrics["ece_bins"]) if _is_number(metrics.get("ece_bins")) else None
    columns = [m for m in EXIT_METRICS if any(m in v for v in exits.values())]
    columns += [f"laplace_{m}" for m in EXIT_METRICS if any(f"laplace_{m}" in v for v in exits.values())]
    header = ["exit"] + [
        _row_name(c.removeprefix("laplace_"), n_bins) + (", Laplace" if c.startswith("laplace_") else "")
        for c in columns
    ]
    rows = [[str(i)] + [_cell(exits[i].get(c)) for c in columns] for i in sorted(exits)]
    return _markdown_table(header, rows)


def exit_calibration_table(exit_calibration: Mapping[str, Any]) -> str:
    """A markdown table of an early-exit causal LM's per-exit temperature scaling ([`hf_kd.ExitCalibrationResult`]
    as a dict): one row per exit with its layer, temperature, and token ECE, NLL and Brier score before -> after."""
    n_bins = exit_calibration.get("n_bins")
    header = ["exit", "layer", "T"] + [_row_name(m, n_bins) + " (before -> after)" for m in EXIT_CALIBRATION_METRICS]
    rows = [
        [str(i), str(layer), _cell(exit_calibration["temperatures"][i])]
        + [f"{_cell(exit_calibration['before'][i][m])} -> {_cell(exit_calibration['after'][i][m])}"
           for m in EXIT_CALIBRATION_METRICS]
        for i, layer in enumerate(exit_calibration["exit_layers"])
    ]
    return _markdown_table(header, rows)


def before_after_table(columns: Mapping[str, Mapping[str, float]], n_bins: int | None) -> str:
    """A markdown table comparing metric dicts, e.g. `{"uncalibrated": ..., "calibrated": ...}` (no `sigma` needed)."""
    rows = [
        [_row_name(metric, n_bins)] + [_cell(values.get(metric)) for values in columns.values()]
        for metric in METRIC_NAMES
        if any(_is_number(values.get(metric)) for values in columns.values())
    ]
    return _markdown_table(["metric"] + list(columns), rows)


# --------------------------------------------------------------------------------------------------------------------
# Cards
# --------------------------------------------------------------------------------------------------------------------


def layer_selection_table(layer_selection: Mapping[str, Any]) -> str:
    """
    A markdown table of self-distillation's source-layer selection: one row per epoch (its phase and the mean
    validation entropy of every exit, the layer selected at that epoch in bold), one column per layer.
    """
    layers = list(layer_selection.get("exit_layers") or [])
    epochs = list(layer_selection.get("epochs") or [])
    if not layers or not epochs or any(len(e.get("entropy") or []) != len(layers) for e in epochs):
        raise ValueError(
            "layer_selection must hold `exit_layers` and, per epoch, one `entropy` per exit, got "
            f"{len(layers)} layers and entropies of lengths {[len(e.get('entropy') or []) for e in epochs]}"
        )
    rows = []
    for epoch in epochs:
        cells = [
            f"**{_cell(h)}**" if layer == epoch.get("selected_layer") else _cell(h)
            for layer, h in zip(layers, epoch["entropy"])
        ]
        rows.append([str(epoch.get("epoch", "")), str(epoch.get("phase", ""))] + cells)
    return _markdown_table(["epoch", "phase"] + [f"layer {layer}" for layer in layers], rows)


def _templates_folder():
    """
    Where the card templates are read from. When `hf_kd` is imported from a source checkout (a clone or a worktree,
    with `setup.cfg` beside the package), it is that checkout's top-level `model_cards/` folder: an editable install
    maps `hf_kd.model_cards` to the checkout it was made from, which need not be the one imported (tests of another
    worktree, a clone run in place). Otherwise (an installed wheel) it is the package data `hf_kd.model_cards`.
    """
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "setup.cfg").is_file() and (checkout / "model_cards" / "__init__.py").is_file():
        return checkout / "model_cards"
    return importlib.resources.files(TEMPLATES_PACKAGE)


def _template_text(template: str) -> str:
    """The text of the card template `template` (a file name in `hf_kd.model_cards`)."""
    if not isinstance(template, str) or not template.endswith(".md") or "/" in template or "\\" in template:
        raise ValueError(f"template must be the file name of a card template in hf_kd.model_cards, got {template!r}")
    folder = _templates_folder()
    resource = folder / template
    if not resource.is_file():
        available = sorted(entry.name for entry in folder.iterdir() if entry.name.endswith(".md"))
        raise FileNotFoundError(
            f"Model card template {template!r} not found in the {TEMPLATES_PACKAGE} package (available: {available}). "
            "If the list is empty the package data was not installed: reinstall hf_kd."
        )
    return resource.read_text(encoding="utf-8")


def _render(template: str, card_data: ModelCardData, **variables) -> ModelCard:
    """`ModelCard.from_template` with a loader, so that a task's template can `{% extends "base_model_card.md" %}`:
    the same Jinja defaults and variables (`card_data` as YAML, then every card-data field, then `variables`)."""
    import jinja2

    environment = jinja2.Environment(loader=jinja2.FunctionLoader(_template_text))
    content = environment.get_template(template).render(
        card_data=card_data.to_yaml(), **(card_data.to_dict() | variables)
    )
    return ModelCard(content)


def pipeline_tag_of(model) -> str:
    """
    The Hub task (`pipeline_tag`) of a model: `"text-classification"` for a sequence classifier,
    `"image-classification"` for an image classifier, `"text-generation"` for a causal LM (the keys of [`TASKS`]).

    Read from the model's class name (`...ForSequenceClassification`, `...ForImageClassification`, `...ForCausalLM`; a PEFT model's base
    model), or from a saved `config.json`'s `architectures`; for another class name, from the model's main input
    (`input_ids` or `pixel_values`: `main_input_name`, else the first argument of `forward`).

    Args:
        model (`torch.nn.Module`, `transformers.PreTrainedConfig` or `Mapping`):
            A model, its config, or the dict of its `config.json`.

    Raises:
        `ValueError`: none of these tells the task (the message names what was read and what is accepted).
    """
    if hasattr(model, "get_base_model"):  # a PEFT model: the task is its base model's
        model = model.get_base_model()
    if isinstance(model, Mapping):
        names, main_input = list(model.get("architectures") or []), None
    elif hasattr(model, "forward"):
        import inspect

        names = [type(model).__name__]
        main_input = getattr(model, "main_input_name", None)
        if main_input is None:
            main_input = next(iter(inspect.signature(model.forward).parameters), None)
    else:
        names, main_input = list(getattr(model, "architectures", None) or []), None
    for name in names:
        for suffix, task in _ARCHITECTURE_TASKS.items():
            if name.endswith(suffix):
                return task
    if main_input in _INPUT_TASKS:
        return _INPUT_TASKS[main_input]
    raise ValueError(
        f"Cannot tell the Hub task of a model with architectures {names} and main input {main_input!r}: expected a "
        f"class name ending in one of {list(_ARCHITECTURE_TASKS)} or a main input in {list(_INPUT_TASKS)} "
        f"(tasks {list(TASKS)})."
    )


def _hub_ids(values, what: str) -> list[str] | None:
    if values is None:
        return None
    values = [values] if isinstance(values, (str, os.PathLike)) else list(values)
    kept = []
    for value in values:
        hub_id = resolve_hub_id(value)
        if hub_id is None:
            warnings.warn(f"{what} entry {str(value)!r} is not a Hub id (the Hub rejects local paths): left out.", stacklevel=2)
        elif hub_id not in kept:
            kept.append(hub_id)
    return kept or None


def generate_model_card(
    model_name: str,
    *,
    base_model: str | os.PathLike | None = None,
    teacher_model: str | os.PathLike | None = None,
    teacher_base_model: str | None = None,
    method_name: str | None = None,
    trainer_name: str | None = None,
    paper: Mapping[str, str] | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    layer_selection: Mapping[str, Any] | None = None,
    metrics_by_split: Mapping[str, Mapping[str, float] | UncertaintyReport] | None = None,
    dataset_type: str = "custom",
    dataset_name: str = "Custom dataset",
    dataset_config: str | None = None,
    datasets: str | list[str] | None = None,
    calibration: Mapping[str, Any] | None = None,
    uncalibrated_metrics: Mapping[str, Mapping[str, float] | UncertaintyReport] | None = None,
    reliability_diagram: str | None = None,
    exit_calibration: Mapping[str, Any] | None = None,
    hub_model_id: str | None = None,
    tags: list[str] | None = None,
    license: str | None = None,
    language: str | list[str] | None = None,
    template: str | None = None,
    library_name: str = "transformers",
    pipeline_tag: str = "text-classification",
) -> ModelCard:
    r"""
    Render an hf_kd model card from the template of the model's task in `hf_kd.model_cards` (as
    `huggingface_hub.ModelCard.from_template` does, with `{% extends %}` between templates).

    Metadata: `base_model` and `datasets` (Hub ids only: local paths are mapped back to a Hub id when they are a Hub
    cache folder, and left out otherwise, with a warning), `library_name: transformers`, `pipeline_tag` (the
    model's task), `tags` (`hf_kd`, the method's tags, `calibrated` and `temperature-scaling` when calibrated),
    a `model-index` from [`build_eval_results`], and an `hf_kd` key with the trainer, method, teacher, hyperparameters
    and calibration. Body: a summary, a quick start, the hyperparameters, the calibration before/after, a metrics
    table (model and teacher side by side), the reliability diagram, and BibTeX for the method, temperature scaling
    and ECE (Guo et al., 2017, https://huggingface.co/papers/1706.04599), sigma and KL/JS when reported.

    Args:
        model_name (`str`):
            Name of the model (title, and `model-index` name).
        base_model (`str` or `os.PathLike`, *optional*):
            The model the student was initialised from.
        teacher_model (`str` or `os.PathLike`, *optional*):
            The teacher; a local path is described as "a local checkpoint" and kept out of the metadata.
        teacher_base_model (`str`, *optional*):
            Hub id the teacher was fine-tuned from (when `teacher_model` is a local checkpoint); looked up in the
            teacher folder's own card when not given.
        method_name (`str`, *optional*):
            E.g. `"Knowledge distillation"` (a trainer's `_name`).
        trainer_name (`str`, *optional*):
            The hf_kd trainer class name, e.g. `"DistillTrainer"`.
        paper (`Mapping[str, str]`, *optional*):
            The method's paper: `{"title", "id", "citation"}` (a trainer's `_paper`).
        hyperparameters (`Mapping[str, Any]`, *optional*):
            Shown in a table and stored under `hf_kd.hyperparameters`, e.g. `{"temperature": 2.0, "alpha": 0.5}`.
        layer_selection (`Mapping[str, Any]`, *optional*):
            Self-distillation's source-layer selection ([`SelfKDTrainer.layer_entropy`]): `exit_layers`,
            `source_layer`, `warmup_epochs` and `epochs`, a list of `{"epoch", "phase", "entropy" (one per exit),
            "selected_layer"}`. Shown as a table of the validation entropy per layer and epoch
            ([`layer_selection_table`]) and stored under `hf_kd.layer_selection`.
        metrics_by_split (`Mapping[str, Mapping | UncertaintyReport]`, *optional*):
            Metrics of this model per split (see [`build_eval_results`]).
        dataset_type (`str`, *optional*, defaults to `"custom"`):
            Dataset identifier of the `model-index`.
        dataset_name (`str`, *optional*, defaults to `"Custom dataset"`):
            Readable dataset name.
        dataset_config (`str`, *optional*):
            Dataset configuration of the `model-index`.
        datasets (`str` or `list[str]`, *optional*):
            Hub ids of training datasets for the `datasets` metadata.
        calibration (`Mapping[str, Any]`, *optional*):
            The folded temperature: `{"temperature", "calibrated_on", "objective"}`, and optionally `"before"` /
            `"after"` metric dicts on the calibration data (a [`hf_kd.CalibrationResult`]`.to_dict()` works).
        uncalibrated_metrics (`Mapping[str, Mapping | UncertaintyReport]`, *optional*):
            Metrics of the model before calibration per split, for the before/after table.
        reliability_diagram (`str`, *optional*):
            Path of the reliability diagram relative to the card (e.g. `"uncertainty/test/reliability_diagram.png"`).
        exit_calibration (`Mapping[str, Any]`, *optional*):
            An early-exit causal LM's per-exit temperatures ([`hf_kd.ExitCalibrationResult`]`.to_dict()`), with
            optionally `split` (the model-index split, default `"calibration"`) and `reliability_diagrams` (one path
            per exit, relative to the card). Each exit's token ECE, NLL and Brier score before and after go to the
            model-index ([`build_eval_results`]) and to a table, the temperatures to `hf_kd.exit_calibration`, and
            the diagrams are linked. The temperatures are not folded into the model.
        hub_model_id (`str`, *optional*):
            Repo id used in the quick-start snippet (defaults to `model_name`).
        tags (`list[str]`, *optional*):
            Extra tags.
        license (`str`, *optional*):
            License id.
        language (`str` or `list[str]`, *optional*):
            Language code(s).
        template (`str`, *optional*):
            File name of the template in `hf_kd.model_cards`; defaults to the template of `pipeline_tag`'s task
            ([`TASKS`], e.g. `"text_classification_model_card.md"`). Another template is recorded under
            `hf_kd.template`, so that [`update_model_card`] renders the card with it again.
        library_name (`str`, *optional*, defaults to `"transformers"`):
            `"peft"` for a PEFT adapter: the Hub then lists it as an adapter of `base_model`. The quick start
            stays valid: with peft installed, transformers' `from_pretrained` (and so `pipeline`) loads an adapter
            folder or repo onto its base model, `modules_to_save` heads included.
        pipeline_tag (`str`, *optional*, defaults to `"text-classification"`):
            The model's Hub task, a key of [`TASKS`]: [`pipeline_tag_of`] the model (hf_kd's trainers and
            [`update_model_card`] pass it). It picks the default template and the task of the `model-index`.

    Returns:
        `huggingface_hub.ModelCard`.

    Raises:
        `FileNotFoundError`: the template does not exist (the message lists the available ones).
        `ValueError`: an unknown `pipeline_tag`, a bad calibration temperature, or metrics that
        [`build_eval_results`] rejects.

    Example:

    ```python
    >>> from hf_kd.hub import generate_model_card, save_model_card
    >>> card = generate_model_card(
    ...     "minilm-l3-rt", base_model="sentence-transformers/paraphrase-MiniLM-L3-v2",
    ...     metrics_by_split={"test": report}, dataset_type="rotten_tomatoes", dataset_name="Rotten Tomatoes",
    ...     calibration=result.to_dict(), reliability_diagram="uncertainty/test/reliability_diagram.png",
    ... )
    >>> save_model_card(card, "student")
    ```
    """
    if not isinstance(model_name, str) or not model_name.strip():
        raise ValueError(f"model_name must be a non-empty string, got {model_name!r}")
    if pipeline_tag not in TASKS:
        raise ValueError(f"pipeline_tag must be one of the tasks with a card template {list(TASKS)}, got {pipeline_tag!r}")
    task_template = TASKS[pipeline_tag]["template"]
    template = template if template is not None else task_template
    _template_text(template)  # fails early, and clearly, for a missing template
    metrics_by_split = {str(k): _as_metrics(str(k), v) for k, v in (metrics_by_split or {}).items()}
    eval_results = build_eval_results(metrics_by_split, dataset_type, dataset_name, dataset_config, pipeline_tag,
                                      exit_calibration)

    calibration = dict(calibration) if calibration else None
    if calibration is not None:
        from .calibration import check_temperature

        calibration["temperature"] = check_temperature(calibration.get("temperature"), "calibration temperature")

    base_model_id = resolve_hub_id(base_model)
    if base_model is not None and base_model_id is None:
        base_model_id = _base_model_of_folder(base_model)
        if base_model_id is None:
            warnings.warn(f"base_model {str(base_model)!r} is a local path, not a Hub id: left out.", stacklevel=2)
        else:
            # The folder's own card names the Hub model it derives from: nothing is lost, so no warning.
            logger.info("base_model %r is a local path: using %r, the base model named in its card.", base_model,
                        base_model_id)
    teacher_id = resolve_hub_id(teacher_model)
    if teacher_model is not None and teacher_id is None and teacher_base_model is None:
        teacher_base_model = _base_model_of_folder(teacher_model)
    teacher_base_model = resolve_hub_id(teacher_base_model)

    hf_kd_meta: dict[str, Any] = {}
    for key, value in (("trainer", trainer_name), ("method", method_name), ("paper", (paper or {}).get("id"))):
        if value:
            hf_kd_meta[key] = value
    if teacher_id:
        hf_kd_meta["teacher_model"] = teacher_id
    elif teacher_model is not None:
        hf_kd_meta["teacher_model"] = "local checkpoint"
        if teacher_base_model:
            hf_kd_meta["teacher_base_model"] = teacher_base_model
    if hyperparameters:
        hf_kd_meta["hyperparameters"] = dict(hyperparameters)
    if layer_selection:
        hf_kd_meta["layer_selection"] = dict(layer_selection)
    if template != task_template:
        hf_kd_meta["template"] = template
    if calibration is not None:
        hf_kd_meta["calibration"] = {
            key: calibration[key] for key in ("temperature", "calibrated_on", "objective") if calibration.get(key)
        }
        hf_kd_meta["calibration"]["method"] = "temperature_scaling"
    if exit_calibration:
        hf_kd_meta["exit_calibration"] = {
            "method": "temperature_scaling",
            "exit_layers": list(exit_calibration["exit_layers"]),
            "temperatures": [round(float(t), 4) for t in exit_calibration["temperatures"]],
            **{k: exit_calibration[k] for k in ("calibrated_on", "num_tokens") if exit_calibration.get(k)},
        }

    all_tags = ["hf_kd"]
    for tag in list(tags or []) + (["calibrated", "temperature-scaling"] if calibration is not None else []):
        if tag not in all_tags:
            all_tags.append(tag)
    card_data = ModelCardData(
        model_name=model_name,
        base_model=base_model_id,
        datasets=_hub_ids(datasets, "datasets"),
        library_name=library_name,
        pipeline_tag=pipeline_tag,
        license=license,
        language=language,
        tags=all_tags,
        eval_results=eval_results or None,
        hf_kd=hf_kd_meta or None,
    )

    papers = [dict(paper)] if paper else []
    papers.append(GUO_2017)
    if any(_is_number(m.get("sigma")) for m in metrics_by_split.values()):
        papers.append(VENGERTSEV_2024)
    if any(_is_number(m.get("kl")) for m in metrics_by_split.values()):
        papers.append(NIE_2020)
    exit_tables = [(split, table) for split, m in metrics_by_split.items() if (table := exit_metrics_table(m))]
    exit_laplace = (hyperparameters or {}).get("exit_laplace")
    if exit_laplace or any("laplace" in table for _, table in exit_tables):
        papers.append(MERONEN_2024)

    n_bins = next((int(m["ece_bins"]) for m in metrics_by_split.values() if _is_number(m.get("ece_bins"))), None)
    calibration_tables = []
    if calibration is not None:
        if calibration.get("before") and calibration.get("after"):
            where = calibration.get("calibrated_on") or "calibration data"
            calibration_tables.append(
                (f"On the calibration data ({where}, where T was fitted)",
                 before_after_table({"uncalibrated": calibration["before"], "calibrated": calibration["after"]},
                                    calibration.get("n_bins") or n_bins))
            )
        for split, before in (uncalibrated_metrics or {}).items():
            if split in metrics_by_split:
                calibration_tables.append(
                    (f"On the {split} split",
                     before_after_table({"uncalibrated": _as_metrics(split, before),
                                         "calibrated": metrics_by_split[split]}, n_bins))
                )

    import huggingface_hub
    import torch
    import transformers

    from .version import __version__

    return _render(
        template,
        card_data,
        model_name=model_name,
        hub_model_id=hub_model_id or model_name,
        base_model_id=base_model_id,
        teacher_id=teacher_id,
        teacher_is_local=teacher_model is not None and teacher_id is None,
        # "fine-tuned from X, derived from X" says X twice: the base model alone names it.
        teacher_base_model=teacher_base_model if teacher_base_model != base_model_id else None,
        method_name=method_name,
        trainer_name=trainer_name,
        paper=paper,
        hyperparameters=dict(hyperparameters or {}),
        layer_selection=dict(layer_selection) if layer_selection else None,
        layer_selection_table=layer_selection_table(layer_selection) if layer_selection else None,
        calibration=calibration,
        calibration_tables=calibration_tables,
        exit_tables=exit_tables,
        exit_laplace=exit_laplace,
        exit_calibration=exit_calibration,
        exit_calibration_table=exit_calibration_table(exit_calibration) if exit_calibration else None,
        metrics_table=metrics_table(metrics_by_split) if metrics_by_split else None,
        dataset_name=dataset_name,
        n_bins=n_bins,
        reliability_diagram=reliability_diagram,
        papers=papers,
        pipeline_tag=pipeline_tag,
        task_name=TASKS[pipeline_tag]["name"],
        versions={
            "hf_kd": __version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "huggingface_hub": huggingface_hub.__version__,
        },
    )


def save_model_card(card: ModelCard, folder: str | os.PathLike) -> Path:
    """Write `card` to `folder/README.md` atomically: an interrupted write never leaves half a card."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "README.md"
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False, encoding="utf-8", newline="") as f:
        f.write(str(card))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(f.name, 0o666 & ~umask)  # the temporary file is 0600: give the card the mode open() would
    os.replace(f.name, path)
    return path


def load_reports(folder: str | os.PathLike) -> dict[str, UncertaintyReport]:
    """All reports under `folder/uncertainty/<name>/report.json`, keyed by `<name>`, sorted by name."""
    root = Path(folder) / REPORTS_DIR
    if not root.is_dir():
        return {}
    paths = sorted(root.glob(f"*/{REPORT_FILENAME}"))
    return {path.parent.name: UncertaintyReport.load(path.parent) for path in paths}


# The papers that generate_model_card cites itself; any other entry of a card's citations is the method's paper.
_OWN_PAPERS = (GUO_2017, VENGERTSEV_2024, MERONEN_2024, NIE_2020)


def _paper_of_card(card: ModelCard, paper_id: str | None) -> dict[str, str] | None:
    """
    The method's paper (`{"title", "id", "citation"}`) as an existing hf_kd card gives it, so that a card re-rendered
    without its trainer keeps it: the id from the `hf_kd.paper` metadata, the title from the card's link to
    `https://huggingface.co/papers/<id>`, the BibTeX from its citations block (the entry that is not one of the
    papers every card cites, `_OWN_PAPERS`). `None` without an id, or when the card no longer holds the title or the
    BibTeX (e.g. edited by hand).
    """
    if not isinstance(paper_id, str) or not paper_id:
        return None
    title = re.search(rf"\[([^\]\n]+)\]\(https://huggingface\.co/papers/{re.escape(paper_id)}\)", card.text)
    block = re.search(r"```bibtex\n(.*?)\n```", card.text, flags=re.DOTALL)
    own = {paper["citation"] for paper in _OWN_PAPERS}
    citations = [entry for entry in block.group(1).split("\n\n") if entry not in own] if block else []
    if title is None or not citations:
        return None
    return {"title": title.group(1), "id": paper_id, "citation": citations[0]}


def update_model_card(
    folder: str | os.PathLike,
    *,
    model_name: str | None = None,
    base_model: str | None = None,
    teacher_model: str | None = None,
    teacher_base_model: str | None = None,
    dataset_type: str | None = None,
    dataset_name: str | None = None,
    hub_model_id: str | None = None,
    template: str | None = None,
) -> Path:
    """
    Re-render `folder/README.md` from the folder's state, keeping what the existing card says unless overridden.

    Reads, in this order: the existing card (its metadata: `base_model`, the `hf_kd` trainer, method, paper id,
    template, teacher and hyperparameters, tags, license, language, the `model-index` dataset; and the method's paper
    as the card cites it), `config.json` (`architectures`: the model's task, see [`pipeline_tag_of`];
    `hf_kd.temperature`: the temperature folded into the weights, the source of truth), `calibration.json` (the fit's
    before/after on the calibration data, used when its temperature matches), `exit_calibration.json` (an early-exit
    causal LM's per-exit temperatures, see [`generate_model_card`]'s `exit_calibration`; its diagrams when all are
    there), and every report under `uncertainty/<name>/report.json`. Reports of the model as it is (same folded
    temperature) give the `model-index` and the metrics table; reports of the uncalibrated model (no temperature)
    feed the before/after table. Without any current report the existing `model-index` is kept.

    Args:
        folder (`str` or `os.PathLike`):
            A saved model folder (with `config.json`).
        model_name, base_model, teacher_model, teacher_base_model, dataset_type, dataset_name, hub_model_id, template:
            Override what the existing card says; see [`generate_model_card`].

    Returns:
        `pathlib.Path` of the card. Nothing is written when rendering fails (e.g. a missing template).
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} is not a saved model folder: it has no config.json")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    folded = (config.get("hf_kd") or {}).get("temperature")

    old_card = ModelCard.load(folder / "README.md", ignore_metadata_errors=True) if (folder / "README.md").is_file() \
        else None
    old = old_card.data if old_card is not None else ModelCardData()
    old_meta = old.get("hf_kd") or {}
    old_results = old.eval_results or []
    # The task comes from the saved model's class (config.json's `architectures`), else from the existing card.
    try:
        pipeline_tag = pipeline_tag_of(config)
    except ValueError:
        if old.pipeline_tag not in TASKS:
            raise
        pipeline_tag = old.pipeline_tag

    reports = load_reports(folder)
    current = {
        r.split or name: r for name, r in reports.items() if _same_temperature(r.calibration_temperature, folded)
    }
    before = {r.split or name: r for name, r in reports.items() if folded and r.calibration_temperature is None}
    metrics_by_split = current or _metrics_from_eval_results(old_results)

    calibration = None
    if folded is not None:
        calibration = {"temperature": folded, "calibrated_on": (config.get("hf_kd") or {}).get("calibrated_on")}
        calibration_path = folder / CALIBRATION_FILENAME
        if calibration_path.is_file():
            saved = json.loads(calibration_path.read_text(encoding="utf-8"))
            if _same_temperature(saved.get("temperature"), folded):
                calibration.update({k: saved[k] for k in ("objective", "before", "after", "n_bins") if k in saved})

    diagram = None
    for name, report in reports.items():
        exists = (folder / REPORTS_DIR / name / RELIABILITY_DIAGRAM_FILENAME).is_file()
        if exists and _same_temperature(report.calibration_temperature, folded):
            diagram = f"{REPORTS_DIR}/{name}/{RELIABILITY_DIAGRAM_FILENAME}"
            if report.split == "test":
                break

    exit_calibration = None
    if (folder / EXIT_CALIBRATION_FILENAME).is_file():
        exit_calibration = json.loads((folder / EXIT_CALIBRATION_FILENAME).read_text(encoding="utf-8"))
        diagrams = [EXIT_RELIABILITY_DIAGRAM.format(i) for i in range(len(exit_calibration["exit_layers"]))]
        if all((folder / path).is_file() for path in diagrams):
            exit_calibration["reliability_diagrams"] = diagrams

    # "local checkpoint" (what a card records for a teacher given as a path) is not a Hub id, so it renders as such.
    teacher = teacher_model if teacher_model is not None else old_meta.get("teacher_model")
    card = generate_model_card(
        model_name or (hub_model_id.split("/")[-1] if hub_model_id else None) or old.model_name or folder.name,
        base_model=base_model or _first(old.base_model),
        teacher_model=teacher,
        teacher_base_model=teacher_base_model or old_meta.get("teacher_base_model"),
        method_name=old_meta.get("method"),
        trainer_name=old_meta.get("trainer"),
        paper=_paper_of_card(old_card, old_meta.get("paper")) if old_card is not None else None,
        hyperparameters=old_meta.get("hyperparameters"),
        layer_selection=old_meta.get("layer_selection"),
        metrics_by_split=metrics_by_split,
        dataset_type=dataset_type or (old_results[0].dataset_type if old_results else "custom"),
        dataset_name=dataset_name or (old_results[0].dataset_name if old_results else "Custom dataset"),
        dataset_config=old_results[0].dataset_config if old_results else None,
        datasets=old.datasets,
        calibration=calibration,
        uncalibrated_metrics=before,
        reliability_diagram=diagram,
        exit_calibration=exit_calibration,
        hub_model_id=hub_model_id,
        tags=[t for t in (old.tags or []) if t not in ("calibrated", "temperature-scaling")],
        license=old.license,
        language=old.language,
        template=template or old_meta.get("template"),
        pipeline_tag=pipeline_tag,
    )
    return save_model_card(card, folder)


def _first(value):
    return value[0] if isinstance(value, list) and value else value


def _same_temperature(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(float(a), float(b), rel_tol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Push
# --------------------------------------------------------------------------------------------------------------------


def _scrub(message: str, token: str | None) -> str:
    return message.replace(token, "<token>") if token else message


def _files_to_push(folder: Path) -> list[Path]:
    files = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(folder).as_posix()
        parts = relative.split("/")
        if any(fnmatch.fnmatch(relative, pattern) or fnmatch.fnmatch(parts[0], pattern) for pattern in
               PUSH_IGNORE_PATTERNS):
            continue
        files.append(path)
    return files


def _card_for_upload(readme: Path) -> bytes:
    """The card as it will be uploaded: local-path `base_model`/`datasets` entries mapped to Hub ids or dropped."""
    card = ModelCard.load(readme)
    changed = False
    for key in ("base_model", "datasets"):
        value = card.data.get(key)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        kept = [hub_id for hub_id in (resolve_hub_id(v) if isinstance(v, str) else None for v in values) if hub_id]
        if kept != values:
            warnings.warn(
                f"README.md {key} {values} holds local paths (the Hub rejects them): uploading {kept or 'none'}.",
                stacklevel=2,
            )
            card.data[key] = (kept if isinstance(value, list) else kept[0]) if kept else None
            changed = True
    return str(card).encode("utf-8") if changed else readme.read_bytes()


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload calibrated student with hf_kd",
    revision: str | None = None,
):
    r"""
    Upload a saved model folder (model, tokenizer, `README.md` card, reports and plots) to the Hub in one commit.

    The repo is created if needed. Training state is never uploaded (`checkpoint-*`, `training_args.bin`, optimizer,
    scheduler and RNG states, `trainer_state.json`, `runs/`, `_*`). The folder is only read: a card whose `base_model`
    or `datasets` hold local paths is fixed in the uploaded copy, not on disk. A commit is atomic on the Hub, so a
    failed or interrupted push leaves both sides as they were, and pushing again retries it (unchanged files are
    skipped).

    The token comes from `token` or, when `None`, from the usual places (`HF_TOKEN`, the token saved by
    `hf auth login`). It is sent in the `Authorization` header only: it is never written to a file, the card or a
    log, the files are checked for it before anything is sent, and it is masked in error messages.

    Args:
        folder (`str` or `os.PathLike`):
            The model folder, e.g. the output of the main job's student or of `hf-kd calibrate`.
        repo_id (`str`):
            `"namespace/name"` (or `"name"` for the token's user).
        token (`str`, *optional*):
            A Hub token with write access; defaults to the usual places.
        private (`bool`, *optional*):
            Create the repo private (no effect on an existing repo).
        commit_message (`str`, *optional*, defaults to `"Upload calibrated student with hf_kd"`):
            The commit message.
        revision (`str`, *optional*):
            Branch to push to (defaults to `main`).

    Returns:
        `huggingface_hub.CommitInfo`.

    Raises:
        `ValueError`: a malformed repo id, a folder without `config.json`, weights or `README.md`, or a file that
        contains the token.
        `RuntimeError`: the Hub refused the push (the message names the step and masks the token).

    Example:

    ```python
    >>> from hf_kd import push_to_hub
    >>> push_to_hub("outputs/main_job/student", "my-org/minilm-l3-rt-calibrated")
    ```
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(
            f"repo_id {repo_id!r} is not a valid Hub repo id ({error}). Expected 'namespace/name' (or 'name'): "
            "letters, digits, '-', '_' and '.', without '--' or '..', at most 96 characters."
        ) from None
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"folder {str(folder)!r} does not exist or is not a directory")
    names = {path.name for path in folder.iterdir()}
    if "config.json" not in names:
        raise ValueError(f"{folder} has no config.json: push_to_hub uploads a model saved with save_pretrained")
    if not names & {"model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"}:
        raise ValueError(f"{folder} has no model weights (model.safetensors or pytorch_model.bin)")
    if "README.md" not in names:
        raise ValueError(
            f"{folder} has no README.md model card. Write one with hf_kd.hub.update_model_card({str(folder)!r}) "
            "(hf-kd evaluate / hf-kd calibrate do it)."
        )

    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    resolved_token = token if token is not None else get_token()
    files = _files_to_push(folder)
    if resolved_token:
        needle = resolved_token.encode("utf-8")
        for path in files:
            if path.stat().st_size <= _SCAN_LIMIT_BYTES and needle in path.read_bytes():
                raise ValueError(
                    f"{path.relative_to(folder)} contains your Hub token: remove it before pushing (nothing was sent)."
                )
    operations = []
    for path in files:
        relative = path.relative_to(folder).as_posix()
        content = _card_for_upload(path) if relative == "README.md" else str(path)
        operations.append(CommitOperationAdd(path_in_repo=relative, path_or_fileobj=content))

    api = HfApi(token=resolved_token)
    step = "creating the repo"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        step = "committing the files"
        info = api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision)
    except Exception as error:
        # Library errors do not include the token, but a server could echo it: never let it reach a traceback.
        raise RuntimeError(
            f"Pushing {folder} to {repo_id} failed while {step}: "
            f"{_scrub(f'{type(error).__name__}: {error}', resolved_token)}. Nothing local was changed; fix the cause "
            "and push again."
        ) from None
    logger.info("Pushed %d file(s) from %s to %s", len(operations), folder, repo_id)
    return info


# What a metric Space holds besides the module script and its card: the widget evaluate's own metric Spaces run, and
# the packages the script imports.
_METRIC_SPACE_APP = """import evaluate
from evaluate.utils import launch_gradio_widget

module = evaluate.load("{repo_id}")
launch_gradio_widget(module)
"""


def push_metrics(
    namespace: str,
    names: list[str] | tuple[str, ...] | None = None,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload hf_kd evaluate metric module",
) -> dict[str, str]:
    r"""
    Publish hf_kd's `evaluate` metric modules as Hub metric repos, so that `evaluate.load("<namespace>/<name>")` works
    online.

    `evaluate` reads a community metric from the Space `<namespace>/<name>` (`/spaces/<namespace>/<name>/resolve/main/
    <name>.py`). Each module becomes such a Space (Gradio SDK), created if needed, with one commit holding the module
    script `<name>.py` and its metric card `README.md` exactly as shipped in `hf_kd/evaluate_metrics/<name>/`, an
    `app.py` (evaluate's metric widget) and a `requirements.txt` (`hf_kd[evaluate]` of this version or newer: the
    script imports `hf_kd.metrics`). Pushing again commits only what changed. The token is handled as in
    [`push_to_hub`]: sent in headers only and masked in error messages.

    Args:
        namespace (`str`):
            The user or organisation the Spaces go to.
        names (`list[str]`, *optional*):
            Modules to publish, from `hf_kd.metrics.EVALUATE_MODULES`; defaults to all of them.
        token (`str`, *optional*):
            A Hub token with write access; defaults to `HF_TOKEN` or the token saved by `hf auth login`.
        private (`bool`, *optional*):
            Create the Spaces private (no effect on existing ones).
        commit_message (`str`, *optional*, defaults to `"Upload hf_kd evaluate metric module"`):
            The commit message.

    Returns:
        `dict[str, str]`: module name -> commit URL.

    Raises:
        `ValueError`: an unknown module name, or a namespace that makes an invalid repo id.
        `RuntimeError`: the Hub refused a push (the message names the module and the step, and masks the token).

    Example:

    ```python
    >>> from hf_kd.hub import push_metrics
    >>> push_metrics("my-org", ["expected_calibration_error"])
    >>> # then, anywhere: evaluate.load("my-org/expected_calibration_error")
    ```
    """
    names = list(EVALUATE_MODULES if names is None else names)
    folders = {name: Path(module_path(name)) for name in names}  # unknown names fail here, before anything is sent
    for name in names:
        try:
            validate_repo_id(f"{namespace}/{name}")
        except HFValidationError as error:
            raise ValueError(
                f"namespace {namespace!r} does not make a valid Hub repo id ({error}): expected a user or organisation "
                "name (letters, digits, '-', '_' and '.')."
            ) from None

    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    resolved_token = token if token is not None else get_token()
    api = HfApi(token=resolved_token)
    requirements = f"evaluate>=0.4\nhf_kd[evaluate]>={__version__}\n"
    urls = {}
    for name, folder in folders.items():
        repo_id = f"{namespace}/{name}"
        operations = [
            CommitOperationAdd(path_in_repo=f"{name}.py", path_or_fileobj=str(folder / f"{name}.py")),
            CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(folder / "README.md")),
            CommitOperationAdd(path_in_repo="app.py", path_or_fileobj=_METRIC_SPACE_APP.format(repo_id=repo_id).encode()),
            CommitOperationAdd(path_in_repo="requirements.txt", path_or_fileobj=requirements.encode()),
        ]
        step = "creating the Space"
        try:
            api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
            step = "committing the files"
            info = api.create_commit(repo_id, operations, repo_type="space", commit_message=commit_message)
        except Exception as error:
            raise RuntimeError(
                f"Pushing the metric module {name} to the Space {repo_id} failed while {step}: "
                f"{_scrub(f'{type(error).__name__}: {error}', resolved_token)}"
                + (f". Already pushed: {', '.join(urls)}." if urls else ". Nothing was pushed.")
            ) from None
        urls[name] = info.commit_url
        logger.info("Pushed the evaluate module %s to the Space %s", name, repo_id)
    return urls
