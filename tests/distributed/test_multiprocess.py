"""2 real ranks under `torchrun` (gloo on CPU) running the drivers beside this file: distributed_distill.py
(DistillTrainer: online, cached and intermediate-layer losses, resume), distributed_dedier.py (DEDIER weights) and
distributed_distill_lm.py (causal-LM DistillTrainer: DDP against 1 process, on-policy generation under ZeRO-3)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


LM_SCRIPT = SCRIPT.with_name("distributed_distill_lm.py")
LM_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu",
          "HF_HUB_OFFLINE": "1"}


def run_lm(out, mode, processes):
    """distributed_distill_lm.py in `mode` on 1 process (plain python) or 2 (torchrun, gloo); the ranks' results."""
    script = [str(LM_SCRIPT), str(out), mode]
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    cmd = [sys.executable, *(launcher if processes == 2 else []), *script]
    # A generation that leaves a process behind in a collective hangs: the timeout turns that into a failure.
    proc = subprocess.run(cmd, env=LM_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["supervised", "on_policy", "early_exit"])
def test_causal_lm_ddp_matches_one_process(tmp_path, mode):
    """A causal-LM student on 2 DDP processes (2 rows each per micro-batch, 2 accumulated) takes the steps of 1 process
    on the same global batch: every step's loss and gradient norm within 1e-5, the final weights within 1e-5. Each
    process counts another number of completion tokens (uneven rows; on-policy, greedy generations of uneven length,
    counted after generation), so this holds only if num_items_in_batch is the count over both processes.
    `early_exit`: the same for EarlyExitTrainer's multi-exit student, its shared head run inside the loss."""
    from safetensors.torch import load_file

    (one,) = run_lm(tmp_path / "one", mode, 1)
    two = run_lm(tmp_path / "two", mode, 2)
    assert one["global_step"] == two[0]["global_step"] == 4
    for rank in two:
        torch.testing.assert_close(torch.tensor(rank["history"]), torch.tensor(one["history"]), rtol=0, atol=1e-5)
    assert one["history"][-1][0] != one["history"][0][0], "the loss did not move: the comparison would be vacuous"
    for step, (a, b) in enumerate(zip(two[0]["generated"], two[1]["generated"])):
        assert a["num_items"] == b["num_items"] == one["generated"][step]["num_items"]
        assert sum(a["local_items"]) + sum(b["local_items"]) == a["num_items"]
    assert any(sum(a["local_items"]) != sum(b["local_items"]) for a, b in zip(*(r["generated"] for r in two)))
    if mode == "on_policy":
        assert one["on_policy"] == [1.0] * 4 and all(r["on_policy"] == [1.0] * 4 for r in two)
        # 4 rows x max_new_tokens=6 unless a generation ended at the EOS early
        assert any(n < 4 * 6 for step in one["generated"] for n in step["local_items"]), "no generation ended early"
    weights = [load_file(out / "student" / "model.safetensors") for out in (tmp_path / "one", tmp_path / "two")]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=0, atol=1e-5, msg=name)


@pytest.mark.multiprocess
def test_causal_lm_zero3_on_policy_generation_does_not_hang(tmp_path):
    """DeepSpeed ZeRO-3 on 2 CPU processes, student and teacher sharded, lmbda=0.5 with sampled generations: the same
    coin on both processes, on-policy micro-batches where one process stops generating before the other
    (generate(synced_gpus=True) keeps it stepping), the generated tokens counted over both processes, and a student
    that trains and saves in full."""
    from safetensors.torch import load_file

    ranks = run_lm(tmp_path, "zero3", 2)
    assert all(r["global_step"] == 4 and r["world_size"] == 2 for r in ranks)
    placement = ranks[0]["teacher_placement"]
    assert placement["kind"] == "zero3_sharded" and all(
        held < 0.55 * placement["parameters"] for held in placement["parameters_per_process"])
    a, b = (r["generated"] for r in ranks)
    assert [s["sources"] for s in a] == [s["sources"] for s in b], "the processes drew different coins"
    sources = [source for step in a for source in step["sources"]]
    assert "student" in sources and None in sources
    unequal = [i for step_a, step_b in zip(a, b) for i, (s, la, lb) in
               enumerate(zip(step_a["sources"], step_a["longest"], step_b["longest"])) if s == "student" and la != lb]
    assert unequal, "every on-policy generation took the same number of steps on both processes: synced_gpus untested"
    for step_a, step_b in zip(a, b):
        assert step_a["num_items"] == step_b["num_items"] == sum(step_a["local_items"]) + sum(step_b["local_items"])
    history = torch.tensor(ranks[0]["history"])
    assert torch.isfinite(history).all() and history[-1, 0] != history[0, 0]
    saved = load_file(tmp_path / "student" / "model.safetensors")
    assert saved["lm_head.weight"].shape == (64, 32)  # gathered from the shards, not a partition
