"""Pieces shared by hf_kd's trainers: logged loss parts, multi-exit bookkeeping, training-state callbacks, full passes.

- [`_LoggedLossesMixin`]: per-batch loss parts collected in `compute_loss` and logged as their mean at each log.
- [`_MultiExitMixin`]: what every trainer of a multi-exit model ([`EarlyExitTrainer`], [`SelfKDTrainer`]) needs on
  top of that: the model check, the extra dataset columns kept through Trainer's column removal, the card's view of
  the evaluation metrics, and the exact restoration of callbacks that hold training state.
- [`plain_loader`] / [`full_pass_batches`]: one no-shuffle pass over a whole dataset with the trainer's collator, on
  every process.
"""

from __future__ import annotations

from collections import defaultdict

import datasets
import torch
from torch.utils.data import DataLoader

from ..metric_keys import EXIT_METRICS, is_card_split, split_exit_split


class _LoggedLossesMixin:
    """Loss parts appended to `self._metrics[mode][name]` (detached scalars) in `compute_loss` are logged as their
    mean over this process's batches since the last log, prefixed at evaluation with its `metric_key_prefix`
    (`eval_`, `test_`, ...). The trainer calls [`~_LoggedLossesMixin._init_logged_losses`] in its `__init__`, after
    `Trainer.__init__` (which sets `model_accepts_loss_kwargs` from the model's signature)."""

    _eval_prefix: str | None = None

    def _init_logged_losses(self) -> None:
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        # hf_kd's compute_loss normalises by `num_items_in_batch` itself: declaring loss kwargs makes Trainer count
        # the items of the accumulated batch and skip its own division by the accumulation steps.
        self.model_accepts_loss_kwargs = True

    def _scale_for_processes(self, loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        """The loss normalised by `num_items_in_batch` (declared above), rescaled for DDP's gradient averaging."""
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # num_items_in_batch counts the items of every process; DDP averages gradients over processes.
            return loss * self.accelerator.num_processes
        return loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        # log() must know which evaluation it is logging (a "test" or "train" split's metrics start with its prefix,
        # not "eval_"); Trainer.evaluate of a dict of datasets calls this again per dataset, hence the restore.
        outer, self._eval_prefix = self._eval_prefix, metric_key_prefix
        try:
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        finally:
            self._eval_prefix = outer

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self._eval_prefix is None else "eval"
        prefix = "" if self._eval_prefix is None else f"{self._eval_prefix}_"
        for key, values in self._metrics[mode].items():
            if values:
                # Mean over this process's batches since the last log (no collective here: a rank with no batch
                # would hang the others).
                logs[prefix + key] = torch.stack(values).mean().item()
        self._metrics[mode].clear()
        super().log(logs, start_time)


class _MultiExitMixin(_LoggedLossesMixin):
    """
    Shared by the trainers of multi-exit models.

    Subclasses set `_extra_columns` (dataset columns that `compute_loss` pops, kept through Trainer's removal of the
    columns the model's forward does not take) and `_training_state_callbacks`: the [`~transformers.ExportableState`]
    callbacks whose state is training state, restored on every resume by their `load_state(state)`; their
    `missing_state_message` says what a checkpoint without their state lacks.
    """

    _extra_columns: tuple[str, ...] = ()
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

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            self._signature_columns += list(self._extra_columns)

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


def full_pass_batches(trainer, dataset, batch_size: int, order: list[int] | None = None, description: str = "pass"):
    """
    Yield the batches of one pass over `dataset` (all rows, every process; in `order` when given, else in dataset
    order), collated by the trainer's data collator and moved to the training device by `trainer._prepare_inputs`.

    The columns the model cannot take are dropped as Trainer's own dataloaders drop them (its extra columns, e.g.
    `labels` and `sample_index`, are kept); the caller pops what is not a model input. A progress bar named
    `description` shows on the main process unless `args.disable_tqdm`.
    """
    from tqdm.auto import tqdm

    loader = plain_loader(trainer, dataset, batch_size, description, sampler=order)
    quiet = trainer.args.disable_tqdm or not trainer.is_world_process_zero()
    for batch in tqdm(loader, desc=description, unit="batch", leave=False, disable=quiet):
        yield trainer._prepare_inputs(batch)


def plain_loader(trainer, dataset, batch_size: int, description: str, sampler=None) -> DataLoader:
    """An unsharded loader over `dataset` (in dataset order, or `sampler`'s) with the trainer's collator, dropping the
    columns the model cannot take as Trainer's own dataloaders do (its extra columns, e.g. `labels` and
    `sample_index`, are kept)."""
    collator = trainer.data_collator
    if isinstance(dataset, datasets.Dataset):
        dataset = trainer._remove_unused_columns(dataset, description=description)
    else:
        collator = trainer._get_collator_with_removed_columns(collator, description=description)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=sampler, collate_fn=collator)
