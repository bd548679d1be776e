"""Run by tests/test_faults.py as a subprocess: a tiny training run that the test kills with SIGKILL and resumes.

    python tests/fault_driver.py <case> <out_dir> [--slow] [--resume]

Cases: `distill_cached` and `distill_online` (DistillTrainer, cached / online teacher), `distill_lm_cached` and
`distill_lm_online` (DistillTrainer with tiny Llama causal LMs: the top-k teacher-logit cache / a live teacher),
`early_exit_dedier` (EarlyExitTrainer distilling a teacher with DEDIER re-weighting) and `self_kd` (SelfKDTrainer with
re-calibration). Each trains on 32 rows (8 steps per epoch) and saves a checkpoint every 3 steps, so checkpoints fall
mid-epoch.
`cli <recipe>` runs `trainers/<recipe>.py` (`distill` or `early_exit`; argv after `--`) as `__main__`, slowed down
the same way with `--slow`.

`--slow` sleeps 0.5 s after every step from step 3 on (after `checkpoint-3` is saved): the test then has time to
kill the run mid-epoch (a sleep changes nothing in the numbers). `--resume` resumes from the newest complete
checkpoint of `<out_dir>/run` (`resume_from_checkpoint="latest"`). At the end the run writes `<out_dir>/result.json`
(evaluation metrics, global step, the trainer-state callbacks' state) and `<out_dir>/final.safetensors` (weights).
The test computes the uninterrupted reference in its own process with [`train_case`].
"""

import json
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from safetensors.torch import save_file
from transformers import DataCollatorWithPadding, TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_kd import (  # noqa: E402
    DistillConfig,
    DistillTrainer,
    EarlyExitConfig,
    EarlyExitTrainer,
    MultiExitConfig,
    MultiExitForSequenceClassification,
    SelfKDConfig,
    SelfKDTrainer,
)
from tests.testing_utils import tiny_bert, tiny_dataset, tiny_llama, tiny_tokenizer  # noqa: E402

CASES = ("distill_cached", "distill_online", "distill_lm_cached", "distill_lm_online", "early_exit_dedier", "self_kd")
SAVE_STEPS = 3
SLOW_FROM_STEP = 3


class SlowDown(TrainerCallback):
    """Sleep after every step from `SLOW_FROM_STEP` on, so that the killing test catches the run mid-epoch."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= SLOW_FROM_STEP:
            time.sleep(0.5)


def tiny_multi_exit(layers: int, seed: int = 1) -> MultiExitForSequenceClassification:
    torch.manual_seed(seed)
    backbone = dict(vocab_size=99, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                    intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.1,
                    attention_probs_dropout_prob=0.0, model_type="bert")
    return MultiExitForSequenceClassification(MultiExitConfig(backbone_config=backbone, num_labels=2))


def causal_lm_rows(n: int, seed: int) -> datasets.Dataset:
    """`n` pre-tokenized rows of 6-14 random token ids (vocab 64, ids >= 3), a random prompt of 1-4 tokens masked."""
    rng = np.random.default_rng(seed)
    lengths, prompts = rng.integers(6, 15, size=n), rng.integers(1, 5, size=n)
    ids = [rng.integers(3, 64, size=int(length)).tolist() for length in lengths]
    return datasets.Dataset.from_dict({
        "input_ids": ids, "attention_mask": [[1] * len(row) for row in ids],
        "labels": [[-100] * int(p) + row[int(p):] for row, p in zip(ids, prompts)],
    })


def dropout_llama(seed: int, layers: int = 2):
    """[`tiny_llama`] with attention dropout 0.1 (so that the resumed RNG state matters)."""
    model = tiny_llama(layers=layers, seed=seed, tie_word_embeddings=False)
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:  # read from the config when the layers are built
        layer.self_attn.attention_dropout = 0.1
    return model


def build(case: str, out: Path, slow: bool = False):
    """The trainer of `case` writing into `out/run` (dropout on, so the resumed RNG state matters too)."""
    common = dict(
        output_dir=str(out / "run"), per_device_train_batch_size=4, per_device_eval_batch_size=8, learning_rate=1e-3,
        logging_steps=1, save_strategy="steps", save_steps=SAVE_STEPS, report_to="none", use_cpu=True, seed=0,
        disable_tqdm=True, eval_strategy="no",
    )
    callbacks = [SlowDown()] if slow else None
    if case.startswith("distill_lm"):  # causal LMs, the default collator (LMDataCollator, pad id 0 from the config)
        args = DistillConfig(num_train_epochs=2, cache_teacher_logits=case == "distill_lm_cached", lm_cache_top_k=8,
                             teacher_logits_cache_dir=str(out / "cache"), temperature=1.5, alpha=0.7, **common)
        return DistillTrainer(model=dropout_llama(seed=1), args=args, teacher_model=dropout_llama(seed=7, layers=3),
                              train_dataset=causal_lm_rows(32, seed=0), eval_dataset=causal_lm_rows(16, seed=1),
                              callbacks=callbacks)
    tokenizer = tiny_tokenizer(out)
    data = dict(
        train_dataset=tiny_dataset(32), eval_dataset=tiny_dataset(16, seed=1), processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer), callbacks=callbacks,
    )
    if case.startswith("distill"):
        args = DistillConfig(num_train_epochs=2, cache_teacher_logits=case == "distill_cached",
                             teacher_logits_cache_dir=str(out / "cache"), **common)
        return DistillTrainer(model=tiny_bert(seed=1, dropout=0.1), args=args, teacher_model=tiny_bert(seed=7), **data)
    if case == "early_exit_dedier":
        args = EarlyExitConfig(num_train_epochs=3, distill_from="teacher", dedier=True, dedier_readout_lr=1e-2,
                               **common)
        return EarlyExitTrainer(model=tiny_multi_exit(3), args=args, teacher_model=tiny_bert(seed=7), **data)
    if case == "self_kd":
        args = SelfKDConfig(num_train_epochs=4, warmup_max_epochs=2, recalibration_percent=25.0, **common)
        return SelfKDTrainer(model=tiny_multi_exit(4), args=args, **data)
    raise ValueError(f"case must be one of {CASES}, got {case!r}")


def train_case(case: str, out: Path, slow: bool = False, resume: bool = False) -> tuple[dict, dict]:
    """Train (or resume) `case`; return `(result, final weights)` and write them under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    trainer = build(case, out, slow)
    trainer.train(resume_from_checkpoint="latest" if resume else None)
    callbacks = {type(cb).__name__: cb.state() for cb in getattr(trainer, "_training_state_callbacks", ())}
    result = {"eval": trainer.evaluate(), "global_step": trainer.state.global_step, "callbacks": callbacks,
              "resumed_from": trainer._resumed_from}
    for key in ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second"):
        result["eval"].pop(key, None)
    weights = {k: v.detach().clone().contiguous() for k, v in trainer.model.state_dict().items()}
    (out / "result.json").write_text(json.dumps(result))
    save_file(weights, out / "final.safetensors")
    return result, weights


RECIPES = {"distill": DistillTrainer, "early_exit": EarlyExitTrainer}


def run_recipe(recipe: str, argv: list[str], slow: bool) -> None:
    """`python trainers/<recipe>.py <argv>`, with the recipe trainer's steps slowed down like [`SlowDown`] when
    `slow`."""
    import runpy

    if slow:
        trainer_class = RECIPES[recipe]
        step = trainer_class.training_step

        def slow_step(self, *args, **kwargs):
            if self.state.global_step >= SLOW_FROM_STEP:
                time.sleep(0.5)
            return step(self, *args, **kwargs)

        trainer_class.training_step = slow_step
    sys.argv = [f"trainers/{recipe}.py", *argv]
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "trainers" / f"{recipe}.py"), run_name="__main__")


if __name__ == "__main__":
    torch.set_num_threads(1)
    flags, rest = (sys.argv[1:sys.argv.index("--")], sys.argv[sys.argv.index("--") + 1:]) if "--" in sys.argv else (
        sys.argv[1:], [])
    if flags[0] == "cli":
        run_recipe(flags[1], rest, slow="--slow" in flags)
    else:
        train_case(flags[0], Path(flags[1]), slow="--slow" in flags, resume="--resume" in flags)
