"""Train a text classifier with one of the modes of Sultan (2023, https://huggingface.co/papers/2301.12609).

    --method erm   fine-tune with cross-entropy (also how a teacher is made)
    --method ls    cross-entropy with label smoothing (`--label_smoothing`, epsilon spread over all classes)
    --method kd    distil `--teacher_model_name_or_path` into `--model_name_or_path` with hf_kd.DistillTrainer.
                   KD, self-KD and reverse KD differ only in the pair: big teacher -> small student, same
                   architecture, small teacher -> big student (see trainers/configs/).
    --method tinybert  the same with hf_kd.TinyBERTTrainer: TinyBERT's intermediate-layer losses (Jiao et al., 2020,
                   https://huggingface.co/papers/1909.10351; recipes trainers/configs/tinybert_*).

Every flag of hf_kd.DistillConfig (so of transformers.TrainingArguments) is accepted, and with --method tinybert every
flag of hf_kd.TinyBERTConfig. Examples:

    python trainers/distill.py trainers/configs/distill_rotten_tomatoes.yaml
    accelerate launch --multi_gpu --num_processes 2 trainers/distill.py trainers/configs/distill_rotten_tomatoes.yaml
    python trainers/distill.py --method erm --model_name_or_path sentence-transformers/all-MiniLM-L6-v2 \
        --output_dir outputs/teacher-l6 --num_train_epochs 2

Scaling out (README "Scaling out"; accelerate and DeepSpeed configs in trainers/accelerate/ and trainers/deepspeed/):

    accelerate launch --config_file trainers/accelerate/multi_process.yaml trainers/distill.py <yaml>   # DDP
    accelerate launch --config_file trainers/accelerate/deepspeed_zero3.yaml trainers/distill.py <yaml>  # ZeRO-3
    deepspeed --num_gpus 2 trainers/distill.py <yaml> --deepspeed trainers/deepspeed/zero2.json          # ZeRO-2
    python trainers/distill.py <yaml> --use_peft --lora_r 8 [--teacher_from_base_model]                 # LoRA student

Test-split metrics (accuracy, ECE with 15 bins, NLL, Brier, mean entropy, and sigma for KD) are written to
`<output_dir>/test_results.json` next to the saved model (an adapter with --use_peft), with the number of processes
and, for KD, where the teacher's weights lived (`teacher_placement`); `--report_train_sigma` adds the training and
validation splits' (sigma on the training set is the confidence-preservation property of Vengertsev & Sherman 2024).

`--resume_from_checkpoint latest` resumes from the newest complete `checkpoint-<step>` of `--output_dir` (or starts
afresh when there is none yet), so that one command line both starts and restarts a preemptible job; a path resumes
from that checkpoint. Every file of the checkpoint is checked first (hf_kd.checkpoints.verify_checkpoint).
"""

import json
import os
import sys
from dataclasses import dataclass, field, fields

from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

from hf_kd import DistillConfig, DistillTrainer, TinyBERTConfig, TinyBERTTrainer, data, make_compute_metrics
from hf_kd.checkpoints import resolve_resume_checkpoint
from hf_kd.distributed import end_distributed
from hf_kd.peft_utils import LoraArguments, get_peft_config

DATASETS = {
    "rotten_tomatoes": data.load_rotten_tomatoes,
    "crowdflower_tweets": data.load_crowdflower_tweets,
    "bbc_news": data.load_bbc_news,
}
METHODS = ("erm", "ls", "kd", "tinybert")
# The distillation methods: their config (parsed from the flags) and trainer.
DISTILL_METHODS = {"kd": (DistillConfig, DistillTrainer), "tinybert": (TinyBERTConfig, TinyBERTTrainer)}


@dataclass
class DataArguments:
    """The data flags every recipe shares (trainers/early_exit.py too)."""

    dataset_name: str = field(default="rotten_tomatoes", metadata={"help": f"One of {sorted(DATASETS)}."})
    max_length: int = field(default=64, metadata={"help": "Truncation length in tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use the first N validation/test rows."})
    split_seed: int = field(default=42, metadata={"help": "Seed of the train/validation/test split."})
    report_train_sigma: bool = field(
        default=False,
        metadata={
            "help": "KD (kd, tinybert) only: also evaluate the training and validation splits (confidence preservation sigma is "
            "defined on the training set, Vengertsev & Sherman 2024) into test_results.json as train_* / eval_*."
        },
    )

    def __post_init__(self):
        if self.dataset_name not in DATASETS:
            raise ValueError(f"dataset_name must be one of {sorted(DATASETS)}, got {self.dataset_name!r}")


@dataclass
class ScriptArguments(DataArguments):
    model_name_or_path: str = field(
        default="sentence-transformers/paraphrase-MiniLM-L3-v2", metadata={"help": "Student (or ERM/LS model)."}
    )
    method: str = field(default="kd", metadata={"help": f"One of {METHODS}."})
    label_smoothing: float = field(default=0.1, metadata={"help": "Epsilon of --method ls."})

    def __post_init__(self):
        super().__post_init__()
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")


def load_splits(script_args: DataArguments, tokenizer):
    splits = DATASETS[script_args.dataset_name](seed=script_args.split_seed)
    limits = {"train": script_args.max_train_samples}
    limits["validation"] = limits["test"] = script_args.max_eval_samples
    for name, limit in limits.items():
        if limit is not None:
            # Rows are grouped by source (e.g. by movie): shuffle before cutting so a slice is representative.
            shuffled = splits[name].shuffle(seed=script_args.split_seed)
            splits[name] = shuffled.select(range(min(limit, len(shuffled)))).flatten_indices()
    return splits.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=script_args.max_length),
        batched=True,
        desc="Tokenizing",
    )


def label_kwargs(splits) -> dict:
    """`num_labels`, `id2label` and `label2id` of the train split's `label` feature."""
    names = splits["train"].features["label"].names
    return {"num_labels": len(names), "id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def build_trainer(script_args: ScriptArguments, args: DistillConfig, splits, tokenizer, peft_config=None):
    set_seed(args.seed)  # a fresh classifier: the same initialisation on every process count and launcher
    model = AutoModelForSequenceClassification.from_pretrained(script_args.model_name_or_path, **label_kwargs(splits))
    common = dict(
        model=model,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    if script_args.method in DISTILL_METHODS:
        trainer_class = DISTILL_METHODS[script_args.method][1]
        return trainer_class(args=args, peft_config=peft_config, **common)
    if peft_config is not None:
        raise ValueError(
            f"--use_peft is for --method kd or tinybert (hf_kd's trainers), got --method {script_args.method}"
        )
    # The baselines use the stock Trainer: hf_kd adds nothing to plain cross-entropy but its metrics.
    plain = {f.name: getattr(args, f.name) for f in fields(TrainingArguments) if f.init}
    plain["label_smoothing_factor"] = script_args.label_smoothing if script_args.method == "ls" else 0.0
    return Trainer(args=TrainingArguments(**plain), compute_metrics=make_compute_metrics(), **common)


def finish(trainer, args, test, summary: dict, extra_metrics: dict | None = None) -> dict:
    """Evaluate on the test split, save the model (an adapter for PEFT students) and `test_results.json` (`summary`,
    the number of processes, the teacher's placement, the test metrics); return the test metrics."""
    metrics = {**trainer.evaluate(test, metric_key_prefix="test"), **(extra_metrics or {})}
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        summary = {**summary, "num_processes": trainer.accelerator.num_processes}
        if hasattr(trainer, "teacher_placement"):
            summary["teacher_placement"] = trainer.teacher_placement
        with open(os.path.join(args.output_dir, "test_results.json"), "w") as f:
            json.dump({**summary, **metrics}, f, indent=2)
    return metrics


def run(script_args: ScriptArguments, args: DistillConfig, lora_args: LoraArguments | None = None) -> dict:
    """Train, evaluate on the test split, save model + tokenizer + `test_results.json`; return the test metrics."""
    tokenizer = AutoTokenizer.from_pretrained(script_args.model_name_or_path)
    splits = load_splits(script_args, tokenizer)
    peft_config = get_peft_config(lora_args) if lora_args is not None else None
    trainer = build_trainer(script_args, args, splits, tokenizer, peft_config)
    # --resume_from_checkpoint latest: resume from the newest complete checkpoint of output_dir, or start afresh.
    trainer.train(resume_from_checkpoint=resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir))
    extra = {}
    if script_args.report_train_sigma and script_args.method in DISTILL_METHODS:
        for split, prefix in (("train", "train"), ("validation", "eval")):
            extra.update(trainer.evaluate(splits[split], metric_key_prefix=prefix))
    summary = {"method": script_args.method, "model": script_args.model_name_or_path}
    return finish(trainer, args, splits["test"], summary, extra)


def parse(argv=None, dataclass_types=None):
    """Parse `[recipe.yaml] [--flag value ...]`: the YAML recipe's keys as flags, overridden by the flags after it.
    `dataclass_types` defaults to `(ScriptArguments, <the method's config>, LoraArguments)`, the config being
    [`TinyBERTConfig`] for `--method tinybert` and [`DistillConfig`] otherwise."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # The `deepspeed` launcher puts --local_rank=N before the script's own arguments.
    launcher = [a for a in argv if a.startswith("--local_rank=")]
    argv = [a for a in argv if not a.startswith("--local_rank=")] + launcher
    if len(argv) >= 1 and argv[0].endswith((".yaml", ".yml")):
        # YAML recipe first, command-line flags override it.
        import yaml

        with open(argv[0]) as f:
            config = yaml.safe_load(f)
        flags = []
        for key, value in config.items():
            if isinstance(value, list):
                flags += [f"--{key}", *map(str, value)]
            else:
                flags += [f"--{key}", json.dumps(value) if isinstance(value, dict) else str(value)]
        argv = flags + list(argv[1:])
    if dataclass_types is None:
        # The last --method wins, as in argparse; --method=x is read too.
        method = "kd"
        for i, arg in enumerate(argv):
            if arg == "--method" and i + 1 < len(argv):
                method = argv[i + 1]
            elif arg.startswith("--method="):
                method = arg.split("=", 1)[1]
        config_class = DISTILL_METHODS.get(method, (DistillConfig,))[0]
        dataclass_types = (ScriptArguments, config_class, LoraArguments)
    return HfArgumentParser(dataclass_types).parse_args_into_dataclasses(args=argv)


if __name__ == "__main__":
    run(*parse())
    end_distributed()
