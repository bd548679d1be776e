"""One no-shuffle pass over a whole dataset with a trainer's collator, on every process ([`full_pass_batches`],
[`plain_loader`]): used by the callbacks that score every training example (DEDIER, self-KD's selection and
recalibration) and by the multi-exit Laplace fit.
"""

from __future__ import annotations

import datasets
from torch.utils.data import DataLoader


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
