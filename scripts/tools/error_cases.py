"""Count the bad-input and fault cases the test suite checks: a pytest plugin.

Every `pytest.raises(...)` that a test enters is one case (a parametrised test or a loop counts once per value),
attributed to the test's file and to the exception type it expects. Tests that fail are left out. Run the suite with
it (from the repository root):

    PYTHONPATH=scripts/tools OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \\
        python -m pytest -q -p no:cacheprovider -p error_cases tests

It writes `docs/error_cases.json` ({"total", "by_file", "by_exception", "by_area"}) and prints the totals; the table
in docs/hardening.md is made from it.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

OUT = Path(__file__).resolve().parents[2] / "docs" / "error_cases.json"
# Which part of hf_kd each test file checks (by file name: tests/distributed/test_scaling.py is test_scaling).
AREAS = {
    "losses, metrics, calibration, prediction sets": (
        "test_losses", "test_metrics", "test_calibration", "test_prediction_sets", "test_early_exit",
        "test_evaluation", "test_properties", "test_self_kd",
    ),
    "trainers and their configs": (
        "test_distill_trainer", "test_early_exit_trainer", "test_dedier", "test_self_kd_trainer", "test_letkd_trainer",
        "test_tinybert_trainer", "test_peft", "test_confidence_search", "test_distributed",
        "test_multiprocess", "test_scaling",
    ),
    "models (multi-exit, KD layers, Laplace exits)": (
        "test_modeling_multi_exit", "test_modeling_multi_exit_cnn", "test_kd_layer", "test_exit_laplace",
        "test_exit_laplace_mixin",
    ),
    "data, teacher, student, offline models, Hub": (
        "test_data", "test_student", "test_offline_models", "test_hub",
    ),
    "CLI and recipes": ("test_cli", "test_recipes"),
    "faults (checkpoints, caches, training state, output_dir)": ("test_faults",),
    "bad input across the API and CLI (the matrix of docs/hardening.md)": ("test_bad_input",),
}

_current: list[str] = []
_pending: dict[str, list[str]] = {}
_passed: list[tuple[str, str]] = []


def _area(module: str) -> str:
    return next((area for area, modules in AREAS.items() if module in modules), "other")


def pytest_configure(config):
    original = pytest.raises

    def counting_raises(expected_exception, *args, **kwargs):
        if _current:
            names = expected_exception if isinstance(expected_exception, tuple) else (expected_exception,)
            _pending.setdefault(_current[0], []).append("/".join(e.__name__ for e in names))
        return original(expected_exception, *args, **kwargs)

    pytest.raises = counting_raises


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    _current[:] = [item.nodeid]
    yield
    _current.clear()


def pytest_runtest_logreport(report):
    if report.when == "call":
        cases = _pending.pop(report.nodeid, [])
        if report.passed:
            _passed.extend((report.nodeid, exc) for exc in cases)


def pytest_sessionfinish(session):
    if not _passed:
        return
    by_file = Counter(Path(nodeid.split("::")[0]).stem for nodeid, _ in _passed)
    by_area = Counter()
    for module, count in by_file.items():
        by_area[_area(module)] += count
    result = {
        "total": len(_passed),
        "tests": len({nodeid for nodeid, _ in _passed}),
        "by_area": dict(by_area.most_common()),
        "by_file": dict(by_file.most_common()),
        "by_exception": dict(Counter(exc for _, exc in _passed).most_common()),
    }
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['total']} error cases checked by {result['tests']} passing tests; written to {OUT}")
