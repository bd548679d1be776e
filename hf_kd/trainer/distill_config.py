from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..options import CrossTokenizerLoss, LMLossType, to_enum
from .teacher_config import _TeacherArguments


@dataclass
class DistillConfig(TrainingArguments, _TeacherArguments):
    r"""
    Configuration of [`DistillTrainer`]: teacher-to-student knowledge distillation (Hinton et al., 2015,
    https://huggingface.co/papers/1503.02531) on top of [`~transformers.TrainingArguments`].

    The student minimises `alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(y, z_s)`
    ([`hf_kd.losses.kd_loss`]). The same trainer runs every training mode of Sultan (2023,
    https://huggingface.co/papers/2301.12609): KD (big teacher, small student), self-KD (same architecture) and reverse
    KD (small teacher, big student); only the teacher/student pair changes.

    > Parameters that control the teacher

    Args:
        teacher_model_name_or_path (`str`, *optional*):
            Hub id or local folder of the teacher, loaded with `AutoModelForSequenceClassification`
            (`AutoModelForCausalLM` for a causal-LM student). Ignored when a teacher model is passed to the trainer.
        teacher_model_init_kwargs (`dict`, *optional*):
            Keyword arguments for the teacher's `from_pretrained` (e.g. `{"torch_dtype": "bfloat16"}`).
        map_teacher_token_ids (`bool`, *optional*, defaults to `False`):
            Map student token ids to teacher token ids by token string, for a teacher whose vocabulary holds the
            student's tokens under other ids (an MPNet teacher for a BERT/MiniLM student). Without it a vocabulary
            mismatch is an error before training.
        teacher_from_base_model (`bool`, *optional*, defaults to `False`):
            Self-distillation of a PEFT student: the teacher is the student's own base model, i.e. the student with
            its adapters (and its `modules_to_save` copies) disabled. No second copy of the weights and nothing to
            load. Needs a PEFT student (`peft_config=` or a `PeftModel`) and no other teacher.
        teacher_zero_stage (`int`, *optional*, defaults to `3`):
            ZeRO stage of the teacher in a DeepSpeed run, whatever the student's stage: `3` shards its weights over
            the processes (initialised for inference by DeepSpeed), `0` keeps a full copy on each process (no
            all-gather per forward: faster for a small teacher). Ignored without DeepSpeed.

    > Parameters that control the loss

    Args:
        temperature (`float`, *optional*, defaults to `2.0`):
            Softmax temperature `T` of the soft targets; the soft term is scaled by `T^2`.
        alpha (`float`, *optional*, defaults to `0.5`):
            Weight of the soft (teacher) term in `[0, 1]`; `1 - alpha` weighs the cross-entropy with the labels.
        loss_type (`str` or [`~hf_kd.losses.LMLossType`], *optional*, defaults to `"forward_kl"`):
            The divergence of a causal-LM student's token-level loss ([`hf_kd.losses.lm_kd_loss`]): `"forward_kl"`
            `KL(p_T || p_S)`, `"reverse_kl"` `KL(p_S || p_T)` or `"jsd"` (GKD's generalised JSD, weight `beta`).
            A sequence-classification student supports `"forward_kl"` only (Hinton's loss).
        beta (`float`, *optional*, defaults to `0.5`):
            Weight of the teacher in the mixture of `loss_type="jsd"`, in `[0, 1]` (`0` is forward KL, `1` reverse
            KL, `0.5` the Jensen-Shannon divergence). Ignored by the other loss types.
        lm_chunk_size (`int`, *optional*, defaults to `128`):
            Tokens processed at once by the causal-LM loss (memory only: the loss does not depend on it).
        lm_fused_head (`bool` or `None`, *optional*, defaults to `None`):
            Whether the causal-LM loss runs the models' LM heads itself, one chunk of completion tokens at a time
            ([`hf_kd.lm_head.lm_head_skipped`], [`hf_kd.losses.LMHeadInputs`]): the student's and the live teacher's
            `(batch, seq, vocab)` logits and the logits' gradient are then never made, and the heads run on the
            completion tokens only. Same loss and gradients up to float rounding. `None`: for each model whose head
            allows it ([`hf_kd.lm_head.lm_head_unsupported_reason`]: a bias-free `nn.Linear` head of a transformers
            `...ForCausalLM` without logit soft-capping or scaling, not ZeRO-3-partitioned), the others get full logits
            (logged once). `True`: both models must allow it (an error naming the reason otherwise). `False`: full
            logits, as the models' own forward makes them. Evaluation always computes full logits (the metrics read
            them).
        lm_cache_top_k (`int`, *optional*, defaults to `64`):
            With `cache_teacher_logits=True` and a causal-LM student: how many of the teacher's largest logits are
            cached per completion token (`6 * k + 4` bytes per token on disk); the loss is then
            [`hf_kd.losses.sparse_lm_kd_loss`]. At least 1 and at most the vocabulary size. With `cross_tokenizer`:
            per teacher token at the aligned spans' positions (`6 * k + 16` bytes), at most the **teacher's**
            vocabulary size.
        lm_cache_tail (`str` or [`~hf_kd.options.LMCacheTail`], *optional*, defaults to `"bucket"`):
            How that sparse loss treats the tokens outside the top k: `"bucket"` (one "rest" cell holding their mass,
            on both sides) or `"renormalise"` (both distributions restricted to the top k and renormalised).
        lm_max_length (`int`, *optional*, defaults to `1024`):
            TRL's `SFTConfig.max_length`, for causal-LM students given data in one of TRL's formats (`text`,
            `messages`, `prompt` + `completion`): the trainer tokenizes it with `processing_class`
            ([`hf_kd.lm_data.tokenize_lm_dataset`]), cutting rows longer than `lm_max_length` tokens on the right
            (the end of a long completion is lost); a prompt of `lm_max_length` tokens or more, which would leave no
            completion token, is refused with an error naming the row. Pre-tokenized data is used as is. (Named
            `lm_` like the other causal-LM fields, and so that it does not clash with the recipes' `--max_length`,
            the classification truncation length.)

    > Parameters that control distillation across tokenizers (causal-LM students; [`hf_kd.cross_tokenizer`])

    Args:
        cross_tokenizer (`str` or [`~hf_kd.options.CrossTokenizerLoss`], *optional*):
            Distil a causal-LM teacher whose tokenizer differs from the student's (e.g. `google/gemma-3-270m` into
            `HuggingFaceTB/SmolLM2-135M-Instruct`). `None` (default): a different vocabulary is an error. `"uld"`:
            each text is tokenised by both tokenizers with offsets, the tokens are aligned into spans covering the same
            characters, and the student's span distributions are pulled to the teacher's by Universal Logit
            Distillation (Boizard et al., 2024, https://huggingface.co/papers/2402.12030;
            [`hf_kd.losses.uld_loss`]). `"hybrid"`: exact KL on the tokens both vocabularies share plus ULD on the rest
            ([`hf_kd.losses.hybrid_loss`]). Needs fast tokenizers on both sides (the teacher's from
            `teacher_processing_class` or saved with the teacher), data in TRL's formats (or rows already carrying the
            [`hf_kd.cross_tokenizer.CROSS_TOKENIZER_COLUMNS`]); not supported yet with `lmbda > 0`, `seq_kd` or
            `teacher_from_base_model`, and `loss_type` must stay `"forward_kl"`. With `cache_teacher_logits=True` one
            teacher pass stores, at each teacher position the span distributions read, its top `lm_cache_top_k`
            log-probabilities at `temperature`, the log of the rest of the mass, of the mass past the student's
            vocabulary size and the log-probability of the realised next token (`6 * k + 16` bytes per teacher token;
            the key adds the teacher's tokenizer, `temperature` and the student's vocabulary size); a cached run never
            loads the teacher. The chain rule's factors are then exact; `"uld"` compares the tail masses as buckets
            ([`hf_kd.losses.cached_uld_loss`], a lower bound of the live loss) and `"hybrid"` spreads the teacher's
            tail evenly over its other tokens ([`hf_kd.losses.cached_span_log_probs`]); both equal the live loss
            with `lm_cache_top_k` = the teacher's vocabulary (docs/methods/cross_tokenizer.md).
            `lm_cache_top_k` is then bounded by the teacher's vocabulary, and `lm_cache_tail` must stay `"bucket"`.
        cross_tokenizer_shared_weight (`float`, *optional*, defaults to `0.5`):
            With `cross_tokenizer="hybrid"`: the weight in `[0, 1]` of the exact KL on the shared tokens;
            `1 - cross_tokenizer_shared_weight` weighs ULD on the rest.

    > Parameters that control on-policy and sequence-level data (causal-LM students; GKD, Agarwal et al., 2024,
    > https://huggingface.co/papers/2306.13649)

    Args:
        lmbda (`float`, *optional*, defaults to `0.0`):
            Fraction of training batches whose completions the **student** generates from the batch's prompts
            (on-policy data, GKD's `lambda`), in `[0, 1]`: each micro-batch flips a coin that comes up with
            probability `lmbda`. `0` trains on the dataset's completions only, `1` on the student's generations only.
        seq_kd (`bool`, *optional*, defaults to `False`):
            When a batch is not on-policy, the **teacher** generates its completions (sequence-level KD, Kim & Rush,
            2016, https://huggingface.co/papers/1606.07947) instead of the dataset's being used.
        max_new_tokens (`int`, *optional*, defaults to `128`):
            Most tokens generated per completion (the end-of-sequence token included), at least 1.
        generation_temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature of those generations, `>= 0` (not the loss's `temperature`). The default samples
            from the generating model's own distribution over the whole vocabulary (no top-k / top-p), which is what
            on-policy means and what GKD does; `0` decodes greedily (deterministic completions).

    > Parameters that control the teacher logits cache

    Args:
        cache_teacher_logits (`bool`, *optional*, defaults to `False`):
            Run the teacher once over each dataset, store its logits on disk (keyed by teacher weights and data) and
            train from them: later epochs and later runs never load the teacher. A dataset that already has a
            `teacher_logits` column is used as is, cache or not. Causal-LM students cache the top `lm_cache_top_k`
            logits per completion token; with `cross_tokenizer` the teacher's at its own span positions (see
            `cross_tokenizer`).
        teacher_logits_cache_dir (`str`, *optional*):
            Where cached logits live. Defaults to `$HF_HOME/hf_kd/teacher_logits`.

    TinyBERT's intermediate-layer losses and letKD's KD layers are their own trainer/config pairs, built on this one:
    [`TinyBERTConfig`] / [`TinyBERTTrainer`] and [`LetKDConfig`] / [`LetKDTrainer`].

    Example:

    ```python
    >>> from hf_kd import DistillConfig
    >>> args = DistillConfig(output_dir="student", teacher_model_name_or_path="my-org/minilm-l6-rt", temperature=2.0)
    ```
    """

    # The teacher and teacher logits cache fields come from _TeacherArguments.

    # Parameters that control the loss
    temperature: float = field(
        default=2.0, metadata={"help": "Softmax temperature T of the soft targets (> 0); soft term scaled by T^2."}
    )
    alpha: float = field(
        default=0.5,
        metadata={"help": "Weight in [0, 1] of the soft teacher term; 1 - alpha weighs cross-entropy with the labels."},
    )

    loss_type: str = field(
        default="forward_kl",
        metadata={
            "help": "Divergence of a causal-LM student's token-level loss: forward_kl, reverse_kl or jsd (with beta). "
            "Sequence classifiers support forward_kl only.",
            "choices": [t.value for t in LMLossType],
        },
    )
    beta: float = field(
        default=0.5, metadata={"help": "Weight in [0, 1] of the teacher in the mixture of loss_type='jsd'."}
    )
    # lm_chunk_size, lm_fused_head, lm_cache_top_k and lm_cache_tail come from _TeacherArguments (EarlyExitConfig
    # reads them too).
    lm_max_length: int = field(
        default=1024,
        metadata={
            "help": "Causal-LM data in TRL's formats (text, messages, prompt/completion): tokenized by the trainer, "
            "rows cut to lm_max_length tokens (TRL's max_length); a prompt of lm_max_length tokens or more is an error."
        },
    )

    # Parameters that control distillation across tokenizers
    cross_tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "Causal-LM teacher with another tokenizer: uld (Universal Logit Distillation on aligned spans) or "
            "hybrid (exact KL on the shared tokens + ULD on the rest). Default: a vocabulary mismatch is an error.",
            "choices": [t.value for t in CrossTokenizerLoss],
        },
    )
    cross_tokenizer_shared_weight: float = field(
        default=0.5,
        metadata={"help": "cross_tokenizer='hybrid': weight in [0, 1] of the exact KL on the shared tokens."},
    )

    # Parameters that control on-policy and sequence-level data
    lmbda: float = field(
        default=0.0,
        metadata={"help": "Fraction in [0, 1] of training batches whose completions the student generates (on-policy)."},
    )
    seq_kd: bool = field(
        default=False,
        metadata={"help": "The teacher generates the completions of the batches that are not on-policy (sequence KD)."},
    )
    max_new_tokens: int = field(
        default=128, metadata={"help": "Most tokens generated per completion (EOS included), at least 1."}
    )
    generation_temperature: float = field(
        default=1.0,
        metadata={"help": "Sampling temperature (>= 0) of the generated completions; 0 decodes greedily."},
    )

    def __post_init__(self):
        super().__post_init__()
        self._teacher_post_init()
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0.0, 1.0], got {self.alpha}")
        self.loss_type = to_enum(LMLossType, self.loss_type, "loss_type")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0.0, 1.0], got {self.beta}")
        if isinstance(self.lm_max_length, bool) or not isinstance(self.lm_max_length, int) or self.lm_max_length < 2:
            raise ValueError(f"lm_max_length must be an int >= 2 (tokens per row), got {self.lm_max_length!r}")
        if isinstance(self.lmbda, bool) or not isinstance(self.lmbda, (int, float)) or not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"lmbda must be a number in [0.0, 1.0], got {self.lmbda!r}")
        if not isinstance(self.seq_kd, bool):
            raise ValueError(f"seq_kd must be True or False, got {self.seq_kd!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        temperature = self.generation_temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise ValueError(f"generation_temperature must be a number >= 0 (0: greedy), got {temperature!r}")
        if self.cache_teacher_logits and (self.lmbda > 0 or self.seq_kd):
            raise ValueError(
                f"cache_teacher_logits=True cannot be combined with lmbda={self.lmbda} / seq_kd={self.seq_kd}: the "
                "cache holds the teacher's logits of the dataset's completions, and generated completions are new at "
                "every step. Train with a live teacher (cache_teacher_logits=False), or with lmbda=0 and "
                "seq_kd=False."
            )
        self.cross_tokenizer = to_enum(CrossTokenizerLoss, self.cross_tokenizer, "cross_tokenizer", allow_none=True)
        weight = self.cross_tokenizer_shared_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight <= 1.0:
            raise ValueError(f"cross_tokenizer_shared_weight must be a number in [0.0, 1.0], got {weight!r}")
        if self.cross_tokenizer is not None:
            unsupported = [
                name for name, on in (
                    (f"lmbda={self.lmbda}", self.lmbda > 0),
                    ("seq_kd=True", self.seq_kd), (f"loss_type={str(self.loss_type)!r}", self.loss_type != "forward_kl"),
                    ("teacher_from_base_model=True", self.teacher_from_base_model),
                ) if on
            ]
            if unsupported:
                raise ValueError(
                    f"cross_tokenizer={str(self.cross_tokenizer)!r} is not supported yet with {', '.join(unsupported)}: "
                    "the teacher reads its own tokenization of the dataset's text (no generated completions, a "
                    "teacher of its own with another tokenizer), and the loss is ULD / hybrid, not loss_type's "
                    "divergence. Use lmbda=0, seq_kd=False, loss_type='forward_kl', teacher_from_base_model=False."
                )
            if self.cache_teacher_logits and self.lm_cache_tail != "bucket":
                raise ValueError(
                    f"lm_cache_tail={str(self.lm_cache_tail)!r} is for the same-tokenizer sparse loss; with "
                    f"cross_tokenizer={str(self.cross_tokenizer)!r} the cached teacher's mass outside its top k is "
                    "spread over its other tokens (hf_kd.losses.cached_span_log_probs): keep lm_cache_tail='bucket'."
                )
        if self.label_smoothing_factor != 0:
            raise ValueError(
                f"label_smoothing_factor={self.label_smoothing_factor} is not used by DistillTrainer: the teacher's "
                "soft targets take its place. For the label smoothing baseline train with transformers.Trainer and "
                "TrainingArguments(label_smoothing_factor=...) (recipe: trainers/distill.py --method ls)."
            )
