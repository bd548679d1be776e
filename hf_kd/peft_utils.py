"""PEFT students: adapters (LoRA, ...) on the student's backbone, with hf_kd's heads trained in full and saved.

PEFT trains only the adapter weights plus the modules listed in `modules_to_save`. A head that is not listed stays
frozen at its initial weights and is left out of the saved adapter, silently (ENVIRONMENT.md): fatal for the fresh
exit heads of a multi-exit model. [`prepare_peft_model`] therefore derives `modules_to_save` from the model itself
([`head_module_names`]), leaf by leaf (PEFT rejects a `ModuleList`), and warns when a head of an already wrapped
`PeftModel` is frozen. Every hf_kd trainer calls it through `_BaseTrainer.__init__(..., peft_config=...)`, as TRL's
trainers do.

`peft` is optional (`pip install hf_kd[peft]`); this module imports it lazily.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .import_utils import is_peft_available

if TYPE_CHECKING:
    from peft import PeftConfig

PEFT_EXTRA = "pip install hf_kd[peft]"
# transformers' classification heads (the modules PEFT itself keeps trainable for task_type="SEQ_CLS").
CLASSIFIER_HEAD_NAMES = ("classifier", "score")
# Models declare their other heads (exit heads, KD layers, ...) in this class attribute: names of submodules.
HEADS_ATTRIBUTE = "_hf_kd_heads"


def require_peft(what: str = "PEFT students") -> None:
    """Raise an `ImportError` naming the extra to install when `peft` is missing."""
    if not is_peft_available():
        raise ImportError(f"{what} need the `peft` package: `{PEFT_EXTRA}` (or `pip install peft`).")


def is_peft_model(model: nn.Module) -> bool:
    """Whether `model` is a `peft.PeftModel` (or `PeftMixedModel`); `False` when peft is not installed."""
    if not is_peft_available():
        return False
    from peft import PeftMixedModel, PeftModel

    return isinstance(model, (PeftModel, PeftMixedModel))


def _is_leaf(module: nn.Module, name: str) -> bool:
    """Named `classifier` / `score` (PEFT wraps those whole for `task_type="SEQ_CLS"`, by name suffix: a part of one
    listed too would be wrapped twice), owns parameters or buffers itself, or is a PEFT wrapper around a leaf (a
    `ModulesToSaveWrapper`, a LoRA layer)."""
    if name.rsplit(".", 1)[-1] in CLASSIFIER_HEAD_NAMES:
        return True
    if next(module.parameters(recurse=False), None) is not None or next(module.buffers(recurse=False), None) is not None:
        return True
    if is_peft_available():
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        return isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper))
    return False


def _leaves(module: nn.Module, prefix: str) -> list[str]:
    """The leaf submodules ([`_is_leaf`]) of `module`, named from `prefix`, outermost first."""
    if _is_leaf(module, prefix):
        return [prefix]
    names = []
    for child_name, child in module.named_children():
        names += _leaves(child, f"{prefix}.{child_name}")
    return names


def head_module_names(model: nn.Module) -> list[str]:
    """
    The head modules of `model` that a PEFT student must train in full, as names for PEFT's `modules_to_save`.

    Heads are the modules a model lists in its `_hf_kd_heads` class attribute (hf_kd models: the exit heads
    `exits`) and the standard transformers classification heads `classifier` and `score`, when `model` has them as
    direct children. Each head is expanded leaf by leaf into the submodules that own parameters or buffers, e.g.
    `exits.0.classifier`, `exits.0.dense`, `exits.1.classifier`: PEFT rejects a `ModuleList` in `modules_to_save`,
    and it matches names by suffix, so a whole `exits.0` would also catch PEFT's own `classifier` entry of
    `task_type="SEQ_CLS"` one level down and wrap the same head twice. For the same reason a module named
    `classifier` or `score` is kept whole (RoBERTa's `classifier` has a `dense` and an `out_proj`).

    Args:
        model (`nn.Module`):
            The student, not wrapped by PEFT.

    Returns:
        `list[str]`: dotted module names relative to `model`, in model order, without duplicates.
    """
    declared = list(getattr(model, HEADS_ATTRIBUTE, ()))
    declared += [name for name in CLASSIFIER_HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)]
    names: list[str] = []
    for head in declared:
        for name in _leaves(model.get_submodule(head), head):
            if name not in names:
                names.append(name)
    return names


def frozen_head_names(peft_model: nn.Module) -> list[str]:
    """The heads ([`head_module_names`]) of a `PeftModel`'s base model that have no trainable parameter."""
    base = peft_model.get_base_model()
    return [name for name in head_module_names(base) if not any(p.requires_grad for p in base.get_submodule(name).parameters())]


def default_lora_target_modules(model: nn.Module) -> list[str] | None:
    """LoRA target modules for a model PEFT cannot infer them for: a multi-exit model (`config.backbone_config`) gets
    those of its backbone's architecture (e.g. `["query", "value"]` for BERT). `None` when unknown."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    config = getattr(model, "config", None)
    for candidate in (config, getattr(config, "backbone_config", None)):
        targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(getattr(candidate, "model_type", None))
        if targets is not None:
            return list(targets)
    return None


def prepare_peft_model(model: nn.Module, peft_config: PeftConfig | None, seed: int | None = None) -> nn.Module:
    """
    Wrap the student with `peft_config` the way hf_kd students need, or check an already wrapped `PeftModel`.

    With a `peft_config`: every head of [`head_module_names`] is added to `modules_to_save` (on a copy: the caller's
    config is not changed); a LoRA config without `target_modules` gets the backbone's defaults
    ([`default_lora_target_modules`]); under DeepSpeed ZeRO-3 the adapter is built with `autocast_adapter_dtype=False`
    (TRL #6089: fp32 LoRA weights next to bf16 base weights break ZeRO-3's all-gather); the adapter is initialised
    after `torch.manual_seed(seed)`, so that every process and every run starts from the same adapter.

    Without a `peft_config`, a `PeftModel` is returned as is, with a warning naming the heads it leaves frozen; any
    other model is returned unchanged.

    Args:
        model (`nn.Module`):
            The student: a transformers model, or a `PeftModel` when `peft_config` is `None`.
        peft_config (`peft.PeftConfig`, *optional*):
            The adapter configuration, e.g. `LoraConfig(r=8, lora_alpha=16)`.
        seed (`int`, *optional*):
            Seed of the adapter's initialisation (the trainer passes `args.seed`).

    Returns:
        `nn.Module`: the `PeftModel` (or `model` itself without `peft_config`).

    Raises:
        `ImportError` when `peft_config` is given and peft is not installed; `ValueError` for a `PeftModel` together
        with a `peft_config` (TRL #4713: the second adapter could not be reloaded); `TypeError` for a `peft_config`
        that is not a `peft.PeftConfig`.
    """
    if peft_config is None:
        if is_peft_model(model):
            frozen = frozen_head_names(model)
            if frozen:
                warnings.warn(
                    f"The PeftModel student keeps its heads {frozen} frozen: they will not train and are not saved "
                    f"in the adapter. Build it with modules_to_save={frozen} (hf_kd does this itself when given the "
                    "base model and a peft_config).",
                    stacklevel=3,
                )
        return model
    require_peft("A peft_config")
    from peft import PeftConfig, get_peft_model

    if is_peft_model(model):
        raise ValueError(
            f"The student is already a {type(model).__name__} and a peft_config was given too: pass either the base "
            "model with a peft_config (hf_kd wraps it), or the PeftModel without a peft_config. Wrapping twice "
            "would stack a second adapter that cannot be reloaded (TRL #4713)."
        )
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a peft.PeftConfig (e.g. peft.LoraConfig), got {type(peft_config).__name__}")

    peft_config = copy.deepcopy(peft_config)
    heads = head_module_names(model)
    if hasattr(peft_config, "modules_to_save"):
        listed = list(peft_config.modules_to_save or [])
        if getattr(peft_config, "task_type", None) == "SEQ_CLS":
            listed += list(CLASSIFIER_HEAD_NAMES)  # PEFT adds these itself for SEQ_CLS: not twice
        added = [name for name in heads if name not in listed]
        peft_config.modules_to_save = list(peft_config.modules_to_save or []) + added or None
    elif heads:
        warnings.warn(
            f"{type(peft_config).__name__} has no modules_to_save: the heads {heads} stay frozen at their initial "
            "weights. Use an adapter type that supports modules_to_save (e.g. LoraConfig).",
            stacklevel=3,
        )
    if getattr(peft_config, "peft_type", None) == "LORA" and peft_config.target_modules is None:
        peft_config.target_modules = default_lora_target_modules(model)

    if not getattr(getattr(model, "config", None), "_name_or_path", None):
        warnings.warn(
            f"The {type(model).__name__} student has no name_or_path (it was built, not loaded), so the saved adapter "
            "will not name its base model and AutoPeftModel cannot reload it: save the model (save_pretrained) and "
            "load it back before training, or reload the adapter with PeftModel.from_pretrained(base, folder).",
            stacklevel=3,
        )
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if seed is not None:
        torch.manual_seed(seed)
    peft_model = get_peft_model(model, peft_config, autocast_adapter_dtype=not is_deepspeed_zero3_enabled())
    frozen = frozen_head_names(peft_model)
    if frozen:  # e.g. a head PEFT's name matching could not find
        warnings.warn(f"The PEFT student keeps its heads {frozen} frozen despite modules_to_save.", stacklevel=3)
    return peft_model


def frozen_tensors(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that determine the outputs of a PEFT student with its adapters disabled: its frozen parameters
    (the base weights, including the original copies of `modules_to_save` heads) and its buffers."""
    tensors = {name: p for name, p in peft_model.named_parameters() if not p.requires_grad}
    tensors.update(dict(peft_model.named_buffers()))
    return tensors


def point_adapter_at_hub_base(folder: str | os.PathLike) -> None:
    """
    Make a saved adapter name its base model by Hub id: PEFT writes `base_model_name_or_path` as the base's
    `name_or_path`, a local folder when the base was loaded from one (e.g. a Hugging Face cache snapshot), which means
    nothing on the Hub. A folder that maps back to a Hub id ([`hf_kd.hub.resolve_hub_id`]) is replaced by that id; any
    other path is kept, so that the adapter still reloads locally. A folder without `adapter_config.json` is left
    alone.
    """
    from .hub import resolve_hub_id

    path = Path(folder) / "adapter_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    base = config.get("base_model_name_or_path")
    hub_id = resolve_hub_id(base) if base else None
    if hub_id is not None and hub_id != base:
        config["base_model_name_or_path"] = hub_id
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


class BaseModelTeacher:
    """
    The base model of a PEFT student used as its frozen teacher: the student's own forward with every adapter (and
    every `modules_to_save` copy) disabled, in eval mode and without gradients. No second copy of the weights exists,
    so it costs no memory, is sharded exactly as the student is (DDP replica, ZeRO-3 shards) and needs no loading.

    Args:
        peft_model (`peft.PeftModel`):
            The student, unwrapped from DDP / DeepSpeed (hooks of ZeRO-3 sit on its submodules and still gather the
            weights it reads).
    """

    def __init__(self, peft_model: nn.Module):
        self.peft_model = peft_model

    @property
    def module(self) -> nn.Module:
        """The model whose `forward` signature tells which inputs the teacher takes."""
        return self.peft_model.get_base_model()

    @property
    def config(self):
        return self.peft_model.get_base_model().config

    @torch.no_grad()
    def __call__(self, **inputs: Any):
        was_training = self.peft_model.training
        self.peft_model.eval()  # no dropout in the teacher
        try:
            with self.peft_model.disable_adapter():
                return self.peft_model(**inputs)
        finally:
            self.peft_model.train(was_training)


def untrained_head_reason(model: nn.Module) -> str | None:
    """
    Why the classification head of `model` (a PEFT student's base model is read through its `modules_to_save`
    wrapper's `original_module`, what the adapters-disabled forward uses) was never trained, or `None`.

    Two signs, either enough: (1) a bias that is exactly zero everywhere, as transformers initialises a new head
    (`_init_weights` zeroes Linear biases; one optimizer step on a trained head moves it, so a trained head never has
    an all-zero bias); (2) for a head without bias, a weight that transformers did not load from the checkpoint while
    other weights were (transformers 5 marks every loaded tensor with `_is_hf_initialized`). A head that cannot be
    found (`classifier`, `classifier.out_proj`, `score`), or whose weights are partitioned by ZeRO-3, gives `None`.

    Returns:
        `str` or `None`: a sentence naming the head, or `None` when nothing says it is untrained.
    """
    model = getattr(model, "get_base_model", lambda: model)()
    head, name = None, None
    for path in ("classifier.out_proj", "classifier", "score"):
        module = model
        for part in path.split("."):
            module = getattr(module, "original_module", module)  # peft's ModulesToSaveWrapper
            module = getattr(module, part, None)
            if module is None:
                break
        module = getattr(module, "original_module", module)
        if isinstance(module, nn.Linear):
            head, name = module, path
            break
    if head is None or hasattr(head.weight, "ds_id"):
        return None
    if head.bias is not None and not head.bias.detach().any():
        return f"its head `{name}` has an all-zero bias, as transformers initialises a new head"
    loaded = any(getattr(p, "_is_hf_initialized", False) for p in model.parameters())
    if head.bias is None and loaded and not getattr(head.weight, "_is_hf_initialized", False):
        return f"its head `{name}` was not in the checkpoint it was loaded from (newly initialised)"
    return None


def warn_if_base_head_untrained(peft_model: nn.Module) -> None:
    """Warn when `teacher_from_base_model=True` would make a random teacher: the base model's classification head was
    never trained ([`untrained_head_reason`]), e.g. a student loaded from a base encoder with `num_labels=2`. Its
    logits are noise (kd_loss near 0 from the start): distil from a fine-tuned model instead."""
    reason = untrained_head_reason(peft_model)
    if reason is not None:
        warnings.warn(
            f"teacher_from_base_model=True uses the PEFT student's base model as the teacher, but {reason}: the "
            "teacher is random and the student would distil noise. Start the student from a fine-tuned classifier "
            "(one whose head was trained on these labels), or pass a fine-tuned teacher_model instead.",
            UserWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------------------------------------------------
# Command-line arguments of the recipes
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class LoraArguments:
    """
    LoRA flags for scripts parsed with [`~transformers.HfArgumentParser`] (the recipes in `trainers/`), as TRL's
    `ModelConfig` has them. [`get_peft_config`] turns them into a `peft.LoraConfig` (LoRA: Hu et al., 2021,
    https://huggingface.co/papers/2106.09685).

    Args:
        use_peft (`bool`, *optional*, defaults to `False`):
            Train a LoRA adapter on the student's backbone instead of every weight; hf_kd's heads are trained in
            full and saved with the adapter.
        lora_r (`int`, *optional*, defaults to `8`):
            Rank of the LoRA update.
        lora_alpha (`int`, *optional*, defaults to `16`):
            Scale of the LoRA update (`lora_alpha / lora_r`).
        lora_dropout (`float`, *optional*, defaults to `0.0`):
            Dropout on the LoRA input.
        lora_target_modules (`list[str]`, *optional*):
            Module names to adapt; defaults to the backbone architecture's (`query`, `value` for BERT).
    """

    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter (and the heads) instead of all weights."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (the update is scaled by lora_alpha / lora_r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules to adapt (default: the backbone architecture's, e.g. query value)."}
    )


def get_peft_config(args: LoraArguments) -> PeftConfig | None:
    """A `peft.LoraConfig(task_type="SEQ_CLS")` from [`LoraArguments`], or `None` when `args.use_peft` is off."""
    if not args.use_peft:
        return None
    require_peft("--use_peft")
    from peft import LoraConfig

    return LoraConfig(
        task_type="SEQ_CLS",
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_modules,
    )


__all__ = [
    "BaseModelTeacher",
    "LoraArguments",
    "default_lora_target_modules",
    "frozen_head_names",
    "get_peft_config",
    "head_module_names",
    "is_peft_model",
    "point_adapter_at_hub_base",
    "prepare_peft_model",
]
