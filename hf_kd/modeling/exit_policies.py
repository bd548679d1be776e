"""Exit policies and model-internal ensembling (MIE) of hf_kd's multi-exit models.

When an example leaves a multi-exit model: [`ExitPolicy`] (max-prob, entropy as DeeBERT, patience as PABEE, and the
budgeted protocol of MSDNet), its per-exit decision, the MIE kernel of Meronen et al. (2024,
https://huggingface.co/papers/2302.06359), and [`_EarlyExitRun`], the bookkeeping of one `predict_with_exits` call.

Both model families (the sequence model `modeling_multi_exit.py` and the CNN `modeling_multi_exit_cnn.py`), the exit
Laplace (`exit_laplace.py`) and [`hf_kd.early_exit`] import this module; it imports none of them (a leaf), so the
models and the exit Laplace do not import each other for it. It lives among the modeling files, with no `hf_kd`
import, because `save_pretrained` copies a model's sibling modules next to its weights: a saved multi-exit model must
load with `trust_remote_code=True` where hf_kd is not installed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch
from transformers.utils import ModelOutput

__all__ = ["EarlyExitPrediction", "ExitPolicy"]


class ExitPolicy(str, Enum):
    """When an example leaves at an exit during `predict_with_exits` (sequence and image models) and
    [`hf_kd.early_exit.simulate_exits`].

    Every policy reads the exit's predictive probabilities `p`: the softmax of the exit's logits or, with `mie=True`,
    the model-internal ensemble of the exits run so far (Meronen et al., 2024). Whatever the policy, every example
    still in the batch leaves at the final exit.
    """

    MAX_PROB = "max_prob"
    """Exit when `max(p) >= threshold` (`threshold` in [0, 1]); one threshold for every exit."""
    ENTROPY = "entropy"
    """Exit when the entropy (nats) of `p` is `< threshold` (`threshold >= 0`), as DeeBERT (Xin et al., 2020)."""
    PATIENCE = "patience"
    """PABEE (Zhou et al., 2020): a counter starts at 0 at the first exit; at each later exit it is incremented if
    the argmax equals the previous exit's argmax and reset to 0 otherwise; exit when it reaches `patience` (an int
    >= 1), i.e. after `patience` consecutive unchanged predictions (`patience + 1` agreeing exits)."""
    BUDGET = "budget"
    """The budgeted protocol of MSDNet (Huang et al., 2018, https://huggingface.co/papers/1703.09844) used by Meronen
    et al. (2024): exit at the first non-final exit `k` (0-based) with `max(p) >= thresholds[k]`. `thresholds` holds
    one value per non-final exit, fitted on validation data by [`hf_kd.early_exit.fit_budget_thresholds`] so that a
    target fraction of the examples leaves at each exit; a threshold above 1 means that no example leaves there."""


@dataclass
class EarlyExitPrediction(ModelOutput):
    """Output of `predict_with_exits` of [`MultiExitForSequenceClassification`] and
    [`MultiExitForImageClassification`].

    Args:
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            Each example's logits at the exit where it left. With `mie=True`, the log of the ensembled probabilities,
            `log(probs)`: valid logits of the ensemble (`softmax(logits) == probs`); the exit's own logits are in
            `forward(...).exit_logits`.
        probs (`torch.FloatTensor` of shape `(batch_size, num_labels)`, float32, or float64 for a float64 model):
            Each example's predictive probabilities at that exit, the ones the policy read: `softmax(logits)`, or the
            model-internal ensemble of the exits it ran with `mie=True`.
        exit_layer (`torch.LongTensor` of shape `(batch_size,)`):
            1-based index of the layer (sequence model) or stage (image model) after which each example left.
        exit_index (`torch.LongTensor` of shape `(batch_size,)`):
            0-based index of that exit in `config.exit_layers`.
        layers_run (`int`):
            Layer-rows (stage-rows for the image model) computed: the sum over examples of the number of layers each
            ran (`batch_size * num_layers` without early exits).
        flops (`float`):
            Estimated forward FLOPs (multiply-adds count 2) of the blocks and exit heads actually run; each model's
            `predict_with_exits` gives its formula.
        full_flops (`float`):
            The same estimate for running every block on every row with the final head only (the static model), so
            `flops / full_flops` is the relative cost.
    """

    logits: torch.FloatTensor | None = None
    probs: torch.FloatTensor | None = None
    exit_layer: torch.LongTensor | None = None
    exit_index: torch.LongTensor | None = None
    layers_run: int | None = None
    flops: float | None = None
    full_flops: float | None = None


def _check_exit_policy(
    policy, threshold, patience, thresholds, num_exits: int
) -> tuple[ExitPolicy, list[float] | None]:
    """Validate the arguments of an exit policy for a model with `num_exits` exits.

    Returns the policy as an [`ExitPolicy`] and, for `"budget"`, the thresholds as a list of `num_exits - 1` floats
    (`None` for the other policies). Arguments of another policy (`thresholds` without `"budget"`, `threshold` with
    `"budget"`) are rejected rather than ignored.
    """
    try:
        policy = ExitPolicy(policy)
    except ValueError:
        raise ValueError(f"policy must be one of {[p.value for p in ExitPolicy]}, got {policy!r}.") from None
    if thresholds is not None and policy is not ExitPolicy.BUDGET:
        raise ValueError(
            f"thresholds (one per non-final exit) is only used by policy='budget', got policy={policy.value!r}; "
            "pass threshold=... for a single threshold."
        )
    if policy is ExitPolicy.PATIENCE:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"policy='patience' needs an integer patience >= 1, got {patience!r}.")
        return policy, None
    if policy is ExitPolicy.BUDGET:
        expected = num_exits - 1
        if threshold is not None:
            raise ValueError(
                f"policy='budget' takes one threshold per non-final exit as thresholds=[...] ({expected} values), "
                f"got threshold={threshold!r}."
            )
        if thresholds is None:
            raise ValueError(
                f"policy='budget' needs thresholds=[T_1, ..., T_{expected}], one per non-final exit of the "
                f"{num_exits} exits (e.g. from hf_kd.early_exit.fit_budget_thresholds), got None."
            )
        try:
            values = torch.as_tensor(thresholds, dtype=torch.float64).cpu()
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"thresholds must be a list of numbers, got {thresholds!r}.") from None
        if values.ndim != 1 or values.numel() != expected:
            got = f"{values.numel()} values" if values.ndim == 1 else f"shape {tuple(values.shape)}"
            raise ValueError(
                f"policy='budget' needs {expected} thresholds, one per non-final exit of the {num_exits} exits, got "
                f"{got}: {thresholds!r}."
            )
        values = values.tolist()
        for k, value in enumerate(values):
            if not math.isfinite(value):
                raise ValueError(
                    f"thresholds must be finite, got {value} at index {k} ({thresholds!r}); a threshold above 1 "
                    "(e.g. 2.0) means that no example exits there."
                )
            if value < 0:
                raise ValueError(
                    f"thresholds must be >= 0 (confidences are probabilities; above 1 means that no example exits "
                    f"there), got {value} at index {k}."
                )
        return policy, values
    if threshold is None or isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ValueError(f"policy={policy.value!r} needs a numeric threshold, got {threshold!r}.")
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}.")
    if policy is ExitPolicy.MAX_PROB and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"policy='max_prob' needs a threshold in [0, 1], got {threshold}.")
    if policy is ExitPolicy.ENTROPY and threshold < 0:
        raise ValueError(f"policy='entropy' needs a threshold >= 0 (nats), got {threshold}.")
    return policy, None


def _exit_decision(
    policy: ExitPolicy,
    probs: torch.Tensor,
    exit_index: int,
    threshold: float | None,
    patience: int | None,
    thresholds: list[float] | None,
    previous: torch.Tensor | None,
    counter: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Which rows leave at the non-final exit `exit_index`, from their predictive probabilities there.

    Args:
        probs (`torch.Tensor` of shape `(n, num_labels)`): the predictive the policy reads (see [`ExitPolicy`]).
        previous (`torch.LongTensor` of shape `(n,)` or `None`): PABEE state, the argmax at the previous exit
            (`None` at the first exit).
        counter (`torch.LongTensor` of shape `(n,)`): PABEE state, the patience counter.

    Returns:
        `(done, previous, counter)`: `done` `(n,)` bool, and the PABEE state after this exit (passed through by the
        other policies).
    """
    if policy is ExitPolicy.MAX_PROB:
        done = probs.max(-1).values >= threshold
    elif policy is ExitPolicy.BUDGET:
        done = probs.max(-1).values >= thresholds[exit_index]
    elif policy is ExitPolicy.ENTROPY:
        done = torch.special.entr(probs).sum(-1) < threshold  # entr(p) = -p log p, and 0 at p = 0
    else:
        prediction = probs.argmax(-1)
        if previous is not None:
            counter = torch.where(prediction == previous, counter + 1, torch.zeros_like(counter))
        previous = prediction
        done = counter >= patience
    return done, previous, counter


def _mie_weights(exit_flops) -> torch.Tensor:
    """MIE weights `w_i = FLOPs_i / FLOPs_K` (float64, `(K,)`) from the per-exit cumulative FLOPs."""
    flops = torch.as_tensor(exit_flops, dtype=torch.float64).cpu()
    return flops / flops[-1]


def _model_internal_ensemble(exit_probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Model-internal ensembling (MIE, Meronen et al., 2024) over the leading (exit) axis, unchecked.

    `p̄_k = sum_{i<=k} w_i p_i / sum_{i<=k} w_i` for `exit_probs` `(k, n, C)` and weights `(k,)` (the first `k` of
    [`_mie_weights`]); returns `(k, n, C)`. The checked public version is [`hf_kd.early_exit.model_internal_ensemble`].
    """
    w = weights.to(device=exit_probs.device, dtype=exit_probs.dtype).view(-1, 1, 1)  # (k, 1, 1)
    return (w * exit_probs).cumsum(0) / w.cumsum(0)


class _EarlyExitRun:
    """The bookkeeping of one `predict_with_exits` call, shared by the sequence and the image model.

    The model runs its blocks on the rows still in the batch; after a block with an exit it calls [`step`] with that
    exit's logits, which records the rows that leave (their logits, probabilities, exit) and returns the mask of the
    rows that go on; the model then drops the other rows from its own tensors. Both models thus apply the policies,
    MIE and row removal identically.

    Args:
        policy, threshold, patience, thresholds: the exit policy (validated by [`_check_exit_policy`]).
        mie (`bool`): read the model-internal ensemble of the exits run so far instead of each exit's softmax.
        exit_flops (`list[float]`): per-exit cumulative FLOPs of one example, for the MIE weights.
        exit_layers (`list[int]`): `config.exit_layers`, recorded as `exit_layer`.
        batch_size, num_labels, device, dtype: shape and placement of the outputs (`dtype` of `logits`).
    """

    def __init__(
        self,
        policy,
        threshold,
        patience,
        thresholds,
        mie,
        exit_flops,
        exit_layers,
        batch_size,
        num_labels,
        device,
        dtype,
    ):
        self.policy, self.thresholds = _check_exit_policy(policy, threshold, patience, thresholds, len(exit_layers))
        if not isinstance(mie, bool):
            raise ValueError(f"mie must be True or False, got {mie!r}.")
        self.threshold, self.patience = threshold, patience
        self.weights = _mie_weights(exit_flops) if mie else None
        self.exit_layers = exit_layers
        self.logits = torch.zeros(batch_size, num_labels, dtype=dtype, device=device)
        # Probabilities in float32 at least, so bf16/fp16 models threshold and ensemble stable values.
        self.probs_dtype = torch.promote_types(dtype, torch.float32)
        self.probs = torch.zeros(batch_size, num_labels, dtype=self.probs_dtype, device=device)
        self.exit_layer = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.exit_index = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.rows = torch.arange(batch_size, device=device)  # original indices of the rows still running
        self.previous = None  # PABEE: argmax at the previous exit, (n,)
        self.counter = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.history = []  # MIE: per-exit probabilities of the rows still running, each (n, K)

    def step(self, exit_index: int, logits: torch.Tensor | None, probs: torch.Tensor | None = None) -> torch.Tensor:
        """Record the rows that leave at exit `exit_index` given its logits `(n, num_labels)` or, when the exit has a
        calibrated predictive (the exit Laplace), its probabilities `(n, num_labels)` (`logits` is then not read and
        may be `None`); return the `(n,)` bool mask of the rows that go on (all `False` at the final exit)."""
        if probs is None:
            probs = logits.to(self.probs_dtype).softmax(-1)  # (n, K)
        else:
            probs, logits = probs.to(self.probs_dtype), None
        if self.weights is not None:
            self.history.append(probs)
            probs, logits = _model_internal_ensemble(torch.stack(self.history), self.weights[: exit_index + 1])[-1], None
        if exit_index == len(self.exit_layers) - 1:
            done = torch.ones(probs.shape[0], dtype=torch.bool, device=probs.device)
        else:
            done, self.previous, self.counter = _exit_decision(
                self.policy,
                probs,
                exit_index,
                self.threshold,
                self.patience,
                self.thresholds,
                self.previous,
                self.counter,
            )
        finished = self.rows[done]
        # For calibrated or ensembled probabilities the logits are log p (softmax(log p) = p), for the leaving rows.
        leaving = logits[done] if logits is not None else probs[done].clamp_min(torch.finfo(probs.dtype).tiny).log()
        self.logits[finished] = leaving.to(self.logits.dtype)
        self.probs[finished] = probs[done]
        self.exit_layer[finished] = self.exit_layers[exit_index]
        self.exit_index[finished] = exit_index
        keep = ~done
        self.rows, self.counter = self.rows[keep], self.counter[keep]
        if self.previous is not None:
            self.previous = self.previous[keep]
        self.history = [p[keep] for p in self.history]
        return keep

    def prediction(self, layers_run: int, flops: float, full_flops: float) -> EarlyExitPrediction:
        """The [`EarlyExitPrediction`] of the call, once every row has left."""
        return EarlyExitPrediction(
            logits=self.logits,
            probs=self.probs,
            exit_layer=self.exit_layer,
            exit_index=self.exit_index,
            layers_run=layers_run,
            flops=flops,
            full_flops=full_flops,
        )
