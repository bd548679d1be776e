"""Distil a causal LM into a smaller one (or train the SFT-only baseline) with the recipe of `hf_kd.lm_recipes`.

    --method kd    DistillTrainer: alpha * T^2 * D(p_T, p_S) + (1 - alpha) * CE on the completion tokens
    --method sft   the SFT-only baseline: the same trainer with alpha = 0 (completion-token cross-entropy only)

Every flag of hf_kd.DistillConfig (so of transformers.TrainingArguments) is accepted, plus the recipe's own
(hf_kd.lm_recipes.LMScriptArguments: --student_layers, --student_rule, --dataset, --max_length, ...). Examples:

    python trainers/distill_lm.py trainers/configs/distill_lm_smollm2_kd.yaml
    python trainers/distill_lm.py trainers/configs/distill_lm_smollm2_sft.yaml --max_steps 20
    accelerate launch --num_processes 1 trainers/distill_lm.py trainers/configs/distill_lm_smollm2_kd.yaml
    accelerate launch --multi_gpu --num_processes 2 trainers/distill_lm.py trainers/configs/distill_lm_smollm2_kd.yaml

Test-split metrics (perplexity, token accuracy, token ECE with 15 bins, mean entropy, top-1 agreement with the
teacher) go to `<output_dir>/test_results.json` next to the saved student, its tokenizer and its model card.
"""

import sys

from distill import parse  # trainers/distill.py: YAML recipe first, flags override it

from hf_kd.distributed import end_distributed
from hf_kd.lm_recipes import lm_dataclass_types, resolve_max_length, run_lm


def parse_lm(argv=None):
    """`(script_args, distill_config, max_length)` of `[recipe.yaml] [--flag value ...]`."""
    script_args, args, *length_args = parse(sys.argv[1:] if argv is None else argv, lm_dataclass_types())
    return script_args, args, resolve_max_length(args, *length_args)


if __name__ == "__main__":
    run_lm(*parse_lm())
    end_distributed()
