"""`hf-kd`: train, evaluate, calibrate and push sequence classifiers from the command line.

    hf-kd distill     [--config] recipe.yaml [--flag value ...]   (--method erm | ls | kd | tinybert)
    hf-kd early-exit  [--config] recipe.yaml [--flag value ...]
    hf-kd self-kd     [--config] recipe.yaml [--flag value ...]
    hf-kd distill-lm  [--config] recipe.yaml [--flag value ...]   (--method kd | sft)
    hf-kd early-exit-lm [--config] recipe.yaml [--flag value ...] (--exit_layers, --exit_epsilon, --exit_delta)
    hf-kd evaluate  MODEL --dataset rotten_tomatoes --split test [--teacher T] [--update_card]
    hf-kd calibrate MODEL --dataset rotten_tomatoes [--split validation] [--eval_split test] [--output_dir OUT]
    hf-kd push      FOLDER --repo_id my-org/my-student [--private]
    hf-kd push-metrics --namespace my-org [--metrics expected_calibration_error ...] [--private]
    hf-kd confidence-search STUDENT --teacher T --dataset rotten_tomatoes [--n_trials 8] [--kappa 0.05] --output_dir OUT

The training commands take a YAML recipe (`trainers/configs/`) and/or flags, parsed by `HfArgumentParser` from the
trainer's config (every `TrainingArguments` flag), the model and the data arguments (`hf_kd.recipes`), as `trl sft
--config` does; run them under several processes with `accelerate launch -m hf_kd.cli distill ...` (DeepSpeed:
`accelerate launch --config_file trainers/accelerate/deepspeed_zero3.yaml -m hf_kd.cli ...`). Each ends with the
test-split metrics, the saved model and its card, and the push with `--push_to_hub`. `hf-kd <command> --help`
lists the flags.

`MODEL` is a local folder or a Hub id. Data comes from one of hf_kd's offline loaders (`--dataset`, split with
`--split_seed`), from a Hub dataset id or a local dataset folder (`--dataset_name`, `--dataset_config`) or from local
files (`--data_files validation=val.jsonl test=test.jsonl`: CSV, JSON lines or Parquet) with a text column and a label
column of class ids or of label names (mapped through the model's `label2id`). `calibrate` fits a temperature on
`--split`, folds it into the classifier, evaluates `--eval_split` before and after, and saves the calibrated model
with its reports, plots, `calibration.json` and model card. `push` takes the token from `HF_TOKEN` or `hf auth login`, never from the command line. `confidence-search`
distils the teacher into STUDENT once per configuration of the prediction-layer hyperparameters (optuna through
`Trainer.hyperparameter_search`, baseline first) and writes the table of sigma (train and `--eval_split`) and accuracy,
with its Pareto front and the configurations that preserve confidence (Vengertsev & Sherman 2024).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .options import BuiltinDataset, CalibrationObjective

DEFAULT_MAX_LENGTH = 128  # for a model that records no truncation length (config.hf_kd["max_length"])

# The training commands: name -> (the module whose `COMMANDS[name]` is its `hf_kd.recipes.TrainingCommand`, help).
# Imported only when the command runs (torch and transformers are slow to import). A new recipe module adds a line.
TRAINING_COMMANDS = {
    "distill": ("hf_kd.recipes", "Train a classifier: --method erm | ls | kd | tinybert."),
    "early-exit": ("hf_kd.recipes", "Train a multi-exit classifier with EarlyExitTrainer (DeeBERT / PABEE)."),
    "self-kd": ("hf_kd.recipes", "Self-knowledge distillation from lower layers (SelfKDTrainer, Park et al. 2024)."),
    "distill-lm": ("hf_kd.lm_recipes", "Distil a causal LM token by token (DistillTrainer; --method kd | sft)."),
    "early-exit-lm": ("hf_kd.lm_recipes", "Train, calibrate and threshold the exits of a causal LM (EarlyExitTrainer)."),
}


# --------------------------------------------------------------------------------------------------------------------
# Argument parsing
# --------------------------------------------------------------------------------------------------------------------


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    source = group.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--dataset", choices=[d.value for d in BuiltinDataset], help="One of hf_kd's offline data sets."
    )
    source.add_argument(
        "--dataset_name", help="A built-in data set, a Hub dataset id or a local dataset folder (datasets.load_dataset)."
    )
    source.add_argument(
        "--data_files",
        nargs="+",
        metavar="SPLIT=PATH",
        help="CSV / JSON lines / Parquet files per split, e.g. validation=val.jsonl test=test.jsonl.",
    )
    group.add_argument("--dataset_config", default=None, help="Configuration (subset) of a --dataset_name.")
    group.add_argument("--text_column", default="text", help="Text column (default: text).")
    group.add_argument("--text_pair_column", default=None, help="Second text of a pair (NLI hypothesis).")
    group.add_argument(
        "--label_column",
        default="label",
        help="Label column (default: label): class ids, or label names mapped through the model's label2id.",
    )
    group.add_argument(
        "--max_length",
        type=int,
        default=None,
        help="Truncation length in tokens (default: the model's config.hf_kd['max_length'], the length it was trained "
        f"and calibrated with, else {DEFAULT_MAX_LENGTH}).",
    )
    group.add_argument("--max_samples", type=int, default=None, help="Use the first N rows of each split.")
    group.add_argument("--split_seed", type=int, default=42, help="Seed of the built-in loaders' split.")
    group.add_argument("--batch_size", type=int, default=64, help="Rows per forward pass (default: 64).")
    group.add_argument("--n_bins", type=int, default=15, help="Equal-width ECE/MCE bins (default: 15).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-kd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="{" + ",".join([*TRAINING_COMMANDS, "evaluate", "calibrate", "push",
                                                               "push-metrics", "confidence-search"]) + "}"
    )
    for name, (_module, help_text) in TRAINING_COMMANDS.items():
        # Listed for --help only: main() hands their arguments to HfArgumentParser (hf_kd.recipes.parse_args).
        commands.add_parser(name, help=help_text + " `hf-kd " + name + " --help` lists the flags.", add_help=False)

    evaluate = commands.add_parser("evaluate", help="Uncertainty report (JSON + reliability diagram) of a model.")
    evaluate.add_argument("model", help="Local folder or Hub id of a sequence classifier.")
    evaluate.add_argument("--split", default="test", help="Split to evaluate (default: test).")
    evaluate.add_argument("--teacher", default=None, help="Teacher folder or Hub id (same tokenizer) for sigma.")
    evaluate.add_argument(
        "--output_dir", default=None, help="Where to write the report (default: MODEL/uncertainty/SPLIT)."
    )
    evaluate.add_argument("--update_card", action="store_true", help="Re-render MODEL/README.md with the report.")
    evaluate.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace an existing report in the output folder (default: keep it and write the new one beside it, "
        "in SPLIT-2, SPLIT-3, ...).",
    )
    _data_arguments(evaluate)

    calibrate = commands.add_parser("calibrate", help="Fit, fold and report a calibration temperature.")
    calibrate.add_argument("model", help="Local folder or Hub id of a sequence classifier.")
    calibrate.add_argument("--split", default="validation", help="Held-out split to fit T on (default: validation).")
    calibrate.add_argument(
        "--eval_split", default="test", help="Split evaluated before and after (default: test; 'none' to skip)."
    )
    calibrate.add_argument(
        "--objective",
        choices=[o.value for o in CalibrationObjective],
        default="nll",
        help="Fit to labels or human dists.",
    )
    calibrate.add_argument("--teacher", default=None, help="Teacher folder or Hub id (same tokenizer) for sigma.")
    calibrate.add_argument(
        "--output_dir", default=None, help="Where to save the calibrated model (default: MODEL itself, in place)."
    )
    calibrate.add_argument(
        "--allow_refold", action="store_true", help="Calibrate a model whose config already records a temperature."
    )
    _data_arguments(calibrate)

    push = commands.add_parser("push", help="Upload a model folder (model, tokenizer, card, plots) to the Hub.")
    push.add_argument("folder", help="The model folder, e.g. the output of hf-kd calibrate.")
    push.add_argument("--repo_id", required=True, help="namespace/name on the Hub.")
    push.add_argument("--private", action="store_true", help="Create the repo private.")
    push.add_argument("--commit_message", default="Upload calibrated student with hf_kd")
    _push_metrics_arguments(commands)

    search = commands.add_parser(
        "confidence-search",
        help="Search prediction-layer KD hyperparameters for sigma <= kappa (Vengertsev & Sherman 2024).",
    )
    search.add_argument("student", help="Folder or Hub id the student starts from (re-loaded for every trial).")
    search.add_argument("--teacher", required=True, help="Fine-tuned teacher: folder or Hub id.")
    search.add_argument("--output_dir", required=True, help="Where confidence_search.{md,json} go.")
    search.add_argument("--train_split", default="train", help="Split the student trains on (default: train).")
    search.add_argument("--eval_split", default="validation", help="Held-out split (default: validation).")
    search.add_argument(
        "--train_samples", type=int, default=None, help="Use N rows of the train split (--max_samples: eval split)."
    )
    search.add_argument("--n_trials", type=int, default=8, help="Trials besides the baseline (default: 8).")
    search.add_argument("--kappa", type=float, default=0.05, help="sigma threshold on train (default: 0.05).")
    search.add_argument(
        "--accuracy_tolerance", type=float, default=0.01, help="Accepted accuracy drop vs baseline (default: 0.01)."
    )
    search.add_argument(
        "--sigma_class", default="0", help="Class whose probability sigma compares, or gold (default: 0, the paper)."
    )
    search.add_argument("--temperature", type=float, default=1.0, help="KD temperature (default: 1, TinyBERT).")
    search.add_argument("--alpha", type=float, default=1.0, help="Weight of the soft term (default: 1, no CE).")
    search.add_argument("--map_teacher_token_ids", action="store_true", help="Teacher with a re-indexed vocabulary.")
    search.add_argument("--no_cache", action="store_true", help="Run the teacher at every step (no logits cache).")
    search.add_argument("--cache_dir", default=None, help="Teacher logits cache folder.")
    search.add_argument("--seed", type=int, default=42, help="Training and sampler seed (default: 42).")
    baseline = search.add_argument_group("baseline (trial 0)", "Defaults: TinyBERT's prediction-layer stage.")
    baseline.add_argument("--learning_rate", type=float, default=3e-5)
    baseline.add_argument("--num_train_epochs", type=int, default=3)
    baseline.add_argument("--per_device_train_batch_size", type=int, default=32)
    baseline.add_argument("--weight_decay", type=float, default=0.01)
    space = search.add_argument_group("search space (defaults: the paper's ranges)")
    space.add_argument("--learning_rate_range", type=float, nargs=2, default=(5e-7, 5e-3), metavar=("LOW", "HIGH"))
    space.add_argument("--epochs_range", type=int, nargs=2, default=(2, 10), metavar=("LOW", "HIGH"))
    space.add_argument("--batch_sizes", type=int, nargs="+", default=(16, 32, 64))
    space.add_argument("--weight_decay_range", type=float, nargs=2, default=(1e-6, 0.1), metavar=("LOW", "HIGH"))
    _data_arguments(search)
    return parser


# --------------------------------------------------------------------------------------------------------------------
# Data and models
# --------------------------------------------------------------------------------------------------------------------


def _resolve_max_length(opts, config) -> int:
    """`--max_length`, else the truncation length the model records (what it was evaluated and calibrated with),
    else `DEFAULT_MAX_LENGTH`; set on `opts` for `_load_split`."""
    from .evaluation import recorded_max_length

    if opts.max_length is None:
        opts.max_length = recorded_max_length(config) or DEFAULT_MAX_LENGTH
    return opts.max_length


def _load_split(opts, split: str, tokenizer, num_labels: int, label2id: dict | None = None):
    """One tokenized split, its labels checked against the model's number of labels (label names mapped through
    `label2id`, the model's)."""
    from datasets import DatasetDict

    from . import data

    name = opts.dataset or opts.dataset_name
    if name is not None:
        splits = data.load_source(name, opts.dataset_config, seed=opts.split_seed)
        if split not in splits:
            flag = "--dataset" if opts.dataset else "--dataset_name"
            raise ValueError(f"{flag} {name} has splits {list(splits)}, not {split!r}")
        dataset = splits[split]
    else:
        files = {}
        for item in opts.data_files:
            key, sep, path = item.partition("=")
            if not sep or not key or not path:
                raise ValueError(f"--data_files entries must look like SPLIT=PATH, got {item!r}")
            files[key] = path
        if split not in files:
            raise ValueError(f"--data_files has splits {sorted(files)}, not {split!r}: add {split}=PATH")
        # Only this split's file is read: a broken file of another split fails the command that reads it.
        dataset = data.load_source(data_files={split: files[split]})[split]
    if opts.max_samples is not None:
        if opts.max_samples < 1:
            raise ValueError(f"--max_samples must be >= 1, got {opts.max_samples}")
        # Rows of the built-in loaders are grouped by source (movie, topic): shuffle before cutting.
        dataset = dataset.shuffle(seed=opts.split_seed).select(range(min(opts.max_samples, len(dataset))))
    feature = dataset.features.get(opts.label_column)
    # Arrow has three string types: Parquet written by pandas >= 3 holds `large_string`, not `string`.
    if len(dataset) and getattr(feature, "dtype", None) in ("string", "large_string", "string_view"):
        # Label names: the model's label2id numbers them (names the model does not know are an error).
        where = _describe(opts, split)
        try:
            dataset = data.encode_labels(
                DatasetDict({where: dataset}), opts.label_column, (opts.text_column, opts.text_pair_column),
                label2id=label2id or {}, output_column=None,
            )[where]
        except ValueError as error:
            raise ValueError(f"{error}; the model's label2id is {label2id}") from None
    _check_labels(opts, dataset, split, num_labels)
    return data.tokenize_dataset(dataset, tokenizer, opts.text_column, opts.text_pair_column, opts.max_length)


def _check_labels(opts, dataset, split: str, num_labels: int) -> None:
    """Every command needs gold labels in [0, num_labels): check them before any model runs (an unlabelled split,
    e.g. GLUE's test sets with label -1, fails here naming the split, the row and the value)."""
    from .evaluation import read_labels

    where = _describe(opts, split)
    if len(dataset) == 0:
        raise ValueError(f"{where} has no rows")
    if opts.label_column not in dataset.column_names:
        raise ValueError(
            f"{where} has no {opts.label_column!r} column (columns: {dataset.column_names}): hf-kd needs gold labels; "
            "name the label column with --label_column"
        )
    names = getattr(dataset.features[opts.label_column], "names", None)
    if names is not None and len(names) != num_labels:
        raise ValueError(
            f"the data has {len(names)} classes {names} but the model predicts {num_labels}: wrong model or data"
        )
    labels = read_labels(dataset, opts.label_column, f"{where} (--label_column {opts.label_column})")
    bad = ((labels < 0) | (labels >= num_labels)).nonzero()[0]
    if bad.size:
        raise ValueError(
            f"{where} has label {labels[bad[0]]} in row {bad[0]} ({bad.size} bad row(s)): the model predicts "
            f"{num_labels} classes, so labels must be in [0, {num_labels}) (a split without gold labels cannot be "
            "used)"
        )


def _check_model_source(name: str, what: str) -> None:
    """A folder that exists, or a well-formed Hub id: a mistyped path fails here, naming it, instead of as
    transformers' "Repo id must be in the form ..." (a missing folder read as a Hub id)."""
    if Path(name).is_dir():
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)  # "name" or "namespace/name": a path with more parts, or "/", "./", "~" is not one
    except HFValidationError:
        raise FileNotFoundError(
            f"{what} {name!r} is neither an existing folder nor a Hub id (namespace/name): check the path"
        ) from None


def _load_model(name: str):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .offline_models import placed_model_kwargs

    # A model placed by hf_kd.offline_models loads from its snapshot, without network retries.
    model = AutoModelForSequenceClassification.from_pretrained(name, **placed_model_kwargs(name, model=True))
    return model, AutoTokenizer.from_pretrained(name, **placed_model_kwargs(name))


def _print_table(columns: dict[str, dict], n_bins: int) -> None:
    from .hub import before_after_table

    print(before_after_table(columns, n_bins))


def _describe(opts, split: str) -> str:
    return f"{opts.dataset or opts.dataset_name or 'data_files'}/{split}"


def _save_model(model, tokenizer, output_dir: Path) -> None:
    """Save next to the old files and swap each in with os.replace: an interruption never leaves a torn file."""
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".hf_kd-save-", dir=output_dir))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        for path in staging.iterdir():
            os.replace(path, output_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------------------------


def _evaluate(opts) -> None:
    from .evaluation import REPORT_FILENAME, evaluate_uncertainty
    from .hub import REPORTS_DIR, update_model_card

    _check_model_source(opts.model, "MODEL")
    if opts.teacher is not None:
        _check_model_source(opts.teacher, "--teacher")
    local = Path(opts.model).is_dir()
    if opts.output_dir is None and not local:
        raise ValueError(f"{opts.model!r} is not a local folder: pass --output_dir for the report")
    if opts.update_card and not local:
        raise ValueError("--update_card needs MODEL to be a local folder")
    output_dir = Path(opts.output_dir) if opts.output_dir else Path(opts.model) / REPORTS_DIR / opts.split
    kept = None
    if (output_dir / REPORT_FILENAME).is_file() and not opts.overwrite:
        if opts.update_card and not opts.output_dir:
            raise ValueError(
                f"{output_dir / REPORT_FILENAME} exists and the card is rendered from it: pass --overwrite to replace "
                "it with this evaluation, or leave out --update_card to write the new report beside it"
            )
        kept, output_dir = output_dir, _free_folder(output_dir)
    model, tokenizer = _load_model(opts.model)
    max_length = _resolve_max_length(opts, model.config)
    dataset = _load_split(opts, opts.split, tokenizer, model.config.num_labels, model.config.label2id)
    report = evaluate_uncertainty(
        model, dataset, teacher=opts.teacher, n_bins=opts.n_bins, batch_size=opts.batch_size,
        label_column=opts.label_column, split=opts.split,
    )
    paths = report.save(output_dir)
    columns = {"model": report.metrics}
    if report.teacher_metrics:
        columns["teacher"] = report.teacher_metrics
    _print_table(columns, report.n_bins)
    print(f"\nTruncation: {max_length} tokens. Report and plots: {', '.join(str(p) for p in paths.values())}")
    if kept is not None:
        print(f"The existing report in {kept} was kept (pass --overwrite to replace it).")
    if opts.update_card:
        print(f"Model card: {update_model_card(opts.model)}")


def _free_folder(folder: Path) -> Path:
    """`folder-2`, `folder-3`, ...: the first sibling of `folder` that holds no report yet."""
    from .evaluation import REPORT_FILENAME

    index = 2
    while (folder.with_name(f"{folder.name}-{index}") / REPORT_FILENAME).is_file():
        index += 1
    return folder.with_name(f"{folder.name}-{index}")


def _calibrate(opts) -> None:
    from .calibration import calibrate_temperature, fold_temperature
    from .evaluation import evaluate_uncertainty, record_max_length
    from .hub import CALIBRATION_FILENAME, REPORTS_DIR, update_model_card

    _check_model_source(opts.model, "MODEL")
    if opts.teacher is not None:
        _check_model_source(opts.teacher, "--teacher")
    local = Path(opts.model).is_dir()
    if opts.output_dir is None and not local:
        raise ValueError(f"{opts.model!r} is not a local folder: pass --output_dir for the calibrated model")
    output_dir = Path(opts.output_dir) if opts.output_dir else Path(opts.model)
    eval_split = None if opts.eval_split.lower() == "none" else opts.eval_split
    if eval_split == opts.split:
        raise ValueError(f"--eval_split must differ from --split ({opts.split!r}): report on data T was not fitted on")

    model, tokenizer = _load_model(opts.model)
    existing = (getattr(model.config, "hf_kd", None) or {}).get("temperature")
    if existing is not None and not opts.allow_refold:
        raise ValueError(
            f"{opts.model} is already calibrated (config.hf_kd temperature {existing}); pass --allow_refold to fold "
            "another temperature on top"
        )
    num_labels = model.config.num_labels
    max_length = _resolve_max_length(opts, model.config)
    # Load everything first: bad data fails before anything is computed or written.
    label2id = model.config.label2id
    calibration_data = _load_split(opts, opts.split, tokenizer, num_labels, label2id)
    eval_data = _load_split(opts, eval_split, tokenizer, num_labels, label2id) if eval_split else None

    result = calibrate_temperature(
        model, calibration_data, objective=opts.objective, n_bins=opts.n_bins, batch_size=opts.batch_size,
        label_column=opts.label_column, calibrated_on=_describe(opts, opts.split),
    )
    common = dict(teacher=opts.teacher, n_bins=opts.n_bins, batch_size=opts.batch_size,
                  label_column=opts.label_column, split=eval_split)
    before = evaluate_uncertainty(model, eval_data, **common) if eval_data is not None else None
    fold_temperature(model, result.temperature, calibrated_on=result.calibrated_on, allow_refold=opts.allow_refold)
    record_max_length(model.config, max_length)  # later `hf-kd evaluate` runs truncate as T was fitted
    after = evaluate_uncertainty(model, eval_data, **common) if eval_data is not None else None

    if output_dir.resolve() != Path(opts.model).resolve() and local and (Path(opts.model) / "README.md").is_file():
        if not (output_dir / "README.md").is_file():
            output_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(opts.model) / "README.md", output_dir / "README.md")  # keeps the card's metadata
    _save_model(model, tokenizer, output_dir)
    (output_dir / CALIBRATION_FILENAME).write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
    if before is not None:
        before.save(output_dir / REPORTS_DIR / f"{eval_split}-uncalibrated")
        after.save(output_dir / REPORTS_DIR / eval_split)
    card = update_model_card(output_dir)

    print(f"Temperature T = {result.temperature:.4f} ({result.objective}, fitted on {result.calibrated_on}, "
          f"{result.num_examples} rows)\n\nOn {opts.split}:")
    _print_table({"uncalibrated": result.before, "calibrated": result.after}, opts.n_bins)
    if before is not None:
        print(f"\nOn {eval_split}:")
        _print_table({"uncalibrated": before.metrics, "calibrated": after.metrics}, opts.n_bins)
    print(f"\nCalibrated model, reports and card: {output_dir} ({card.name})")


def _push(opts) -> None:
    from .hub import push_to_hub

    info = push_to_hub(opts.folder, opts.repo_id, private=opts.private or None, commit_message=opts.commit_message)
    print(f"Pushed {opts.folder} to {opts.repo_id}: {info.commit_url}")


def _push_metrics_arguments(commands) -> None:
    from .metrics import EVALUATE_MODULES

    parser = commands.add_parser(
        "push-metrics", help="Publish hf_kd's evaluate metric modules as Hub metric repos (<namespace>/<metric>)."
    )
    parser.add_argument("--namespace", required=True, help="User or organisation the metric Spaces go to.")
    parser.add_argument(
        "--metrics", nargs="+", choices=EVALUATE_MODULES, default=None, metavar="NAME",
        help=f"Modules to publish (default: all): {', '.join(EVALUATE_MODULES)}.",
    )
    parser.add_argument("--private", action="store_true", help="Create the Spaces private.")


def _push_metrics(opts) -> None:
    from .hub import push_metrics

    for name, url in push_metrics(opts.namespace, opts.metrics, private=opts.private or None).items():
        print(f"Pushed {name} to {opts.namespace}/{name} (load it with evaluate.load({opts.namespace + '/' + name!r})): "
              f"{url}")


def _confidence_search(opts) -> None:
    import copy

    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    from .confidence_search import SearchSpace, search_confidence_preservation
    from .metrics import make_compute_metrics
    from .offline_models import placed_model_kwargs
    from .trainer import DistillConfig, DistillTrainer

    if opts.sigma_class != "gold" and not opts.sigma_class.isdigit():
        raise ValueError(f"--sigma_class must be a class index or 'gold', got {opts.sigma_class!r}")
    space = SearchSpace(
        tuple(opts.learning_rate_range), tuple(opts.epochs_range), tuple(opts.batch_sizes), tuple(opts.weight_decay_range)
    )
    _check_model_source(opts.student, "STUDENT")
    _check_model_source(opts.teacher, "--teacher")
    teacher_config = AutoConfig.from_pretrained(opts.teacher, **placed_model_kwargs(opts.teacher))
    _resolve_max_length(opts, teacher_config)
    tokenizer = AutoTokenizer.from_pretrained(opts.student, **placed_model_kwargs(opts.student))
    num_labels = teacher_config.num_labels
    train_opts = copy.copy(opts)
    train_opts.max_samples = opts.train_samples
    splits = {
        "train": _load_split(train_opts, opts.train_split, tokenizer, num_labels, teacher_config.label2id),
        "dev": _load_split(opts, opts.eval_split, tokenizer, num_labels, teacher_config.label2id),
    }
    if opts.label_column != "label":
        splits = {k: v.rename_column(opts.label_column, "label") for k, v in splits.items()}

    def model_init():
        return AutoModelForSequenceClassification.from_pretrained(
            opts.student, num_labels=num_labels, id2label=teacher_config.id2label, label2id=teacher_config.label2id,
            **placed_model_kwargs(opts.student, model=True),
        )

    output_dir = Path(opts.output_dir)
    args = DistillConfig(
        output_dir=str(output_dir / "runs"), teacher_model_name_or_path=opts.teacher, temperature=opts.temperature,
        alpha=opts.alpha, map_teacher_token_ids=opts.map_teacher_token_ids, cache_teacher_logits=not opts.no_cache,
        teacher_logits_cache_dir=opts.cache_dir, learning_rate=opts.learning_rate,
        num_train_epochs=opts.num_train_epochs, per_device_train_batch_size=opts.per_device_train_batch_size,
        weight_decay=opts.weight_decay, per_device_eval_batch_size=opts.batch_size, eval_strategy="no",
        save_strategy="no", report_to="none", seed=opts.seed, disable_tqdm=True,
    )
    class_index = None if opts.sigma_class == "gold" else int(opts.sigma_class)
    trainer = DistillTrainer(
        model=None, model_init=model_init, args=args, train_dataset=splits["train"], processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=make_compute_metrics(opts.n_bins, class_index),
    )
    result = search_confidence_preservation(
        trainer, splits["train"], splits["dev"], n_trials=opts.n_trials, kappa=opts.kappa,
        accuracy_tolerance=opts.accuracy_tolerance, search_space=space, seed=opts.seed,
    )
    paths = result.save(output_dir)
    print(f"{result.summary()}\n\n{result.pareto_table()}\n\nWritten: {paths['markdown']}, {paths['json']}")


def _train(name: str, argv: list[str]) -> int:
    """Run the training command `name` on `argv` (a YAML recipe and/or flags, see `hf_kd.recipes.parse_args`)."""
    import importlib

    command = importlib.import_module(TRAINING_COMMANDS[name][0]).COMMANDS[name]
    sys.argv = [f"hf-kd {name}", *argv]  # HfArgumentParser's usage line and --help name the command
    try:
        command.main(argv)
    except (ValueError, TypeError, FileNotFoundError, ImportError, OSError) as error:
        print(f"hf-kd {name}: error: {error}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hf-kd` console script. Returns the exit status (0 on success, 1 on a handled error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in TRAINING_COMMANDS:
        return _train(argv[0], argv[1:])
    parser = build_parser()
    opts = parser.parse_args(argv)
    for name in ("batch_size", "n_bins", "max_length"):
        if getattr(opts, name, None) is not None and getattr(opts, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(opts, name)}")
    command = {
        "evaluate": _evaluate, "calibrate": _calibrate, "push": _push, "confidence-search": _confidence_search,
        "push-metrics": _push_metrics,
    }[opts.command]
    try:
        command(opts)
    except (ValueError, TypeError, FileNotFoundError, ImportError, RuntimeError, OSError) as error:
        print(f"hf-kd {opts.command}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
