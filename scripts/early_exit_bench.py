"""Shared parts of the early-exit benchmarks (bench_early_exit_rt.py, bench_early_exit_fmnist.py).

- `sweep`: accuracy and mean layers for every threshold of a policy, computed offline from every exit's probabilities
  (one forward pass; `hf_kd.early_exit.simulate_exits` makes the same decisions as `predict_with_exits`).
- `operating_point`: the threshold with the fewest mean layers whose *validation* accuracy is within a tolerance of
  the final exit's.
- `time_variants`: wall-clock of callables over prepared batches, interleaved repeats, medians.
"""

from __future__ import annotations

import math
import statistics
import time
from functools import partial
from typing import Callable

import numpy as np

from hf_kd.early_exit import simulate_exits

# Threshold grids swept offline. Entropy thresholds are fractions of the largest entropy, log(num_classes).
GRIDS = {
    "max_prob": [0.1 + 0.01 * i for i in range(90)] + [0.995, 0.999, 1.0],
    "entropy": [0.0, 0.001, 0.005] + [0.01 * i for i in range(1, 100)],
    "patience": [1, 2, 3, 4, 5],
}


def grid(policy: str, num_classes: int) -> list[float]:
    """The threshold values swept for `policy` (max_prob values below 1/num_classes are dropped: all would exit)."""
    if policy == "entropy":
        return [round(f * math.log(num_classes), 6) for f in GRIDS["entropy"]]
    if policy == "max_prob":
        return [v for v in GRIDS["max_prob"] if v >= 1 / num_classes]
    return GRIDS[policy]


def policy_kwargs(policy: str, value) -> dict:
    return {"patience": int(value)} if policy == "patience" else {"threshold": value}


def sweep(policy: str, probs: np.ndarray, labels: np.ndarray, exit_layers: list[int], exit_flops=None) -> list[dict]:
    """Accuracy and mean layers run (and the FLOPs fraction of the full model, given each exit's cumulative FLOPs)
    for every value of the policy's grid; `probs` `(K, N, C)`, `labels` `(N,)`."""
    rows = []
    for value in grid(policy, probs.shape[-1]):
        chosen, chosen_probs = simulate_exits(probs, policy=policy, **policy_kwargs(policy, value))
        row = {
            "value": value,
            "accuracy": float((chosen_probs.argmax(-1) == labels).mean()),
            "mean_layers": float(np.asarray(exit_layers)[chosen].mean()),
        }
        if exit_flops is not None:
            row["flops_fraction"] = float(np.asarray(exit_flops)[chosen].mean() / exit_flops[-1])
        rows.append(row)
    return rows


def operating_point(val_rows: list[dict], final_accuracy: float, tolerance: float) -> dict:
    """The validation row with the fewest mean layers whose accuracy is >= `final_accuracy - tolerance`."""
    admissible = [r for r in val_rows if r["accuracy"] >= final_accuracy - tolerance]
    return min(admissible, key=lambda r: (r["mean_layers"], -r["accuracy"]))


def policy_curves(
    val_probs, val_labels, test_probs, test_labels, exit_layers, tolerance: float, exit_flops=None
) -> dict:
    """Per policy: the test curve, and the operating point chosen on validation with its test figures."""
    final_val = float((val_probs[-1].argmax(-1) == val_labels).mean())
    policies = {}
    for policy in GRIDS:
        val_rows = sweep(policy, val_probs, val_labels, exit_layers, exit_flops)
        test_rows = sweep(policy, test_probs, test_labels, exit_layers, exit_flops)
        chosen = operating_point(val_rows, final_val, tolerance)
        test_at = next(r for r in test_rows if r["value"] == chosen["value"])
        policies[policy] = {
            "value": chosen["value"],
            "validation": chosen,
            "test": test_at,
            "layer_reduction": exit_layers[-1] / test_at["mean_layers"],
            "test_curve": test_rows,
        }
    return policies


def timed_points(curve: list[dict], count: int) -> list:
    """About `count` grid values spread evenly along a policy's curve (by mean layers), for wall-clock timing."""
    by_layers = sorted(curve, key=lambda r: r["mean_layers"])
    picks = np.linspace(0, len(by_layers) - 1, count).round().astype(int)
    return sorted({by_layers[i]["value"] for i in picks})


def time_variants(variants: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds of each callable; the variants are interleaved within each repeat so load drift hits all."""
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def measure_speed(workloads: dict[str, list], run_full: Callable, run_exits: Callable, policies: dict, repeats: int):
    """Wall-clock of the full model vs early exits over prepared batches.

    Args:
        workloads: name -> list of batches (e.g. `{"bs1": ..., "bs32": ...}`); the last one also gets a curve.
        run_full: `run_full(batches)` runs the static model (every layer, final exit).
        run_exits: `run_exits(batches, policy, value)` runs `predict_with_exits`.
        policies: the output of `policy_curves` (operating points and test curves).
        repeats: interleaved repeats; medians are reported.

    Returns:
        Per workload the median seconds, speed-ups at each policy's operating point and the number of rows, and
        `curve`: accuracy vs measured speed-up for about 5 points along each policy's curve on the last workload.
    """
    result = {}
    for name, prepared in workloads.items():
        run_full(prepared[:5])  # warm-up
        variants = {"full": partial(run_full, prepared)}
        for policy, p in policies.items():
            variants[policy] = partial(run_exits, prepared, policy, p["value"])
        medians = time_variants(variants, repeats)
        result[name] = {
            "seconds": medians,
            "speedup": {v: medians["full"] / s for v, s in medians.items() if v != "full"},
            "batches": len(prepared),
        }
    name, prepared = list(workloads.items())[-1]
    points = sorted({(policy, value) for policy, p in policies.items() for value in timed_points(p["test_curve"], 5)})
    variants = {"full": partial(run_full, prepared)}
    for policy, value in points:
        variants[f"{policy}={value:g}"] = partial(run_exits, prepared, policy, value)
    medians = time_variants(variants, max(1, repeats // 2))
    curve = []
    for policy, value in points:
        row = next(r for r in policies[policy]["test_curve"] if r["value"] == value)
        curve.append({"policy": policy, "value": value, "workload": name, **row,
                      "speedup": medians["full"] / medians[f"{policy}={value:g}"]})
    result["curve"] = curve
    return result


def curve_markdown(result: dict, unit: str = "layers") -> list[str]:
    """Markdown lines: the operating-point table and the accuracy vs layers / wall-clock curves."""
    lines = [
        f"| policy | threshold | test accuracy | final-exit accuracy | mean {unit} | fewer {unit} | speed-up bs1 "
        "| speed-up bs32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    final = result["curve"]["per_exit_accuracy"]["test"][-1]
    speed = result.get("speed", {})
    for policy, p in result["curve"]["policies"].items():
        speedups = [speed.get(w, {}).get("speedup", {}).get(policy) for w in ("bs1", "bs32")]
        cells = " | ".join(f"{s:.2f}x" if s is not None else "-" for s in speedups)
        lines.append(
            f"| {policy} | {p['value']:g} | {p['test']['accuracy']:.4f} | {final:.4f} | "
            f"{p['test']['mean_layers']:.2f} | {p['layer_reduction']:.2f}x | {cells} |"
        )
    if speed:
        lines += ["", f"Accuracy vs measured speed-up over the full model ({speed['curve'][0]['workload']}):", "",
                  f"| policy | threshold | test accuracy | mean {unit} | speed-up |", "|---|---|---|---|---|"]
        lines += [f"| {r['policy']} | {r['value']:g} | {r['accuracy']:.4f} | {r['mean_layers']:.2f} | "
                  f"{r['speedup']:.2f}x |" for r in speed["curve"]]
    lines += ["", f"Accuracy vs mean {unit} (test, every threshold of the grid):", ""]
    for policy, p in result["curve"]["policies"].items():
        points = ", ".join(f"{r['mean_layers']:.2f}:{r['accuracy']:.4f}" for r in p["test_curve"])
        lines.append(f"- {policy} ({unit}:accuracy): {points}")
    return lines
