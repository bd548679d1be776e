"""Run by tests/distributed/test_multiprocess.py under `torchrun --nproc_per_node 2` (gloo on CPU): a tiny DistillTrainer run.

Each rank writes `rank<k>.json` with a hash of its final student weights, its teacher-weight check and its logs.
Modes: `online` (teacher forward every step), `cache` (cached teacher logits), `intermediate` (TinyBERT losses from a
wider, deeper teacher through the learned projection, whose hash is written too).
"""

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import DataCollatorWithPadding

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from hf_kd import DistillConfig, DistillTrainer, TinyBERTConfig, TinyBERTTrainer  # noqa: E402
from hf_kd.distributed import end_distributed  # noqa: E402
from tests.testing_utils import tiny_bert, tiny_dataset, tiny_tokenizer  # noqa: E402


def sha(tensors: dict) -> str:
    digest = hashlib.sha256()
    for _name, param in sorted(tensors.items()):
        digest.update(param.detach().numpy().tobytes())
    return digest.hexdigest()


def main(out_dir: str, mode: str) -> None:
    out = Path(out_dir)
    intermediate = mode == "intermediate"
    losses = dict(hidden_loss_weight=1.0, attention_loss_weight=1.0, embedding_loss_weight=1.0) if intermediate else {}
    # The intermediate mode runs TinyBERT's losses (TinyBERTTrainer); the others plain KD.
    config_class, trainer_class = (TinyBERTConfig, TinyBERTTrainer) if intermediate else (DistillConfig, DistillTrainer)
    args = config_class(
        output_dir=str(out / "run"), per_device_train_batch_size=4, per_device_eval_batch_size=4, num_train_epochs=2,
        learning_rate=1e-3, logging_steps=1, eval_strategy="epoch", save_strategy="epoch", report_to="none",
        use_cpu=True, seed=0, cache_teacher_logits=mode == "cache", teacher_logits_cache_dir=str(out / "cache"),
        ddp_backend="gloo", **losses,
    )
    tokenizer = tiny_tokenizer(out)
    teacher = tiny_bert(seed=7, layers=4, hidden=48) if intermediate else tiny_bert(seed=7)
    student = tiny_bert(seed=1)
    teacher_before = {n: p.clone() for n, p in teacher.named_parameters()}
    trainer = trainer_class(
        model=student, args=args, teacher_model=teacher, train_dataset=tiny_dataset(32),
        eval_dataset=tiny_dataset(16, seed=1), processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
    )
    train_output = trainer.train()
    metrics = trainer.evaluate()
    rank = dist.get_rank()
    result = {
        "world_size": dist.get_world_size(),
        "student_sha": sha(student.state_dict()),
        "projection_sha": sha(trainer.intermediate_projection.state_dict()) if intermediate else None,
        "teacher_unchanged": all(torch.equal(p, teacher_before[n]) for n, p in teacher.named_parameters()),
        "train_loss": train_output.training_loss,
        "eval": metrics,
        "global_step": trainer.state.global_step,
    }
    if mode == "online":
        # Resume under DDP: a new trainer from the epoch-1 checkpoint ends with the uninterrupted run's weights.
        resumed = tiny_bert(seed=3)  # other initial weights: the checkpoint must overwrite them all
        trainer = DistillTrainer(
            model=resumed, args=args, teacher_model=teacher, train_dataset=tiny_dataset(32),
            eval_dataset=tiny_dataset(16, seed=1), processing_class=tokenizer,
            data_collator=DataCollatorWithPadding(tokenizer),
        )
        trainer.train(resume_from_checkpoint=str(out / "run" / "checkpoint-4"))
        result["resumed_sha"] = sha(resumed.state_dict())
        result["resumed_max_abs_diff"] = max(
            (a - b).abs().max().item() for a, b in zip(student.state_dict().values(), resumed.state_dict().values())
        )
        result["resumed_global_step"] = trainer.state.global_step
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    end_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
