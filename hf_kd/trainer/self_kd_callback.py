"""The phases of [`SelfKDTrainer`] and the trainer state they carry across checkpoints.

Park et al., "Self-Knowledge Distillation for Learning Ambiguity" (2024, https://huggingface.co/papers/2406.09719).
[`SelfKDCallback`] measures the validation entropy of every exit after each epoch, selects the source layer during
the warm-up, selects the re-calibration set, and holds all of it as [`~transformers.ExportableState`].
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate.utils import broadcast
from torch.nn import functional as F
from transformers import Trainer
from transformers.trainer_callback import ExportableState, TrainerCallback

from ..import_utils import is_matplotlib_available
from ..metrics import predictive_entropy
from ..self_kd import level_of_ambiguity, recalibration_indices, select_source_exit, selection_is_stable
from .dedier import SAMPLE_INDEX_COLUMN
from .full_pass import full_pass_batches

logger = logging.getLogger(__name__)

HUMAN_DISTRIBUTION_COLUMN = "human_label_dist"
PHASES = ("warmup", "distill", "recalibrate")
LAYER_ENTROPY_DIR = "self_kd"
"""`output_dir/self_kd/` holds `layer_entropy.json` (rewritten after every epoch) and `layer_entropy.png` (drawn when
training ends)."""


class SelfKDCallback(TrainerCallback, ExportableState):
    r"""
    The phase machine of [`SelfKDTrainer`] (which builds it; not meant to be added by hand).

    After every epoch, on every process:

    1. the unwrapped model, in eval mode and without gradients, runs over the **whole** selection (validation) set;
       the mean predictive entropy of every exit is appended to `entropy_curves`, logged as `val_entropy_layer_{l}`
       and written to `output_dir/self_kd/layer_entropy.json` (plotted into `layer_entropy.png` when training
       ends);
    2. during the warm-up, the source exit of that curve is appended to `selections`
       ([`hf_kd.self_kd.select_source_exit`]); once the last `selection_stable_epochs` agree, or after
       `warmup_max_epochs`, it becomes `source_exit` and self-distillation starts;
    3. when re-calibration is due (`recalibration_timing`), the model runs over the whole train set, every sample's
       level of ambiguity is computed ([`hf_kd.self_kd.level_of_ambiguity`]) and the `m %` lowest form the
       re-calibration set ([`hf_kd.self_kd.recalibration_indices`]).

    Every process computes the same numbers from the same data; rank 0's are broadcast so that all ranks, and every
    checkpoint, agree even where kernels are not bit-deterministic. The passes run in a forked CPU random state: the
    model's own random stream (data order, dropout) is the same as without them.

    The phase, the per-epoch entropy curves and selections, the source exit, the ambiguity scores and the
    re-calibration set are the callback's [`~transformers.ExportableState`], saved in every checkpoint's
    `trainer_state.json` and restored by the trainer on `resume_from_checkpoint` whatever
    `restore_callback_states_from_checkpoint` says: a resumed run continues exactly where the interrupted one was.

    Args:
        trainer ([`SelfKDTrainer`]):
            The trainer, whose `args`, model, data collator, train set and selection set are used.
        num_samples (`int`, *optional*):
            Number of training samples `N` (needed to re-calibrate).
    """

    missing_state_message = (
        "it was not saved by a SelfKDTrainer, so its source layer, ambiguity scores and re-calibration set cannot be "
        "restored"
    )

    def __init__(self, trainer: Trainer, num_samples: int | None):
        self.trainer = trainer
        self.num_samples = num_samples
        self.phase = "warmup"
        self.entropy_curves: list[list[float]] = []  # per epoch: mean validation entropy per exit
        self.epoch_phases: list[str] = []  # per epoch: the phase it trained in
        self.selections: list[int] = []  # per warm-up epoch: the source exit of that epoch's curve
        self.source_exit: int | None = None
        self.warmup_epochs: int | None = None
        self.ambiguity: np.ndarray | None = None  # (N,) level of ambiguity, +inf for unlabelled rows
        self.recalibration_set = np.zeros(0, dtype=np.int64)  # sorted sample indices
        self.epochs_done = 0
        self._set_mask()

    # ---- state -----------------------------------------------------------------------------------------------------

    def _set_mask(self) -> None:
        # A boolean lookup table on the training device, indexed by every training batch's sample_index.
        size = self.num_samples or 0
        self.recalibration_mask = torch.zeros(size, dtype=torch.bool, device=self.trainer.args.device)
        self.recalibration_mask[torch.as_tensor(self.recalibration_set, dtype=torch.long)] = True

    def state(self) -> dict:
        ambiguity = None
        if self.ambiguity is not None:
            # JSON has no infinity: unlabelled rows are written as null. float64 values round-trip exactly.
            ambiguity = [float(a) if math.isfinite(a) else None for a in self.ambiguity]
        return {
            "args": {"num_samples": self.num_samples},
            "attributes": {
                "phase": self.phase,
                "entropy_curves": self.entropy_curves,
                "epoch_phases": self.epoch_phases,
                "selections": self.selections,
                "source_exit": self.source_exit,
                "warmup_epochs": self.warmup_epochs,
                "ambiguity": ambiguity,
                "recalibration_set": self.recalibration_set.tolist(),
                "epochs_done": self.epochs_done,
            },
        }

    def load_state(self, state: dict) -> None:
        """Restore everything [`~SelfKDCallback.state`] saved."""
        num_samples = state["args"]["num_samples"]
        if num_samples != self.num_samples:
            raise ValueError(
                f"The checkpoint's self-distillation state is for {num_samples} training samples, but this run has "
                f"{self.num_samples}: resume with the same training data and recalibration_percent."
            )
        attributes = state["attributes"]
        self.phase = attributes["phase"]
        self.entropy_curves = [list(curve) for curve in attributes["entropy_curves"]]
        self.epoch_phases = list(attributes["epoch_phases"])
        self.selections = list(attributes["selections"])
        self.source_exit = attributes["source_exit"]
        self.warmup_epochs = attributes["warmup_epochs"]
        ambiguity = attributes["ambiguity"]
        self.ambiguity = None if ambiguity is None else np.array(
            [np.inf if a is None else a for a in ambiguity], dtype=np.float64
        )
        self.recalibration_set = np.asarray(attributes["recalibration_set"], dtype=np.int64)
        self.epochs_done = attributes["epochs_done"]
        self._check_restored_state()
        self._set_mask()

    def _check_restored_state(self) -> None:
        """`ValueError` on a restored state that SelfKDCallback cannot have written (a damaged or edited file)."""
        num_exits = len(self.trainer.accelerator.unwrap_model(self.trainer.model).config.exit_layers)
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.phase!r}")
        if not isinstance(self.epochs_done, int) or not (
            self.epochs_done == len(self.entropy_curves) == len(self.epoch_phases)
        ):
            raise ValueError(
                f"epochs_done={self.epochs_done!r} must equal the number of entropy curves ({len(self.entropy_curves)}) "
                f"and of epoch phases ({len(self.epoch_phases)})"
            )
        if any(len(curve) != num_exits for curve in self.entropy_curves):
            raise ValueError(f"every entropy curve must have one value per exit ({num_exits})")
        if self.source_exit is not None and not (isinstance(self.source_exit, int) and 0 <= self.source_exit < num_exits):
            raise ValueError(f"source_exit must be None or an exit index in [0, {num_exits}), got {self.source_exit!r}")
        if self.ambiguity is not None and self.ambiguity.shape != (self.num_samples,):
            raise ValueError(f"ambiguity must have {self.num_samples} values, got {self.ambiguity.shape[0]}")
        index = self.recalibration_set
        if index.size and (index.min() < 0 or index.max() >= (self.num_samples or 0)):
            raise ValueError(f"recalibration_set indices must be in [0, {self.num_samples}), got {index.min()}..{index.max()}")

    # ---- events ----------------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        if state.num_train_epochs < args.min_train_epochs:
            raise ValueError(
                f"SelfKDTrainer trains for {state.num_train_epochs} epochs, fewer than the {args.min_train_epochs} its "
                f"phases need: warmup_max_epochs={args.warmup_max_epochs}, at least 1 self-distillation epoch"
                + (
                    f" and recalibration_epochs={args.recalibration_epochs}"
                    if args.recalibrates and args.recalibration_timing == "end"
                    else ""
                )
                + ". Raise num_train_epochs (or max_steps) or lower warmup_max_epochs."
            )
        # A checkpoint saved by save_strategy="steps" at the last step of an epoch precedes that epoch's end (Trainer
        # saves before on_epoch_end), and the model is the one the epoch's end would have seen: catch it up now, so
        # that a resumed run matches an uninterrupted one.
        if self.epochs_done < int(state.epoch):
            self.end_epoch(self.epochs_done + 1, state.num_train_epochs)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.end_epoch(self.epochs_done + 1, state.num_train_epochs)

    def end_epoch(self, epoch: int, num_train_epochs: int) -> dict[str, float]:
        """Everything that happens after epoch `epoch` (1-based) of `num_train_epochs`; logs and returns the
        statistics."""
        trainer, args = self.trainer, self.trainer.args
        model = trainer.accelerator.unwrap_model(trainer.model)
        layers = list(model.config.exit_layers)
        was_training = model.training
        model.eval()
        with torch.random.fork_rng(devices=[]):  # the passes' DataLoaders draw base seeds from the CPU generator
            probs, _, _ = self._exit_probabilities(model, trainer.selection_dataset, "SelfKD validation entropy")
            curve = self._from_rank_zero(
                torch.tensor([predictive_entropy(p) for p in probs], dtype=torch.float64)
            ).tolist()
            self.entropy_curves.append(curve)
            self.epoch_phases.append(self.phase)
            logs = {f"val_entropy_layer_{layer}": entropy for layer, entropy in zip(layers, curve)}

            if self.phase == "warmup":
                selected = select_source_exit(
                    curve, args.entropy_drop_rule, args.entropy_drop_threshold, args.source_layer_side
                )
                self.selections.append(selected)
                logs["selected_layer"] = layers[selected]
                if selection_is_stable(self.selections, args.selection_stable_epochs) or (
                    len(self.selections) >= args.warmup_max_epochs
                ):
                    self.source_exit, self.warmup_epochs, self.phase = selected, epoch, "distill"
                    logs.update(source_layer=layers[selected], warmup_epochs=epoch)

            last = epoch >= num_train_epochs  # a new set would never be used
            due = self.phase == "recalibrate" or (
                self.phase == "distill"
                and (args.recalibration_timing == "every_epoch" or epoch >= num_train_epochs - args.recalibration_epochs)
            )
            if args.recalibrates and due and not last:
                logs.update(self._select_recalibration_set(model))
                self.phase = "recalibrate"
        model.train(was_training)
        self.epochs_done = epoch
        logs["phase"] = float(PHASES.index(self.phase))
        # Trainer.log, not trainer.log: the trainer's log would flush the loss parts accumulated since the last step
        # log into this entry.
        Trainer.log(trainer, logs)
        if args.should_save:
            self.save_layer_entropy(Path(args.output_dir) / LAYER_ENTROPY_DIR, layers, plot=False)
        return logs

    def on_train_end(self, args, state, control, **kwargs):
        # The plot once, at the end (drawing takes most of a second); the JSON is rewritten after every epoch.
        if args.should_save and self.entropy_curves:
            layers = list(self.trainer.accelerator.unwrap_model(self.trainer.model).config.exit_layers)
            self.save_layer_entropy(Path(args.output_dir) / LAYER_ENTROPY_DIR, layers)

    def _select_recalibration_set(self, model) -> dict[str, float]:
        probs, labels, index = self._exit_probabilities(model, self.trainer.train_dataset, "SelfKD ambiguity scores")
        if index is None:
            raise ValueError(f"re-calibration needs a '{SAMPLE_INDEX_COLUMN}' in every training batch")
        order = np.empty(self.num_samples, dtype=np.int64)
        seen = np.zeros(self.num_samples, dtype=np.int64)
        if index.min() < 0 or index.max() >= self.num_samples:
            raise ValueError(f"'{SAMPLE_INDEX_COLUMN}' values must be in [0, {self.num_samples}), got {index}")
        np.add.at(seen, index, 1)
        if not (seen == 1).all():
            raise ValueError(
                f"The train set's '{SAMPLE_INDEX_COLUMN}' values must be a permutation of 0..{self.num_samples - 1}; "
                f"{int((seen != 1).sum())} of them are missing or repeated."
            )
        order[index] = np.arange(index.size)  # row of each sample index
        scores = level_of_ambiguity(probs[:, order], labels[order], self.source_exit, self.trainer.args.ambiguity_score)
        # +inf (unlabelled) survives the broadcast as a float64.
        self.ambiguity = self._from_rank_zero(torch.from_numpy(scores)).numpy()
        self.recalibration_set = recalibration_indices(self.ambiguity, self.trainer.args.recalibration_percent)
        self._set_mask()
        chosen = self.ambiguity[self.recalibration_set]
        return {
            "recalibration_set_size": float(self.recalibration_set.size),
            "recalibration_max_ambiguity": float(chosen.max()) if chosen.size else float("nan"),
            "train_mean_ambiguity": float(self.ambiguity[np.isfinite(self.ambiguity)].mean()),
        }

    def _from_rank_zero(self, values: torch.Tensor) -> torch.Tensor:
        accelerator = self.trainer.accelerator
        if accelerator.num_processes == 1:
            return values
        device = self.trainer.args.device
        return broadcast(values.to(device).contiguous(), from_process=0).cpu()

    @torch.no_grad()
    def _exit_probabilities(self, model, dataset, description: str):
        """`(probs (num_exits, N, K) float64, labels (N,), sample_index (N,) or None)` of the model on every row of
        `dataset`, shortest rows first (less padding; the callers need means or the sample index, not the order)."""
        args = self.trainer.args
        order = None
        if isinstance(dataset, datasets.Dataset) and "input_ids" in dataset.column_names:
            lengths = [len(ids) for ids in dataset["input_ids"]]
            order = np.argsort(lengths, kind="stable").tolist()
        probs, labels, index = [], [], []
        batches = full_pass_batches(self.trainer, dataset, args.per_device_eval_batch_size, order, description)
        for batch in batches:
            batch_labels = batch.pop("labels", None)
            batch_index = batch.pop(SAMPLE_INDEX_COLUMN, None)
            batch.pop(HUMAN_DISTRIBUTION_COLUMN, None)
            exit_logits = self.trainer._exit_logits(model(**batch))
            probs.append(torch.stack([F.softmax(z.double(), dim=-1) for z in exit_logits]).cpu())
            if batch_labels is not None:
                labels.append(batch_labels.cpu())
            if batch_index is not None:
                index.append(batch_index.cpu())
        return (
            torch.cat(probs, dim=1).numpy(),
            torch.cat(labels).numpy() if labels else None,
            torch.cat(index).numpy() if index else None,
        )

    # ---- the entropy curves, saved and plotted -----------------------------------------------------------------------

    def layer_entropy_record(self, layers: list[int]) -> dict:
        """The entropy curves with their layers, phases and selections (what `layer_entropy.json` holds)."""
        epochs = [
            {
                "epoch": epoch,
                "phase": phase,
                "entropy": curve,
                "selected_layer": layers[self.selections[epoch - 1]] if epoch <= len(self.selections) else None,
            }
            for epoch, (curve, phase) in enumerate(zip(self.entropy_curves, self.epoch_phases), start=1)
        ]
        return {
            "exit_layers": layers,
            "source_layer": None if self.source_exit is None else layers[self.source_exit],
            "warmup_epochs": self.warmup_epochs,
            "epochs": epochs,
        }

    def save_layer_entropy(self, folder: Path, layers: list[int], plot: bool = True) -> None:
        """Write `layer_entropy.json` and, with `plot` and matplotlib, `layer_entropy.png` into `folder`."""
        record = self.layer_entropy_record(layers)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "layer_entropy.json.tmp"
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, folder / "layer_entropy.json")
        if not plot:
            return
        if not is_matplotlib_available():
            if not getattr(self, "_warned_no_plot", False):
                logger.warning("matplotlib is not installed: layer_entropy.png is not drawn (pip install 'hf_kd[plots]')")
                self._warned_no_plot = True
            return
        from ..plots import plot_layer_entropy

        plot_layer_entropy(
            layers,
            [e["entropy"] for e in record["epochs"]],
            folder / "layer_entropy.png",
            source_layer=record["source_layer"],
            phases=[e["phase"] for e in record["epochs"]],
        )
