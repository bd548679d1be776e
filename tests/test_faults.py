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

from .fault_driver import CASES, SAVE_STEPS, build, train_case
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


@pytest.mark.parametrize("recipe", ["distill", "early_exit"])
def test_killed_recipe_resumes_with_resume_from_checkpoint_latest(recipe, tmp_path):
    """`python trainers/<recipe>.py ... --resume_from_checkpoint latest`, killed with SIGKILL mid-epoch and re-run
    with the same command line, ends with the uninterrupted run's test metrics and weights (the early-exit recipe
    puts fresh exits on an encoder and self-distils the final exit into the others)."""
    student, teacher = tmp_path / "student_init", tmp_path / "teacher"
    tokenizer = tiny_tokenizer(tmp_path)
    for path, seed in ((teacher, 7), (student, 1)):
        tiny_bert(seed=seed, dropout=0.1).save_pretrained(path)
        tokenizer.save_pretrained(path)
    method = {
        "distill": ["--method", "kd", "--teacher_model_name_or_path", str(teacher)],
        "early_exit": ["--distill_from", "final_exit"],
    }[recipe]

    def argv(out: Path) -> list[str]:
        return [*method, "--model_name_or_path", str(student), "--output_dir", str(out), "--max_train_samples", "32",
                "--max_eval_samples", "16", "--max_length", "16", "--num_train_epochs", "2",
                "--per_device_train_batch_size", "4", "--save_strategy", "steps", "--save_steps", str(SAVE_STEPS),
                "--use_cpu", "true", "--report_to", "none", "--seed", "0", "--disable_tqdm", "true",
                "--resume_from_checkpoint", "latest"]

    cli = [sys.executable, str(DRIVER), "cli", recipe]
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


# ---- damaged checkpoints: a clear error naming the file, nothing loaded -----------------------------------------------


def distill_trainer(tmp_path, **kwargs) -> DistillTrainer:
    defaults = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=4, save_steps=2,
                    save_strategy="steps", learning_rate=1e-3, report_to="none", use_cpu=True, seed=0,
                    disable_tqdm=True, teacher_logits_cache_dir=str(tmp_path / "cache"))
    defaults.update(kwargs)
    tokenizer = tiny_tokenizer(tmp_path)
    return DistillTrainer(model=tiny_bert(seed=1), args=DistillConfig(**defaults), teacher_model=tiny_bert(seed=7),
                          train_dataset=tiny_dataset(16), processing_class=tokenizer,
                          data_collator=DataCollatorWithPadding(tokenizer))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 4-step DistillTrainer run with checkpoint-2 and checkpoint-4 (copied by each test before damaging it)."""
    tmp = tmp_path_factory.mktemp("finished")
    distill_trainer(tmp).train()
    return tmp / "run"


def copy_run(finished_run, tmp_path) -> Path:
    import shutil

    shutil.copytree(finished_run, tmp_path / "run")
    return tmp_path / "run"


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("name", ["model.safetensors", "trainer_state.json", "optimizer.pt", "rng_state.pth",
                                  "scheduler.pt", "config.json"])
def test_truncated_checkpoint_file_is_a_clear_error_and_not_loaded(name, finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    truncate(run / "checkpoint-4" / name)
    trainer = distill_trainer(tmp_path)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for value in (str(run / "checkpoint-4"), True, "latest"):
        with pytest.raises(ValueError, match=rf"checkpoint-4/{name} is damaged .*Delete the folder .*checkpoint-4"):
            trainer.train(resume_from_checkpoint=value)
    assert trainer.state.global_step == 0
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())  # nothing was loaded


def test_flipped_byte_in_optimizer_state_fails_its_crc(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    path = run / "checkpoint-4" / "optimizer.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside a stored tensor: the archive still opens, its CRC does not match
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="optimizer.pt is damaged"):
        verify_checkpoint(run / "checkpoint-4")


def test_incomplete_newest_checkpoint_is_skipped_by_latest(finished_run, tmp_path, caplog):
    run = copy_run(finished_run, tmp_path)
    (run / "checkpoint-4" / "trainer_state.json").unlink()  # killed while saving: trainer_state.json comes last
    assert find_last_checkpoint(run) == run / "checkpoint-2"
    assert resolve_resume_checkpoint("latest", run) == str(run / "checkpoint-2")
    assert "incomplete checkpoint" in caplog.text
    with pytest.raises(FileNotFoundError, match="has no trainer_state.json: its save was cut off"):
        resolve_resume_checkpoint(str(run / "checkpoint-4"), run)
    trainer = distill_trainer(tmp_path)
    trainer.train(resume_from_checkpoint=True)
    assert trainer._resumed_from == str(run / "checkpoint-2") and trainer.state.global_step == 4


def test_resume_with_nothing_to_resume(tmp_path):
    assert resolve_resume_checkpoint("latest", tmp_path / "none") is None  # 'latest': start afresh
    with pytest.raises(ValueError, match="has no complete checkpoint-<step> folder"):
        resolve_resume_checkpoint(True, tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-9"), tmp_path)


# ---- damaged caches: teacher logits, letKD targets ----------------------------------------------------------------


def rewrite_tensor(path: Path, name: str, change) -> None:
    """Change tensor `name` of a safetensors file in place, keeping its metadata (its old sha256 included)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors[name] = change(tensors[name].clone())
    save_file(tensors, path, metadata=metadata)


class TestTeacherLogitsCache:
    def cached_file(self, tmp_path) -> Path:
        distill_trainer(tmp_path, cache_teacher_logits=True)
        (path,) = (tmp_path / "cache").glob("*.safetensors")
        return path

    @pytest.mark.parametrize(
        "damage, message",
        [
            (truncate, "is unreadable"),
            (lambda p: rewrite_tensor(p, "logits", lambda t: t.index_fill_(0, torch.tensor([3]), 0.5)),
             "does not match its sha256 checksum"),
        ],
        ids=["truncated", "tampered"],
    )
    def test_damaged_file_is_an_error_naming_it_and_never_used(self, damage, message, tmp_path, monkeypatch):
        path = self.cached_file(tmp_path)
        damage(path)
        monkeypatch.setattr(DistillTrainer, "compute_loss", lambda *a, **k: pytest.fail("trained on a bad cache"))
        with pytest.raises(ValueError, match=rf"teacher logits cache file {path} {message}.*delete it to recompute"):
            distill_trainer(tmp_path, cache_teacher_logits=True)
        path.unlink()  # what the error says to do
        distill_trainer(tmp_path, cache_teacher_logits=True)  # recomputes
        assert path.exists()

    def test_metadata_shape_and_values_are_checked(self, tmp_path):
        cache = TeacherLogitsCache(tmp_path, "teacher-a")
        path, logits = cache.path_for("data-a", None), torch.randn(6, 2)
        cache.save(path, logits, "data-a")
        torch.testing.assert_close(cache.load(path, 6, "data-a", 2), logits)
        moved = cache.path_for("data-b", None)
        moved.write_bytes(path.read_bytes())  # another dataset's file under this key
        with pytest.raises(ValueError, match="is for data='data-a', not 'data-b'"):
            cache.load(moved, 6, "data-b")
        with pytest.raises(ValueError, match="is for teacher='teacher-a', not 'teacher-b'"):
            TeacherLogitsCache(tmp_path, "teacher-b").load(path, 6)
        with pytest.raises(ValueError, match="is for rows='6', not '7'"):
            cache.load(path, 7)
        with pytest.raises(ValueError, match="holds logits over 2 labels but the student predicts 3"):
            cache.load(path, 6, num_labels=3)
        cache.save(path, torch.tensor([[0.0, float("nan")]] * 6), "data-a")
        with pytest.raises(ValueError, match="holds 6 non-finite logits"):
            cache.load(path, 6)
        from safetensors.torch import save_file

        save_file({"logits": logits}, path, metadata={"teacher": "teacher-a", "data": "data-a", "rows": "6"})
        with pytest.raises(ValueError, match="has no sha256 checksum"):
            cache.load(path, 6)


def test_letkd_targets_cache_is_verified(tmp_path):
    cache = KDLayerTargetsCache(tmp_path, "teacher-key")
    settings = {"location": "penultimate", "templates": 5}
    path = cache.path_for("data", settings)
    cache.save(path, TemplateTargets(torch.randn(5, 3)), settings)
    assert cache.load(path, settings=settings).num_templates == 5
    with pytest.raises(ValueError, match="is for settings=.*copied or renamed"):
        cache.load(path, settings={**settings, "templates": 6})
    with pytest.raises(ValueError, match="is for teacher='teacher-key', not 'other'"):
        KDLayerTargetsCache(tmp_path, "other").load(path)
    rewrite_tensor(path, "codebook", lambda t: t.add_(1e-3))
    with pytest.raises(ValueError, match="KD layer targets cache file .* does not match its sha256 checksum"):
        cache.load(path, settings=settings)
    cache.save(path, TemplateTargets(torch.randn(4, 3)), settings)  # 4 templates where the settings say 5
    with pytest.raises(ValueError, match="inconsistent shapes"):
        cache.load(path, settings=settings)
    truncate(path)
    with pytest.raises(ValueError, match="is unreadable"):
        cache.load(path, settings=settings)


# ---- damaged DEDIER / SelfKD state in trainer_state.json ------------------------------------------------------------


@pytest.fixture(scope="module")
def state_runs(tmp_path_factory) -> dict[str, Path]:
    """Finished `early_exit_dedier` and `self_kd` runs of tests/fault_driver.py (checkpoints every 3 steps)."""
    runs = {}
    for case in ("early_exit_dedier", "self_kd"):
        out = tmp_path_factory.mktemp(case)
        build(case, out).train()
        runs[case] = out / "run"
    return runs


@pytest.mark.parametrize(
    "case, callback, key, value, message",
    [
        ("early_exit_dedier", "DedierCallback", "weights", lambda w: w[:-1], "must be 32 finite values >= 1"),
        ("early_exit_dedier", "DedierCallback", "weights", lambda w: [0.5] + w[1:], "must be 32 finite values >= 1"),
        ("early_exit_dedier", "DedierCallback", "num_reweighs", lambda n: -1, "num_reweighs must be an integer >= 0"),
        ("self_kd", "SelfKDCallback", "phase", lambda p: "bogus", "phase must be one of"),
        ("self_kd", "SelfKDCallback", "recalibration_set", lambda s: [99], r"indices must be in \[0, 32\)"),
        ("self_kd", "SelfKDCallback", "source_exit", lambda s: 7, r"source_exit must be None or an exit index"),
        ("self_kd", "SelfKDCallback", "entropy_curves", lambda c: c[:-1], "epochs_done=.* must equal"),
    ],
)
def test_damaged_training_state_is_a_clear_error(case, callback, key, value, message, state_runs, tmp_path):
    import shutil

    shutil.copytree(state_runs[case], tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoint-27" if case == "self_kd" else tmp_path / "run" / "checkpoint-21"
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    attributes = state["stateful_callbacks"][callback]["attributes"]
    attributes[key] = value(attributes[key])
    state_file.write_text(json.dumps(state))
    with pytest.raises(ValueError, match=rf"The {callback} state in {state_file} is damaged .*{message}"):
        build(case, tmp_path).train(resume_from_checkpoint=str(checkpoint))


# ---- an output_dir that cannot be written fails before anything is built ---------------------------------------------


class TestOutputDir:
    def test_output_dir_under_a_file_fails_at_init(self, tmp_path):
        blocker = tmp_path / "a_file"
        blocker.write_text("not a folder")
        with pytest.raises(NotADirectoryError, match=rf"output_dir '{blocker}/run' cannot be written"):
            distill_trainer(tmp_path, output_dir=str(blocker / "run"), cache_teacher_logits=True)
        assert not (tmp_path / "cache").exists()  # failed before the teacher logits were computed

    def test_output_dir_that_is_a_file_fails(self, tmp_path):
        (tmp_path / "run").write_text("")
        with pytest.raises(OSError, match="cannot be written"):
            check_output_dir(tmp_path / "run")

    def test_writable_output_dir_passes_and_is_left_clean(self, tmp_path):
        check_output_dir(tmp_path / "new" / "run", needed_bytes=1)
        assert list((tmp_path / "new" / "run").iterdir()) == []  # the probe file is gone

    def test_full_disk_fails_at_init_when_checkpoints_are_saved(self, tmp_path, monkeypatch):
        import shutil

        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr("hf_kd.checkpoints.shutil.disk_usage", lambda p: usage._replace(free=100_000))
        with pytest.raises(OSError, match=r"has 0.1 MiB free, less than the .* MiB one checkpoint"):
            distill_trainer(tmp_path)
        distill_trainer(tmp_path, save_strategy="no")  # nothing is saved during training: no space needed
