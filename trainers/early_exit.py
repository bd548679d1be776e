"""Train a multi-exit text classifier with hf_kd.EarlyExitTrainer (DeeBERT / PABEE joint training of every exit,
https://huggingface.co/papers/2004.12993, https://huggingface.co/papers/2006.04152), optionally distilling a
teacher into every exit (`--distill_from teacher`) or the final exit into the earlier ones (`--distill_from
final_exit`): the script form of `hf-kd early-exit` (the recipe is `hf_kd.recipes.run_early_exit`).

`--model_name_or_path` is an encoder (exits are put on it with `MultiExitForSequenceClassification.from_backbone`,
after the layers of `--exit_layers`) or a saved multi-exit model. Every flag of hf_kd.EarlyExitConfig (so of
transformers.TrainingArguments) and of hf_kd.recipes.DataArguments is accepted, and a YAML recipe may come first.
Examples:

    python trainers/early_exit.py trainers/configs/early_exit_rotten_tomatoes.yaml   # = hf-kd early-exit --config ...
    accelerate launch --config_file trainers/accelerate/multi_process.yaml trainers/early_exit.py \\
        trainers/configs/early_exit_rotten_tomatoes.yaml
    accelerate launch --config_file trainers/accelerate/deepspeed_zero3.yaml trainers/early_exit.py \\
        trainers/configs/early_exit_rotten_tomatoes.yaml
    deepspeed --num_gpus 2 trainers/early_exit.py trainers/configs/early_exit_rotten_tomatoes.yaml \\
        --deepspeed trainers/deepspeed/zero2.json

Test-split metrics (final exit: accuracy, ECE with 15 bins, NLL, Brier, entropy; every exit's accuracy, ECE and
entropy) are written to `<output_dir>/test_results.json` next to the saved model and its card, with the number of
processes and, with a teacher, where its weights lived (`teacher_placement`). `--resume_from_checkpoint latest`
resumes from the newest complete checkpoint of `--output_dir`, or starts afresh (see trainers/distill.py).
"""

import sys

from hf_kd import EarlyExitConfig
from hf_kd.peft_utils import LoraArguments
from hf_kd.recipes import COMMANDS, build_multi_exit_model, parse_args, run_early_exit
from hf_kd.recipes import MultiExitScriptArguments as EarlyExitScriptArguments

build_model, run = build_multi_exit_model, run_early_exit  # the names this script had


def parse(argv=None, dataclass_types=(EarlyExitScriptArguments, EarlyExitConfig, LoraArguments)):
    """Parse `[recipe.yaml] [--flag value ...]` ([`hf_kd.recipes.parse_args`]) into `dataclass_types`."""
    return parse_args(sys.argv[1:] if argv is None else argv, dataclass_types)

if __name__ == "__main__":
    COMMANDS["early-exit"].main()
