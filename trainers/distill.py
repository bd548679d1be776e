"""Train a text classifier with one of the modes of Sultan (2023, https://huggingface.co/papers/2301.12609): the
script form of `hf-kd distill` (the recipe is `hf_kd.recipes.run`; this file only calls it).

    --method erm   fine-tune with cross-entropy (also how a teacher is made)
    --method ls    cross-entropy with label smoothing (`--label_smoothing`, epsilon spread over all classes)
    --method kd    distil `--teacher_model_name_or_path` into `--model_name_or_path` with hf_kd.DistillTrainer.
                   KD, born-again KD and reverse KD differ only in the pair: big teacher -> small student, same
                   architecture, small teacher -> big student (see trainers/configs/).
    --method tinybert  the same with hf_kd.TinyBERTTrainer: TinyBERT's intermediate-layer losses (Jiao et al., 2020,
                   https://huggingface.co/papers/1909.10351; recipes trainers/configs/tinybert_*).

Every flag of hf_kd.DistillConfig (so of transformers.TrainingArguments) is accepted, and with --method tinybert every
flag of hf_kd.TinyBERTConfig; the data flags are hf_kd.recipes.DataArguments' (`--dataset_name` a built-in data set,
a Hub id or a folder; `--data_files train=... validation=...`; `--text_column`, `--label_column`, ...). Examples:

    python trainers/distill.py trainers/configs/distill_rotten_tomatoes.yaml      # = hf-kd distill --config <yaml>
    accelerate launch --multi_gpu --num_processes 2 trainers/distill.py trainers/configs/distill_rotten_tomatoes.yaml
    python trainers/distill.py --method erm --model_name_or_path sentence-transformers/all-MiniLM-L6-v2 \
        --output_dir outputs/teacher-l6 --num_train_epochs 2

Scaling out (README "Scaling out"; accelerate and DeepSpeed configs in trainers/accelerate/ and trainers/deepspeed/):

    accelerate launch --config_file trainers/accelerate/multi_process.yaml trainers/distill.py <yaml>   # DDP
    accelerate launch --config_file trainers/accelerate/deepspeed_zero3.yaml trainers/distill.py <yaml>  # ZeRO-3
    deepspeed --num_gpus 2 trainers/distill.py <yaml> --deepspeed trainers/deepspeed/zero2.json          # ZeRO-2
    python trainers/distill.py <yaml> --use_peft --lora_r 8 [--teacher_from_base_model]                 # LoRA student

Test-split metrics (accuracy, ECE with 15 bins, NLL, Brier, mean entropy, and sigma for KD) are written to
`<output_dir>/test_results.json` next to the saved model (an adapter with --use_peft) and its card, with the number of
processes and, for KD, where the teacher's weights lived (`teacher_placement`); `--report_train_sigma` adds the
training and validation splits' (sigma on the training set is the confidence-preservation property of Vengertsev &
Sherman 2024).

`--resume_from_checkpoint latest` resumes from the newest complete `checkpoint-<step>` of `--output_dir` (or starts
afresh when there is none yet), so that one command line both starts and restarts a preemptible job; a path resumes
from that checkpoint. Every file of the checkpoint is checked first (hf_kd.checkpoints.verify_checkpoint).
"""

import sys

# The recipe itself is hf_kd.recipes (shared with `hf-kd distill`, trainers/early_exit.py, trainers/main_job.py and
# scripts/studies/); its names stay importable from here.
from hf_kd.peft_utils import LoraArguments  # noqa: F401
from hf_kd.recipes import (  # noqa: F401
    COMMANDS,
    DATASETS,
    DISTILL_METHODS,
    DataArguments,
    ScriptArguments,
    build_trainer,
    distill_dataclass_types,
    finish,
    label_kwargs,
    load_splits,
    parse_args,
    run,
)


def parse(argv=None, dataclass_types=None):
    """Parse `[recipe.yaml] [--flag value ...]` ([`hf_kd.recipes.parse_args`]). `dataclass_types` defaults to
    `(ScriptArguments, <the method's config>, LoraArguments)`, the config being `TinyBERTConfig` for `--method
    tinybert` and `DistillConfig` otherwise."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return parse_args(argv, dataclass_types or distill_dataclass_types(argv))


if __name__ == "__main__":
    COMMANDS["distill"].main()
