"""The frozen teacher under DeepSpeed, and what every multi-process hf_kd run shares.

Under DeepSpeed the teacher is initialised for inference by DeepSpeed itself (`deepspeed.initialize` without an
optimizer), from a config derived from the student's ([`deepspeed_teacher_config`]). By default it is **sharded
with ZeRO-3 whatever the student's stage**: ZeRO-1/2 only partition optimizer states and gradients, which a frozen
teacher does not have, so ZeRO-3 is the only stage that saves memory on it. TRL replicates the teacher unless the
student is ZeRO-3, DistillKit always replicates it (PEERS.md sections 2-3). A teacher given by name is loaded straight
into its shards (`zero.Init`), and a ZeRO-3 model is never deep-copied (a copy would clone empty shards).

[`teacher_placement`] reports where the teacher's weights live (the proof that it is sharded), and
[`end_distributed`] ends a multi-process script cleanly.
"""

from __future__ import annotations

import contextlib
import copy
import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .import_utils import is_deepspeed_available

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import TrainingArguments

TEACHER_ZERO_STAGES = (0, 3)
# ZeRO-3 settings a teacher takes over from the student's config; the rest (optimizer offload, gradient buckets)
# concerns training only.
_ZERO3_INFERENCE_KEYS = (
    "offload_param",
    "overlap_comm",
    "stage3_max_live_parameters",
    "stage3_max_reuse_distance",
    "stage3_param_persistence_threshold",
    "stage3_prefetch_bucket_size",
    "reduce_bucket_size",
)


def is_zero3_partitioned(model: nn.Module) -> bool:
    """Whether any parameter of `model` is partitioned by DeepSpeed ZeRO-3 (it then has a `ds_id`)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _drop_auto(value: Any) -> Any:
    """`value` without the entries still set to `"auto"` (DeepSpeed rejects them)."""
    if isinstance(value, dict):
        return {k: _drop_auto(v) for k, v in value.items() if v != "auto"}
    return value


def deepspeed_teacher_config(
    student_config: dict[str, Any], args: TrainingArguments, stage: int = 3, hidden_size: int | None = None
) -> dict[str, Any]:
    """
    The DeepSpeed config of a frozen teacher, derived from the student's.

    The student's precision (`bf16` / `fp16`), batch sizes and, for ZeRO-3, its inference settings (parameter offload,
    prefetch and persistence thresholds) are kept; the optimizer, the scheduler, gradient clipping and the training
    parts of `zero_optimization` are dropped. Values still `"auto"` are resolved from `args`; ZeRO-3 bucket sizes that
    are `"auto"` are set from the teacher's hidden size `h` as TRL's `prepare_deepspeed` does (prefetch `0.9 h^2`,
    parameters smaller than `10 h` kept whole on every process).

    Args:
        student_config (`dict`):
            The student's DeepSpeed config (`accelerator.state.deepspeed_plugin.deepspeed_config`).
        args ([`~transformers.TrainingArguments`]):
            The run's arguments, for values the config leaves to `"auto"`.
        stage (`int`, *optional*, defaults to `3`):
            ZeRO stage of the teacher: 3 (sharded) or 0 (a full copy on every process).
        hidden_size (`int`, *optional*):
            The teacher's hidden size, for the ZeRO-3 thresholds.

    Returns:
        `dict`: a config for `deepspeed.initialize(model=teacher, config=...)`.
    """
    if stage not in TEACHER_ZERO_STAGES:
        raise ValueError(f"teacher_zero_stage must be one of {TEACHER_ZERO_STAGES}, got {stage}")
    config = copy.deepcopy(student_config)
    for key in ("optimizer", "scheduler", "gradient_clipping", "zero_allow_untested_optimizer"):
        config.pop(key, None)
    for precision, enabled in (("bf16", args.bf16), ("fp16", args.fp16)):
        if isinstance(config.get(precision), dict) and config[precision].get("enabled") == "auto":
            config[precision]["enabled"] = bool(enabled)
    world_size = max(int(getattr(args, "world_size", 1)), 1)
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = args.per_device_train_batch_size
    if config.get("gradient_accumulation_steps", "auto") == "auto":
        config["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    if config.get("train_batch_size", "auto") == "auto":
        config["train_batch_size"] = (
            config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] * world_size
        )
    student_zero = config.get("zero_optimization", {})
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero.update({k: student_zero[k] for k in _ZERO3_INFERENCE_KEYS if k in student_zero})
        if hidden_size is not None:
            defaults = {
                "reduce_bucket_size": hidden_size * hidden_size,
                "stage3_param_persistence_threshold": 10 * hidden_size,
                "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            }
            for key, value in defaults.items():
                if zero.get(key, "auto") == "auto":
                    zero[key] = value
    config["zero_optimization"] = zero
    return _drop_auto(config)


def fill_auto_bucket_sizes(hf_ds_config, model_config) -> None:
    """
    Fill the `"auto"` ZeRO bucket sizes of the student's DeepSpeed config for a model whose config keeps its hidden
    size in `backbone_config` (hf_kd's multi-exit models), which transformers only looks for at the top level (and
    otherwise raises): the same values it would set, `h^2`, `0.9 h^2` and `10 h`.
    """
    if model_config is None or hasattr(model_config, "hidden_size") or hasattr(model_config, "hidden_sizes"):
        return
    hidden_size = _hidden_size(model_config)
    if hidden_size is None:
        return
    hf_ds_config.fill_only("zero_optimization.reduce_bucket_size", hidden_size * hidden_size)
    hf_ds_config.fill_only("zero_optimization.stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))
    hf_ds_config.fill_only("zero_optimization.stage3_param_persistence_threshold", 10 * hidden_size)


@contextlib.contextmanager
def zero3_init(ds_config: dict[str, Any] | None):
    """
    Make transformers' `from_pretrained` build models into ZeRO-3 shards with `ds_config` (`zero.Init`), or build them
    whole when `ds_config` is `None`, whatever the run's own DeepSpeed config; restored on exit.
    """
    import transformers.integrations.deepspeed as hf_deepspeed

    previous = hf_deepspeed._hf_deepspeed_config_weak_ref
    holder = None
    if ds_config is None:
        hf_deepspeed.unset_hf_deepspeed_config()
    else:
        holder = hf_deepspeed.HfDeepSpeedConfig(ds_config)  # registers itself as transformers' global config
    try:
        yield holder
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = previous


def _hidden_size(config) -> int | None:
    for candidate in (config, getattr(config, "backbone_config", None)):
        size = getattr(candidate, "hidden_size", None)
        if isinstance(size, int):
            return size
    return None


def prepare_deepspeed_teacher(
    teacher: str | os.PathLike | nn.Module,
    accelerator: Accelerator,
    args: TrainingArguments,
    stage: int = 3,
    init_kwargs: dict[str, Any] | None = None,
    causal_lm: bool = False,
) -> nn.Module:
    """
    Load the frozen teacher (if given by name; with `AutoModelForCausalLM` when `causal_lm`) and initialise it for
    inference with DeepSpeed.

    With `stage=3` the weights are sharded over the processes: a teacher given by name is built straight into its
    shards (`zero.Init` with the teacher's config), a built teacher is partitioned in place by `deepspeed.initialize`.
    With `stage=0` every process keeps a full copy (a teacher given by name is then built whole even when the student
    is ZeRO-3).

    Args:
        teacher (`str`, `os.PathLike` or `nn.Module`):
            Hub id / local folder, or the built teacher.
        accelerator (`accelerate.Accelerator`):
            The trainer's accelerator; its DeepSpeed plugin holds the student's config.
        args ([`~transformers.TrainingArguments`]):
            The run's arguments.
        stage (`int`, *optional*, defaults to `3`):
            ZeRO stage of the teacher, 3 or 0.
        init_kwargs (`dict`, *optional*):
            `from_pretrained` keyword arguments of a teacher given by name.

    Returns:
        `deepspeed.DeepSpeedEngine`: the teacher's inference engine (its `.module` is the model), in eval mode.

    Raises:
        `ValueError` for a built teacher already partitioned by ZeRO-3 with `stage=0`; `RuntimeError`, naming the
        teacher and the ways out, when DeepSpeed cannot initialise it.
    """
    from .teacher import load_teacher, load_teacher_config

    if not is_deepspeed_available():
        raise ImportError("A DeepSpeed run needs the `deepspeed` package: `pip install hf_kd[deepspeed]`.")
    import deepspeed

    name = teacher if isinstance(teacher, (str, os.PathLike)) else type(teacher).__name__
    if isinstance(teacher, nn.Module):
        if stage == 0 and is_zero3_partitioned(teacher):
            raise ValueError(
                "teacher_zero_stage=0 keeps a full copy of the teacher on every process, but the teacher given is "
                "already partitioned by ZeRO-3 (it was built after ZeRO-3 arguments existed). Pass its Hub id or path "
                "instead, or keep teacher_zero_stage=3."
            )
        teacher_model_config = getattr(teacher, "config", None)
    else:
        hub_kwargs = {k: v for k, v in (init_kwargs or {}).items() if k in ("revision", "cache_dir", "token")}
        teacher_model_config = load_teacher_config(teacher, hub_kwargs)
    config = deepspeed_teacher_config(
        accelerator.state.deepspeed_plugin.deepspeed_config, args, stage, _hidden_size(teacher_model_config)
    )
    if torch.distributed.is_initialized():
        # zero.Init reads the world size from DeepSpeed's own communication layer, which a run whose student was not
        # built by zero.Init may not have started yet: it wraps the existing process group.
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    try:
        if not isinstance(teacher, nn.Module):
            with zero3_init(config if stage == 3 else None):
                teacher = load_teacher(teacher, init_kwargs, causal_lm=causal_lm)
        teacher = load_teacher(teacher)  # frozen, eval mode
        engine, *_ = deepspeed.initialize(model=teacher, config=config)
    except OSError:
        raise  # a teacher that cannot be found or read: transformers' own message says it best
    except Exception as err:
        raise RuntimeError(
            f"DeepSpeed could not initialise the teacher {str(name)!r} for ZeRO-{stage} inference "
            f"({type(err).__name__}: {err}). Set teacher_zero_stage={3 - stage} to "
            + ("shard it instead" if stage == 0 else "keep a full copy on each process")
            + ", or distil from cached logits (cache_teacher_logits=True or a 'teacher_logits' column), which needs "
            "no teacher during training."
        ) from err
    engine.module.eval()  # DeepSpeedEngine.eval() returns None: never chain it
    return engine


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """
    `(held, total)`: the parameter elements this process holds and those of the whole model.

    A ZeRO-3 parameter counts its local shard (`ds_tensor`, padding included), or its full size when DeepSpeed keeps
    it whole on every process (`ds_persist`, parameters below the persistence threshold); any other parameter counts
    in full.
    """
    held = total = 0
    for param in model.parameters():
        if hasattr(param, "ds_numel"):
            total += param.ds_numel
            held += param.ds_numel if getattr(param, "ds_persist", False) else param.ds_tensor.numel()
        else:
            total += param.numel()
            held += param.numel()
    return held, total


def teacher_placement(teacher, accelerator: Accelerator, kind: str) -> dict[str, Any]:
    """
    Where the teacher's weights live, for logs and run summaries. A collective: call it on every process.

    Args:
        teacher (`nn.Module`, *optional*):
            The prepared teacher (a DeepSpeed engine, a model, or `None` when no teacher is loaded).
        accelerator (`accelerate.Accelerator`):
            The trainer's accelerator.
        kind (`str`):
            `"zero3_sharded"`, `"replicated"`, `"student_base_model"` or `"none"`.

    Returns:
        `dict` with `kind`, `num_processes`, `parameters` (the full teacher) and `parameters_per_process` (what each
        process holds; with ZeRO-3 about `parameters / num_processes` each, plus the small parameters kept whole).
    """
    placement: dict[str, Any] = {"kind": kind, "num_processes": accelerator.num_processes}
    if teacher is None or kind == "student_base_model":
        return placement
    module = getattr(teacher, "module", teacher)
    held, total = parameter_counts(module)
    counts = torch.tensor([held], dtype=torch.long, device=accelerator.device)
    placement["parameters"] = total
    placement["parameters_per_process"] = accelerator.gather(counts).tolist()
    return placement


def end_distributed() -> None:
    """
    End a multi-process script cleanly: free what still uses the process group (a trainer's DDP wrapper, DeepSpeed
    engines: `gc.collect()`, they sit in reference cycles), wait for every process, then destroy the process group.
    A no-op in a single process. Without it, ~1 exit in 5 of a 2-process gloo run aborted (ENVIRONMENT.md).
    """
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
