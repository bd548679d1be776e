"""The builders every test module shares: tiny models, tokenizers and datasets built in code (no download, a few ms
each), the `make_<method>_args` / `make_<method>_trainer` factory of each trainer, and the real causal LMs of the LM
tests. Test modules import builders from here only, never from one another (tests/test_imports.py checks it);
pytest fixtures used by several modules are in tests/conftest.py."""

import functools
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from torch.nn import functional as F
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizer,
    DataCollatorWithPadding,
    MPNetConfig,
    MPNetForSequenceClassification,
    RobertaConfig,
)

from hf_kd import (
    DistillConfig,
    DistillTrainer,
    EarlyExitConfig,
    EarlyExitTrainer,
    MultiExitConfig,
    MultiExitForImageClassification,
    MultiExitForSequenceClassification,
    MultiExitImageConfig,
    SelfKDConfig,
    SelfKDTrainer,
    TinyBERTConfig,
    TinyBERTTrainer,
)
from hf_kd.evaluation import compute_logits
from hf_kd.import_utils import is_peft_available
from hf_kd.offline_models import install_offline_models
from hf_kd.tinybert import encoder_layers, record_attention_scores, self_attention_module

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


def snapshot(model) -> dict[str, torch.Tensor]:
    """A detached copy of every named parameter, to compare weights before and after a step."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def tiny_gpt2():
    """A 1-layer GPT-2 sequence classifier in eval mode (a decoder whose head is `score`, without bias)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=99, n_embd=32, n_layer=1, n_head=4, n_positions=64, pad_token_id=0, num_labels=2)
    return GPT2ForSequenceClassification(config).eval()


def expressive_bert(seed=0, **kwargs):
    """A tiny BERT whose logits vary across inputs (std ~3 with initializer_range 0.5; ~1e-4 with the default 0.02)."""
    return tiny_bert(seed=seed, initializer_range=0.5, **kwargs)


def labelled_by_model(model, n, true_temperature, seed):
    """Tiny data whose labels are drawn from softmax(model logits / T_true): the model is over-confident by T_true."""
    dataset = tiny_dataset(n, seed=seed)
    logits = compute_logits(model, dataset)
    g = torch.Generator().manual_seed(seed)
    labels = torch.multinomial(torch.softmax(logits / true_temperature, dim=1), 1, generator=g).squeeze(1)
    return dataset.remove_columns("label").add_column("label", labels.tolist())


# ---- DistillTrainer and TinyBERTTrainer ------------------------------------------------------------------------------


def tiny_run_args(config_class, tmp_path, **kwargs):
    """`config_class` with the settings every tiny trainer test shares (output in `tmp_path/out`, batch 8, lr 1e-3, one
    epoch evaluated at its end, a log line per step, no checkpoints, CPU, seed 0), then `kwargs`."""
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        num_train_epochs=1,
        learning_rate=1e-3,
        logging_steps=1,
        eval_strategy="epoch",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
    )
    defaults.update(kwargs)
    return config_class(**defaults)


def make_distill_args(tmp_path, config_class=DistillConfig, **kwargs):
    kwargs.setdefault("teacher_logits_cache_dir", str(tmp_path / "cache"))
    return tiny_run_args(config_class, tmp_path, **kwargs)


def make_distill_trainer(tmp_path, teacher, args=None, student=None, train=None, eval_=None,
                         trainer_class=DistillTrainer, **kwargs):
    tokenizer = kwargs.pop("processing_class", tiny_tokenizer(tmp_path))
    return trainer_class(
        model=student if student is not None else tiny_bert(seed=1),
        args=args if args is not None else make_distill_args(tmp_path),
        teacher_model=teacher,
        train_dataset=train if train is not None else tiny_dataset(32),
        eval_dataset=eval_ if eval_ is not None else tiny_dataset(16, seed=1),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        **kwargs,
    )


def make_tinybert_args(tmp_path, **kwargs):
    return make_distill_args(tmp_path, config_class=TinyBERTConfig, **kwargs)


def make_tinybert_trainer(tmp_path, teacher, args=None, **kwargs):
    args = args if args is not None else make_tinybert_args(tmp_path)
    return make_distill_trainer(tmp_path, teacher, args=args, trainer_class=TinyBERTTrainer, **kwargs)


def tiny_mpnet(layers=4, hidden=48, seed=7):
    torch.manual_seed(seed)
    config = MPNetConfig(
        vocab_size=99, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=70, num_labels=2, pad_token_id=0, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return MPNetForSequenceClassification(config)


def tinybert_masked(scores):
    return torch.where(scores <= -100, torch.zeros_like(scores), scores)


def hooked_scores(model, batch):
    layers = encoder_layers(model)
    with record_attention_scores({i + 1: self_attention_module(layer) for i, layer in enumerate(layers)}) as scores:
        model(**batch)
    return [scores[i + 1] for i in range(len(layers))]


# ---- multi-exit models -----------------------------------------------------------------------------------------------

MULTI_EXIT_NUM_LABELS = 3  # the labels of tiny_eval_multi_exit
TEXT_BATCH, TEXT_SEQ = 13, 7  # the shape of padded_text_batch


def tiny_backbone_config(kind="bert", layers=3):
    common = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return {"bert": BertConfig, "mpnet": MPNetConfig, "roberta": RobertaConfig}[kind](**common)


def tiny_eval_multi_exit(kind="bert", exit_layers=None, seed=0, sharpen=1.0, **kwargs):
    """A tiny 3-label multi-exit model in eval mode; `sharpen` scales the exit weights so confidences spread out.
    (The trainers' tests train `tiny_multi_exit`: 2 labels, train mode.)"""
    torch.manual_seed(seed)
    config = MultiExitConfig(
        backbone_config=tiny_backbone_config(kind), exit_layers=exit_layers, num_labels=MULTI_EXIT_NUM_LABELS, **kwargs
    )
    model = MultiExitForSequenceClassification(config)
    with torch.no_grad():
        for head in model.exits:
            head.classifier.weight.mul_(sharpen)
    return model.eval()


def padded_text_batch(seed=0, pad_id=0):
    """(input_ids, attention_mask) of TEXT_BATCH rows of 3..TEXT_SEQ tokens (row 0 full length), padded with pad_id."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 99, (TEXT_BATCH, TEXT_SEQ), generator=g)
    attention_mask = torch.ones_like(input_ids)
    lengths = torch.randint(3, TEXT_SEQ + 1, (TEXT_BATCH,), generator=g)
    lengths[0] = TEXT_SEQ
    for row, length in enumerate(lengths.tolist()):
        attention_mask[row, length:] = 0
        input_ids[row, length:] = pad_id
    return input_ids, attention_mask


def text_inputs_for(kind):
    """padded_text_batch with the pad id of the backbone `kind` (MPNet pads with 1)."""
    return padded_text_batch(pad_id=1 if kind == "mpnet" else 0)


CNN_NUM_LABELS = 10  # the labels of tiny_cnn
CNN_BATCH = 12  # the default batch of images


def tiny_cnn(seed=0, sharpen=1.0, **kwargs):
    """A tiny CNN in eval mode (BatchNorm with non-trivial running statistics); `sharpen` spreads the confidences."""
    torch.manual_seed(seed)
    kwargs = {"stem_channels": 4, "stage_channels": [4, 8, 8], "num_labels": CNN_NUM_LABELS, **kwargs}
    model = MultiExitForImageClassification(MultiExitImageConfig(**kwargs))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
        for head in model.exits:
            head.classifier.weight.mul_(sharpen)
    return model.eval()


def images(seed=0, batch=CNN_BATCH, size=28):
    """Smooth random images with a per-image contrast and brightness, so the exits disagree across images."""
    g = torch.Generator().manual_seed(seed)
    smooth = F.avg_pool2d(torch.randn(batch, 1, size, size, generator=g), 5, stride=1, padding=2)
    return 3 * torch.rand(batch, 1, 1, 1, generator=g) * smooth + torch.randn(batch, 1, 1, 1, generator=g)


# ---- EarlyExitTrainer (DEDIER included) ------------------------------------------------------------------------------

NUM_EXITS = 3  # exits after layers 1, 2, 3 of the 3-layer backbone


def tiny_multi_exit(seed=1, layers=NUM_EXITS, **kwargs):
    """A tiny 2-label multi-exit BERT to train (tiny_dataset's labels), exits after every layer."""
    torch.manual_seed(seed)
    config = MultiExitConfig(backbone_config=tiny_backbone_config(layers=layers), num_labels=2, **kwargs)
    return MultiExitForSequenceClassification(config)


def exit_logits_of(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).exit_logits


def make_early_exit_args(tmp_path, **kwargs):
    return tiny_run_args(EarlyExitConfig, tmp_path, **kwargs)


def make_early_exit_trainer(tmp_path, model=None, args=None, teacher=None, train=None, eval_=None, **kwargs):
    tokenizer = tiny_tokenizer(tmp_path)
    return EarlyExitTrainer(
        model=model if model is not None else tiny_multi_exit(),
        args=args if args is not None else make_early_exit_args(tmp_path),
        teacher_model=teacher,
        train_dataset=train if train is not None else tiny_dataset(32),
        eval_dataset=eval_ if eval_ is not None else tiny_dataset(16, seed=1),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        **kwargs,
    )


def make_dedier_args(tmp_path, **kwargs):
    # A readout lr well above the student's, so that one readout epoch over 32 rows separates them a little.
    defaults = dict(distill_from="teacher", dedier=True, dedier_readout_lr=1e-2, eval_strategy="no")
    defaults.update(kwargs)
    return make_early_exit_args(tmp_path, **defaults)


def make_dedier_trainer(tmp_path, model=None, **kwargs):
    return make_early_exit_trainer(tmp_path, model=model, args=make_dedier_args(tmp_path, **kwargs),
                                   teacher=tiny_bert(seed=7))


# ---- SelfKDTrainer ---------------------------------------------------------------------------------------------------

SELF_KD_LAYERS = 4  # the tiny backbone of tiny_self_kd_model: exits after layers 1..4


def tiny_self_kd_model(seed=1, layers=SELF_KD_LAYERS, dropout=0.0, **kwargs):
    return tiny_multi_exit(seed, layers=layers, classifier_dropout=dropout, **kwargs)


def make_self_kd_args(tmp_path, **kwargs):
    defaults = dict(num_train_epochs=4, warmup_max_epochs=2, eval_strategy="no", disable_tqdm=True)
    defaults.update(kwargs)
    return tiny_run_args(SelfKDConfig, tmp_path, **defaults)


def eval_with_human(n=16, seed=1):
    """tiny_dataset rows with a `human_label_dist` column (a random share of annotators per label)."""
    rows = tiny_dataset(n, seed=seed)
    g = np.random.default_rng(seed)
    share = g.uniform(0.1, 0.9, size=n)
    return rows.add_column("human_label_dist", np.stack([share, 1 - share], axis=1).astype(np.float32).tolist())


def make_self_kd_trainer(tmp_path, model=None, args=None, train=None, eval_="default", **kwargs):
    tokenizer = tiny_tokenizer(tmp_path)
    return SelfKDTrainer(
        model=model if model is not None else tiny_self_kd_model(),
        args=args if args is not None else make_self_kd_args(tmp_path),
        train_dataset=train if train is not None else tiny_dataset(32),
        eval_dataset=eval_with_human() if isinstance(eval_, str) else eval_,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        **kwargs,
    )


# ---- the real causal LMs of the LM tests -----------------------------------------------------------------------------
# Loaded once per test process by their Hub ids (offline). `make setup` places them in the hub cache
# (`python -m hf_kd.offline_models`); the calls below repeat that install, which returns at once when the snapshot is
# complete, so a bare `pytest` run also works (the first conversion takes about a minute for SmolLM2, three for Gemma,
# on 2 shared CPU cores).

def tiny_llama(layers=4, seed=0, vocab_size=64, tie_word_embeddings=True):
    """A tiny Llama causal LM (hidden 32, 4 heads / 2 KV heads, vocab 64; ids 0/1/2 = pad/bos/eos), in train mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie_word_embeddings, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(config)


def lm_dataset(n=8, seed=0, min_len=5, max_len=12, vocab_size=64):
    """Rows of uneven length whose first `prompt` tokens are -100 (prompt); the first row is all labels (text)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        length = int(rng.integers(min_len, max_len + 1))
        ids = rng.integers(3, vocab_size, size=length).tolist()
        prompt = 0 if i == 0 else int(rng.integers(1, length - 1))
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": [-100] * prompt + ids[prompt:]})
    return datasets.Dataset.from_list(rows)


def pad_collator(rows):
    """Right padding: pad id 0, attention 0, label -100."""
    width = max(len(r["input_ids"]) for r in rows)

    def pad(key, value):
        return torch.tensor([r[key] + [value] * (width - len(r[key])) for r in rows])

    return {"input_ids": pad("input_ids", 0), "attention_mask": pad("attention_mask", 0), "labels": pad("labels", -100)}


SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
GEMMA3 = "google/gemma-3-270m"


@functools.lru_cache(maxsize=None)
def causal_lm_tokenizer(model_id: str = SMOLLM2):
    install_offline_models([model_id])
    return AutoTokenizer.from_pretrained(model_id)


@functools.lru_cache(maxsize=None)
def causal_lm(model_id: str = SMOLLM2):
    """The model in eval mode; tests must not modify it (copy it first: hf_kd.student.drop_layers copies)."""
    install_offline_models([model_id])
    return AutoModelForCausalLM.from_pretrained(model_id).eval()


# ---- the hf-kd training commands (tests/test_cli_training.py, tests/distributed/) ------------------------------------


def save_tiny_pair(tmp_path, num_labels=2):
    """A tiny teacher (4 layers) and student (2 layers) with the tiny tokenizer, saved to `tmp_path/teacher` and
    `tmp_path/student`; returns the two folders."""
    tokenizer = tiny_tokenizer(tmp_path)
    folders = tmp_path / "teacher", tmp_path / "student"
    for folder, model in zip(folders, (tiny_bert(num_labels, layers=4, seed=7), tiny_bert(num_labels, seed=1))):
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folders


def rotten_tomatoes_rows(split="train", n=60, seed=0) -> list[dict]:
    """`n` real Rotten Tomatoes snippets of `split` (shuffled with `seed`) as rows `{"review": text, "sentiment":
    "fresh" | "rotten"}`: a corpus slice with label names and non-default column names, for data-file tests."""
    from hf_kd import data

    rows = data.load_rotten_tomatoes()[split].shuffle(seed=seed).select(range(n))
    names = rows.features["label"].names
    return [{"review": text, "sentiment": names[label]} for text, label in zip(rows["text"], rows["label"])]


def write_rows(path, rows: list[dict]):
    """`rows` as a CSV (`.csv`) or JSON-lines (`.jsonl`) file at `path`; returns `path`."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    if str(path).endswith(".csv"):
        frame.to_csv(path, index=False)
    else:
        frame.to_json(path, orient="records", lines=True)
    return path
