"""Run by tests/distributed/test_multiprocess.py, under `torchrun --nproc_per_node 2` (gloo on CPU) or as a plain
1-process script: a tiny causal-LM DistillTrainer run on one global batch of 8 rows per optimizer step (4 rows per
micro-batch over all processes, 2 accumulated micro-batches), whatever the number of processes.

Modes:
- `supervised`: the dataset's completions (uneven prompt and completion lengths, so each process counts another
  number of tokens: the loss is exact only through `num_items_in_batch` gathered over the processes);
- `on_policy`: `lmbda=1`, greedy student generations stopping at a frequent token, so the generated lengths differ by
  row and process and `num_items_in_batch` must be counted on the generated labels;
- `zero3`: DeepSpeed ZeRO-3 (student and teacher sharded), `lmbda=0.5` with sampled generations and several EOS ids,
  so the processes finish generating at different steps (`generate(synced_gpus=True)`);
- `early_exit`: an `EarlyExitTrainer` run instead, a `MultiExitForCausalLM` student (exit after layer 1 with an
  adapter) distilled from its final exit, the shared LM head run inside the loss (`lm_fused_head`'s default): under
  DDP the skipped head's weight must still count as used.

Each process writes `rank<k>.json` (per-step loss and gradient norm; per step, each micro-batch's data source, token
count and longest completion; the teacher placement) and the main process saves the final student in `<out>/student`.
"""

import json
import os
import sys
from pathlib import Path

import datasets
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from hf_kd import (  # noqa: E402
    DistillConfig,
    DistillTrainer,
    EarlyExitConfig,
    EarlyExitTrainer,
    MultiExitForCausalLM,
)
from hf_kd.distributed import end_distributed  # noqa: E402
from tests.testing_utils import tiny_llama  # noqa: E402

VOCAB = 64


def rows(n=16, seed=0):
    """Rows of 5 to 12 tokens whose first 1 to length-2 tokens are the prompt (-100)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(5, 13))
        ids = rng.integers(3, VOCAB, size=length).tolist()
        prompt = int(rng.integers(1, length - 1))
        out.append({"input_ids": ids, "attention_mask": [1] * length, "labels": [-100] * prompt + ids[prompt:]})
    return datasets.Dataset.from_list(out)


def collate(batch_rows):
    """Right padding: pad id 0, attention 0, label -100."""
    width = max(len(r["input_ids"]) for r in batch_rows)

    def pad(key, value):
        return torch.tensor([r[key] + [value] * (width - len(r[key])) for r in batch_rows])

    return {"input_ids": pad("input_ids", 0), "attention_mask": pad("attention_mask", 0), "labels": pad("labels", -100)}


def frequent_greedy_token(model, data) -> int:
    """The token `model` generates most often greedily from the rows' prompts: as EOS it ends generations early."""
    counts = np.zeros(VOCAB, dtype=int)
    model.eval()
    with torch.no_grad():
        for row in data:
            prompt = torch.tensor([row["input_ids"][: next(i for i, t in enumerate(row["labels"]) if t != -100)]])
            out = model.generate(input_ids=prompt, do_sample=False, max_new_tokens=6, pad_token_id=0)
            counts += np.bincount(out[0, prompt.shape[1]:].numpy(), minlength=VOCAB)
    model.train()
    return int(counts.argmax())


def main(out_dir: str, mode: str) -> None:
    out = Path(out_dir)
    student, teacher = tiny_llama(layers=2, seed=1, tie_word_embeddings=False), tiny_llama(layers=3, seed=0)
    data = rows()
    generation = {}
    if mode == "on_policy":
        generation = dict(lmbda=1.0, max_new_tokens=6, generation_temperature=0.0)
        student.generation_config.eos_token_id = frequent_greedy_token(student, data)
    elif mode == "zero3":
        generation = dict(lmbda=0.5, max_new_tokens=6)
        student.generation_config.eos_token_id = list(range(2, 34))  # about half the sampled tokens end a completion
    # One global micro-batch of 4 rows: 4 on 1 process, 2 on each of 2.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    per_device = 4 // world_size
    common = dict(
        output_dir=str(out / "run"), per_device_train_batch_size=per_device, gradient_accumulation_steps=2, num_train_epochs=2,
        learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        ddp_backend="gloo" if world_size > 1 else None, alpha=0.5, temperature=2.0,
    )
    if mode == "early_exit":
        student = MultiExitForCausalLM.from_backbone(student, exit_layers=[1], exit_adapter="linear")
        args = EarlyExitConfig(**common, distill_from="final_exit")
        trainer = EarlyExitTrainer(model=student, args=args, train_dataset=data, data_collator=collate)
    else:
        args = DistillConfig(
            **common, deepspeed=str(ROOT / "trainers" / "deepspeed" / "zero3.json") if mode == "zero3" else None,
            **generation,
        )
        trainer = DistillTrainer(model=student, args=args, teacher_model=teacher, train_dataset=data,
                                 data_collator=collate)
    generated = []
    get_batch_samples = trainer.get_batch_samples

    def recording(*a, **k):
        batches, num_items = get_batch_samples(*a, **k)
        generated.append({
            "sources": [trainer._completion_source(i) for i in range(len(batches))] if mode != "early_exit" else [],
            "num_items": int(num_items),
            "local_items": [int((b["labels"][:, 1:] != -100).sum()) for b in batches],
            # The longest completion of each micro-batch: for a generated one, the generation steps this process took.
            "longest": [int((b["labels"] != -100).sum(1).max()) for b in batches],
        })
        return batches, num_items

    trainer.get_batch_samples = recording
    trainer.train()
    trainer.save_model(str(out / "student"))
    result = {
        "world_size": args.world_size,
        "global_step": trainer.state.global_step,
        "history": [[h["loss"], h["grad_norm"]] for h in trainer.state.log_history if "loss" in h],
        "on_policy": [h["on_policy"] for h in trainer.state.log_history if "on_policy" in h],
        "generated": generated,
        "teacher_placement": trainer.teacher_placement,
    }
    (out / f"rank{args.process_index}.json").write_text(json.dumps(result))
    end_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
