"""`TinyBERTTrainer`: TinyBERT's intermediate-layer losses on top of [`DistillTrainer`] (Jiao et al., 2020,
https://huggingface.co/papers/1909.10351); the losses and the attention-score hooks live in [`hf_kd.tinybert`]."""

from __future__ import annotations

import os
from typing import Any

from torch import nn
from transformers import TrainerCallback

from ..teacher import TEACHER_LOGITS_COLUMN, teacher_inputs
from ..tinybert import IntermediateDistiller
from .distill_trainer import DistillTrainer
from .tinybert_config import TinyBERTConfig

PROJECTION_FILENAME = "intermediate_projection.safetensors"


class _ZeroGradCallback(TrainerCallback):
    """Clear a module's gradients when training starts and after every optimizer step: Trainer only calls
    `model.zero_grad()`, which does not reach a module outside the model (its gradients would pile up over steps)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def on_train_begin(self, args, state, control, **kwargs):
        self.module.zero_grad(set_to_none=True)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.module.zero_grad(set_to_none=True)


class TinyBERTTrainer(DistillTrainer):
    r"""
    [`DistillTrainer`] with TinyBERT's intermediate-layer distillation (Jiao et al., 2020,
    https://huggingface.co/papers/1909.10351), for teachers and students of any widths and depths.

    Besides the KD loss on logits, the student learns the teacher's embedding output, layer outputs and pre-softmax
    attention scores ([`hf_kd.tinybert.IntermediateDistiller`]):

    `L = prediction_loss_weight * kd_loss + embedding_loss_weight * MSE(E_S W, E_T)
    + hidden_loss_weight * sum_m MSE(H_S^m W, H_T^g(m)) + attention_loss_weight * sum_m MSE(A_S^m, A_T^g(m))`

    where `g` is `args.intermediate_layer_map` (TinyBERT's uniform map by default) and `W` the projection
    (`args.intermediate_projection`). Each part is logged (`hidden_loss`, `attention_loss`, `embedding_loss`, besides
    `kd_loss` and `ce_loss`). With every intermediate weight at 0 (TinyBERT's second, prediction-layer stage) it trains
    as [`DistillTrainer`] with the KD loss weighted by `prediction_loss_weight`.

    The learned projection lives outside the student, which stays a plain transformers model: it is trained by this
    trainer's optimizer (added to it, learning-rate schedule and weight decay included; clipped together with the
    student; its own DDP wrapper under data parallelism; re-initialised whenever `model_init` re-creates the student)
    and saved as `intermediate_projection.safetensors` in every checkpoint and saved model, restored on resume. The
    teacher runs live at every step (no logits cache while an intermediate loss is on).

    Args:
        model (`PreTrainedModel`):
            The student, a transformers encoder sequence classifier (BERT, MiniLM, MPNet, ...).
        args ([`TinyBERTConfig`]):
            Training, distillation and TinyBERT arguments.

        The other arguments are those of [`DistillTrainer`].

    Example:

    ```python
    >>> from hf_kd import TinyBERTConfig, TinyBERTTrainer
    >>> args = TinyBERTConfig(output_dir="stage1", hidden_loss_weight=1.0, attention_loss_weight=1.0,
    ...                       embedding_loss_weight=1.0, prediction_loss_weight=0.0)
    >>> trainer = TinyBERTTrainer(model=student, args=args, teacher_model="my-org/minilm-l6-rt",
    ...                           train_dataset=train, eval_dataset=validation, processing_class=tokenizer)
    >>> trainer.train()
    ```
    """

    _tag_names = ["hf_kd", "distillation", "tinybert"]
    _name = "TinyBERT"
    _config_class = TinyBERTConfig
    _paper = {
        "title": "TinyBERT: Distilling BERT for Natural Language Understanding",
        "id": "1909.10351",
        "citation": (
            "@inproceedings{jiao2020tinybert,\n  title={{TinyBERT}: Distilling {BERT} for Natural Language "
            "Understanding},\n  author={Jiao, Xiaoqi and Yin, Yichun and Shang, Lifeng and Jiang, Xin and Chen, Xiao "
            "and Li, Linlin and Wang, Fang and Liu, Qun},\n  booktitle={Findings of EMNLP},\n  year={2020}\n}"
        ),
    }
    _intermediate: IntermediateDistiller | None = None
    _projection_wrapped = None

    def __init__(self, *args, **kwargs):
        # The arguments of DistillTrainer (which checks that `args` is a TinyBERTConfig); then the method's own set-up.
        super().__init__(*args, **kwargs)
        self._init_intermediate()

    def _init_intermediate(self) -> None:
        """Build the [`IntermediateDistiller`] (layer map checked against both depths) when any intermediate loss
        weight is positive; load the teacher now, since these losses need it live."""
        self._intermediate, self._projection_wrapped = None, None
        if not self.args.uses_intermediate_losses:
            return
        if self._teacher_source is None:
            raise ValueError(
                "Intermediate-layer losses need the teacher's hidden states, not only its logits: pass teacher_model "
                "or set teacher_model_name_or_path (a 'teacher_logits' column is not enough)."
            )
        learned = self.args.intermediate_projection == "linear"
        if learned and (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            raise ValueError(
                "A learned intermediate projection is not supported with DeepSpeed or FSDP yet (it lives outside the "
                "sharded model): use intermediate_projection='identity' (equal widths) or plain DDP."
            )
        if learned and self.optimizer is not None:
            raise ValueError(
                "Intermediate-layer losses train a projection that the trainer adds to its own optimizer: do not pass "
                "`optimizers=`, set `optim` / `optim_args` in the config instead."
            )
        teacher = self.accelerator.unwrap_model(self._load_teacher())
        student = self.accelerator.unwrap_model(self.model)
        self._intermediate = IntermediateDistiller(
            student,
            teacher,
            layer_map=self.args.intermediate_layer_map,
            hidden_weight=self.args.hidden_loss_weight,
            attention_weight=self.args.attention_loss_weight,
            embedding_weight=self.args.embedding_loss_weight,
            projection=str(self.args.intermediate_projection),
        )
        self._intermediate.projection.to(self.args.device)
        if self._projection_parameters():
            self.add_callback(_ZeroGradCallback(self._intermediate.projection))

    @property
    def intermediate_projection(self):
        """The projection `student width -> teacher width` of the intermediate losses, or `None` without them."""
        return None if self._intermediate is None else self._intermediate.projection

    def _projection_parameters(self) -> list:
        projection = self.intermediate_projection
        return [] if projection is None else [p for p in projection.parameters() if p.requires_grad]

    def _intermediate_forward(self, model, inputs: dict, labels, num_items_in_batch):
        """`(student_logits, teacher_logits, losses)` for one batch; see [`IntermediateDistiller.__call__`]."""
        if self._projection_wrapped is None:
            projection = self._intermediate.projection
            # Its own DDP wrapper: gradients of a module outside the student's DDP would not be averaged over ranks.
            # (Prepared at first use, when the accelerator's DDP settings are final; without parameters there is
            # nothing to synchronise.)
            self._projection_wrapped = (
                self.accelerator.prepare_model(projection) if self._projection_parameters() else projection
            )
        teacher = self._load_teacher()
        return self._intermediate(
            model,
            teacher,
            inputs,
            teacher_inputs(inputs, teacher, self._token_id_map),
            projection=self._projection_wrapped,
            item_mask=None if labels is None else labels != -100,
            num_items_in_batch=num_items_in_batch,
            unwrapped_student=self.accelerator.unwrap_model(model),
        )

    def _model_card_info(self) -> dict[str, Any]:
        """The teacher, the KD loss settings and TinyBERT's weights and layer map, for the model card."""
        info = super()._model_card_info()
        if self._intermediate is not None:
            info["hyperparameters"].update(
                {f"{k}_loss_weight": v for k, v in self._intermediate.weights.items()},
                prediction_loss_weight=self.args.prediction_loss_weight,
                intermediate_layer_map=self._intermediate.layer_map,
            )
        return info

    # ---- loss ------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels", None)
        teacher_logits = inputs.pop(TEACHER_LOGITS_COLUMN, None)
        intermediate = {}
        if self._intermediate is None:
            # The prediction-layer stage: every intermediate weight is 0.
            student_logits, feature_loss = model(**inputs).logits, 0.0
        else:
            student_logits, live_logits, intermediate = self._intermediate_forward(
                model, inputs, labels, num_items_in_batch
            )
            teacher_logits = live_logits if teacher_logits is None else teacher_logits
            feature_loss = self._intermediate.weighted_sum(intermediate)
            mode = "train" if model.training else "eval"
            for name, value in intermediate.items():
                self._metrics[mode][f"{name}_loss"].append(value.detach())
        loss, teacher_logits = self._kd_loss(model, inputs, student_logits, teacher_logits, labels, num_items_in_batch)
        loss = self._scale_for_processes(self.args.prediction_loss_weight * loss + feature_loss, num_items_in_batch)
        if return_outputs:
            return loss, {"logits": student_logits, TEACHER_LOGITS_COLUMN: teacher_logits}
        return loss

    # ---- the projection as a trained parameter ---------------------------------------------------------------------

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        params = self._projection_parameters()
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if params and id(params[0]) not in in_optimizer:
            # Added before the scheduler is built, so the schedule (warm-up, decay) covers them; no decay on biases,
            # as for the student.
            named = [(n, p) for n, p in self.intermediate_projection.named_parameters() if p.requires_grad]
            decay = [p for n, p in named if not n.endswith("bias")]
            no_decay = [p for n, p in named if n.endswith("bias")]
            optimizer.add_param_group({"params": decay, "weight_decay": self.args.weight_decay})
            optimizer.add_param_group({"params": no_decay, "weight_decay": 0.0})
        return optimizer

    def _clip_grad_norm(self, model):
        params = self._projection_parameters()
        if not params:
            return super()._clip_grad_norm(model)
        # One norm over student and projection, as TinyBERT's BertAdam clips every parameter it updates.
        return self.accelerator.clip_grad_norm_([*model.parameters(), *params], self.args.max_grad_norm)

    def call_model_init(self, trial=None):
        model = super().call_model_init(trial)
        if self._intermediate is not None:
            # A new student (hyperparameter search trial) starts with a new projection, seeded like it.
            self._intermediate.projection.reset_parameters()
            self._projection_wrapped = None
        return model

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        if self._projection_parameters() and self.args.should_save:
            from safetensors.torch import save_file

            output_dir = output_dir if output_dir is not None else self.args.output_dir
            projection = self.intermediate_projection
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in projection.state_dict().items()},
                os.path.join(output_dir, PROJECTION_FILENAME),
                metadata={
                    "student_hidden_size": str(projection.student_hidden_size),
                    "teacher_hidden_size": str(projection.teacher_hidden_size),
                    "layer_map": ",".join(map(str, self._intermediate.layer_map)),
                },
            )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if not self._projection_parameters():
            return
        from safetensors.torch import load_file

        path = os.path.join(resume_from_checkpoint, PROJECTION_FILENAME)
        if not os.path.isfile(path):
            raise ValueError(
                f"{resume_from_checkpoint} has no {PROJECTION_FILENAME}: it was not written by a run with a learned "
                "intermediate projection, so this run cannot resume from it exactly."
            )
        self.intermediate_projection.load_state_dict(load_file(path, device=str(self.args.device)))
