"""Faults: runs killed with a real SIGKILL resume to the uninterrupted result, damaged checkpoint and cache files are
clear errors and never used, and an output_dir that cannot be written fails before training starts."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import DataCollatorWithPadding

from hf_kd import DistillConfig, DistillTrainer
from hf_kd.checkpoints import check_output_dir, find_last_checkpoint, resolve_resume_checkpoint, verify_checkpoint
from hf_kd.kd_layer_targets import KDLayerTargetsCache, TemplateTargets
from hf_kd.teacher import TeacherLogitsCache

from .fault_driver import CASES, SAVE_STEPS, train_case
from .testing_utils import tiny_bert, tiny_dataset, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "fault_driver.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "",
       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
STEPS_PER_EPOCH = 8  # 32 rows, batch 4


def kill_after_first_checkpoint(cmd: list[str], run_dir: Path, log: Path) -> None:
    """Start `cmd`, wait until `run_dir/checkpoint-3` is complete, SIGKILL the process (it is then sleeping between
    steps, mid-epoch) and check that it died unfinished."""
    first = run_dir / f"checkpoint-{SAVE_STEPS}" / "trainer_state.json"
    with log.open("w") as stderr:
        proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 300
        while not first.exists():
            assert proc.poll() is None, f"the run ended before its first checkpoint:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL


def run_to_end(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]


def assert_same_run(resumed: dict, resumed_weights: dict, reference: dict, reference_weights: dict) -> None:
    assert resumed["global_step"] == reference["global_step"]
    assert resumed["eval"].keys() == reference["eval"].keys()
    for key, value in reference["eval"].items():
        assert resumed["eval"][key] == pytest.approx(value, abs=1e-6, nan_ok=True), key
    assert resumed_weights.keys() == reference_weights.keys()
    for name, value in reference_weights.items():
        torch.testing.assert_close(resumed_weights[name], value, atol=1e-6, rtol=0, msg=name)


def assert_close_json(got, want, where: str) -> None:
    """Equal JSON values, floats within 1e-6."""
    if isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-6, nan_ok=True), where
    elif isinstance(want, (list, dict)):
        assert type(got) is type(want) and len(got) == len(want), where
        pairs = zip(got, want) if isinstance(want, list) else ((got[k], v) for k, v in want.items())
        for g, w in pairs:
            assert_close_json(g, w, where)
    else:
        assert got == want, where


# ---- kill -9 mid-epoch, resume in a new process, same result ---------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_killed_run_resumes_to_the_uninterrupted_result(case, tmp_path):
    out = tmp_path / "killed"
    kill_after_first_checkpoint([sys.executable, str(DRIVER), case, str(out), "--slow"], out / "run", tmp_path / "log")
    assert not (out / "result.json").exists()  # it died before the end
    last = find_last_checkpoint(out / "run")
    step = int(last.name.split("-")[1])
    assert step % STEPS_PER_EPOCH != 0, f"{last.name} is at an epoch boundary, not mid-epoch"

    run_to_end([sys.executable, str(DRIVER), case, str(out), "--resume"])
    resumed = json.loads((out / "result.json").read_text())
    assert resumed["resumed_from"] == str(last)
    reference, reference_weights = train_case(case, tmp_path / "reference")
    assert reference["resumed_from"] is None
    assert_same_run(resumed, load_file(out / "final.safetensors"), reference, reference_weights)
    # The training-state callbacks (DEDIER weights, SelfKD's source layer / ambiguity / re-calibration set) too.
    assert resumed["callbacks"].keys() == reference["callbacks"].keys()
    for name, state in reference["callbacks"].items():
        got = resumed["callbacks"][name]["attributes"]
        for key, value in state["attributes"].items():
            assert_close_json(got[key], value, f"{name}.{key}")


def test_killed_recipe_resumes_with_resume_from_checkpoint_latest(tmp_path):
    """`python trainers/distill.py ... --resume_from_checkpoint latest`, killed with SIGKILL mid-epoch and re-run with
    the same command line, ends with the uninterrupted run's test metrics and weights."""
    student, teacher = tmp_path / "student_init", tmp_path / "teacher"
    tokenizer = tiny_tokenizer(tmp_path)
    for path, seed in ((teacher, 7), (student, 1)):
        tiny_bert(seed=seed, dropout=0.1).save_pretrained(path)
        tokenizer.save_pretrained(path)

    def argv(out: Path) -> list[str]:
        return ["--method", "kd", "--model_name_or_path", str(student), "--teacher_model_name_or_path", str(teacher),
                "--output_dir", str(out), "--max_train_samples", "32", "--max_eval_samples", "16", "--max_length", "16",
                "--num_train_epochs", "2", "--per_device_train_batch_size", "4", "--save_strategy", "steps",
                "--save_steps", str(SAVE_STEPS), "--use_cpu", "true", "--report_to", "none", "--seed", "0",
                "--disable_tqdm", "true", "--resume_from_checkpoint", "latest"]

    cli = [sys.executable, str(DRIVER), "cli"]
    killed = tmp_path / "killed"
    kill_after_first_checkpoint([*cli, "--slow", "--", *argv(killed)], killed, tmp_path / "log")
    assert not (killed / "test_results.json").exists()
    last = find_last_checkpoint(killed)
    assert int(last.name.split("-")[1]) % STEPS_PER_EPOCH != 0
    run_to_end([*cli, "--", *argv(killed)])  # the same command line resumes
    reference = tmp_path / "reference"
    run_to_end([*cli, "--", *argv(reference)])  # the same command line starts afresh: no checkpoint yet

    got, want = (json.loads((d / "test_results.json").read_text()) for d in (killed, reference))
    for key, value in want.items():
        if key.startswith("test_") and "runtime" not in key and "per_second" not in key:
            assert got[key] == pytest.approx(value, abs=1e-6, nan_ok=True), key
    got_weights, want_weights = (load_file(d / "model.safetensors") for d in (killed, reference))
    for name, value in want_weights.items():
        torch.testing.assert_close(got_weights[name], value, atol=1e-6, rtol=0, msg=name)
