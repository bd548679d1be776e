"""How far the 2-process runs of tests/distributed/test_scaling.py are from their 1-process runs (README "Scaling out").

    python -m pytest tests/distributed/test_scaling.py --basetemp outputs/scaling
    python scripts/tools/scaling_diffs.py outputs/scaling

For every test folder holding a 1-process run (`one/`) and a 2-process run (`two/`): the largest absolute difference
of the per-step training losses, of the per-step gradient norms, of the test metrics, and of the final weights (the
merged model for an adapter), and where the teacher's weights lived.
"""

import argparse
import json
from pathlib import Path

import torch

import hf_kd  # noqa: F401  (registers the multi-exit models with the Auto classes)

# pytest cuts the folder names to 30 characters: the tests of tests/distributed/test_scaling.py by name.
LABELS = {
    "test_ddp_lora_student_base_model_teacher": "DDP: LoRA student, teacher = its base model",
    "test_zero3_sharded_teacher_early_exit": "ZeRO-3: multi-exit student, teacher sharded",
    "test_zero3_lora_student_cached_base_model_logits": "ZeRO-3: LoRA student, cached base-model logits",
    "test_zero2_deepspeed_launcher_sharded_teacher": "ZeRO-2 (`deepspeed` launcher): teacher sharded, cached logits",
}
METRICS = ("test_loss", "test_accuracy", "test_ece", "test_nll", "test_brier", "test_entropy")


def history(run: Path) -> torch.Tensor:
    checkpoint = max(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    log = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return torch.tensor([(h["loss"], h["grad_norm"]) for h in log if "loss" in h])


def weights(run: Path) -> dict[str, torch.Tensor]:
    if (run / "adapter_config.json").is_file():
        from peft import AutoPeftModelForSequenceClassification

        return AutoPeftModelForSequenceClassification.from_pretrained(run).merge_and_unload().state_dict()
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(run).state_dict()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("basetemp", type=Path, help="The --basetemp of the pytest run.")
    opts = parser.parse_args(argv)
    print("| test | losses | gradient norms | test metrics | weights | teacher (parameters per process) |")
    print("|---|---|---|---|---|---|")
    for one in sorted(opts.basetemp.glob("*/one")):
        two = one.with_name("two")
        if one.parent.is_symlink() or not (two / "test_results.json").is_file():
            continue  # pytest's `<name>current` links repeat the numbered folders
        h1, h2 = history(one), history(two)
        r1, r2 = (json.loads((run / "test_results.json").read_text()) for run in (one, two))
        metrics = max(abs(r1[m] - r2[m]) for m in METRICS)
        w1, w2 = weights(one), weights(two)
        weight_diff = max((w1[k].float() - w2[k].float()).abs().max().item() for k in w1)
        placement = r2["teacher_placement"]
        where = placement["kind"] + (
            f" ({placement['parameters_per_process']} of {placement['parameters']})" if "parameters" in placement else ""
        )
        losses, norms = (h1 - h2).abs().max(0).values.tolist()
        folder = one.parent.name.rstrip("0123456789")
        label = next((text for name, text in LABELS.items() if name.startswith(folder)), folder)
        print(f"| {label} | {losses:.1e} | {norms:.1e} | {metrics:.1e} | {weight_diff:.1e} | {where} |")


if __name__ == "__main__":
    main()
