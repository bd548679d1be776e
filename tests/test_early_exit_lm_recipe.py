"""`hf-kd early-exit-lm` (hf_kd.lm_recipes.run_early_exit_lm, trainers/configs/early_exit_lm_*.yaml, issue 18): exits
on a tiny Llama over SmolLM2's vocabulary, trained for two steps on real BBC articles, calibrated per exit on the
validation split, thresholds certified on the other half of the validation split, saved and reloaded; its YAML recipe; its errors on bad
input, before any training."""

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_kd import EarlyExitConfig, MultiExitForCausalLM
from hf_kd.cli import main
from hf_kd.lm_data import lm_text_dataset
from hf_kd.lm_recipes import COMMANDS, EarlyExitLMScriptArguments
from hf_kd.recipes import parse_args

from .testing_utils import SMOLLM2, causal_lm_tokenizer, tiny_llama, write_rows

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "trainers" / "configs" / "early_exit_lm_smollm2.yaml"
RUN = ["--lm_max_length", "24", "--max_train_samples", "8", "--max_eval_samples", "4", "--max_steps", "2",
       "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--learning_rate", "1e-2",
       "--use_cpu", "true", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    """A 4-layer tiny Llama over SmolLM2's vocabulary, saved with SmolLM2's tokenizer (the recipe reads the data with
    the real tokenizer, so the ids must fit the model's vocabulary)."""
    tokenizer = causal_lm_tokenizer(SMOLLM2)
    path = tmp_path_factory.mktemp("early_exit_lm") / "backbone"
    tiny_llama(layers=4, seed=0, vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_ok(argv, capsys) -> str:
    status = main(argv)
    out, err = capsys.readouterr()
    assert status == 0, err[-3000:]
    return out


def error_of(argv, capsys) -> str:
    """Exit status 1 and one `hf-kd early-exit-lm: error: ...` line, no traceback."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("hf-kd early-exit-lm: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_frozen_backbone_self_distilled_exits_calibrated_and_thresholded(tmp_path, backbone_dir, capsys):
    """Adapters on exits 1 and 2 of the 4 layers, backbone frozen, distilled from the final exit; then the
    temperatures in the config, the per-exit calibration in the card, thresholds that generate(early_exit="confident")
    reads, the table on stdout."""
    out = tmp_path / "out"
    printed = run_ok(["early-exit-lm", "--model_name_or_path", str(backbone_dir), "--exit_layers", "1", "2",
                      "--exit_adapter", "low_rank", "--exit_adapter_rank", "4", "--freeze_backbone", "true",
                      "--distill_from", "final_exit", "--alpha", "1.0", "--exit_loss_weights", "1,1,0",
                      "--exit_epsilon", "0.3", "--exit_delta", "0.3", "--output_dir", str(out), *RUN], capsys)

    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, MultiExitForCausalLM) and model.config.exit_layers == [1, 2, 4]
    results = json.loads((out / "test_results.json").read_text())
    calibration = json.loads((out / "exit_calibration.json").read_text())
    temperatures = calibration["temperatures"]
    # With thresholds the validation split is halved: temperatures on the first half (model-index split
    # "calibration", not the whole eval set), thresholds on the second.
    assert calibration["split"] == "calibration" and calibration["exit_layers"] == [1, 2, 4]
    assert "validation (its first half; the second certifies the thresholds)" in printed
    assert model.config.exit_temperatures == {str(layer): t for layer, t in zip([1, 2, 4], temperatures)}
    assert results["exit_temperatures"] == temperatures and all(t > 0 for t in temperatures)

    # Thresholds for the two early exits (the final exit has none), kept in the config and used by generation.
    thresholds = model.config.exit_thresholds
    assert set(thresholds) <= {"1", "2"} and all(0 <= v <= 1 for v in thresholds.values())
    assert results["exit_thresholds"] == thresholds
    generated = model.eval().generate(torch.tensor([[1, 100, 200]]), early_exit="confident", max_new_tokens=3,
                                      pad_token_id=2)
    assert generated.sequences.shape == (1, 6) and generated.exit_layers.shape == (1, 3)

    # The frozen backbone is the saved one, weight for weight; only the adapters learned.
    original = load_file(backbone_dir / "model.safetensors")
    for key, value in model.backbone.state_dict().items():
        if key in original:
            torch.testing.assert_close(value, original[key], rtol=0, atol=0)
    assert any(p.abs().sum() > 0 for name, p in model.exit_adapters.named_parameters() if ".up." in name)

    # The card: every exit's token ECE / NLL / Brier before and after its temperature, and the test metrics.
    card = ModelCard.load(out / "README.md")
    types = {(r.dataset_split, r.metric_type) for r in card.data.eval_results}
    for i in range(3):
        for when in ("uncalibrated", "calibrated"):
            for metric in ("token_ece", "nll", "brier"):
                assert ("calibration", f"exit_{i}_{when}_{metric}") in types
    assert any(split == "test" for split, _ in types)
    assert "Confidence of the exits" in str(card)
    for i in range(3):
        assert 0 <= results[f"test_exit_{i}_top1_agreement"] <= 1
        assert results[f"test_exit_{i}_uncalibrated_token_ece"] >= 0 and results[f"test_exit_{i}_calibrated_token_ece"] >= 0
    assert results["test_exit_2_top1_agreement"] == 1.0  # the final exit agrees with itself

    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| exit | layer | T | top-1 agreement") and len(table) == 4
    assert table[1].startswith(f"| 0 | 1 | {temperatures[0]:.3f} | {results['test_exit_0_top1_agreement']:.4f} |")
    assert table[3].endswith("| - |")  # no threshold for the final exit


def test_trained_backbone_from_a_cached_teacher_on_data_files_without_thresholds(tmp_path, backbone_dir, capsys):
    """Shared-head exits (no adapter), backbone trained, every exit distilled from a teacher's cached top-k logits,
    on a JSON-lines file of real articles (validation and test cut from it); no --exit_epsilon: no thresholds,
    temperatures still in the config."""
    train = write_rows(tmp_path / "train.jsonl", [{"text": t} for t in lm_text_dataset()["train"]["text"][:20]])
    out, cache = tmp_path / "out", tmp_path / "cache"
    run_ok(["early-exit-lm", "--model_name_or_path", str(backbone_dir), "--exit_layers", "2",
            "--distill_from", "teacher", "--teacher_model_name_or_path", str(backbone_dir),
            "--cache_teacher_logits", "true", "--teacher_logits_cache_dir", str(cache), "--lm_cache_top_k", "8",
            "--data_files", f"train={train}", "--output_dir", str(out), *RUN], capsys)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.exit_layers == [2, 4] and model.config.exit_thresholds is None
    assert set(model.config.exit_temperatures) == {"2", "4"}
    assert len(model.exit_adapters) == 0
    original = load_file(backbone_dir / "model.safetensors")
    layer = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(model.backbone.state_dict()[layer], original[layer])  # the backbone trained
    assert list(cache.glob("*.safetensors"))  # the teacher's top-k targets were cached
    results = json.loads((out / "test_results.json").read_text())
    assert results["distill_from"] == "teacher" and results["exit_thresholds"] is None
    assert results["dataset"] == "data_files"


def test_recipe_parses_with_its_exits_and_thresholds():
    argv = [str(RECIPE), "--exit_epsilon", "0.05"]
    script_args, args = parse_args(argv, COMMANDS["early-exit-lm"].dataclass_types(argv))
    assert isinstance(script_args, EarlyExitLMScriptArguments) and isinstance(args, EarlyExitConfig)
    assert script_args.model_name_or_path == SMOLLM2 and script_args.exit_layers == [8, 15]
    assert (script_args.exit_epsilon, script_args.exit_delta) == (0.05, 0.1)  # the flag overrides the YAML
    assert script_args.exit_adapter == "low_rank" and args.freeze_backbone
    assert str(args.distill_from) == "final_exit" and args.exit_loss_weights == [1.0, 1.0, 0.0]


def test_default_backbone_is_smollm2():
    assert EarlyExitLMScriptArguments().model_name_or_path == SMOLLM2


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--exit_layers", "2", "9"], "exit layer 9 is out of range: exit_layers are 1-based and the backbone has 4 "
                                      "layers (valid: 1..4)"),
        (["--exit_epsilon", "1.5", "--exit_delta", "0.1"], "exit_epsilon must be in (0, 1), got 1.5"),
        (["--exit_epsilon", "0.1", "--exit_delta", "0"], "exit_delta must be in (0, 1), got 0.0"),
        (["--exit_epsilon", "0.1"], "exit_epsilon and exit_delta go together"),
        (["--lm_max_length", "1"], "lm_max_length must be an int >= 2, got 1"),
        # 4 test rows of at most 24 tokens; 2 early exits at delta 0.01 / 2 need log(0.005) / log(0.99) = 528.
        (["--exit_epsilon", "0.01", "--exit_delta", "0.01"], "too few to fit thresholds with exit_epsilon=0.01 and "
                                                            "exit_delta=0.01: with 2 early exits each needs n >= "
                                                            "log(0.005) / log(1 - 0.01) = 528 tokens"),
        (["--freeze_backbone", "true"], "freeze_backbone=True leaves nothing to train"),
        (["--exit_adapter", "conv"], None),  # argparse's choices: exit status 2, see below
    ],
)
def test_bad_input_fails_before_training_naming_the_value(tmp_path, backbone_dir, capsys, flags, message):
    out = tmp_path / "out"
    argv = ["early-exit-lm", "--model_name_or_path", str(backbone_dir), "--exit_layers", "1", "2",
            "--output_dir", str(out), *RUN]
    if message is None:
        with pytest.raises(SystemExit) as exit_:
            main(argv + flags)
        assert exit_.value.code == 2
        assert "invalid choice: 'conv' (choose from 'linear', 'low_rank')" in capsys.readouterr().err
        return
    line = error_of(argv + flags, capsys)
    assert message in line, line
    assert not (out / "model.safetensors").exists()  # nothing was trained or saved
