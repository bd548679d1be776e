"""Test-wide settings: offline, one thread (2 shared cores: oversubscription made a test 25x slower)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


# setup.cfg maps the package hf_kd.model_cards onto the top-level model_cards/ folder. pytest puts this checkout's hf_kd
# first on the path, but an editable install of another checkout would still answer for hf_kd.model_cards (it is not
# under hf_kd/): bind it to this checkout's templates too.
import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

_CARDS = Path(__file__).resolve().parents[1] / "model_cards"
_spec = importlib.util.spec_from_file_location(
    "hf_kd.model_cards", _CARDS / "__init__.py", submodule_search_locations=[str(_CARDS)]
)
_module = importlib.util.module_from_spec(_spec)
sys.modules["hf_kd.model_cards"] = _module
_spec.loader.exec_module(_module)
