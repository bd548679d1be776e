"""Checkpoint and output-folder checks run before training, so that a damaged file or a folder that cannot be written
fails at once with a clear error instead of being used silently or failing at the first save.

- [`find_last_checkpoint`]: the newest *complete* `checkpoint-<step>` folder of a run (`Trainer` writes
  `trainer_state.json` last, so a run killed while saving leaves a folder without it, which is skipped).
- [`verify_checkpoint`]: every file of a checkpoint folder is readable in full: safetensors headers and sizes,
  JSON files, and the zip archives `torch.save` writes (optimizer, scheduler, RNG states), CRCs included.
- [`resolve_resume_checkpoint`]: what `resume_from_checkpoint` (`True`, `"latest"`, or a path) means for a run.
- [`check_output_dir`]: `output_dir` can be created and written, and its disk has room for one checkpoint.

hf_kd's trainers call these from `train()` (see [`hf_kd.trainer.base_trainer._BaseTrainer`]).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# Strings of `resume_from_checkpoint` (a CLI flag is a string) that mean "the newest checkpoint of output_dir".
LATEST = ("latest", "last", "true", "True")


def find_last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The `checkpoint-<step>` folder of `output_dir` with the highest step that has a `trainer_state.json`, or
    `None`. Folders without one (a run killed while saving them) are skipped with a warning."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    steps = sorted(
        ((int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT_RE.match(p.name)) and p.is_dir()),
        reverse=True,
    )
    for _, path in steps:
        if (path / TRAINER_STATE_NAME).is_file():
            return path
        logger.warning(f"Skipping the incomplete checkpoint {path}: it has no {TRAINER_STATE_NAME} (its save was cut off).")
    return None


def _damaged(path: Path, reason: str) -> ValueError:
    return ValueError(
        f"The checkpoint file {path} is damaged ({reason}); it was not used. Delete the folder {path.parent} to resume "
        "from the previous checkpoint, or start a new run."
    )


def verify_checkpoint(folder: str | os.PathLike) -> Path:
    """
    Check that a checkpoint folder is complete and every file in it can be read in full; return it as a `Path`.

    Checked: `trainer_state.json` exists and is a JSON object with `global_step`; every `*.json` parses; every
    `*.safetensors` has a valid header covering the whole file (a truncated file fails); the shards named by a
    `*.safetensors.index.json` exist; every `*.pt`, `*.pth` and `*.bin` (`torch.save` writes zip archives) is a
    complete zip whose members pass their CRC check (the whole file is read once).

    Raises:
        `FileNotFoundError`: the folder or its `trainer_state.json` does not exist.
        `ValueError`: a damaged file, named with what to do.
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint={str(folder)!r} is not a folder.")
    state = folder / TRAINER_STATE_NAME
    if not state.is_file():
        raise FileNotFoundError(
            f"The checkpoint {folder} has no {TRAINER_STATE_NAME}: its save was cut off. Delete it to resume from the "
            "previous checkpoint, or pass resume_from_checkpoint=True (or 'latest'), which skips incomplete ones."
        )
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        if path.suffix == ".json":
            try:
                content = json.loads(path.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise _damaged(path, f"not valid JSON: {err}") from err
            if path.name == TRAINER_STATE_NAME and not (isinstance(content, dict) and "global_step" in content):
                raise _damaged(path, "no global_step")
            if path.name.endswith(".safetensors.index.json"):
                shards = set(content.get("weight_map", {}).values()) if isinstance(content, dict) else set()
                missing = sorted(s for s in shards if not (folder / s).is_file())
                if missing:
                    raise _damaged(path, f"missing shards {missing}")
        elif path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt"):
                    pass
            except (SafetensorError, OSError) as err:
                raise _damaged(path, str(err)) from err
        elif path.suffix in (".pt", ".pth", ".bin"):
            try:
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
            except (zipfile.BadZipFile, OSError, EOFError) as err:
                raise _damaged(path, f"not a complete torch.save archive: {err}") from err
            if bad is not None:
                raise _damaged(path, f"CRC mismatch in {bad}")
    return folder


def resolve_resume_checkpoint(value: str | bool | os.PathLike | None, output_dir: str | os.PathLike) -> str | None:
    """
    The checkpoint folder a run resumes from, verified by [`verify_checkpoint`], or `None` to start afresh.

    Args:
        value (`str`, `bool` or `None`):
            `None` / `False`: start afresh. `True`: the newest complete checkpoint of `output_dir`, an error if there
            is none (as `Trainer`). `"latest"` (also `"last"`, `"true"`): the newest complete checkpoint, or start
            afresh when there is none yet, which lets one command line both start and resume a job. Any other
            string: that folder.
        output_dir (`str` or `os.PathLike`): the run's `output_dir`.
    """
    if value is None or value is False:
        return None
    if value is True or (isinstance(value, str) and value in LATEST):
        found = find_last_checkpoint(output_dir)
        if found is None:
            if value is True:
                raise ValueError(f"resume_from_checkpoint=True but output_dir {str(output_dir)!r} has no complete "
                                 "checkpoint-<step> folder. Pass resume_from_checkpoint='latest' to start afresh then.")
            logger.info(f"resume_from_checkpoint={value!r}: no checkpoint in {output_dir} yet, starting afresh.")
            return None
        value = found
    return str(verify_checkpoint(value))


def checkpoint_bytes(model, with_optimizer: bool = True) -> int:
    """A lower bound on the size of one checkpoint: the model's parameters and buffers, plus Adam's two moments of
    the trainable parameters when `with_optimizer`."""
    size = sum(t.numel() * t.element_size() for t in model.parameters())
    size += sum(t.numel() * t.element_size() for t in model.buffers())
    if with_optimizer:
        size += 2 * sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    return size


def check_output_dir(output_dir: str | os.PathLike, needed_bytes: int = 0) -> None:
    """
    Fail now, with a clear error, if the run could not save into `output_dir`.

    The folder is created if missing and a probe file is written and removed (a real write test: `os.access` says
    yes to root on a read-only mount); then, if `needed_bytes > 0`, the free space of its disk must be at least that.

    Raises:
        `PermissionError` / `NotADirectoryError` / `OSError`: the folder cannot be created or written, naming it.
        `OSError`: the disk has less than `needed_bytes` free.
    """
    folder = Path(output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".hf_kd_write_test"):
            pass
    except OSError as err:
        raise type(err)(
            f"output_dir {str(folder)!r} cannot be written ({err.strerror or err}): checkpoints and the model could "
            "not be saved. Pass an output_dir on a writable disk."
        ) from err
    if needed_bytes > 0:
        free = shutil.disk_usage(folder).free
        if free < needed_bytes:
            raise OSError(
                f"output_dir {str(folder)!r} has {free / 2**20:.1f} MiB free, less than the {needed_bytes / 2**20:.1f}"
                " MiB one checkpoint of this model takes: free some space or choose another output_dir."
            )


__all__ = ["check_output_dir", "checkpoint_bytes", "find_last_checkpoint", "resolve_resume_checkpoint",
           "verify_checkpoint"]
