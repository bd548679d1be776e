"""2 real ranks under `torchrun` (gloo on CPU) running the drivers beside this file: distributed_distill.py
(DistillTrainer: online, cached and intermediate-layer losses, resume) and distributed_dedier.py (DEDIER weights)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("distributed_distill.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["online", "cache", "intermediate"])
def test_two_process_ddp_on_cpu(tmp_path, mode):
    """2 real ranks (torchrun, gloo): training ends on every rank with identical students and an untouched teacher;
    online, a run resumed from the epoch-1 checkpoint ends with exactly the uninterrupted run's weights."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(SCRIPT), str(tmp_path), mode,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["student_sha"] == ranks[1]["student_sha"], "DDP replicas diverged"
    assert all(r["teacher_unchanged"] for r in ranks)
    # 32 examples, 2 ranks x 4 per device -> 4 steps per epoch, 2 epochs.
    assert ranks[0]["global_step"] == 8
    assert "eval_sigma" in ranks[0]["eval"] and ranks[0]["eval"]["eval_loss"] > 0
    if mode == "cache":
        assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    if mode == "online":
        for rank in ranks:
            assert rank["resumed_global_step"] == 8 and rank["resumed_max_abs_diff"] == 0.0
            assert rank["resumed_sha"] == rank["student_sha"]
    if mode == "intermediate":  # the projection lives outside the student's DDP: it has its own
        assert ranks[0]["projection_sha"] == ranks[1]["projection_sha"], "projection replicas diverged"
        assert "eval_hidden_loss" in ranks[0]["eval"]


@pytest.mark.multiprocess
def test_two_process_dedier_weights_identical_on_every_rank(tmp_path):
    """2 real ranks: both re-weigh the whole train set, end with the same DEDIER weights and the same model."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(SCRIPT.with_name("distributed_dedier.py")), str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world_size"] == 2 for r in ranks)
    # 32 examples, 2 ranks x 4 per device -> 4 steps per epoch, 3 epochs, re-weighting after epochs 1 and 2.
    assert ranks[0]["global_step"] == 12 and all(r["num_reweighs"] == 2 for r in ranks)
    assert ranks[0]["weights_sha"] == ranks[1]["weights_sha"], "ranks hold different DEDIER weights"
    assert ranks[0]["model_sha"] == ranks[1]["model_sha"], "DDP replicas diverged"
    assert ranks[0]["upweighted"] > 0
    assert ranks[0]["reweigh_logs"] == ranks[1]["reweigh_logs"]
