"""Test-wide settings (offline, one thread: 2 shared cores, oversubscription made a test 25x slower) and the pytest
fixtures that several test modules use (builders that are plain functions are in tests/testing_utils.py)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from .testing_utils import expressive_bert, tiny_tokenizer  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def model_dir(tmp_path):
    """A saved 2-label tiny BERT (expressive_bert) and its tokenizer: what the `hf-kd` CLI tests load."""
    folder = tmp_path / "model"
    expressive_bert().save_pretrained(folder)
    tiny_tokenizer(tmp_path).save_pretrained(folder)
    return folder
