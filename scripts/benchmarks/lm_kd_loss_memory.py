"""Peak memory and time of hf_kd.losses.lm_kd_loss against full-tensor and other chunked implementations (CPU).

Each variant runs forward + backward of the loss on float32 logits of shape (batch, seq, vocab) (defaults: 4 x 256 x
49,152, SmolLM2's vocabulary; the first quarter of every sequence is prompt, label -100) in a fresh subprocess, so
that its peak resident memory (`resource.getrusage(...).ru_maxrss`) is its own; glibc's mmap threshold is fixed at
1 MiB (`MALLOC_MMAP_THRESHOLD_`) so that freed chunk tensors go back to the system at once. Reported "extra peak" is that peak
minus the resident memory once the inputs exist (student logits, teacher logits, labels: 2 x 201 MB at the
defaults), so it includes the student's gradient (one more 201 MB tensor), which every variant must produce.

Variants:

  naive              log-softmax of the full (batch, seq, vocab) tensors, masked mean: what most trainers do
                     (TRL's GKDTrainer loss works this way)
  chunked_autograd   the counted rows in chunks, plain autograd through the chunks: every chunk's float32
                     intermediates stay alive until backward
  chunked_checkpoint the same with torch.utils.checkpoint around each chunk: intermediates recomputed in backward
  hf_kd              hf_kd.losses.lm_kd_loss: the counted rows in chunks, each chunk's gradient computed at once and
                     written into one gradient buffer

Run (writes the table to stdout; docs/benchmarks/lm_kd_loss.md records one run):

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/benchmarks/lm_kd_loss_memory.py --repeats 3
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

LOSS_CASES = {"forward_kl": dict(loss_type="forward_kl", alpha=1.0), "jsd+ce": dict(loss_type="jsd", alpha=0.5)}
VARIANTS = ("naive", "chunked_autograd", "chunked_checkpoint", "hf_kd")


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def _reference_token_losses(student, teacher, targets, loss_type, alpha, beta=0.5):
    """alpha * D + (1 - alpha) * CE per row (T = 1), written directly on whatever rows it is given."""
    import math

    import torch.nn.functional as F

    log_s, log_t = F.log_softmax(student.float(), -1), F.log_softmax(teacher.float(), -1)
    if loss_type == "forward_kl":
        divergence = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)
    else:
        import torch

        log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log(1 - beta))
        divergence = beta * F.kl_div(log_m, log_t, reduction="none", log_target=True).sum(-1) + (1 - beta) * F.kl_div(
            log_m, log_s, reduction="none", log_target=True
        ).sum(-1)
    per_token = alpha * divergence
    if alpha < 1:
        per_token = per_token + (1 - alpha) * F.cross_entropy(student.float(), targets, reduction="none")
    return per_token


def _loss(variant, student, teacher, labels, case, chunk_size):
    import torch
    from torch.utils.checkpoint import checkpoint

    from hf_kd.losses import lm_kd_loss

    if variant == "hf_kd":
        return lm_kd_loss(student, teacher, labels, chunk_size=chunk_size, **case)
    if variant == "naive":
        vocab = student.shape[-1]
        per_token = _reference_token_losses(
            student.reshape(-1, vocab), teacher.reshape(-1, vocab), labels.reshape(-1).clamp_min(0), **case
        )
        mask = labels.reshape(-1) != -100
        return torch.where(mask, per_token, 0.0).sum() / mask.sum()
    rows, positions = (labels != -100).nonzero(as_tuple=True)
    total = student.new_zeros(())
    for start in range(0, rows.shape[0], chunk_size):
        index = (rows[start : start + chunk_size], positions[start : start + chunk_size])

        def chunk(s, t, index=index):
            return _reference_token_losses(s[index], t[index], labels[index], **case).sum()

        if variant == "chunked_checkpoint":
            total = total + checkpoint(chunk, student, teacher, use_reentrant=False)
        else:
            total = total + chunk(student, teacher)
    return total / rows.shape[0]


def worker(args) -> None:
    import torch
    import torch.utils.checkpoint  # noqa: F401  (every import before the baseline: they raise the RSS)

    import hf_kd.losses  # noqa: F401

    torch.manual_seed(0)
    # Filled in place: no temporary copies that would raise the peak before the measurement starts.
    student = torch.empty(args.batch, args.seq, args.vocab).normal_(0, 2).requires_grad_(True)
    teacher = torch.empty(args.batch, args.seq, args.vocab).normal_(0, 2)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq))
    labels[:, : args.seq // 4] = -100
    case = LOSS_CASES[args.case]
    base = _max_rss_mb()
    seconds, value = [], None
    for repeat in range(args.repeats + 1):  # the first run warms up the allocator and kernels, not timed
        student.grad = None
        start = time.perf_counter()
        loss = _loss(args.worker, student, teacher, labels, case, args.chunk_size)
        loss.backward()
        if repeat:
            seconds.append(time.perf_counter() - start)
        value = loss.item()
    print(json.dumps({"extra_peak_mb": _max_rss_mb() - base, "inputs_mb": base, "seconds": seconds, "loss": value}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--chunk-sizes", type=int, nargs="*", default=[32, 256, 1024], help="extra hf_kd chunk sizes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=list(LOSS_CASES), default="forward_kl", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    runs = [(case, variant, args.chunk_size) for case in LOSS_CASES for variant in VARIANTS]
    runs += [("forward_kl", "hf_kd", size) for size in args.chunk_sizes]
    print(f"batch {args.batch} x seq {args.seq} x vocab {args.vocab}, float32, 3/4 of the positions counted, "
          f"forward + backward, median of {args.repeats} after a warm-up run\n")
    print("| loss | variant | chunk | extra peak RSS (MB) | seconds | loss value |")
    print("|---|---|---|---|---|---|")
    for case, variant, chunk in runs:
        command = [sys.executable, __file__, "--worker", variant, "--case", case, "--chunk-size", str(chunk),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--vocab", str(args.vocab),
                   "--repeats", str(args.repeats)]
        # A fixed mmap threshold: glibc otherwise raises it after each free of a large block and then serves the next
        # chunks from its heap, whose freed pages it keeps, so the peak RSS would depend on the order of frees
        # (+-100 MB between identical runs) rather than on the memory that is live at once.
        environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        result = subprocess.run(command, check=True, capture_output=True, text=True, env=environment)
        result = json.loads(result.stdout.splitlines()[-1])
        chunk_text = "-" if variant == "naive" else str(chunk)
        print(f"| {case} | {variant} | {chunk_text} | {result['extra_peak_mb']:.0f} | "
              f"{statistics.median(result['seconds']):.2f} | {result['loss']:.6f} |", flush=True)


if __name__ == "__main__":
    main()
