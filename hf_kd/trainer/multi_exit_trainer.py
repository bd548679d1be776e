"""`_MultiExitTrainer`: what every trainer of a multi-exit model ([`EarlyExitTrainer`], [`SelfKDTrainer`]) adds to
[`_BaseTrainer`]: the model check, the card's view of the per-exit evaluation metrics, and the exact restoration of
callbacks that hold training state.
"""

from __future__ import annotations

import torch

from ..metric_keys import EXIT_METRICS, is_card_split, split_exit_split
from .base_trainer import _BaseTrainer


class _MultiExitTrainer(_BaseTrainer):
    """
    Base class of the trainers of multi-exit models ([`EarlyExitTrainer`], [`SelfKDTrainer`]).

    Subclasses set `_extra_columns` (see [`_BaseTrainer`]) and `_training_state_callbacks`: the [`~transformers.ExportableState`]
    callbacks whose state is training state, restored on every resume by their `load_state(state)`; their
    `missing_state_message` says what a checkpoint without their state lacks.
    """

    _training_state_callbacks: tuple = ()

    def _check_multi_exit_config(self) -> object:
        """The unwrapped model's config; `TypeError` unless it has `exit_layers` (duck-typed, so that sequence and
        image multi-exit models both train)."""
        config = getattr(self.accelerator.unwrap_model(self.model), "config", None)
        if not getattr(config, "exit_layers", None):
            raise TypeError(
                f"{type(self).__name__} trains a multi-exit model (e.g. MultiExitForSequenceClassification) whose config "
                f"has `exit_layers` and whose output has `exit_logits`, got a model with a {type(config).__name__}."
            )
        return config

    def _exit_logits(self, outputs) -> tuple[torch.Tensor, ...]:
        if getattr(outputs, "exit_logits", None) is None:
            raise TypeError(
                f"{type(self).__name__} needs the model's output to have `exit_logits`, got a {type(outputs).__name__}."
            )
        return tuple(outputs.exit_logits)  # num_exits x (batch, num_labels), exit_logits[-1] = outputs.logits

    def latest_eval_metrics(self) -> dict[str, dict[str, float]]:
        # Per-exit metrics are folded back into their split as `exit_{i}_{metric}` / `exit_{i}_laplace_{metric}` keys
        # (the card's per-exit table; the Laplace-calibrated ones also go to the model-index); group and DEDIER
        # statistics stay out.
        by_split: dict[str, dict[str, float]] = {}
        for split, metrics in super().latest_eval_metrics().items():
            if not is_card_split(split):
                continue
            match = split_exit_split(split)
            if match is None:
                by_split.setdefault(split, {}).update(metrics)
                continue
            parent, exit_name = match
            by_split.setdefault(parent, {}).update(
                {f"{exit_name}_{metric}": value for metric, value in metrics.items() if metric in EXIT_METRICS}
            )
        return by_split

    def _load_callback_state(self) -> None:
        # Trainer restores callback states only with restore_callback_states_from_checkpoint=True (default False),
        # and then into new instances built from JSON arguments, which cannot hold the trainer. These callbacks hold
        # training state, like the optimizer's: always restore them, into this trainer's own instances.
        stored = {}
        for callback in self._training_state_callbacks:
            name = type(callback).__name__
            stored[name] = self.state.stateful_callbacks.pop(name, None)
            if stored[name] is None:
                raise ValueError(
                    f"The checkpoint has no {name} state in its trainer_state.json: {callback.missing_state_message}. "
                    "Start a new run from its model weights instead."
                )
        super()._load_callback_state()
        for callback in self._training_state_callbacks:
            name = type(callback).__name__
            self.state.stateful_callbacks[name] = stored[name]  # _save_checkpoint updates this entry
            try:
                callback.load_state(stored[name])
            except (KeyError, TypeError, ValueError, IndexError) as err:
                # A hand-edited or damaged trainer_state.json must not half-restore the state: say which file.
                where = f"{self._resumed_from}/trainer_state.json" if self._resumed_from else "trainer_state.json"
                raise ValueError(
                    f"The {name} state in {where} is damaged ({type(err).__name__}: {err}); it was not used. Resume "
                    "from an earlier checkpoint, or start a new run from this checkpoint's model weights."
                ) from err
