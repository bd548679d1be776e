"""hf_kd.lm_data: causal-LM datasets from the real corpora, and their tokenisation with completion-only labels."""

import numpy as np
import pytest
from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_kd.lm_data import (
    LM_CHAT_TASKS,
    lm_chat_dataset,
    lm_text_dataset,
    load_bbc_news_articles,
    tokenize_lm_dataset,
    tokenize_lm_example,
    tokenized_fingerprint,
)

from .testing_utils import causal_lm, causal_lm_tokenizer

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = ["<unk>", "<|im_start|>", "<|im_end|>", "<bos>", "user", "assistant", "the", "a", "film", "is", "good", "bad",
         "positive", "negative", "Answer", ":", "?", ".", "very", "and", "long"]


def tiny_chat_tokenizer(chat_template=CHATML, bos=False):
    """A word-level tokenizer over 21 words, with ChatML special tokens, EOS = <|im_end|> (and optionally BOS)."""
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        from tokenizers import processors

        model.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 3)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=model, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        bos_token="<bos>", additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def _completion(row):
    return [i for i, label in zip(row["input_ids"], row["labels"]) if label != -100]


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ----- tokenisation, tiny tokenizer -----


def test_text_format_labels_every_token_and_appends_eos():
    tokenizer = tiny_chat_tokenizer()
    row = tokenize_lm_example({"text": "the film is good"}, tokenizer, max_length=16)
    assert row["input_ids"] == _ids(tokenizer, "the film is good") + [tokenizer.eos_token_id]
    assert row["labels"] == row["input_ids"] and row["attention_mask"] == [1] * 5
    truncated = tokenize_lm_example({"text": "the film is very very very long"}, tokenizer, max_length=4)
    assert truncated["input_ids"] == _ids(tokenizer, "the film is very")
    with pytest.raises(ValueError, match="text is empty"):
        tokenize_lm_example({"text": "  "}, tokenizer)


def test_standard_prompt_completion():
    tokenizer = tiny_chat_tokenizer(bos=True)
    row = tokenize_lm_example({"prompt": "the film is good . Answer :", "completion": " positive"}, tokenizer, 32)
    prompt_ids = tokenizer("the film is good . Answer :")["input_ids"]
    assert prompt_ids[0] == 3  # the prompt gets the tokenizer's special tokens (BOS), the completion does not
    eos = tokenizer.eos_token_id
    assert row["input_ids"] == prompt_ids + [WORDS.index("positive"), eos]
    assert row["labels"] == [-100] * len(prompt_ids) + [WORDS.index("positive"), eos]
    # Truncation cuts the completion on the right and keeps the prompt.
    long = tokenize_lm_example({"prompt": "the film", "completion": " is very very long"}, tokenizer, max_length=5)
    assert long["input_ids"] == [3, 6, 8, 9, 18] and long["labels"] == [-100, -100, -100, 9, 18]
    with pytest.raises(ValueError, match=r"The prompt has 3 tokens, so nothing of the completion fits in max_length=3"):
        tokenize_lm_example({"prompt": "the film", "completion": " good"}, tokenizer, max_length=3)
    with pytest.raises(ValueError, match="completion is empty"):
        tokenize_lm_example({"prompt": "the film", "completion": " "}, tokenizer)
    with pytest.raises(ValueError, match="both be strings"):
        tokenize_lm_example({"prompt": "the film", "completion": [{"role": "assistant", "content": "good"}]}, tokenizer)


def test_conversational_prompt_completion_labels_the_rendered_completion():
    tokenizer = tiny_chat_tokenizer()
    prompt = [{"role": "user", "content": "the film is good ?"}]
    completion = [{"role": "assistant", "content": "positive"}]
    row = tokenize_lm_example({"prompt": prompt, "completion": completion}, tokenizer, 64)
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    assert row["input_ids"] == _ids(tokenizer, full)
    # The completion is what follows the generation prompt: the answer and the end-of-turn token.
    assert _completion(row) == _ids(tokenizer, "positive<|im_end|>\n")
    prompt_part = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert row["labels"][: len(_ids(tokenizer, prompt_part))] == [-100] * len(_ids(tokenizer, prompt_part))
    with pytest.raises(ValueError, match="empty assistant turn"):
        tokenize_lm_example({"prompt": prompt, "completion": [{"role": "assistant", "content": ""}]}, tokenizer)


def test_messages_label_every_assistant_turn_only():
    tokenizer = tiny_chat_tokenizer()
    messages = [
        {"role": "user", "content": "the film ?"},
        {"role": "assistant", "content": "good"},
        {"role": "user", "content": "a film ?"},
        {"role": "assistant", "content": "very bad"},
    ]
    row = tokenize_lm_example({"messages": messages}, tokenizer, 64)
    assert row["input_ids"] == _ids(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False))
    assert _completion(row) == _ids(tokenizer, "good<|im_end|> very bad<|im_end|>")
    labelled = [label != -100 for label in row["labels"]]
    # <|im_start|> user the film ? <|im_end|> <|im_start|> assistant | good <|im_end|> | ... | very bad <|im_end|>
    assert labelled == [False] * 8 + [True] * 2 + [False] * 8 + [True] * 3
    with pytest.raises(ValueError, match="no assistant turn"):
        tokenize_lm_example({"messages": messages[:1]}, tokenizer)


def test_prompt_only_gives_generation_inputs_without_labels():
    tokenizer = tiny_chat_tokenizer()
    row = tokenize_lm_example({"prompt": [{"role": "user", "content": "the film ?"}]}, tokenizer, 16)
    assert "labels" not in row
    assert row["input_ids"][-2:] == _ids(tokenizer, "<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="more than max_length=3"):
        tokenize_lm_example({"prompt": [{"role": "user", "content": "the film ?"}]}, tokenizer, 3)


def test_chat_template_problems_are_errors():
    messages = [{"role": "user", "content": "the film"}, {"role": "assistant", "content": "good"}]
    with pytest.raises(ValueError, match="has no chat template"):
        tokenize_lm_example({"messages": messages}, tiny_chat_tokenizer(chat_template=None))
    # A template whose rendering of the first turns is not a prefix of the whole (here: it starts with a count).
    counting = "{{ messages|length }}" + CHATML
    with pytest.raises(ValueError, match="not render the conversation up to an assistant turn as a prefix"):
        tokenize_lm_example({"messages": messages}, tiny_chat_tokenizer(chat_template=counting))
    with pytest.raises(ValueError, match=r"needs a 'text', 'messages' or 'prompt'.*got fields \['content'\]"):
        tokenize_lm_example({"content": "x"}, tiny_chat_tokenizer())
    with pytest.raises(ValueError, match="max_length must be an int >= 2"):
        tokenize_lm_example({"text": "the"}, tiny_chat_tokenizer(), max_length=1)


def test_tokenize_lm_dataset_replaces_format_columns_and_names_bad_rows():
    tokenizer = tiny_chat_tokenizer()
    data = Dataset.from_dict({"prompt": ["the film", "a film"], "completion": [" good", " bad"], "label": [1, 0]})
    out = tokenize_lm_dataset(DatasetDict({"train": data}), tokenizer, max_length=8)
    assert out["train"].column_names == ["label", "input_ids", "attention_mask", "labels"]
    assert list(out["train"]["label"]) == [1, 0]
    bad = Dataset.from_dict({"prompt": ["the film", "a film"], "completion": [" good", ""]})
    with pytest.raises(ValueError, match="Row 1: completion is empty"):
        tokenize_lm_dataset(bad, tokenizer)
    with pytest.raises(ValueError, match=r"needs a 'text', 'messages' or 'prompt'.*\['completion'\]"):
        tokenize_lm_dataset(Dataset.from_dict({"completion": ["x"]}), tokenizer)


def test_tokenized_fingerprint_follows_everything_the_ids_depend_on():
    """The tokenising map's fingerprint is given, not hashed by datasets (which pickles the tokenizers), and changes
    with the data, the tokenizer's vocabulary or chat template, the settings and the code; a slow tokenizer leaves the
    hashing to datasets."""
    data = Dataset.from_dict({"text": ["the film is good", "a film"]})
    tokenizer = tiny_chat_tokenizer()
    base = tokenized_fingerprint(data, [tokenizer], (__file__,), max_length=8)
    assert base == tokenized_fingerprint(data, [tiny_chat_tokenizer()], (__file__,), max_length=8)
    assert len(base) == 64
    others = [
        tokenized_fingerprint(Dataset.from_dict({"text": ["the film is bad", "a film"]}), [tokenizer], (__file__,),
                              max_length=8),
        tokenized_fingerprint(data, [tiny_chat_tokenizer(chat_template=CHATML + " ")], (__file__,), max_length=8),
        tokenized_fingerprint(data, [tiny_chat_tokenizer(bos=True)], (__file__,), max_length=8),
        tokenized_fingerprint(data, [tokenizer], (__file__,), max_length=9),
        tokenized_fingerprint(data, [tokenizer], (), max_length=8),
    ]
    assert len({base, *others}) == 6
    out = tokenize_lm_dataset(data, tokenizer, max_length=8)
    assert out._fingerprint == tokenized_fingerprint(data, [tokenizer], (),
                                                     max_length=8)

    class Slow:  # no backend_tokenizer: a slow (Python) tokenizer
        init_kwargs = {}

    assert tokenized_fingerprint(data, [Slow()], (__file__,)) is None


# ----- builders on the real corpora -----


@pytest.fixture(scope="module")
def articles():
    return load_bbc_news_articles()


def test_bbc_articles_are_split_by_article_without_leakage(articles):
    sizes = {split: len(data) for split, data in articles.items()}
    assert sizes == {"train": 1556, "validation": 224, "test": 445} and sum(sizes.values()) == 2225
    split_of_text, split_of_headline = {}, {}
    for split, data in articles.items():
        for text, headline in zip(data["text"], data["headline"]):
            split_of_text.setdefault(text, set()).add(split)
            split_of_headline.setdefault(" ".join(headline.split()).lower(), set()).add(split)
            assert text.startswith(headline)
    assert len(split_of_text) == 2127  # distinct texts: 98 files repeat another one
    assert all(len(splits) == 1 for splits in split_of_text.values())
    assert all(len(splits) == 1 for splits in split_of_headline.values())
    # Stratified by topic: each topic's share of the test split is close to its share overall.
    overall = np.bincount(sum((list(d["label"]) for d in articles.values()), []), minlength=5) / 2225
    test_share = np.bincount(articles["test"]["label"], minlength=5) / 445
    assert np.abs(test_share - overall).max() < 0.02


def test_bbc_articles_split_is_seeded(articles):
    assert list(load_bbc_news_articles(seed=42)["test"]["text"]) == list(articles["test"]["text"])
    assert list(load_bbc_news_articles(seed=7)["test"]["text"]) != list(articles["test"]["text"])


def test_lm_text_dataset(articles):
    text = lm_text_dataset()
    assert text["validation"].column_names == ["text"]
    assert list(text["validation"]["text"]) == list(articles["validation"]["text"])


def test_lm_chat_dataset_formats(articles):
    topic = lm_chat_dataset("topic")
    names = topic["train"].features["label"].names
    assert names == ["business", "entertainment", "politics", "sports", "tech"]
    row = topic["test"][0]
    assert row["prompt"][0]["role"] == "user" and row["prompt"][0]["content"].startswith(
        "What is the topic of this news article? Answer with one word: business, entertainment, politics, sports or "
        "tech.\n\n"
    )
    assert row["prompt"][0]["content"].endswith(articles["test"][0]["text"])
    assert row["completion"] == [{"role": "assistant", "content": names[row["label"]]}]

    summarize = lm_chat_dataset("summarize", max_words=20)
    assert summarize["train"].column_names == ["prompt"]
    content = summarize["train"][0]["prompt"][0]["content"]
    assert content.endswith(" ...") and len(content.split("\n\n", 1)[1].split()) == 21

    sentiment = lm_chat_dataset("sentiment", format="messages")
    assert sentiment["train"].features["label"].names == ["negative", "positive"]
    for row in sentiment["validation"].select(range(20)):
        user, assistant = row["messages"]
        assert user["content"].startswith("Is this movie review positive or negative? Answer with one word.\n\nReview: ")
        assert assistant == {"role": "assistant", "content": ["negative", "positive"][row["label"]]}

    standard = lm_chat_dataset("sentiment", format="standard")["test"][0]
    assert standard["prompt"].endswith("\nAnswer:") and standard["completion"] in (" negative", " positive")


def test_lm_chat_sentiment_keeps_the_movie_split():
    from hf_kd.data import load_rotten_tomatoes

    reviews = load_rotten_tomatoes()
    sentiment = lm_chat_dataset("sentiment")
    for split in ("train", "test"):
        assert len(sentiment[split]) == len(reviews[split])
        assert list(sentiment[split]["label"]) == list(reviews[split]["label"])  # fresh = 1 = "positive"


def test_lm_chat_dataset_errors():
    with pytest.raises(ValueError, match=r"task must be one of \('summarize', 'topic', 'sentiment'\)"):
        lm_chat_dataset("translate")
    with pytest.raises(ValueError, match="format must be one of"):
        lm_chat_dataset("topic", format="alpaca")
    with pytest.raises(ValueError, match="'summarize' has no gold answer"):
        lm_chat_dataset("summarize", format="messages")
    with pytest.raises(ValueError, match="max_words must be a positive int"):
        lm_chat_dataset("topic", max_words=0)
    assert LM_CHAT_TASKS == ("summarize", "topic", "sentiment")


# ----- the real SmolLM2 tokenizer, small slices -----


@pytest.mark.slow
@pytest.mark.parametrize("task,format", [("topic", "conversational"), ("sentiment", "messages"),
                                         ("sentiment", "standard")])
def test_smollm2_tokenizer_labels_exactly_the_answer(task, format):
    tokenizer = causal_lm_tokenizer()
    data = lm_chat_dataset(task, format=format, max_words=80)["validation"].select(range(4))
    tokens = tokenize_lm_dataset(data, tokenizer, max_length=256)
    names = data.features["label"].names
    for row, label in zip(tokens, data["label"]):
        answer = tokenizer.decode(_completion(row))
        if format == "standard":
            assert answer == f" {names[label]}<|im_end|>"
        else:
            assert answer == f"{names[label]}<|im_end|>\n"
        assert len(row["input_ids"]) <= 256 and row["labels"][0] == -100


@pytest.mark.slow
def test_smollm2_tokenizer_on_articles_and_prompts():
    tokenizer = causal_lm_tokenizer()
    text = tokenize_lm_dataset(lm_text_dataset()["test"].select(range(3)), tokenizer, max_length=128)
    assert all(len(ids) == 128 and ids == labels for ids, labels in zip(text["input_ids"], text["labels"]))
    prompts = tokenize_lm_dataset(lm_chat_dataset("summarize", max_words=60)["test"].select(range(3)), tokenizer, 512)
    assert "labels" not in prompts.column_names
    assert all(tokenizer.decode(ids).endswith("<|im_start|>assistant\n") for ids in prompts["input_ids"])
    full = lm_chat_dataset("topic")["test"].select(range(30))  # whole articles: some exceed 64 tokens
    with pytest.raises(ValueError, match=r"Row 0: The prompt has \d+ tokens, so nothing of the completion fits"):
        tokenize_lm_dataset(full, tokenizer, max_length=64)


@pytest.mark.slow
def test_smollm2_pieces_fit_together_for_token_level_distillation():
    """Tokenised chat data -> teacher (SmolLM2) and a 15-layer student -> shifted lm_kd_loss -> student gradients."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    from hf_kd.losses import lm_kd_loss
    from hf_kd.student import make_student

    tokenizer, teacher = causal_lm_tokenizer(), causal_lm()
    student = make_student(teacher, 15).train()
    data = tokenize_lm_dataset(lm_chat_dataset("sentiment")["validation"].select(range(2)), tokenizer, 128)
    batch = DataCollatorForSeq2Seq(tokenizer, padding=True, return_tensors="pt")(
        [{k: row[k] for k in ("input_ids", "attention_mask", "labels")} for row in data]
    )
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]  # position t predicts token t + 1
    loss = lm_kd_loss(student_logits[:, :-1], teacher_logits[:, :-1], labels, loss_type="jsd", alpha=0.5)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert student.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    # The teacher answers the sentiment prompts: its loss on the gold answers is low, far below uniform (log 49152).
    teacher_ce = lm_kd_loss(teacher_logits[:, :-1], teacher_logits[:, :-1], labels, alpha=0.0)
    assert teacher_ce.item() < 3.0 < np.log(49152)
