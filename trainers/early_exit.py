"""Train a multi-exit text classifier with hf_kd.EarlyExitTrainer (DeeBERT / PABEE joint training of every exit,
https://huggingface.co/papers/2004.12993, https://huggingface.co/papers/2006.04152), optionally distilling a
teacher into every exit (`--distill_from teacher`) or the final exit into the earlier ones (`--distill_from
final_exit`).

`--model_name_or_path` is an encoder (exits are put on it with `MultiExitForSequenceClassification.from_backbone`,
after the layers of `--exit_layers`) or a saved multi-exit model. Every flag of hf_kd.EarlyExitConfig (so of
transformers.TrainingArguments) is accepted, and a YAML recipe may come first. Examples:

    python trainers/early_exit.py trainers/configs/early_exit_rotten_tomatoes.yaml
    accelerate launch --config_file trainers/accelerate/multi_process.yaml trainers/early_exit.py \\
        trainers/configs/early_exit_rotten_tomatoes.yaml
    accelerate launch --config_file trainers/accelerate/deepspeed_zero3.yaml trainers/early_exit.py \\
        trainers/configs/early_exit_rotten_tomatoes.yaml
    deepspeed --num_gpus 2 trainers/early_exit.py trainers/configs/early_exit_rotten_tomatoes.yaml \\
        --deepspeed trainers/deepspeed/zero2.json

Test-split metrics (final exit: accuracy, ECE with 15 bins, NLL, Brier, entropy; every exit's accuracy, ECE and
entropy) are written to `<output_dir>/test_results.json` next to the saved model, with the number of processes and,
with a teacher, where its weights lived (`teacher_placement`). `--resume_from_checkpoint latest` resumes from the
newest complete checkpoint of `--output_dir`, or starts afresh (see trainers/distill.py).
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # trainers/ is a folder of scripts, not a package
from distill import parse  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    set_seed,
)

from hf_kd import EarlyExitConfig, EarlyExitTrainer, MultiExitConfig, MultiExitForSequenceClassification  # noqa: E402
from hf_kd.checkpoints import resolve_resume_checkpoint  # noqa: E402
from hf_kd.distributed import end_distributed  # noqa: E402
from hf_kd.offline_models import placed_model_kwargs  # noqa: E402
from hf_kd.peft_utils import LoraArguments, get_peft_config  # noqa: E402
from hf_kd.recipes import DataArguments, finish, label_kwargs, load_splits  # noqa: E402


@dataclass
class EarlyExitScriptArguments(DataArguments):
    model_name_or_path: str = field(
        default="sentence-transformers/paraphrase-MiniLM-L3-v2",
        metadata={"help": "Encoder to put exits on (Hub id or path), or a saved multi-exit model."},
    )
    exit_layers: list[int] | None = field(
        default=None, metadata={"help": "1-based layers followed by an exit (the last layer always is); default: all."}
    )


def build_model(script_args: EarlyExitScriptArguments, args: EarlyExitConfig, splits, peft: bool):
    """A saved multi-exit model as is, or exits on an encoder. A LoRA adapter names the model it adapts: exits built
    here are saved to `<output_dir>/base_model` first, so that the adapter reloads onto them."""
    name = script_args.model_name_or_path
    if AutoConfig.from_pretrained(name, **placed_model_kwargs(name)).model_type == MultiExitConfig.model_type:
        return AutoModelForSequenceClassification.from_pretrained(name, **placed_model_kwargs(name, model=True))
    model = MultiExitForSequenceClassification.from_backbone(
        name, exit_layers=script_args.exit_layers, backbone_kwargs=placed_model_kwargs(name, model=True),
        **label_kwargs(splits),
    )
    if peft:
        base = Path(args.output_dir) / "base_model"
        if args.should_save:
            model.save_pretrained(base)
        model.config._name_or_path = str(base)  # every process built the same model (same seed)
    return model


def run(script_args: EarlyExitScriptArguments, args: EarlyExitConfig, lora_args: LoraArguments | None = None) -> dict:
    """Train, evaluate on the test split, save model + tokenizer + `test_results.json`; return the test metrics."""
    tokenizer = AutoTokenizer.from_pretrained(script_args.model_name_or_path, **placed_model_kwargs(script_args.model_name_or_path))
    splits = load_splits(script_args, tokenizer)
    set_seed(args.seed)  # fresh exit heads: the same initialisation on every process count and launcher
    peft_config = get_peft_config(lora_args) if lora_args is not None else None
    trainer = EarlyExitTrainer(
        model=build_model(script_args, args, splits, peft=peft_config is not None),
        args=args,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        peft_config=peft_config,
    )
    # --resume_from_checkpoint latest: resume from the newest complete checkpoint of output_dir, or start afresh.
    trainer.train(resume_from_checkpoint=resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir))
    summary = {"method": "early_exit", "distill_from": args.distill_from, "model": script_args.model_name_or_path}
    return finish(trainer, args, splits["test"], summary)


if __name__ == "__main__":
    run(*parse(dataclass_types=(EarlyExitScriptArguments, EarlyExitConfig, LoraArguments)))
    end_distributed()
