"""Teacher handling shared by every hf_kd trainer that distils from a teacher.

Four jobs, each a small function so `DistillTrainer` and `EarlyExitTrainer` use the same code:

- load a teacher given as a model or as a Hub id / local path ([`load_teacher`]);
- check that teacher and student can be compared: same label space ([`check_label_spaces`]) and the same
  vocabulary, or an explicit id mapping between the two ([`check_vocabularies`], [`build_token_id_map`]);
- run the frozen teacher on a student batch ([`teacher_logits_for_batch`]);
- cache the teacher's logits for a whole dataset, keyed by teacher weights and data, so that later epochs and later
  runs never load the teacher ([`TeacherLogitsCache`]). Users of every peer ask for this first (PEERS.md: TRL #1975,
  #2255, DistillKit #18).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    import datasets
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

TEACHER_LOGITS_COLUMN = "teacher_logits"
# The inputs a sequence-classification teacher consumes; everything else in a batch (labels, cached logits, ...) is
# dropped before the teacher runs.
TEACHER_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")
# The column that points each row of a causal-LM dataset at its rows of the cached top-k teacher logits.
TEACHER_CACHE_INDEX_COLUMN = "teacher_cache_index"


def load_teacher(
    teacher: str | os.PathLike | nn.Module,
    init_kwargs: dict[str, Any] | None = None,
    causal_lm: bool = False,
) -> nn.Module:
    """Return the teacher as a frozen module in eval mode.

    Args:
        teacher (`str`, `os.PathLike` or `nn.Module`):
            A Hub id or local folder loaded with `AutoModelForSequenceClassification.from_pretrained(teacher,
            **init_kwargs)` (a Hub id placed by `python -m hf_kd.offline_models` loads from its snapshot, without
            network: [`hf_kd.offline_models.placed_model_kwargs`]), or an already built model (used as is).
        init_kwargs (`dict`, *optional*):
            Keyword arguments for `from_pretrained`. Passing them together with a built model is an error, because
            they would be silently ignored.
        causal_lm (`bool`, *optional*, defaults to `False`):
            Load a Hub id or folder with `AutoModelForCausalLM` instead (the teacher of a causal-LM student).

    Returns:
        `nn.Module`: the teacher, in `eval()` mode with `requires_grad=False` on every parameter.
    """
    if isinstance(teacher, nn.Module):
        if init_kwargs:
            raise ValueError(
                f"teacher_model_init_kwargs={init_kwargs!r} were given together with an already built teacher "
                f"({type(teacher).__name__}); they only apply when the teacher is a Hub id or path. Pass one or the other."
            )
        model = teacher
    elif isinstance(teacher, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        from .offline_models import placed_model_kwargs  # not at the top: see _locate_package_file in hf_kd.data

        auto_class = AutoModelForCausalLM if causal_lm else AutoModelForSequenceClassification
        with _named_teacher_source(teacher):
            model = auto_class.from_pretrained(
                str(teacher), **placed_model_kwargs(str(teacher), init_kwargs, model=True)
            )
    else:
        raise TypeError(
            f"teacher must be a Hub id, a local path or a torch.nn.Module, got {type(teacher).__name__}: {teacher!r}"
        )
    model.eval()
    model.requires_grad_(False)
    return model


def load_teacher_config(teacher: str | os.PathLike, hub_kwargs: dict[str, Any] | None = None) -> PretrainedConfig:
    """The config of a teacher given by Hub id or folder (its weights are not loaded), for the compatibility checks.

    A Hub id placed by `python -m hf_kd.offline_models` is read from its snapshot without network
    ([`hf_kd.offline_models.placed_model_kwargs`]).
    """
    from transformers import AutoConfig

    from .offline_models import placed_model_kwargs

    with _named_teacher_source(teacher):
        return AutoConfig.from_pretrained(str(teacher), **placed_model_kwargs(str(teacher), hub_kwargs))


@contextlib.contextmanager
def _named_teacher_source(teacher: str | os.PathLike):
    """Turn transformers' error for a teacher that is neither a folder nor a reachable Hub id ("couldn't connect to
    huggingface.co", "not a valid model identifier", a malformed repo id) into one that names the path given."""
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError

    try:
        yield
    except (OSError, HFValidationError) as error:
        if Path(teacher).is_dir():
            raise  # a folder that exists: transformers' own error (a missing config.json, ...) says what is wrong

        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else " (offline?)"
        raise FileNotFoundError(
            f"Teacher {str(teacher)!r} is neither a local folder nor a Hub id reachable now{offline}. Check the path. "
            "The README's teacher is made by `make demo`, which writes outputs/main_job/teacher; "
            "`python trainers/distill.py --method erm --model_name_or_path sentence-transformers/all-MiniLM-L6-v2 "
            f"--output_dir DIR` trains one. ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        ) from error


def load_teacher_tokenizer(teacher: str, hub_kwargs: dict[str, Any] | None = None) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved with a teacher Hub id or folder, or `None` when none was saved.

    transformers 5 builds an empty-vocabulary tokenizer from a bare model folder instead of failing, which would make
    every vocabulary comparison fail: the folder is checked for a tokenizer config first.
    """
    from transformers import AutoTokenizer
    from transformers.utils import cached_file

    from .offline_models import placed_model_kwargs

    hub_kwargs = placed_model_kwargs(teacher, hub_kwargs)
    if cached_file(teacher, "tokenizer_config.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs) is None:
        return None
    return AutoTokenizer.from_pretrained(teacher, **hub_kwargs)


def _is_default_label2id(config: PretrainedConfig) -> bool:
    return dict(config.label2id) == {f"LABEL_{i}": i for i in range(config.num_labels)}


def check_label_spaces(student_config: PretrainedConfig, teacher_config: PretrainedConfig) -> None:
    """Raise a `ValueError` when student and teacher predict different label spaces.

    The number of labels must match. Label names must match too when both models name their labels (a model fresh
    from a base checkpoint has the default `LABEL_i` names and is accepted against any naming).
    """
    if student_config.num_labels != teacher_config.num_labels:
        raise ValueError(
            f"The student predicts {student_config.num_labels} labels but the teacher predicts "
            f"{teacher_config.num_labels}: distillation needs the same label space. Load the student with "
            f"num_labels={teacher_config.num_labels} (and the teacher's id2label)."
        )
    if _is_default_label2id(student_config) or _is_default_label2id(teacher_config):
        return
    student, teacher = dict(student_config.label2id), dict(teacher_config.label2id)
    if student != teacher:
        raise ValueError(
            f"{_label_mapping_difference(student, 'student', teacher, 'teacher')}: student label2id={student}, "
            f"teacher label2id={teacher}. Load the student with the teacher's id2label/label2id."
        )


def _label_mapping_difference(first: dict, first_name: str, second: dict, second_name: str) -> str:
    """What differs between two `label2id` mappings, as a sentence starting with `first_name` (capitalised): the
    order of the same names, or the names (case-insensitive, as `align_labels_with_mapping` compares them)."""
    subject = f"{first_name[0].upper()}{first_name[1:]} and {second_name}"
    first_names, second_names = {n.lower(): n for n in first}, {n.lower(): n for n in second}
    if set(first_names) == set(second_names):
        return f"{subject} order their labels differently"
    only_first = sorted(first_names[n] for n in set(first_names) - set(second_names))
    only_second = sorted(second_names[n] for n in set(second_names) - set(first_names))
    return f"{subject} name their labels differently ({first_name} only: {only_first}, {second_name} only: {only_second})"


# The columns Trainer feeds to the loss as gold labels (`label` is renamed `labels` by the default collators).
_LABEL_COLUMNS = ("labels", "label")


def dataset_label2id(dataset, label_column: str | None = None) -> dict[str, int] | None:
    """The `label2id` a dataset's labels follow: `{name: index}` from the [`~datasets.ClassLabel`] feature of its
    `labels` / `label` column (or `label_column`), `None` when the labels carry no names (not a `datasets.Dataset`,
    plain integers, or a `ClassLabel` built from `num_classes` alone, whose names are `"0"`, `"1"`, ...)."""
    import datasets

    features = getattr(dataset, "features", None)
    if not isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)) or not features:
        return None
    column = label_column or next((c for c in _LABEL_COLUMNS if c in features), None)
    feature = features.get(column) if column else None
    if not isinstance(feature, datasets.ClassLabel) or feature.names == [str(i) for i in range(feature.num_classes)]:
        return None
    return {name: index for index, name in enumerate(feature.names)}


def check_label_names(dataset, split: str, configs: dict[str, PretrainedConfig | None]) -> None:
    """Raise a `ValueError` when a dataset's label names disagree with a model's `label2id`.

    A dataset whose `ClassLabel` names the labels in another order than the teacher (e.g. a CSV of `fresh` /
    `rotten` encoded with `class_encode_column`, which sorts the names, against a teacher with `fresh = 1`) trains
    the student against swapped teacher labels without any error: the teacher then scores 0 accuracy. Names are
    compared case-insensitively (as `datasets.Dataset.align_labels_with_mapping` does). Models with the default
    `LABEL_i` names, and datasets whose labels carry no names ([`dataset_label2id`]), are not checked.

    Args:
        dataset (`datasets.Dataset`, or anything else, which is not checked):
            The data.
        split (`str`):
            Its name in messages, e.g. `"train_dataset"`.
        configs (`dict[str, PretrainedConfig or None]`):
            The models to check against, by role, e.g. `{"student": ..., "teacher": ...}`; `None` values are skipped.
    """
    names = dataset_label2id(dataset)
    if names is None:
        return
    lowered = {name.lower(): index for name, index in names.items()}
    for role, config in configs.items():
        if config is None or _is_default_label2id(config):
            continue
        model = {str(name): int(index) for name, index in dict(config.label2id).items()}
        if {name.lower(): index for name, index in model.items()} == lowered:
            continue
        difference = _label_mapping_difference(names, f"the {split}", model, f"the {role}")
        if {name.lower() for name in model} == set(lowered):
            fix = (
                f"Remap the dataset's label ids to the {role}'s (one line, before building the trainer): "
                f"`{split} = hf_kd.data.align_labels({split}, {role}.config.label2id)`."
            )
        else:
            fix = (
                f"Rename the dataset's labels to the {role}'s names (e.g. `dataset.cast_column('label', "
                f"ClassLabel(names=[...]))`) if they are the same classes, then remap them with "
                f"`hf_kd.data.align_labels(dataset, {role}.config.label2id)`; or use a {role} trained on these labels."
            )
        raise ValueError(
            f"{difference}: {split} label2id={names}, {role} label2id={model}. Training or evaluating on it would "
            f"score the {role}'s predictions against the wrong labels. {fix}"
        )


def check_datasets_label_names(train_dataset, eval_dataset, configs: dict[str, PretrainedConfig | None]) -> None:
    """[`check_label_names`] on a trainer's `train_dataset` and `eval_dataset` (one dataset or a dict of them)."""
    check_label_names(train_dataset, "train_dataset", configs)
    evals = eval_dataset.items() if isinstance(eval_dataset, dict) else [(None, eval_dataset)]
    for name, dataset in evals:
        check_label_names(dataset, "eval_dataset" if name is None else f"eval_dataset[{name!r}]", configs)


def build_token_id_map(
    student_tokenizer: PreTrainedTokenizerBase, teacher_tokenizer: PreTrainedTokenizerBase
) -> torch.LongTensor:
    """Map every student token id to the teacher id of the same token.

    Ordinary tokens are matched by their string; special tokens by their role (`cls`/`bos`, `sep`/`eos`, `pad`,
    `unk`, `mask`), because vocabularies name them differently (`[CLS]` vs `<s>`). This is exact when the teacher
    vocabulary is a re-indexed copy of the student's, as for an MPNet teacher and a BERT/MiniLM student: MPNet's vocab
    is bert-base-uncased's shifted by 4, and its WordPiece segmentation is the same (ENVIRONMENT.md).

    Returns:
        `torch.LongTensor` of shape `(len(student_tokenizer),)`: `map[student_id] = teacher_id`.

    Raises:
        `ValueError` naming (up to 10 of) the student tokens missing from the teacher vocabulary.
    """
    student_vocab = student_tokenizer.get_vocab()
    teacher_vocab = teacher_tokenizer.get_vocab()

    def special(tokenizer, *roles):
        for role in roles:
            token_id = getattr(tokenizer, f"{role}_token_id", None)
            if token_id is not None:
                return token_id
        return None

    role_map = {}
    for student_roles, teacher_roles in [
        (("cls", "bos"), ("cls", "bos")),
        (("sep", "eos"), ("sep", "eos")),
        (("pad",), ("pad",)),
        (("unk",), ("unk",)),
        (("mask",), ("mask",)),
    ]:
        s_id, t_id = special(student_tokenizer, *student_roles), special(teacher_tokenizer, *teacher_roles)
        if s_id is not None and t_id is not None:
            role_map[s_id] = t_id

    id_map = torch.full((max(student_vocab.values()) + 1,), -1, dtype=torch.long)
    missing = []
    for token, s_id in student_vocab.items():
        if s_id in role_map:
            id_map[s_id] = role_map[s_id]
        elif token in teacher_vocab:
            id_map[s_id] = teacher_vocab[token]
        else:
            missing.append(token)
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(student_vocab)} student tokens are not in the teacher vocabulary "
            f"(for example {missing[:10]}), so student token ids cannot be mapped to teacher ids. Use a teacher with "
            "the student's tokenizer, or distil from cached teacher logits computed with the teacher's own tokenizer "
            "(a `teacher_logits` column)."
        )
    return id_map


def check_vocabularies(
    student_config: PretrainedConfig,
    teacher_config: PretrainedConfig,
    student_tokenizer: PreTrainedTokenizerBase | None,
    teacher_tokenizer: PreTrainedTokenizerBase | None,
    map_token_ids: bool,
) -> torch.LongTensor | None:
    """Check that the teacher reads student token ids correctly; return an id map when one is asked for.

    Equal vocabularies pass (compared token by token when both tokenizers are known, by `vocab_size` otherwise). A
    different vocabulary is an error unless `map_token_ids=True`, which builds the map with [`build_token_id_map`].
    Feeding student ids to a teacher with another vocabulary would silently produce garbage (PEERS.md: TRL #4562,
    DistillKit #7).

    Image models (neither config has a `vocab_size`) have no vocabulary to compare.

    Returns:
        `None` when no mapping is needed, else the `(student_vocab,)` id map.
    """
    has_vocab = [hasattr(config, "vocab_size") for config in (student_config, teacher_config)]
    if not any(has_vocab) and not map_token_ids:
        return None
    if not all(has_vocab):
        raise ValueError(
            f"Only the {'student' if has_vocab[0] else 'teacher'} has a vocabulary (vocab_size): a text model and an "
            "image model cannot read the same inputs."
        )
    same_vocab = student_config.vocab_size == teacher_config.vocab_size
    if same_vocab and student_tokenizer is not None and teacher_tokenizer is not None:
        same_vocab = student_tokenizer.get_vocab() == teacher_tokenizer.get_vocab()
    if same_vocab and not map_token_ids:
        return None
    if not map_token_ids:
        raise ValueError(
            f"Student and teacher vocabularies differ (student vocab_size={student_config.vocab_size}, teacher "
            f"vocab_size={teacher_config.vocab_size}): the teacher would read student token ids as other tokens. "
            "If the teacher vocabulary holds the same tokens under other ids (e.g. MPNet teacher, BERT/MiniLM "
            "student), set `map_teacher_token_ids=True`; otherwise cache teacher logits computed with the "
            "teacher's own tokenizer in a `teacher_logits` column."
        )
    if student_tokenizer is None or teacher_tokenizer is None:
        raise ValueError(
            "map_teacher_token_ids=True needs both tokenizers: pass the student tokenizer as `processing_class` and, "
            "when the teacher is a built model, its tokenizer as `teacher_processing_class`."
        )
    return build_token_id_map(student_tokenizer, teacher_tokenizer)


def check_lm_vocabularies(
    student_config: PretrainedConfig,
    teacher_config: PretrainedConfig,
    student_tokenizer: PreTrainedTokenizerBase | None,
    teacher_tokenizer: PreTrainedTokenizerBase | None,
) -> None:
    """Check that a causal-LM teacher predicts over the student's vocabulary, before any weight is loaded.

    Token-level distillation compares the two next-token distributions entry by entry, so both models need the same
    output vocabulary: the same `vocab_size` and, when both tokenizers are known, the same token-to-id mapping. There
    is no id map for LMs (the teacher's *outputs* would need one too).

    Raises:
        `ValueError`: naming both vocabulary sizes and both tokenizers.
    """
    def name(tokenizer) -> str:
        return repr(getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__) if tokenizer else "unknown"

    sizes = [getattr(config, "vocab_size", None) for config in (student_config, teacher_config)]
    lengths = [len(tokenizer) if tokenizer is not None else None for tokenizer in (student_tokenizer, teacher_tokenizer)]
    same = sizes[0] == sizes[1]
    if same and None not in lengths:
        same = student_tokenizer.get_vocab() == teacher_tokenizer.get_vocab()
    if not same:
        raise ValueError(
            f"Student and teacher vocabularies differ: student vocab_size={sizes[0]} (tokenizer {name(student_tokenizer)}"
            f", {lengths[0]} tokens), teacher vocab_size={sizes[1]} (tokenizer {name(teacher_tokenizer)}, "
            f"{lengths[1]} tokens). Token-level distillation of causal LMs needs one vocabulary on both sides: "
            "distil between models of one family (same tokenizer), or distil across tokenizers on aligned text "
            "spans with DistillConfig(cross_tokenizer=\"uld\" | \"hybrid\") (hf_kd.cross_tokenizer)."
        )


def teacher_inputs(
    inputs: dict[str, Any], teacher: nn.Module, token_id_map: torch.LongTensor | None = None
) -> dict[str, torch.Tensor]:
    """Select (and re-index) the part of a student batch the teacher consumes.

    Keeps `input_ids`, `attention_mask`, `token_type_ids` and `pixel_values` when the teacher's `forward` accepts them
    (MPNet has no token types), and maps `input_ids` through `token_id_map` when given.
    """
    accepted = _forward_parameters(teacher)
    batch = {k: inputs[k] for k in TEACHER_INPUT_NAMES if k in inputs and k in accepted}
    if token_id_map is not None:
        token_id_map = token_id_map.to(batch["input_ids"].device)
        batch["input_ids"] = token_id_map[batch["input_ids"]]
    return batch


def _forward_parameters(model: nn.Module) -> set[str]:
    import inspect

    model = getattr(model, "module", model)  # DDP / DeepSpeed wrappers
    return set(inspect.signature(model.forward).parameters)


@torch.no_grad()
def teacher_logits_for_batch(
    teacher: nn.Module, inputs: dict[str, Any], token_id_map: torch.LongTensor | None = None
) -> torch.Tensor:
    """Logits of the frozen teacher for one student batch, shape `(batch, num_labels)`, without gradients."""
    return teacher(**teacher_inputs(inputs, teacher, token_id_map)).logits


# --------------------------------------------------------------------------------------------------------------------
# Teacher logits cache
# --------------------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """`$HF_HOME/hf_kd/teacher_logits` (HF_HOME defaults to `~/.cache/huggingface`)."""
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "hf_kd" / "teacher_logits"


def _sha256_file(path: Path, hasher) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            hasher.update(chunk)


def teacher_fingerprint(teacher: str | os.PathLike | nn.Module, init_kwargs: dict[str, Any] | None = None) -> str:
    """A hash of what determines the teacher's logits: its config and its weights.

    For a built model, the config (but not `_name_or_path`) and every parameter and buffer are hashed (about 0.1 s
    for 22M parameters). For a Hub id or path, the config and weight files are resolved (downloaded if needed, but
    never instantiated) and their bytes hashed, so changing the weights under the same name invalidates the cache.
    """
    hasher = hashlib.sha256()
    if isinstance(teacher, nn.Module):
        model = getattr(teacher, "module", teacher)
        # keep_vars: the parameters themselves, so that ZeRO-3 shards can be gathered (their .data is empty).
        return tensors_fingerprint(model, sorted(model.state_dict(keep_vars=True).items()))

    for path in _teacher_files(str(teacher), init_kwargs or {}):
        hasher.update(path.name.encode())
        _sha256_file(path, hasher)
    hasher.update(json.dumps(init_kwargs or {}, sort_keys=True, default=str).encode())
    return hasher.hexdigest()


def tensors_fingerprint(model: nn.Module, named_tensors) -> str:
    """A hash of `model`'s class and config and of `named_tensors` (`(name, tensor)` pairs, in the order given).

    A parameter partitioned by DeepSpeed ZeRO-3 is gathered, one at a time, while it is hashed: a collective, so every
    process must hash the same tensors.
    """
    hasher = hashlib.sha256()
    config = getattr(model, "config", None)
    hasher.update(type(model).__name__.encode())
    if config is not None:
        # Where the weights were loaded from is not what they compute: the same teacher loaded through two paths
        # (relative and absolute) must share its caches.
        settings = {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}
        hasher.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in named_tensors:
        hasher.update(name.encode())
        with _gathered(tensor):
            # reshape(-1): 0-d buffers (BatchNorm's num_batches_tracked) cannot be viewed as bytes.
            hasher.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def _gathered(tensor: torch.Tensor):
    """Context in which a ZeRO-3 partitioned parameter holds its full value (a no-op for any other tensor)."""
    if hasattr(tensor, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([tensor])
    return contextlib.nullcontext()


def _teacher_files(teacher: str, init_kwargs: dict[str, Any]) -> list[Path]:
    """config.json and the weight files of a Hub id or local folder, without loading the model."""
    from transformers.utils import cached_file

    hub_kwargs = {k: init_kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in init_kwargs}
    files = [Path(cached_file(teacher, "config.json", **hub_kwargs))]
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        path = cached_file(teacher, name, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        if path is None:
            continue
        files.append(Path(path))
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(Path(path).read_text())["weight_map"].values()))
            files += [Path(cached_file(teacher, shard, **hub_kwargs)) for shard in shards]
        break
    if len(files) == 1:
        raise FileNotFoundError(f"No weight file (model.safetensors or pytorch_model.bin) found for teacher {teacher!r}")
    return files


def _is_fixed_shape_numeric(feature) -> bool:
    """Columns whose batches come out of Arrow as one numeric numpy array (images, class labels, numbers)."""
    from datasets import Array2D, Array3D, Array4D, Array5D, ClassLabel, Value

    if isinstance(feature, (Array2D, Array3D, Array4D, Array5D, ClassLabel)):
        return True
    return isinstance(feature, Value) and feature.dtype.startswith(("int", "uint", "float", "bool"))


def dataset_fingerprint(dataset: datasets.Dataset, columns: list[str]) -> str:
    """A hash of the teacher input columns of `dataset`, row by row in the current order.

    Fixed-shape numeric columns (`pixel_values`, labels) are hashed as the bytes of their numpy batches (60,000
    Fashion-MNIST images: under a second, against about a minute through JSON); the others (ragged token ids) as the
    JSON of their batches.
    """
    hasher = hashlib.sha256()
    hasher.update(json.dumps(columns).encode())
    rows = dataset.select_columns(columns)
    arrays = [c for c in columns if _is_fixed_shape_numeric(rows.features[c])]
    others = [c for c in columns if c not in arrays]
    json_batches = rows.select_columns(others).with_format(None).iter(batch_size=2048) if others else None
    array_batches = rows.select_columns(arrays).with_format("numpy").iter(batch_size=2048) if arrays else None
    for _ in range(0, len(rows), 2048):
        if json_batches is not None:
            hasher.update(json.dumps(next(json_batches), sort_keys=True).encode())
        if array_batches is not None:
            batch = next(array_batches)
            for column in arrays:
                values = batch[column]
                hasher.update(f"{column}:{values.dtype}:{values.shape}".encode())
                hasher.update(values.tobytes())
    return hasher.hexdigest()


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the names, dtypes, shapes and bytes of `tensors` (sorted by name): what a cache file's `sha256`
    metadata holds, so that a file whose values were changed after it was written is detected."""
    hasher = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        tensor = tensor.detach().cpu().contiguous()
        hasher.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def save_file_atomically(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """`safetensors.torch.save_file` to a temporary name, then renamed: an interrupted run never leaves a truncated
    file behind. The tensors' [`tensors_checksum`] is added to the metadata as `sha256` ([`load_verified_file`])."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, tmp, metadata={**metadata, "sha256": tensors_checksum(tensors)})
    os.replace(tmp, path)


def load_verified_file(path: Path, what: str, expected: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict]:
    """
    Tensors and metadata of a file written by [`save_file_atomically`], after checking it: readable in full, its
    `sha256` matches its tensors (values changed after writing are caught), and each `expected` metadata entry
    matches (a file copied or renamed from another key is caught).

    hf_kd's caches never silently use, and never silently overwrite, a bad file: this raises a `ValueError` that
    names the file and says to delete it (the next run then recomputes it).

    Args:
        path (`Path`): the file.
        what (`str`): what the file holds, for the error (e.g. `"teacher logits cache"`).
        expected (`dict[str, str]`): metadata entries the file must have.
    """
    from safetensors import SafetensorError, safe_open

    def bad(reason: str) -> ValueError:
        return ValueError(f"The {what} file {path} {reason}. It was not used; delete it to recompute it.")

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise bad(f"is unreadable ({err})") from err
    if "sha256" not in metadata:
        raise bad("has no sha256 checksum (it was not written by this version of hf_kd)")
    if tensors_checksum(tensors) != metadata["sha256"]:
        raise bad("does not match its sha256 checksum: its values were changed after it was written")
    for key, value in expected.items():
        if metadata.get(key) != value:
            raise bad(f"is for {key}={metadata.get(key)!r}, not {value!r}: it was copied or renamed from another run")
    return tensors, metadata


class TeacherLogitsCache:
    """Teacher logits of whole datasets, computed once and stored on disk.

    One file per (teacher, data, id map) key under `cache_dir`: `<key>.safetensors` holds a float32 tensor
    `(num_rows, num_labels)` and its metadata (teacher and data fingerprints, row count, a `sha256` checksum of the
    logits, all checked on load: a damaged, tampered or misplaced file is an error, see [`~TeacherLogitsCache.load`]).
    The logits are added to the
    dataset as a `teacher_logits` column, so they follow the rows through shuffling and across epochs, and a run that
    finds every file never loads the teacher weights.

    Args:
        cache_dir (`str` or `Path`, *optional*, defaults to [`default_cache_dir`]):
            Where the files live.
        teacher_key (`str`):
            [`teacher_fingerprint`] of the teacher.
    """

    def __init__(self, cache_dir: str | os.PathLike | None, teacher_key: str):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.teacher_key = teacher_key

    def path_for(self, data_key: str, token_id_map: torch.Tensor | None) -> Path:
        hasher = hashlib.sha256(f"{self.teacher_key}:{data_key}".encode())
        if token_id_map is not None:
            hasher.update(token_id_map.numpy().tobytes())
        return self.cache_dir / f"{hasher.hexdigest()[:32]}.safetensors"

    def load(self, path: Path, num_rows: int, data_key: str | None = None, num_labels: int | None = None) -> torch.Tensor | None:
        """
        The cached logits `(num_rows, num_labels)`, `None` if the file is absent.

        A file that is unreadable or truncated, whose values were changed after it was written (its `sha256`
        checksum), that was written for another teacher or other data (its metadata), or whose shape or values do not
        fit (rows, labels, non-finite logits) is an error naming the file and saying to delete it: a bad file is
        never used, nor silently recomputed over (which would hide a failing disk or a tampered file).
        """
        if not path.exists():
            return None
        expected = {"teacher": self.teacher_key, "rows": str(num_rows)}
        if data_key is not None:
            expected["data"] = data_key
        tensors, _ = load_verified_file(path, "teacher logits cache", expected)

        def bad(reason: str) -> ValueError:
            return ValueError(f"The teacher logits cache file {path} {reason}. It was not used; delete it to recompute it.")

        logits = tensors.get("logits")
        if logits is None or logits.dim() != 2:
            raise bad(f"has no (rows, labels) 'logits' tensor (tensors: {sorted(tensors)})")
        if logits.shape[0] != num_rows:
            raise bad(f"holds {logits.shape[0]} rows but the dataset has {num_rows}")
        if num_labels is not None and logits.shape[1] != num_labels:
            raise bad(f"holds logits over {logits.shape[1]} labels but the student predicts {num_labels}")
        if not torch.isfinite(logits).all():
            raise bad(f"holds {int((~torch.isfinite(logits)).sum())} non-finite logits (NaN or inf)")
        return logits

    def save(self, path: Path, logits: torch.Tensor, data_key: str) -> None:
        save_file_atomically(
            {"logits": logits.float()},
            path,
            metadata={"teacher": self.teacher_key, "data": data_key, "rows": str(logits.shape[0])},
        )


@torch.no_grad()
def compute_teacher_logits(
    teacher: nn.Module,
    dataset: datasets.Dataset,
    collator,
    batch_size: int,
    device: torch.device,
    token_id_map: torch.LongTensor | None = None,
    desc: str = "Teacher logits",
    process_index: int = 0,
    num_processes: int = 1,
) -> torch.Tensor:
    """One batched, gradient-free pass of the teacher over `dataset`; returns `(num_rows, num_labels)` float32 logits.

    Text rows are processed in order of length so that dynamic padding wastes little compute, then put back in
    dataset order; other inputs (`pixel_values`) in dataset order.

    With `num_processes > 1` the batches are dealt out round-robin and this process computes only its own: the rows
    of the other processes' batches are left at zero, so that summing the results of all processes (an all-reduce)
    gives every row exactly once. Every process runs the same number of forwards (the last one repeats a batch and
    drops its result when the batches do not divide evenly), which a ZeRO-3 teacher, whose forward is a collective,
    needs.
    """
    from tqdm.auto import tqdm

    columns = [c for c in TEACHER_INPUT_NAMES if c in dataset.column_names]
    rows = dataset.select_columns(columns)
    if "input_ids" in columns:
        lengths = torch.tensor([len(ids) for ids in rows["input_ids"]])
        order = torch.argsort(lengths, descending=True, stable=True)
    else:
        order = torch.arange(len(rows))
    num_batches = -(-len(rows) // batch_size)
    steps = -(-num_batches // num_processes)
    out = None
    for step in tqdm(range(steps), desc=desc, unit="batch", leave=False, disable=process_index != 0):
        batch_index = step * num_processes + process_index
        own = batch_index < num_batches
        start = (batch_index if own else num_batches - 1) * batch_size
        index = order[start : start + batch_size]
        batch = collator([rows[int(i)] for i in index])
        batch = {k: v.to(device) for k, v in batch.items() if k in columns}
        logits = teacher_logits_for_batch(teacher, batch, token_id_map).float().cpu()
        if out is None:
            out = torch.zeros(len(rows), logits.shape[-1])
        if own:
            out[index] = logits
    return out


# --------------------------------------------------------------------------------------------------------------------
# Top-k teacher logits cache of causal LMs
# --------------------------------------------------------------------------------------------------------------------

LM_TOP_K_TENSORS = ("topk_ids", "topk_logprobs", "logsumexp", "offsets")
LM_TOP_K_SPAN_TENSORS = ("token_logprobs", "tail_logprobs", "far_tail_logprobs")
"""The three tensors a cross-tokenizer cache file holds besides [`LM_TOP_K_TENSORS`] (`span_tensors=...` in
[`compute_teacher_lm_top_k`]): per cached token, the log-probability of the realised next token, the log of the mass
outside the top k, and the log of the mass at ranks `>= span_tensors` (the student's vocabulary size), all float32."""


def lm_top_k_data_key(data_key: str, top_k: int) -> str:
    """The key of a causal-LM top-k cache file: the data's fingerprint (inputs and labels) and `k` (a file holds one
    `k`; [`TeacherLogitsCache.path_for`] hashes it with the teacher's key)."""
    return f"{data_key}:lm-top{top_k}"


def load_lm_top_k(
    path: Path,
    teacher_key: str,
    data_key: str,
    num_rows: int,
    top_k: int,
    vocab_size: int,
    span_tensors: bool = False,
):
    """
    The top-k teacher logits of a causal-LM dataset written by [`save_lm_top_k`], `None` if the file is absent.

    Returns a dict of CPU tensors: `topk_ids` `(tokens, k)` int32, `topk_logprobs` `(tokens, k)` float16 (log-probs at
    the temperature of the pass, 1 for the same-tokenizer cache), `logsumexp` `(tokens,)` float32 (of all the teacher's
    logits) and `offsets` `(rows + 1,)` int64 (row `r`'s completion tokens are `offsets[r]:offsets[r + 1]`, in position
    order); with `span_tensors=True` (the cross-tokenizer cache) also [`LM_TOP_K_SPAN_TENSORS`], `(tokens,)` each.

    A damaged (checksum), misplaced (metadata) or inconsistent file is a `ValueError` naming it
    ([`load_verified_file`]). `vocab_size` is the vocabulary of the model whose logits were cached (the student's,
    which equals the teacher's, or with `cross_tokenizer` the teacher's).
    """
    if not path.exists():
        return None
    expected = {"teacher": teacher_key, "data": data_key, "rows": str(num_rows), "top_k": str(top_k)}
    tensors, _ = load_verified_file(path, "causal-LM top-k teacher logits cache", expected)

    def bad(reason: str) -> ValueError:
        return ValueError(
            f"The causal-LM top-k teacher logits cache file {path} {reason}. It was not used; delete it to recompute it."
        )

    names = LM_TOP_K_TENSORS + (LM_TOP_K_SPAN_TENSORS if span_tensors else ())
    if sorted(tensors) != sorted(names):
        raise bad(f"holds the tensors {sorted(tensors)}, not {sorted(names)}")
    ids, logprobs, lse, offsets = (tensors[name] for name in LM_TOP_K_TENSORS)
    tokens = int(offsets[-1]) if offsets.numel() else -1
    if offsets.shape != (num_rows + 1,) or ids.shape != (tokens, top_k) or logprobs.shape != ids.shape:
        raise bad(
            f"has inconsistent shapes (offsets {tuple(offsets.shape)} for {num_rows} rows, ids {tuple(ids.shape)}, "
            f"log-probs {tuple(logprobs.shape)}, k = {top_k})"
        )
    per_token = [lse] + [tensors[name] for name in LM_TOP_K_SPAN_TENSORS if span_tensors]
    if any(t.shape != (tokens,) or not torch.isfinite(t).all() for t in per_token) or not torch.isfinite(logprobs).all():
        raise bad("holds non-finite or misshapen log-probabilities")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise bad(f"holds token ids outside the vocabulary [0, {vocab_size})")
    return tensors


def save_lm_top_k(path: Path, top_k: dict[str, torch.Tensor], teacher_key: str, data_key: str) -> None:
    """Write what [`compute_teacher_lm_top_k`] returns, checksummed, atomically ([`save_file_atomically`])."""
    k = top_k["topk_ids"].shape[-1]
    rows = top_k["offsets"].shape[0] - 1
    metadata = {"teacher": teacher_key, "data": data_key, "rows": str(rows), "top_k": str(k)}
    names = [name for name in LM_TOP_K_TENSORS + LM_TOP_K_SPAN_TENSORS if name in top_k]
    save_file_atomically({name: top_k[name] for name in names}, path, metadata)


def _far_tail(logits: torch.Tensor, rank: int, chunk: int = 64) -> torch.Tensor:
    """`logsumexp` of each row's logits ranked `rank` or lower (0-based ranks `>= rank`; `-inf` when there are
    none), a few rows at a time (a full sort of 262,144 logits per token is what it costs)."""
    if rank >= logits.shape[-1]:
        return logits.new_full(logits.shape[:1], float("-inf"))
    out = [torch.logsumexp(rows.sort(dim=-1, descending=True).values[:, rank:], dim=-1) for rows in logits.split(chunk)]
    return torch.cat(out) if out else logits.new_zeros(0)


# Log-probabilities are clamped to this floor before they are stored: a log-prob below float16's range stays finite
# (it is ~0 in probability anyway), and an empty tail (k = vocab) is a finite log(0) that a 0 * log term keeps at 0.
_LOG_PROB_FLOOR = -60000.0


@torch.no_grad()
def compute_teacher_lm_top_k(
    teacher: nn.Module,
    dataset: datasets.Dataset,
    collator,
    batch_size: int,
    device: torch.device,
    top_k: int,
    desc: str = "Teacher top-k logits",
    temperature: float = 1.0,
    span_tensors: int | None = None,
) -> dict[str, torch.Tensor]:
    """
    One gradient-free pass of a causal-LM teacher over a tokenized `dataset` (`input_ids`, `labels`, optionally
    `attention_mask`), in dataset order, keeping for every completion token only what [`~hf_kd.losses.sparse_lm_kd_loss`]
    needs.

    A completion token is a position `t` whose shifted label `labels[t + 1]` is not `-100` (the logits at `t` predict
    it). For each one: the ids of the teacher's `top_k` largest logits (int32), their log-probabilities at
    `temperature` (`logit / T - logsumexp(logits / T)`, float16: near 0, where the top tokens are, float16 is most
    precise) and the `logsumexp` of all the logits divided by `temperature` (float32), so that the top-k tempered logits
    are `log-prob + logsumexp`. That is `6 * k + 4` bytes per completion token, stored flat in row order with per-row
    `offsets` (no padding).

    With `span_tensors=R` (the cross-tokenizer cache of [`hf_kd.trainer.DistillTrainer`], whose "labels" are the
    teacher's own tokens inside the aligned completion spans; `R` is the student's vocabulary size) three float32
    tensors more, 12 bytes per token, for [`~hf_kd.losses.cached_span_top_k`] and [`~hf_kd.losses.cached_uld_loss`]:
    `token_logprobs`, the log-probability at `temperature` of the realised next token `labels[t + 1]` (the chain
    rule's factor, exact whether or not the token is in the top k), `tail_logprobs`, the log of the tempered mass
    outside the top k (summed in float32 over the full vocabulary, not `1 -` the rounded top-k mass), and
    `far_tail_logprobs`, the log of the tempered mass of the tokens ranked `R` or lower (0-based ranks `>= R`: the
    sorted places a student with `R` tokens has no probability at, which ULD compares exactly).

    Args:
        teacher (`nn.Module`): the causal LM, frozen.
        dataset ([`~datasets.Dataset`]): tokenized rows, read in order.
        collator (`Callable`): pads a list of rows into a batch (e.g. [`hf_kd.lm_data.LMDataCollator`]).
        batch_size (`int`): rows per forward.
        device (`torch.device`): where the teacher runs.
        top_k (`int`): logits kept per token, `1 <= top_k <= vocab`.
        desc (`str`, *optional*): the progress bar's label.
        temperature (`float`, *optional*, defaults to `1.0`): the logits are divided by it before everything.
        span_tensors (`int`, *optional*): the student's vocabulary size `R`: also compute [`LM_TOP_K_SPAN_TENSORS`].

    Returns:
        `dict` with `topk_ids` `(tokens, k)`, `topk_logprobs` `(tokens, k)`, `logsumexp` `(tokens,)`, `offsets`
        `(rows + 1,)` (int64), and with `span_tensors` the three of [`LM_TOP_K_SPAN_TENSORS`] `(tokens,)`, on the
        CPU.
    """
    from tqdm.auto import tqdm

    columns = [c for c in ("input_ids", "attention_mask", "labels") if c in dataset.column_names]
    rows = dataset.select_columns(columns)
    fields = {name: [] for name in ("topk_ids", "topk_logprobs", "logsumexp", *LM_TOP_K_SPAN_TENSORS)}
    counts = []
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch", leave=False):
        batch = collator([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
        labels = batch["labels"][:, 1:]
        inputs = {k: v.to(device) for k, v in batch.items() if k in TEACHER_INPUT_NAMES}
        logits = teacher_logits_for_batch(teacher, inputs)[:, :-1]
        counted = (labels != -100).to(logits.device)
        # (tokens, vocab), row-major: each row's tokens in position order
        token_logits = logits[counted].float() / temperature
        token_lse = torch.logsumexp(token_logits, dim=-1)
        values, indices = token_logits.topk(top_k, dim=-1)
        fields["topk_ids"].append(indices.int().cpu())
        fields["topk_logprobs"].append((values - token_lse[:, None]).clamp(min=_LOG_PROB_FLOOR).half().cpu())
        fields["logsumexp"].append(token_lse.cpu())
        if span_tensors is not None:
            targets = labels.to(logits.device)[counted].long()
            realised = token_logits.gather(-1, targets[:, None]).squeeze(-1) - token_lse
            far = _far_tail(token_logits, span_tensors) - token_lse
            # The tail in place of the logits (not needed again): the top-k cells masked out, the rest summed.
            tail = torch.logsumexp(token_logits.scatter_(-1, indices, float("-inf")), dim=-1) - token_lse
            fields["token_logprobs"].append(realised.clamp(min=_LOG_PROB_FLOOR).cpu())
            fields["tail_logprobs"].append(tail.clamp(min=_LOG_PROB_FLOOR).cpu())
            fields["far_tail_logprobs"].append(far.clamp(min=_LOG_PROB_FLOOR).cpu())
        counts.append(counted.sum(1).cpu())
    counts = torch.cat(counts) if counts else torch.zeros(0, dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.long().cumsum(0)])
    empty = {"topk_ids": torch.zeros(0, top_k, dtype=torch.int32), "topk_logprobs": torch.zeros(0, top_k).half()}
    names = ("topk_ids", "topk_logprobs", "logsumexp", *(LM_TOP_K_SPAN_TENSORS if span_tensors is not None else ()))
    out = {name: torch.cat(fields[name]) if fields[name] else empty.get(name, torch.zeros(0)) for name in names}
    out["offsets"] = offsets
    return out
