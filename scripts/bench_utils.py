"""Shared pieces of the training-overhead benchmarks: per-step timing, peak memory, interleaved subprocess runs.

Each configuration runs in its own subprocess (a clean peak-RSS reading, no state shared between configurations),
the configurations are interleaved and repeated so that drifts in machine load hit all of them alike, and the
figures are medians over repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time

from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    """Records the wall-clock seconds of every optimiser step (`on_step_begin` to `on_step_end`)."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


class PeakRSS:
    """Context manager sampling this process's resident memory every 10 ms; `peak_mb` is the maximum seen."""

    def __enter__(self):
        import psutil

        self._process = psutil.Process()
        self._peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self._process.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self._peak / 2**20


def step_summary(times: list[float], warmup: int) -> dict:
    """Median and mean seconds per step after the first `warmup` steps."""
    timed = times[warmup:]
    return {"seconds_per_step": statistics.median(timed), "mean_seconds_per_step": statistics.fmean(timed),
            "steps_timed": len(timed)}


def overhead_parser(
    description: str, configs, out: str, steps: tuple[str, int], warmup: int, scratch: tuple[str, str]
) -> argparse.ArgumentParser:
    """The flags every overhead benchmark takes: `steps` (flag, default; e.g. `("--steps", 40)`), `--warmup`,
    `--batch_size`, `--repeats`, `--threads`, `--out` (report folder), and the hidden `--worker` (one of `configs`)
    and `scratch` (flag, default folder) that the interleaved subprocesses get."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(steps[0], type=int, default=steps[1])
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=out)
    parser.add_argument("--worker", choices=configs, help=argparse.SUPPRESS)
    parser.add_argument(scratch[0], default=scratch[1], help=argparse.SUPPRESS)
    return parser


def forwarded_args(opts: argparse.Namespace, names: list[str]) -> list[str]:
    """`["--name", "value", ...]` of the parsed options `names`, to hand the same settings to a worker."""
    return [item for name in names for item in (f"--{name}", str(getattr(opts, name)))]


def launch_worker(script: str, config: str, args: list[str], env: dict) -> dict:
    """Run `script --worker config *args` in a fresh interpreter; its last stdout line is a JSON result."""
    cmd = [sys.executable, script, "--worker", config, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"worker {config} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def interleaved(configs, repeats: int, run) -> dict[str, list[dict]]:
    """`run(config)` for every config, `repeats` rounds, configs interleaved within each round."""
    runs = {config: [] for config in configs}
    for repeat in range(repeats):
        for config in configs:
            result = run(config)
            runs[config].append(result)
            print(f"repeat {repeat} {config:<16} {result['seconds_per_step']:.4f} s/step  "
                  f"peak {result['peak_rss_mb']:.0f} MB", flush=True)
    return runs


def median_summary(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per config: the median over repeats of seconds per step and the largest peak RSS."""
    return {config: {"seconds_per_step": statistics.median(r["seconds_per_step"] for r in results),
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in results)} for config, results in runs.items()}
