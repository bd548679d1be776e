"""`_TeacherArguments`: the teacher, teacher-logits-cache and causal-LM loss fields shared by [`DistillConfig`] and
[`EarlyExitConfig`].

A plain dataclass, not a [`~transformers.TrainingArguments`]: configs list it after `TrainingArguments`
(`class DistillConfig(TrainingArguments, _TeacherArguments)`), so `TrainingArguments` stays their direct parent and
[`~transformers.HfArgumentParser`] still sees every field. `TrainingArguments.__post_init__` does not call `super()`,
so configs call [`~_TeacherArguments._teacher_post_init`] themselves.
"""

import json
from dataclasses import dataclass, field
from typing import Any

from ..distributed import TEACHER_ZERO_STAGES
from ..options import LMCacheTail, to_enum


@dataclass
class _TeacherArguments:
    # Parameters that control the teacher
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub id or local path of the teacher (an AutoModelForSequenceClassification checkpoint)."},
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for the teacher's from_pretrained, as a dict or a JSON string."},
    )
    teacher_from_base_model: bool = field(
        default=False,
        metadata={
            "help": "Self-distillation of a PEFT student: the teacher is the student's own base model, i.e. the "
            "student with its adapters disabled (no second copy in memory, nothing to load). Needs a PEFT student "
            "(peft_config or a PeftModel) and no other teacher."
        },
    )
    teacher_zero_stage: int = field(
        default=3,
        metadata={
            "help": "ZeRO stage of the teacher in a DeepSpeed run, whatever the student's: 3 shards its weights over "
            "the processes, 0 keeps a full copy on each (no all-gather per forward: faster for a small teacher). "
            "Ignored without DeepSpeed."
        },
    )
    map_teacher_token_ids: bool = field(
        default=False,
        metadata={
            "help": "Map student token ids to the teacher's vocabulary by token string (e.g. MPNet teacher, "
            "MiniLM student). Without it a vocabulary mismatch is an error."
        },
    )

    # Parameters that control the teacher logits cache
    cache_teacher_logits: bool = field(
        default=False,
        metadata={
            "help": "Compute teacher logits once per dataset, cache them on disk keyed by teacher and data, and "
            "train from the cache (a cached run never loads the teacher)."
        },
    )
    teacher_logits_cache_dir: str | None = field(
        default=None, metadata={"help": "Directory of the teacher logits cache (default $HF_HOME/hf_kd/teacher_logits)."}
    )
    lm_cache_top_k: int = field(
        default=64,
        metadata={"help": "Causal-LM students with cache_teacher_logits: the teacher's top-k logits cached per token."},
    )
    lm_cache_tail: str = field(
        default="bucket",
        metadata={
            "help": "Tail of the cached causal-LM loss: bucket (one rest cell) or renormalise (top k only).",
            "choices": [t.value for t in LMCacheTail],
        },
    )

    # Parameters of the causal-LM loss (DistillTrainer's student, EarlyExitTrainer's exits)
    lm_chunk_size: int = field(
        default=128, metadata={"help": "Tokens processed at once by the causal-LM loss (memory only)."}
    )
    lm_fused_head: bool | None = field(
        default=None,
        metadata={
            "help": "Causal LMs: the loss runs the LM heads chunk by chunk on completion tokens, so no (batch, seq, "
            "vocab) logits are made in training. None: where the model allows it; True: required; False: never."
        },
    )

    def _teacher_post_init(self) -> None:
        # HfArgumentParser hands dict fields over as JSON strings.
        if isinstance(self.teacher_model_init_kwargs, str):
            self.teacher_model_init_kwargs = json.loads(self.teacher_model_init_kwargs)
        if self.teacher_zero_stage not in TEACHER_ZERO_STAGES:
            raise ValueError(
                f"teacher_zero_stage must be one of {TEACHER_ZERO_STAGES} (3: sharded, 0: a full copy on each "
                f"process; stages 1 and 2 partition optimizer states and gradients, which a teacher has none of), "
                f"got {self.teacher_zero_stage}"
            )
        if isinstance(self.lm_cache_top_k, bool) or not isinstance(self.lm_cache_top_k, int) or self.lm_cache_top_k < 1:
            raise ValueError(f"lm_cache_top_k must be an int >= 1, got {self.lm_cache_top_k!r}")
        self.lm_cache_tail = to_enum(LMCacheTail, self.lm_cache_tail, "lm_cache_tail")
        if isinstance(self.lm_chunk_size, bool) or not isinstance(self.lm_chunk_size, int) or self.lm_chunk_size < 1:
            raise ValueError(f"lm_chunk_size must be a positive int, got {self.lm_chunk_size!r}")
        if self.lm_fused_head not in (None, True, False):
            raise ValueError(f"lm_fused_head must be None (where possible), True or False, got {self.lm_fused_head!r}")
        if self.teacher_from_base_model and self.teacher_model_name_or_path is not None:
            raise ValueError(
                f"teacher_from_base_model=True uses the PEFT student's base model as the teacher, but "
                f"teacher_model_name_or_path={self.teacher_model_name_or_path!r} was set too: choose one."
            )
