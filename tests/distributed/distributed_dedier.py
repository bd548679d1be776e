"""Run by tests/distributed/test_multiprocess.py under `torchrun --nproc_per_node 2` (gloo on CPU): a tiny DEDIER run.

Each rank writes `rank<k>.json` with hashes of its final model and of its DEDIER weights, and its re-weighting logs.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from hf_kd.distributed import end_distributed  # noqa: E402
from tests.testing_utils import make_dedier_args, make_early_exit_trainer, tiny_bert, tiny_multi_exit  # noqa: E402


def sha(tensors) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(out_dir: str) -> None:
    out = Path(out_dir)
    args = make_dedier_args(out, per_device_train_batch_size=4, num_train_epochs=3, ddp_backend="gloo")
    model = tiny_multi_exit()
    trainer = make_early_exit_trainer(out, model=model, args=args, teacher=tiny_bert(seed=7))
    trainer.train()
    result = {
        "world_size": dist.get_world_size(),
        "model_sha": sha(p for _, p in sorted(model.state_dict().items())),
        "weights_sha": sha([trainer.dedier_weights]),
        "num_reweighs": trainer._dedier.num_reweighs,
        "upweighted": int((trainer.dedier_weights > 1).sum()),
        "reweigh_logs": [h for h in trainer.state.log_history if "dedier_mean_weight" in h],
        "global_step": trainer.state.global_step,
    }
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    end_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
