"""Search prediction-layer hyperparameters for confidence preservation (Vengertsev & Sherman, 2024,
https://huggingface.co/papers/2401.11365; PAPERS.md section 3).

A student preserves its teacher's confidence when `sigma(X_train) <= kappa` ([`hf_kd.metrics.confidence_preservation`]:
the std of `p_T(c|x) - p_S(c|x)` over training examples both models classify correctly; kappa 0.05 in the reference
experiments). The paper restores the property by tuning the prediction-layer distillation's learning rate, epochs,
batch size and weight decay, and accepts a configuration when sigma on the training set is at most kappa and the
student's accuracy is within 1 point of the untuned (baseline) student's.

[`search_confidence_preservation`] runs that search with [`~transformers.Trainer.hyperparameter_search`] (optuna
backend, two objectives: minimise sigma on the training set, maximise dev accuracy). The baseline configuration is
enqueued as trial 0, so it is trained and measured exactly like every other trial; the result lists every trial with
sigma and accuracy on both splits, the Pareto front, and the accepted configurations
([`ConfidenceSearchResult.pareto_table`]). `hf-kd confidence-search` is the command-line form.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ConfidenceSearchResult", "SearchSpace", "TrialResult", "pareto_front", "search_confidence_preservation"]

# The hyperparameters of the search, as TrainingArguments names them.
HYPERPARAMETERS = ("learning_rate", "num_train_epochs", "per_device_train_batch_size", "weight_decay")
# sigma is NaN when no training example is right for both models; optuna fails NaN trials, so they are scored with
# the largest sigma two probability vectors can have (never <= kappa) and kept in the table as NaN.
_NAN_SIGMA_SCORE = 1.0


@dataclass
class SearchSpace:
    """
    Ranges of the prediction-layer hyperparameters. The defaults are the ranges of Vengertsev & Sherman's ~150
    experiment scripts (PAPERS.md 3.2).

    Args:
        learning_rate (`tuple[float, float]`, *optional*, defaults to `(5e-7, 5e-3)`): log-uniform range.
        num_train_epochs (`tuple[int, int]`, *optional*, defaults to `(2, 10)`): integer range, both ends included.
        per_device_train_batch_size (`tuple[int, ...]`, *optional*, defaults to `(16, 32, 64)`): choices.
        weight_decay (`tuple[float, float]`, *optional*, defaults to `(1e-6, 0.1)`): log-uniform range.
    """

    learning_rate: tuple[float, float] = (5e-7, 5e-3)
    num_train_epochs: tuple[int, int] = (2, 10)
    per_device_train_batch_size: tuple[int, ...] = (16, 32, 64)
    weight_decay: tuple[float, float] = (1e-6, 0.1)

    def __post_init__(self):
        for name in ("learning_rate", "weight_decay"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"{name} range must be 0 < low <= high (log scale), got {(low, high)}")
        low, high = self.num_train_epochs
        if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high):
            raise ValueError(f"num_train_epochs range must be integers 1 <= low <= high, got {(low, high)}")
        if not self.per_device_train_batch_size or any(
            not isinstance(b, int) or b < 1 for b in self.per_device_train_batch_size
        ):
            raise ValueError(f"per_device_train_batch_size must be positive ints, got {self.per_device_train_batch_size}")

    def contains(self, params: dict[str, Any]) -> bool:
        """Whether `params` (one value per hyperparameter) lie in the space."""
        lr, wd = params["learning_rate"], params["weight_decay"]
        return (
            self.learning_rate[0] <= lr <= self.learning_rate[1]
            and self.num_train_epochs[0] <= params["num_train_epochs"] <= self.num_train_epochs[1]
            and params["per_device_train_batch_size"] in self.per_device_train_batch_size
            and self.weight_decay[0] <= wd <= self.weight_decay[1]
        )

    def suggest(self, trial) -> dict[str, Any]:
        """The `hp_space` of [`~transformers.Trainer.hyperparameter_search`] for an optuna `trial`."""
        return {
            "learning_rate": trial.suggest_float("learning_rate", *self.learning_rate, log=True),
            "num_train_epochs": trial.suggest_int("num_train_epochs", *self.num_train_epochs),
            "per_device_train_batch_size": trial.suggest_categorical(
                "per_device_train_batch_size", list(self.per_device_train_batch_size)
            ),
            "weight_decay": trial.suggest_float("weight_decay", *self.weight_decay, log=True),
        }


def pareto_front(sigmas, accuracies) -> list[bool]:
    """
    Which points are Pareto-optimal for (minimise sigma, maximise accuracy): no other point has sigma <= and
    accuracy >= with one of them strict. NaN sigmas are never on the front.

    Args:
        sigmas (`Sequence[float]`), accuracies (`Sequence[float]`): one value per point.

    Returns:
        `list[bool]`, one per point.
    """
    points = list(zip(sigmas, accuracies, strict=True))
    front = []
    for i, (s, a) in enumerate(points):
        if math.isnan(s):
            front.append(False)
            continue
        dominated = any(
            not math.isnan(s2) and s2 <= s and a2 >= a and (s2 < s or a2 > a)
            for j, (s2, a2) in enumerate(points)
            if j != i
        )
        front.append(not dominated)
    return front


@dataclass
class TrialResult:
    """One trained configuration: its hyperparameters and the student's sigma and accuracy on both splits
    (`metrics` holds every evaluation metric, e.g. `eval_dev_ece`, `eval_train_teacher_accuracy`)."""

    number: int
    params: dict[str, Any]
    sigma_train: float
    sigma_dev: float
    accuracy_train: float
    accuracy_dev: float
    baseline: bool = False
    pareto: bool = False
    accepted: bool = False
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ConfidenceSearchResult:
    """
    All trials of a [`search_confidence_preservation`] run.

    Attributes:
        trials (`list[TrialResult]`): in trial order; trial 0 is the baseline.
        kappa (`float`): sigma threshold on the training set.
        accuracy_tolerance (`float`): largest accepted drop of dev accuracy below the baseline's (0.01 = 1 point).
    """

    trials: list[TrialResult]
    kappa: float
    accuracy_tolerance: float

    @property
    def baseline(self) -> TrialResult:
        return next(t for t in self.trials if t.baseline)

    @property
    def accepted(self) -> list[TrialResult]:
        """Trials with `sigma_train <= kappa` and `accuracy_dev >= baseline accuracy_dev - accuracy_tolerance`,
        lowest sigma first."""
        return sorted((t for t in self.trials if t.accepted), key=lambda t: t.sigma_train)

    def pareto_table(self) -> str:
        """Markdown table of every trial, Pareto-optimal ones first (by sigma on train), then the others."""
        header = (
            "| trial | learning rate | epochs | batch | weight decay | sigma train | sigma dev | acc train | acc dev "
            "| Pareto | accepted |\n|---|---|---|---|---|---|---|---|---|---|---|"
        )
        ordered = sorted(self.trials, key=lambda t: (not t.pareto, _nan_last(t.sigma_train)))
        rows = []
        for t in ordered:
            p = t.params
            rows.append(
                f"| {t.number}{' (baseline)' if t.baseline else ''} | {p['learning_rate']:.2e} | "
                f"{p['num_train_epochs']} | {p['per_device_train_batch_size']} | {p['weight_decay']:.1e} | "
                f"{t.sigma_train:.4f} | {t.sigma_dev:.4f} | {t.accuracy_train:.4f} | {t.accuracy_dev:.4f} | "
                f"{'yes' if t.pareto else ''} | {'yes' if t.accepted else ''} |"
            )
        return header + "\n" + "\n".join(rows)

    def summary(self) -> str:
        """One paragraph: baseline, whether it preserves confidence, and the best accepted configuration."""
        b = self.baseline
        text = (
            f"Baseline (trial {b.number}): sigma train {b.sigma_train:.4f}, dev {b.sigma_dev:.4f}, dev accuracy "
            f"{b.accuracy_dev:.4f}: confidence {'preserved' if b.sigma_train <= self.kappa else 'not preserved'} "
            f"(kappa {self.kappa})."
        )
        if self.accepted:
            best = self.accepted[0]
            text += (
                f" {len(self.accepted)} of {len(self.trials)} configurations preserve it within "
                f"{100 * self.accuracy_tolerance:g} accuracy point(s) of the baseline; lowest sigma: trial "
                f"{best.number} (sigma train {best.sigma_train:.4f}, dev accuracy {best.accuracy_dev:.4f})."
            )
        else:
            text += (
                f" None of the {len(self.trials)} configurations has sigma train <= {self.kappa} with dev accuracy "
                f">= {b.accuracy_dev - self.accuracy_tolerance:.4f}."
            )
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "kappa": self.kappa,
            "accuracy_tolerance": self.accuracy_tolerance,
            "trials": [asdict(t) for t in self.trials],
        }

    def save(self, output_dir: str | Path) -> dict[str, Path]:
        """Write `confidence_search.json` and `confidence_search.md` (summary + Pareto table) into `output_dir`."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        paths = {"json": output_dir / "confidence_search.json", "markdown": output_dir / "confidence_search.md"}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2, allow_nan=True), encoding="utf-8")
        paths["markdown"].write_text(
            f"# Confidence-preservation search\n\n{self.summary()}\n\n{self.pareto_table()}\n", encoding="utf-8"
        )
        return paths


def _nan_last(value: float) -> float:
    return math.inf if math.isnan(value) else value


def search_confidence_preservation(
    trainer,
    train_dataset,
    dev_dataset,
    n_trials: int = 8,
    kappa: float = 0.05,
    accuracy_tolerance: float = 0.01,
    baseline: dict[str, Any] | None = None,
    search_space: SearchSpace | None = None,
    seed: int = 0,
) -> ConfidenceSearchResult:
    """
    Search the prediction-layer hyperparameters of a [`DistillTrainer`] for confidence preservation (Vengertsev &
    Sherman, 2024, https://huggingface.co/papers/2401.11365).

    Each trial re-creates the student with the trainer's `model_init`, sets `learning_rate`, `num_train_epochs`,
    `per_device_train_batch_size` and `weight_decay`, trains, then evaluates the student on `train_dataset` (sigma on
    the training set, the property's definition) and `dev_dataset`. The baseline (the trainer's own `args` values
    unless `baseline` is given) runs first. Optuna's default multi-objective TPE sampler (seeded) draws the others;
    its first 10 trials are random, so a short search is a random search.

    Args:
        trainer ([`DistillTrainer`]):
            Built with `model_init` (each trial needs a fresh student) and `eval_strategy="no"` (one evaluation per
            trial, after training). Its `compute_metrics` must report `sigma` and `accuracy`, as the default does.
            With `cache_teacher_logits`, the teacher's logits for both splits are cached first.
        train_dataset, dev_dataset ([`~datasets.Dataset`]):
            Tokenized splits to evaluate sigma and accuracy on; `train_dataset` is normally the trainer's own.
        n_trials (`int`, *optional*, defaults to `8`): trials besides the baseline.
        kappa (`float`, *optional*, defaults to `0.05`): sigma threshold on the training set.
        accuracy_tolerance (`float`, *optional*, defaults to `0.01`): accepted drop of dev accuracy (1 point).
        baseline (`dict`, *optional*): values of the four hyperparameters for trial 0 (missing ones: the trainer's).
        search_space ([`SearchSpace`], *optional*): defaults to the paper's ranges.
        seed (`int`, *optional*, defaults to `0`): seed of the sampler.

    Returns:
        [`ConfidenceSearchResult`].

    Raises:
        `ValueError`: without `model_init`, with evaluation during training, or bad `n_trials` / `kappa` /
        `accuracy_tolerance`.
        `ImportError`: without optuna (`pip install hf_kd[search]`).
    """
    from .import_utils import is_optuna_available

    if not is_optuna_available():
        raise ImportError("search_confidence_preservation needs optuna: pip install 'hf_kd[search]'")
    import optuna

    if trainer.model_init is None:
        raise ValueError("The trainer needs a model_init (each trial trains a fresh student): build it with model_init=.")
    if trainer.args.eval_strategy != "no":
        raise ValueError(
            f"Build the trainer with eval_strategy='no' (got {trainer.args.eval_strategy!r}): each trial is evaluated "
            "once, on both splits, after training."
        )
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 0:
        raise ValueError(f"n_trials must be an int >= 0, got {n_trials!r}")
    if not kappa > 0:
        raise ValueError(f"kappa must be > 0, got {kappa}")
    if not 0 <= accuracy_tolerance < 1:
        raise ValueError(f"accuracy_tolerance must be in [0, 1), got {accuracy_tolerance}")
    search_space = search_space or SearchSpace()
    baseline = {name: getattr(trainer.args, name) for name in HYPERPARAMETERS} | dict(baseline or {})
    baseline["num_train_epochs"] = int(baseline["num_train_epochs"])
    unknown = set(baseline) - set(HYPERPARAMETERS)
    if unknown:
        raise ValueError(f"baseline accepts {HYPERPARAMETERS}, got unknown {sorted(unknown)}")
    if not search_space.contains(baseline):
        raise ValueError(f"The baseline {baseline} lies outside the search space {search_space}: widen the space.")

    splits = {"train": train_dataset, "dev": dev_dataset}
    if trainer.args.cache_teacher_logits:
        splits = {name: trainer.with_teacher_logits(ds, name) for name, ds in splits.items()}
    trainer.eval_dataset = splits

    current = {}

    def hp_space(trial):
        current["trial"] = trial
        return search_space.suggest(trial)  # trial 0 gets the enqueued baseline values

    def compute_objective(metrics: dict[str, float]) -> list[float]:
        for key in ("eval_train_sigma", "eval_dev_accuracy"):
            if key not in metrics:
                raise ValueError(f"The trainer's evaluation has no {key!r} (metrics: {sorted(metrics)})")
        current["trial"].set_user_attr("metrics", {k: float(v) for k, v in metrics.items()})
        sigma = float(metrics["eval_train_sigma"])
        return [_NAN_SIGMA_SCORE if math.isnan(sigma) else sigma, float(metrics["eval_dev_accuracy"])]

    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(directions=["minimize", "maximize"], storage=storage)
    study.enqueue_trial(baseline)
    trainer.hyperparameter_search(
        hp_space=hp_space,
        compute_objective=compute_objective,
        n_trials=n_trials + 1,
        direction=["minimize", "maximize"],
        backend="optuna",
        storage=storage,
        study_name=study.study_name,
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=seed),
    )
    return _collect(optuna.load_study(study_name=study.study_name, storage=storage), kappa, accuracy_tolerance)


def _collect(study, kappa: float, accuracy_tolerance: float) -> ConfidenceSearchResult:
    trials = []
    for trial in study.trials:
        metrics = trial.user_attrs.get("metrics")
        if metrics is None:  # a failed trial: optuna keeps it, the table does not
            continue
        trials.append(
            TrialResult(
                number=trial.number,
                params=dict(trial.params),
                sigma_train=metrics["eval_train_sigma"],
                sigma_dev=metrics.get("eval_dev_sigma", math.nan),
                accuracy_train=metrics.get("eval_train_accuracy", math.nan),
                accuracy_dev=metrics["eval_dev_accuracy"],
                baseline=trial.number == 0,
                metrics=metrics,
            )
        )
    if not trials or not trials[0].baseline:
        raise RuntimeError("The baseline trial did not finish: nothing to compare the search with.")
    front = pareto_front([t.sigma_train for t in trials], [t.accuracy_dev for t in trials])
    floor = trials[0].accuracy_dev - accuracy_tolerance
    for t, on_front in zip(trials, front, strict=True):
        t.pareto = on_front
        # NaN <= kappa is False: a trial without a both-correct example is never accepted.
        t.accepted = t.sigma_train <= kappa and t.accuracy_dev >= floor - 1e-12
    return ConfidenceSearchResult(trials=trials, kappa=kappa, accuracy_tolerance=accuracy_tolerance)
