"""Tiny models, tokenizers and datasets built in code, shared by the unit tests (no download, a few ms each)."""

from pathlib import Path

import datasets
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from hf_kd.import_utils import is_peft_available

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

require_peft = pytest.mark.skipif(not is_peft_available(), reason="needs peft: pip install hf_kd[peft]")
require_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"needs the shared data folder {SHARED_DATA}")

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [f"w{i}" for i in range(94)]


def tiny_tokenizer(tmp_path, words=WORDS, specials=SPECIALS) -> BertTokenizer:
    """A WordPiece tokenizer over 99 tokens: 5 specials then `w0`..`w93`."""
    vocab = tmp_path / f"vocab_{len(specials)}_{len(words)}.txt"
    vocab.write_text("\n".join(specials + list(words)) + "\n")
    return BertTokenizer(str(vocab))


def tiny_bert(num_labels=2, layers=2, hidden=32, vocab_size=99, seed=0, dropout=0.0, **kwargs):
    """A 2-layer BERT sequence classifier (hidden 32, 4 heads): the transformers test-suite size."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        **kwargs,
    )
    return BertForSequenceClassification(config)


def tiny_dataset(n=32, seq_len=8, num_labels=2, vocab_size=99, seed=0, equal_lengths=False) -> datasets.Dataset:
    """Random token ids with a learnable label (parity of the first word id), `[CLS] ... [SEP]` framing."""
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "attention_mask": [], "label": []}
    for _ in range(n):
        length = seq_len if equal_lengths else int(torch.randint(3, seq_len + 1, (1,), generator=g))
        body = torch.randint(5, vocab_size, (length - 2,), generator=g).tolist()
        rows["input_ids"].append([2] + body + [3])
        rows["attention_mask"].append([1] * length)
        rows["label"].append(body[0] % num_labels)
    return datasets.Dataset.from_dict(rows)
