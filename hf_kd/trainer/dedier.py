"""DEDIER for [`EarlyExitTrainer`]: early readouts that re-weight the distillation loss.

Tiwari et al., "Using Early Readouts to Mediate Featural Bias in Distillation", WACV 2024
(https://huggingface.co/papers/2310.18590; official code molereddy/distillation-group-analysis). After every student
epoch a fresh readout is trained on the frozen student's features at an early layer. Samples that this readout gets
wrong are the ones an early, shortcut-prone representation cannot explain; each gets the weight
`exp(beta * margin^alpha)` ([`hf_kd.losses.dedier_weights`]), which scales its distillation loss from then on.

- [`DedierReadout`]: the readout, for token features `(batch, hidden)` and image feature maps `(batch, C, H, W)`.
- [`DedierCallback`]: holds the per-sample weights (checkpointed in `trainer_state.json`), trains the readout and
  re-weighs at the end of each epoch.
- [`with_sample_index`]: gives the train set the stable `sample_index` column the weights are looked up by.
"""

from __future__ import annotations

import datasets
import numpy as np
import torch
from accelerate.utils import broadcast
from torch import nn
from torch.nn import functional as F
from torch.utils.data import IterableDataset
from transformers import Trainer
from transformers.trainer_callback import ExportableState, TrainerCallback

from ..losses import dedier_weights
from ..teacher import TEACHER_LOGITS_COLUMN
from .full_pass import full_pass_batches

SAMPLE_INDEX_COLUMN = "sample_index"
GROUP_COLUMN = "group"


def with_sample_index(dataset, purpose: str = "dedier=True"):
    """
    Return the train set with a `sample_index` column `0..N-1` (added to a [`datasets.Dataset`] that lacks one).

    A [`datasets.Dataset`] that already has the column must hold a permutation of `0..N-1`. Any other map-style
    dataset must yield a `sample_index` in every example; it is checked when the readout first visits every row.

    Args:
        dataset: the train set.
        purpose (`str`, *optional*, defaults to `"dedier=True"`): the setting that needs per-sample state, named in
            the errors.

    Raises:
        `ValueError`: without a train set, or on a `sample_index` column that is not a permutation of `0..N-1`.
        `TypeError`: for an `IterableDataset`, whose rows have neither a length nor a stable position.
    """
    if dataset is None:
        raise ValueError(f"{purpose} needs the train_dataset when the trainer is built: its state is per sample.")
    if isinstance(dataset, (IterableDataset, datasets.IterableDataset)):
        raise TypeError(
            f"{purpose} needs a map-style train_dataset with a length and stable rows, got {type(dataset).__name__}"
        )
    if not isinstance(dataset, datasets.Dataset):
        return dataset
    if SAMPLE_INDEX_COLUMN not in dataset.column_names:
        return dataset.add_column(SAMPLE_INDEX_COLUMN, np.arange(len(dataset), dtype=np.int64))
    index = np.asarray(dataset.with_format("numpy")[SAMPLE_INDEX_COLUMN])
    if not np.array_equal(np.sort(index), np.arange(len(dataset))):
        raise ValueError(
            f"The train_dataset's '{SAMPLE_INDEX_COLUMN}' column must be a permutation of 0..{len(dataset) - 1} "
            "(per-sample state is looked up by it): drop it and the trainer adds one."
        )
    return dataset


class _BasicBlock(nn.Module):
    """ResNet's BasicBlock, `in_channels -> out_channels` at stride 1, with a 1x1 projection shortcut."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))  # (bs, out, H, W)
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class DedierReadout(nn.Module):
    r"""
    DEDIER's early readout: a small classifier trained on the frozen model's features at one layer.

    - Token features of shape `(batch, hidden)`, a sequence model's hidden states pooled as its exits pool them (masked
      mean or first token):
      `Linear(hidden, hidden) -> tanh -> Linear(hidden, num_labels)`, the shape of BERT's pooler and classifier. (The
      paper's release implements no text readout; one hidden non-linear layer mirrors the capacity of its image
      readout.)
    - Feature maps of shape `(batch, C, H, W)`, a stage output of an image model: a ResNet BasicBlock `C -> 2C`
      (stride 1), global average pooling and `Linear(2C, num_labels)`, the paper's readout (`BasicBlock(64 -> 128)`
      after `layer1` of ResNet-18). Convolutions are Kaiming-normal initialised (`fan_out`, ReLU), batch norms to
      weight 1 and bias 0, as in torchvision's ResNet.

    Args:
        feature_shape (`tuple[int, ...]`):
            The shape of one example's features: `(hidden,)` or `(C, H, W)`.
        num_labels (`int`):
            Number of classes.
    """

    def __init__(self, feature_shape: tuple[int, ...], num_labels: int):
        super().__init__()
        if len(feature_shape) == 1:
            (hidden,) = feature_shape
            self.block = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh())
            self.classifier = nn.Linear(hidden, num_labels)
        elif len(feature_shape) == 3:
            channels = feature_shape[0]
            self.block = _BasicBlock(channels, 2 * channels)
            self.classifier = nn.Linear(2 * channels, num_labels)
            for module in self.block.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(module, nn.BatchNorm2d):
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)
        else:
            raise ValueError(
                f"DEDIER readout features must be (hidden,) token features or (C, H, W) feature maps per example, got "
                f"shape {tuple(feature_shape)}"
            )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.block(features)  # (bs, hidden) or (bs, 2C, H, W)
        if hidden.dim() == 4:
            hidden = hidden.mean(dim=(2, 3))  # global average pooling, (bs, 2C)
        return self.classifier(hidden)  # (bs, num_labels)


class DedierCallback(TrainerCallback, ExportableState):
    r"""
    DEDIER's per-sample weights and their update at the end of each epoch, for [`EarlyExitTrainer`] (which builds
    it when `args.dedier=True`; not meant to be added by hand).

    At each re-weighting, on every process:

    1. the unwrapped model, in eval mode and without gradients, runs over the **whole** train set (not this
       process's shard) with `output_hidden_states=True`; its features are `hidden_states[args.dedier_layer]`, pooled
       as the model's exits pool them for a sequence model `(N, hidden)` (masked mean or first token, per
       `config.exit_pooling`), and the feature map for an image model `(N, C, H, W)`;
    2. a new [`DedierReadout`] (re-initialised every time from the seed `args.seed + number of re-weightings so
       far`) is trained on them with cross-entropy for `args.dedier_readout_epochs` epochs, in a random order drawn
       from the same seed;
    3. the weights of the samples it misreads become `exp(beta * margin^alpha)` ([`hf_kd.losses.dedier_weights`]).

    Token features are cached on the CPU for the pass (`N x hidden` floats). Feature maps are recomputed by the frozen
    model at every readout epoch and for the predictions instead: they would take `N x C x H x W` floats, e.g. 130 GB
    for CelebA after ResNet-18's first stage.

    Every process trains the same readout on the same data with the same seed, so no process waits for another
    (a rank-0-only readout would leave the other ranks blocked in a collective, racing the process-group timeout
    for the length of a pass over the train set). Kernels that are not bit-deterministic (cuDNN, atomics) could still
    make them differ in the last bits, so rank 0's weights are then broadcast: every rank, and every checkpoint,
    holds the same weights. All random draws happen in a forked CPU generator: the student's own random stream (data
    order, dropout) is the same with and without DEDIER.

    The weights, the number of re-weightings and the seed are the callback's [`~transformers.ExportableState`],
    saved in each checkpoint's `trainer_state.json` (`N` floats) and restored by [`EarlyExitTrainer`] on
    `resume_from_checkpoint` whatever `restore_callback_states_from_checkpoint` says, since they are training state
    like the optimizer's.

    Args:
        trainer ([`EarlyExitTrainer`]):
            The trainer, whose `args`, model, data collator and `sample_index`-carrying train set are used.
        num_samples (`int`):
            Number of training samples `N`.
        seed (`int`):
            Base seed of the readouts.
    """

    missing_state_message = "it was not saved by a dedier=True run, so its DEDIER weights cannot be restored"

    def __init__(self, trainer: Trainer, num_samples: int, seed: int):
        self.trainer = trainer
        self.num_samples = num_samples
        self.seed = seed
        # float32 on the training device: indexed by every training batch without a host round trip.
        self.weights = torch.ones(num_samples, device=trainer.args.device)  # (N,)
        self.num_reweighs = 0
        self.readout: DedierReadout | None = None  # the last readout trained; re-initialised, so not checkpointed

    def state(self) -> dict:
        # tolist(): float32 values written as Python floats round-trip exactly through JSON.
        return {
            "args": {"num_samples": self.num_samples, "seed": self.seed},
            "attributes": {"weights": self.weights.tolist(), "num_reweighs": self.num_reweighs},
        }

    def load_state(self, state: dict) -> None:
        """Restore the weights, the number of re-weightings and the seed from [`~DedierCallback.state`]'s output."""
        num_samples = state["args"]["num_samples"]
        if num_samples != self.num_samples:
            raise ValueError(
                f"The checkpoint's DEDIER weights are for {num_samples} training samples, but the train_dataset has "
                f"{self.num_samples}: resume with the same training data."
            )
        weights = torch.tensor(state["attributes"]["weights"], dtype=torch.float32, device=self.weights.device)
        num_reweighs = state["attributes"]["num_reweighs"]
        # exp(beta * margin^alpha) >= 1: anything else was not written by DEDIER.
        if weights.shape != (self.num_samples,) or not bool(torch.isfinite(weights).all() and (weights >= 1).all()):
            raise ValueError(
                f"DEDIER weights must be {self.num_samples} finite values >= 1, got shape {tuple(weights.shape)} with "
                f"min {weights.min().item() if weights.numel() else None}"
            )
        if not isinstance(num_reweighs, int) or num_reweighs < 0:
            raise ValueError(f"num_reweighs must be an integer >= 0, got {num_reweighs!r}")
        self.seed = state["args"]["seed"]
        self.weights, self.num_reweighs = weights, num_reweighs

    def on_train_begin(self, args, state, control, **kwargs):
        # A checkpoint saved by save_strategy="steps" at the last step of an epoch precedes that epoch's re-weighting
        # (Trainer saves before on_epoch_end). The model is then exactly the one the re-weighting would have seen:
        # catch it up now, so that a resumed run matches an uninterrupted one.
        if self.num_reweighs < int(state.epoch):
            self.reweigh()

    def on_epoch_end(self, args, state, control, **kwargs):
        # After the last epoch the new weights would never be used: skip the pass over the train set. A run resumed
        # with more epochs catches it up in on_train_begin.
        if not control.should_training_stop:
            self.reweigh()

    # ---- re-weighting ----------------------------------------------------------------------------------------------

    def reweigh(self) -> dict[str, float]:
        """Train a fresh readout, update the weights of the samples it misreads, log and return the statistics
        `dedier_mean_weight`, `dedier_upweighted_fraction` (weights above 1) and `dedier_readout_accuracy` (of the
        readout on the train set)."""
        trainer, args = self.trainer, self.trainer.args
        model = trainer.accelerator.unwrap_model(trainer.model)
        was_training = model.training
        model.eval()
        # Forked: the readout's initialisation, its data order and the DataLoaders' base seeds draw from the CPU
        # generator, which must not shift the student's own random stream.
        with torch.random.fork_rng(devices=[]):
            logits, labels = self._fit_readout(model, seed=self.seed + self.num_reweighs)  # (N, K), (N,)
        model.train(was_training)

        weights = dedier_weights(logits, labels, self.weights, args.dedier_alpha, args.dedier_beta)
        if trainer.accelerator.num_processes > 1:
            weights = broadcast(weights.contiguous(), from_process=0)
        self.weights = weights
        self.num_reweighs += 1

        labelled = labels != -100
        correct = logits.argmax(-1)[labelled] == labels[labelled]
        stats = {
            "dedier_mean_weight": weights.mean().item(),
            "dedier_upweighted_fraction": (weights > 1).float().mean().item(),
            "dedier_readout_accuracy": correct.float().mean().item() if labelled.any() else float("nan"),
        }
        # Trainer.log, not trainer.log: EarlyExitTrainer.log would flush the per-exit losses accumulated since the
        # last step log into this entry.
        Trainer.log(trainer, stats)
        return stats

    def _fit_readout(self, model: nn.Module, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Train a new readout, initialised and shuffled from `seed`, on the model's features; return its logits
        `(N, K)` on CPU and the labels `(N,)`, both in sample-index order."""
        args, device, num_samples = self.trainer.args, self.trainer.args.device, self.num_samples
        batches = self._feature_batches(model, list(range(num_samples)), args.per_device_eval_batch_size)
        first = next(batches)
        feature_shape = tuple(first[0].shape[1:])
        cache = None
        if len(feature_shape) == 1:
            # [features (N, hidden), labels (N,), sample indices (N,)] on the CPU, in dataset order
            cache = [torch.cat([t.cpu() for t in column]) for column in zip(first, *batches)]

        def readout_batches(order: torch.Tensor, batch_size: int):
            if cache is None:
                yield from self._feature_batches(model, order.tolist(), batch_size)
            else:
                for chunk in order.split(batch_size):
                    yield tuple(column[chunk].to(device) for column in cache)

        torch.random.default_generator.manual_seed(seed)  # after the first pass: the readout depends on `seed` alone
        readout = DedierReadout(feature_shape, model.config.num_labels).to(device)
        lr = args.dedier_readout_lr or args.learning_rate
        if args.dedier_readout_optimizer == "sgd":
            optimizer = torch.optim.SGD(readout.parameters(), lr=lr, momentum=0.9, weight_decay=args.weight_decay)
        else:
            optimizer = torch.optim.AdamW(readout.parameters(), lr=lr, weight_decay=args.weight_decay)
        readout.train()
        for _ in range(args.dedier_readout_epochs):
            for features, labels, _ in readout_batches(torch.randperm(num_samples), args.per_device_train_batch_size):
                if not (labels != -100).any():
                    continue  # cross-entropy over no labelled row is 0/0
                loss = F.cross_entropy(readout(features).float(), labels, ignore_index=-100)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

        readout.eval()
        all_logits = torch.zeros(num_samples, model.config.num_labels)
        all_labels = torch.full((num_samples,), -100, dtype=torch.long)
        seen = torch.zeros(num_samples, dtype=torch.long)
        with torch.no_grad():
            for features, labels, index in readout_batches(torch.arange(num_samples), args.per_device_eval_batch_size):
                index = index.cpu()
                if index.min() < 0 or index.max() >= num_samples:
                    raise ValueError(f"'{SAMPLE_INDEX_COLUMN}' values must be in [0, {num_samples}), got {index}")
                all_logits[index] = readout(features).float().cpu()
                all_labels[index] = labels.cpu()
                seen[index] += 1
        if not (seen == 1).all():
            raise ValueError(
                f"The train set's '{SAMPLE_INDEX_COLUMN}' values must be a permutation of 0..{num_samples - 1}; "
                f"{int((seen != 1).sum())} of them are missing or repeated."
            )
        self.readout = readout
        return all_logits, all_labels

    def _feature_batches(self, model: nn.Module, order: list[int], batch_size: int):
        """Yield `(features, labels, sample_index)` on the training device over the train set rows in `order`."""
        trainer = self.trainer
        for batch in full_pass_batches(trainer, trainer.train_dataset, batch_size, order, "DEDIER readout"):
            labels, index = batch.pop("labels", None), batch.pop(SAMPLE_INDEX_COLUMN, None)
            if labels is None or index is None:
                raise ValueError(
                    f"dedier=True trains its readout on labelled training examples carrying a '{SAMPLE_INDEX_COLUMN}'; "
                    f"this batch has the keys {sorted(batch)}."
                )
            batch.pop(TEACHER_LOGITS_COLUMN, None)
            batch.pop(GROUP_COLUMN, None)
            # Computed in a function, not under a `no_grad` block here: a generator suspended inside one would leave
            # gradients disabled in the caller's readout training.
            yield self._features(model, batch), labels, index

    @torch.no_grad()
    def _features(self, model: nn.Module, batch: dict) -> torch.Tensor:
        layer = self.trainer.args.dedier_layer
        hidden_states = model(**batch, output_hidden_states=True).hidden_states
        if hidden_states is None or len(hidden_states) <= layer:
            got = "none" if hidden_states is None else len(hidden_states)
            raise ValueError(
                f"dedier_layer={layer} needs the model to return at least {layer + 1} hidden states (embeddings or "
                f"stem first) with output_hidden_states=True, got {got}."
            )
        hidden = hidden_states[layer]
        # float(): the readout trains in float32 whatever the model's dtype.
        if hidden.dim() == 3:
            # Sequence model, (bs, hidden): pooled as the model's own exits pool (MultiExitConfig.exit_pooling), so
            # the readout sees what an exit at that layer would see; the first ([CLS]) token otherwise.
            mask = batch.get("attention_mask")
            if getattr(model.config, "exit_pooling", "cls") == "mean":
                weights = torch.ones_like(hidden[..., :1]) if mask is None else mask.to(hidden.dtype).unsqueeze(-1)
                return ((hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)).float()
            return hidden[:, 0].float()
        if hidden.dim() == 4:
            return hidden.float()  # image model: (bs, C, H, W)
        raise ValueError(
            f"DEDIER reads (batch, seq_len, hidden) or (batch, C, H, W) hidden states, got shape {tuple(hidden.shape)}"
        )
