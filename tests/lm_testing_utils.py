"""The real causal LMs of the LM tests, loaded once per test process by their Hub ids (offline).

`make setup` places them in the hub cache (`python -m hf_kd.offline_models`); the calls below repeat that install,
which returns at once when the snapshot is complete, so a bare `pytest` run also works (the first conversion takes
about a minute for SmolLM2, three for Gemma, on 2 shared CPU cores).
"""

import functools

from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_kd.offline_models import install_offline_models

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
GEMMA3 = "google/gemma-3-270m"


@functools.lru_cache(maxsize=None)
def tokenizer(model_id: str = SMOLLM2):
    install_offline_models([model_id])
    return AutoTokenizer.from_pretrained(model_id)


@functools.lru_cache(maxsize=None)
def model(model_id: str = SMOLLM2):
    """The model in eval mode; tests must not modify it (copy it first: hf_kd.student.drop_layers copies)."""
    install_offline_models([model_id])
    return AutoModelForCausalLM.from_pretrained(model_id).eval()
