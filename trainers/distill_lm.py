"""Distil a causal LM into a smaller one (or train the SFT-only baseline) with the recipe of `hf_kd.lm_recipes`.

    --method kd    DistillTrainer: alpha * T^2 * D(p_T, p_S) + (1 - alpha) * CE on the completion tokens
    --method sft   the SFT-only baseline: the same trainer with alpha = 0 (completion-token cross-entropy only)

Every flag of hf_kd.DistillConfig (so of transformers.TrainingArguments) is accepted, plus the recipe's own
(hf_kd.lm_recipes.LMScriptArguments: --student_layers, --student_rule, --dataset, ...; --lm_max_length is DistillConfig's). Examples:

    python trainers/distill_lm.py trainers/configs/distill_lm_smollm2_kd.yaml
    python trainers/distill_lm.py trainers/configs/distill_lm_smollm2_sft.yaml --max_steps 20
    accelerate launch --num_processes 1 trainers/distill_lm.py trainers/configs/distill_lm_smollm2_kd.yaml
    accelerate launch --multi_gpu --num_processes 2 trainers/distill_lm.py trainers/configs/distill_lm_smollm2_kd.yaml

Test-split metrics (perplexity, token accuracy, token ECE with 15 bins, mean entropy, top-1 agreement with the
teacher) go to `<output_dir>/test_results.json` next to the saved student, its tokenizer and its model card.
"""

import sys

from hf_kd.lm_recipes import COMMANDS
from hf_kd.recipes import parse_args


def parse_lm(argv=None):
    """`(script_args, distill_config)` of `[recipe.yaml] [--flag value ...]` ([`hf_kd.recipes.parse_args`])."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return parse_args(argv, COMMANDS["distill-lm"].dataclass_types(argv))


if __name__ == "__main__":
    COMMANDS["distill-lm"].main()
