"""Availability checks for optional dependencies (one place, as in TRL and PEFT)."""

import importlib.metadata
import importlib.util
from functools import lru_cache


@lru_cache
def _is_package_available(name: str) -> bool:
    if importlib.util.find_spec(name) is None:
        return False
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def is_peft_available() -> bool:
    """Whether `peft` is importable (extra: `pip install hf_kd[peft]`)."""
    return _is_package_available("peft")


def is_deepspeed_available() -> bool:
    """Whether `deepspeed` is importable (extra: `pip install hf_kd[deepspeed]`)."""
    return _is_package_available("deepspeed")


def is_matplotlib_available() -> bool:
    """Whether `matplotlib` is importable (extra: `pip install hf_kd[plots]`)."""
    return _is_package_available("matplotlib")


def is_optuna_available() -> bool:
    """Whether `optuna` is importable (extra: `pip install hf_kd[search]`)."""
    return _is_package_available("optuna")
