"""Distillation across tokenizers (issue 19): span alignment, shared vocabulary, ULD / hybrid losses, the rows and the
DistillTrainer path, with the real Gemma-3 (SentencePiece) and SmolLM2 (byte-level BPE) tokenizers and tiny models."""

import copy
import math

import datasets
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_kd import DistillConfig, DistillTrainer
from hf_kd.cross_tokenizer import (
    CROSS_TOKENIZER_COLUMNS,
    AlignedSpan,
    CrossTokenizerCollator,
    align_token_spans,
    shared_vocabulary_map,
    span_token_mask,
    token_bytes,
    tokenize_cross_tokenizer_dataset,
    tokenize_cross_tokenizer_example,
)
from hf_kd.lm_data import LMDataCollator, tokenize_lm_example
from hf_kd.losses import (
    cached_span_log_probs,
    cached_span_top_k,
    cached_uld_loss,
    hybrid_loss,
    span_log_probs,
    uld_loss,
)

from .testing_utils import GEMMA3, SMOLLM2, causal_lm_tokenizer, tiny_llama

TEXTS = [
    "Hello  world!\n\n  Café 🤗 naïve — ok",
    "  leading spaces, trailing tabs\t\t",
    "Family: 👨‍👩‍👧, flags 🇫🇷🇯🇵, CJK 東京タワー, math ∑x² ≤ ∞.",
    "code:\n    def f(x):\n        return x  # done\n\n\n",
    "Ünïcödé àccents and ﬁ ligatures, Ελληνικά, русский, العربية",
]


@pytest.fixture(scope="module")
def smol():
    return causal_lm_tokenizer(SMOLLM2)


@pytest.fixture(scope="module")
def gemma():
    return causal_lm_tokenizer(GEMMA3)


@pytest.fixture(scope="module")
def shared(smol, gemma):
    return shared_vocabulary_map(smol, gemma)


@pytest.fixture(scope="module")
def byte_maps(smol, gemma):
    return token_bytes(smol), token_bytes(gemma)


def word_tokenizer(words):
    """A fast word-level tokenizer over `words` (whitespace split, so its offsets leave the spaces uncovered)."""
    vocab = {"[UNK]": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<eos>")


# ---- alignment ---------------------------------------------------------------------------------------------------


class TestAlignTokenSpans:
    def test_merges_where_one_side_splits(self):
        # "abcde": student ab|c|de, teacher a|bc|de -> spans "abc" (2 + 2 tokens) and "de" (1 + 1).
        spans = align_token_spans([(0, 2), (2, 3), (3, 5)], [(0, 1), (1, 3), (3, 5)], 5)
        assert spans == [AlignedSpan(0, 3, 0, 2, 0, 2), AlignedSpan(3, 5, 2, 3, 2, 3)]

    def test_one_to_one(self):
        offsets = [(0, 1), (1, 4), (4, 6)]
        assert [(s.student_start, s.teacher_end) for s in align_token_spans(offsets, offsets)] == [(0, 1), (1, 2),
                                                                                                    (2, 3)]

    def test_overlapping_byte_pieces_and_zero_width_specials(self):
        # Student: " " then an emoji in three byte tokens sharing the character (1, 2); teacher: BOS, one token, EOS.
        student = [(0, 1), (1, 2), (1, 2), (1, 2), (2, 3)]
        teacher = [(0, 0), (0, 2), (2, 3), (3, 3)]
        spans = align_token_spans(student, teacher, 3)
        assert spans == [AlignedSpan(0, 2, 0, 4, 1, 2), AlignedSpan(2, 3, 4, 5, 2, 3)]

    @pytest.mark.parametrize(
        "student, teacher, match",
        [
            ([(0, 1), (2, 3)], [(0, 3)], "student offsets leave characters 1..2 uncovered"),
            ([(1, 3)], [(0, 3)], "student tokens start at character 1"),
            ([(0, 3)], [(0, 2)], "teacher tokens cover characters 0..2 of a text of 3"),
            ([(0, 0)], [(0, 2)], "student tokenization has no token"),
        ],
    )
    def test_offsets_that_do_not_tile_the_text(self, student, teacher, match):
        with pytest.raises(ValueError, match=match):
            align_token_spans(student, teacher, 3)

    def test_different_lengths_without_text_length(self):
        with pytest.raises(ValueError, match="not of the same text"):
            align_token_spans([(0, 3)], [(0, 2)])

    @pytest.mark.parametrize("text", TEXTS)
    def test_round_trip_on_real_tokenizers(self, text, smol, gemma, byte_maps):
        """Every character in exactly one span; on each side every token in exactly one span, whose bytes are the
        span's text (markers normalised by token_bytes)."""
        student, teacher = (tok(text, return_offsets_mapping=True) for tok in (smol, gemma))
        spans = align_token_spans(student["offset_mapping"], teacher["offset_mapping"], len(text))
        assert spans[0].char_start == 0 and spans[-1].char_end == len(text)
        assert all(a.char_end == b.char_start for a, b in zip(spans, spans[1:]))
        for encoded, bytes_of, start, end in (
            (student, byte_maps[0], "student_start", "student_end"),
            (teacher, byte_maps[1], "teacher_start", "teacher_end"),
        ):
            ids = encoded["input_ids"]
            covered = [i for s in spans for i in range(getattr(s, start), getattr(s, end))]
            real = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if b > a]
            assert covered == real  # each token once, in order (Gemma's BOS in none)
            for span in spans:
                got = b"".join(bytes_of[ids[i]] for i in range(getattr(span, start), getattr(span, end)))
                assert got == text[span.char_start : span.char_end].encode("utf-8")
        if text == TEXTS[0]:  # the tokenizers disagree here: some span merges tokens on one side (" naïve")
            assert any(s.student_end - s.student_start != s.teacher_end - s.teacher_start for s in spans)


# ---- shared vocabulary ---------------------------------------------------------------------------------------------


class TestSharedVocabulary:
    def test_real_pair(self, smol, gemma, shared, byte_maps):
        student_ids, teacher_ids = shared
        assert len(student_ids) == len(teacher_ids) == 46145  # of SmolLM2's 49,152 (docs/methods/cross_tokenizer.md)
        assert len(set(student_ids.tolist())) == len(set(teacher_ids.tolist())) == len(student_ids)
        assert all(byte_maps[0][s] == byte_maps[1][t] for s, t in zip(student_ids.tolist(), teacher_ids.tolist()))
        pairs = dict(zip(smol.convert_ids_to_tokens(student_ids.tolist()), gemma.convert_ids_to_tokens(
            teacher_ids.tolist())))
        assert pairs["Ġthe"] == "▁the" and pairs["Ċ"] == "\n" and pairs["Hello"] == "Hello"
        specials = set(smol.all_special_ids)
        assert not specials & set(student_ids.tolist()) and not set(gemma.all_special_ids) & set(teacher_ids.tolist())
        # A plain string comparison (GOLD's) misses every token with a marker.
        assert len(set(smol.get_vocab()) & set(gemma.get_vocab())) < len(student_ids) / 2

    def test_token_bytes_markers(self, smol, gemma, byte_maps):
        assert byte_maps[0][smol.convert_tokens_to_ids("ĠCaf")] == b" Caf"
        assert byte_maps[0][smol.convert_tokens_to_ids("Ã©")] == "é".encode()
        assert byte_maps[1][gemma.convert_tokens_to_ids("<0xC3>")] == b"\xc3"
        assert byte_maps[1][gemma.convert_tokens_to_ids("▁▁")] == b"  "
        assert gemma.bos_token_id not in byte_maps[1]

    def test_disjoint_vocabularies(self):
        student_ids, teacher_ids = shared_vocabulary_map(word_tokenizer(["a", "b"]), word_tokenizer(["x", "y"]))
        assert len(student_ids) == len(teacher_ids) == 0


# ---- losses --------------------------------------------------------------------------------------------------------


def naive_span_log_probs(logits, ids, spans, T):
    out = []
    for b, row in enumerate(spans):
        logp = torch.log_softmax(logits[b].double() / T, -1)
        for start, end in row:
            earlier = sum(logp[k - 1, ids[b, k]] for k in range(start, end - 1))
            out.append(logp[end - 2] + earlier)
    return torch.stack(out)


def naive_uld(log_s, log_t):
    total = []
    for ps, pt in zip(log_s.double().exp().numpy(), log_t.double().exp().numpy()):
        ps, pt = -np.sort(-ps), -np.sort(-pt)
        width = max(len(ps), len(pt))
        ps, pt = np.pad(ps, (0, width - len(ps))), np.pad(pt, (0, width - len(pt)))
        total.append(np.abs(ps - pt).sum())
    return np.array(total)


class TestLosses:
    def test_span_log_probs_is_the_chain_rule(self):
        torch.manual_seed(0)
        logits, ids = torch.randn(2, 7, 11), torch.randint(0, 11, (2, 7))
        spans = [[(1, 2), (2, 5), (5, 7)], [(3, 4), (4, 6)]]
        starts = torch.tensor([[a for a, _ in spans[0]], [a for a, _ in spans[1]] + [-1]])
        ends = torch.tensor([[b for _, b in spans[0]], [b for _, b in spans[1]] + [-1]])
        got = span_log_probs(logits, ids, starts, ends, temperature=2.0)
        torch.testing.assert_close(got, naive_span_log_probs(logits, ids, spans, 2.0).float())
        # One-token spans are plain next-token distributions; a merged span's entry of its last token is the
        # log-probability of the whole span, and its vector sums to the probability of the earlier tokens.
        torch.testing.assert_close(got[0], torch.log_softmax(logits[0, 0] / 2, -1))
        logp = torch.log_softmax(logits[0] / 2, -1)
        torch.testing.assert_close(got[1, ids[0, 4]], logp[1, ids[0, 2]] + logp[2, ids[0, 3]] + logp[3, ids[0, 4]])
        torch.testing.assert_close(got[1].exp().sum(), (logp[1, ids[0, 2]] + logp[2, ids[0, 3]]).exp())

    def test_span_log_probs_refuses_a_span_at_token_0(self):
        with pytest.raises(ValueError, match="1 <= start < end"):
            span_log_probs(torch.randn(1, 4, 5), torch.zeros(1, 4, dtype=torch.long), torch.tensor([[0]]),
                           torch.tensor([[1]]))

    def test_uld_matches_a_direct_implementation(self):
        torch.manual_seed(1)
        log_s = torch.log_softmax(torch.randn(5, 13), -1)
        log_t = torch.log_softmax(torch.randn(5, 29) * 3, -1) - 0.3  # unnormalised rows (merged spans) too
        direct = naive_uld(log_s, log_t)
        torch.testing.assert_close(uld_loss(log_s, log_t, reduction="none").double(), torch.from_numpy(direct))
        assert uld_loss(log_s, log_t).item() == pytest.approx(direct.mean(), rel=1e-5)
        assert uld_loss(log_s, log_t, reduction="sum").item() == pytest.approx(direct.sum(), rel=1e-5)
        assert uld_loss(log_s, log_t, num_items_in_batch=10).item() == pytest.approx(direct.sum() / 10, rel=1e-5)
        # Zero for the same distribution up to a permutation of the vocabulary, and with the teacher's padding.
        assert uld_loss(log_s, torch.cat([log_s.flip(-1), torch.full((5, 4), -torch.inf)], -1)).item() < 1e-6

    def test_uld_gradient_reaches_the_student(self):
        logits = torch.randn(3, 8, requires_grad=True)
        uld_loss(torch.log_softmax(logits, -1), torch.log_softmax(torch.randn(3, 20), -1)).backward()
        assert logits.grad.abs().sum() > 0

    def test_hybrid_matches_a_direct_implementation(self):
        torch.manual_seed(2)
        log_s = torch.log_softmax(torch.randn(4, 10), -1)
        log_t = torch.log_softmax(torch.randn(4, 15), -1)
        student_ids, teacher_ids = torch.tensor([0, 3, 7]), torch.tensor([14, 2, 5])
        got = hybrid_loss(log_s, log_t, student_ids, teacher_ids, shared_weight=0.3, reduction="none")
        for row in range(4):
            q_s = log_s[row, student_ids].double().exp()
            q_t = log_t[row, teacher_ids].double().exp()
            q_s, q_t = q_s / q_s.sum(), q_t / q_t.sum()
            kl = (q_t * (q_t / q_s).log()).sum().item()
            rest_s = np.delete(log_s[row].numpy(), student_ids.numpy())
            rest_t = np.delete(log_t[row].numpy(), teacher_ids.numpy())
            rest = naive_uld(torch.from_numpy(rest_s)[None], torch.from_numpy(rest_t)[None])[0]
            assert got[row].item() == pytest.approx(0.3 * kl + 0.7 * rest, rel=1e-5)
        assert hybrid_loss(log_s, log_t, student_ids, teacher_ids).item() == pytest.approx(
            hybrid_loss(log_s, log_t, student_ids, teacher_ids, reduction="none").mean().item(), rel=1e-6)

    def test_hybrid_needs_shared_tokens(self):
        empty = torch.tensor([], dtype=torch.long)
        with pytest.raises(ValueError, match="not empty.*use uld_loss"):
            hybrid_loss(torch.zeros(1, 3), torch.zeros(1, 4), empty, empty)
        with pytest.raises(ValueError, match="shared_weight"):
            hybrid_loss(torch.zeros(1, 3), torch.zeros(1, 4), torch.tensor([0]), torch.tensor([0]), shared_weight=2)


# ---- rows ----------------------------------------------------------------------------------------------------------


class TestRows:
    def test_prompt_completion_row(self, smol, gemma, byte_maps):
        example = {"prompt": "Q: what is 2+2? Answer in words 🤗\nA:", "completion": " four, naïvely"}
        row = tokenize_cross_tokenizer_example(example, smol, gemma, 64)
        student = tokenize_lm_example(example, smol, 64)
        assert {k: row[k] for k in student} == student  # the student's row is the same-tokenizer path's
        assert row["teacher_input_ids"][0] == gemma.bos_token_id and row["teacher_input_ids"][-1] == gemma.eos_token_id
        spans = list(zip(*(row[c] for c in CROSS_TOKENIZER_COLUMNS[1:])))
        labels = row["labels"]
        text = []
        for s0, s1, t0, t1 in spans[:-1]:
            assert all(label != -100 for label in labels[s0:s1])  # completion spans only
            piece = b"".join(byte_maps[0][i] for i in row["input_ids"][s0:s1])
            assert piece == b"".join(byte_maps[1][i] for i in row["teacher_input_ids"][t0:t1])
            text.append(piece)
        assert b"".join(text) == example["completion"].encode()
        s0, s1, t0, t1 = spans[-1]  # the two EOS
        assert row["input_ids"][s0:s1] == [smol.eos_token_id] and row["teacher_input_ids"][t0:t1] == [
            gemma.eos_token_id]

    def test_chat_row(self, smol, gemma):
        """Conversational data: the teacher reads the student's rendered template; the spans are the assistant turn
        (its end-of-turn tokens included, spelled as text by the teacher)."""
        messages = [{"role": "user", "content": "Is it blue? 🤔"}, {"role": "assistant", "content": "Yes, naïvely."}]
        row = tokenize_cross_tokenizer_example({"messages": messages}, smol, gemma, 128)
        assert {k: row[k] for k in ("input_ids", "labels")} == {
            k: v for k, v in tokenize_lm_example({"messages": messages}, smol, 128).items() if k != "attention_mask"}
        starts, ends = row["student_span_starts"], row["student_span_ends"]
        student_text = smol.decode(row["input_ids"][starts[0] : ends[-1]])
        teacher_text = gemma.decode(row["teacher_input_ids"][row["teacher_span_starts"][0] : row["teacher_span_ends"][-1]])
        assert student_text == teacher_text == "Yes, naïvely.<|im_end|>\n"

    def test_text_row_and_truncation(self, smol, gemma):
        example = {"text": TEXTS[2]}
        full = tokenize_cross_tokenizer_example(example, smol, gemma, 1024)
        assert full["student_span_starts"][0] == 1  # the first student token has no prediction
        cut = tokenize_cross_tokenizer_example(example, smol, gemma, 12)
        assert len(cut["input_ids"]) == 12 and max(cut["student_span_ends"]) <= 12
        assert len(cut["teacher_input_ids"]) == max(cut["teacher_span_ends"])
        assert cut["student_span_starts"] == full["student_span_starts"][: len(cut["student_span_starts"])]

    def test_collator(self, smol, gemma):
        data = datasets.Dataset.from_list([{"text": TEXTS[0]}, {"text": "Short."}])
        rows = tokenize_cross_tokenizer_dataset(data, smol, gemma, 32)
        batch = CrossTokenizerCollator(LMDataCollator(0), teacher_pad_token_id=0)(list(rows))
        assert batch["teacher_input_ids"].shape == batch["teacher_attention_mask"].shape
        assert batch["teacher_attention_mask"][1].sum() == len(rows[1]["teacher_input_ids"])
        assert (batch["student_span_starts"][1, len(rows[1]["student_span_starts"]):] == -1).all()
        assert set(batch) == {"input_ids", "attention_mask", "labels", "teacher_attention_mask",
                              *CROSS_TOKENIZER_COLUMNS}

    def test_a_text_a_tokenizer_cannot_round_trip(self, smol):
        with pytest.raises(ValueError, match="Row 0: The teacher's tokenizer .* cannot round-trip .* unknown token"):
            tokenize_cross_tokenizer_dataset(datasets.Dataset.from_list([{"text": "a b zzz"}]), smol,
                                             word_tokenizer(["a", "b"]), 32)

    def test_offsets_that_leave_spaces_out(self, smol):
        with pytest.raises(ValueError, match="teacher offsets leave characters 1..2 uncovered"):
            tokenize_cross_tokenizer_example({"text": "a b"}, smol, word_tokenizer(["a", "b"]), 32)

    def test_slow_tokenizer(self, smol):
        class Slow:
            is_fast = False
            name_or_path = "slow-one"

        with pytest.raises(ValueError, match="teacher's tokenizer, but Slow .*'slow-one'.* slow"):
            tokenize_cross_tokenizer_dataset(datasets.Dataset.from_list([{"text": "a"}]), smol, Slow(), 32)


# ---- DistillTrainer ------------------------------------------------------------------------------------------------


def tiny_lm(vocab_size, seed):
    """1 layer, hidden 16: fast even with Gemma's 262,144-token vocabulary."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def chat_data(n=4):
    rows = [
        {"prompt": f"Question {i}: what colour is the sky? 🤔\nAnswer:", "completion": f" Blue, naïvely {i}."}
        for i in range(n)
    ]
    return datasets.Dataset.from_list(rows)


def make_args(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, per_device_eval_batch_size=2,
        num_train_epochs=1, learning_rate=3e-2, logging_steps=1, eval_strategy="no", save_strategy="no",
        report_to="none", use_cpu=True, seed=0, cross_tokenizer="uld", temperature=1.0, alpha=0.5,
        lm_max_length=48,
    )
    defaults.update(kwargs)
    return DistillConfig(**defaults)


@pytest.fixture(scope="module")
def teacher(gemma):
    return tiny_lm(len(gemma), seed=0).eval()


def make_trainer(tmp_path, smol, gemma, teacher, args=None, train=None, model=None, **kwargs):
    kwargs.setdefault("teacher_processing_class", gemma)
    return DistillTrainer(
        model=model if model is not None else tiny_lm(len(smol), seed=1),
        args=args if args is not None else make_args(tmp_path),
        teacher_model=teacher, train_dataset=train if train is not None else chat_data(),
        processing_class=smol, **kwargs,
    )


class TestDistillTrainer:
    @pytest.mark.parametrize("loss", ["uld", "hybrid"])
    def test_training_lowers_the_loss(self, tmp_path, smol, gemma, teacher, loss):
        args = make_args(tmp_path, cross_tokenizer=loss, num_train_epochs=6, alpha=1.0)
        trainer = make_trainer(tmp_path, smol, gemma, teacher, args=args, train=chat_data(2))
        before = [p.detach().clone() for p in trainer.model.parameters()]
        trainer.train()
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        assert len(losses) == 6 and all(np.isfinite(losses)) and losses[-1] < losses[0]
        assert all(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))  # gradient flows
        assert all("kd_loss" in log for log in trainer.state.log_history if "loss" in log)
        if loss == "hybrid":
            assert len(trainer._shared_vocabulary[0]) == 46145
        else:  # evaluation: the student's LM metrics, no top1_agreement (the teacher predicts over another vocabulary)
            metrics = trainer.evaluate(eval_dataset=chat_data(2))
            assert np.isfinite(metrics["eval_loss"]) and metrics["eval_perplexity"] > 1
            assert "eval_top1_agreement" not in metrics

    def test_exact_under_gradient_accumulation(self, tmp_path, smol, gemma, teacher):
        """Two micro-batches with the accumulated batch's token count sum to the loss of the whole batch."""
        trainer = make_trainer(tmp_path, smol, gemma, teacher, args=make_args(tmp_path, cross_tokenizer="hybrid"))
        rows = list(trainer.train_dataset)
        collate = trainer.data_collator
        whole = collate(rows)
        total = int((whole["labels"][:, 1:] != -100).sum())
        model = trainer.model.eval()
        with torch.no_grad():
            full = trainer.compute_loss(model, dict(whole), num_items_in_batch=total)
            parts = sum(trainer.compute_loss(model, collate(rows[i : i + 2]), num_items_in_batch=total)
                        for i in (0, 2))
            mean = trainer.compute_loss(model, dict(whole))
        torch.testing.assert_close(full, parts, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(full, mean, rtol=1e-5, atol=1e-6)

    def test_teacher_tokenizer_from_its_folder(self, tmp_path, smol, gemma, teacher):
        folder = tmp_path / "teacher"
        teacher.save_pretrained(folder)
        gemma.save_pretrained(folder)
        trainer = DistillTrainer(model=tiny_lm(len(smol), seed=1), args=make_args(tmp_path), teacher_model=str(folder),
                                 train_dataset=chat_data(2), processing_class=smol)
        assert trainer.train_dataset[0]["teacher_input_ids"][0] == gemma.bos_token_id


class TestErrors:
    def test_mismatch_without_the_option_names_it(self, tmp_path, smol, gemma, teacher):
        args = make_args(tmp_path, cross_tokenizer=None)
        with pytest.raises(ValueError, match=r"vocabularies differ.*cross_tokenizer=\"uld\" \| \"hybrid\""):
            make_trainer(tmp_path, smol, gemma, teacher, args=args)

    def test_no_teacher_tokenizer(self, tmp_path, smol, teacher):
        with pytest.raises(ValueError, match="needs the teacher's tokenizer .* teacher_processing_class="):
            DistillTrainer(model=tiny_lm(len(smol), seed=1), args=make_args(tmp_path), teacher_model=teacher,
                           train_dataset=chat_data(2), processing_class=smol)

    def test_hybrid_without_shared_tokens(self, tmp_path):
        student_tok, teacher_tok = word_tokenizer(["a", "b"]), word_tokenizer(["x", "y"])
        with pytest.raises(ValueError, match="share none: use cross_tokenizer='uld'"):
            DistillTrainer(model=tiny_llama(layers=1, seed=1), args=make_args(tmp_path, cross_tokenizer="hybrid"),
                           teacher_model=tiny_llama(layers=1), train_dataset=datasets.Dataset.from_list([{"text": "a"}]),
                           processing_class=student_tok, teacher_processing_class=teacher_tok)

    def test_pre_tokenized_rows_without_the_teacher_columns(self, tmp_path, smol, gemma, teacher):
        rows = datasets.Dataset.from_list([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}])
        with pytest.raises(ValueError, match=r"train_dataset is pre-tokenized .* lacks \['teacher_input_ids'"):
            make_trainer(tmp_path, smol, gemma, teacher, train=rows)

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            ({"cache_teacher_logits": True, "lm_cache_tail": "renormalise"},
             "lm_cache_tail='renormalise' is for the same-tokenizer sparse loss.*keep lm_cache_tail='bucket'"),
            ({"lmbda": 0.5}, "not supported yet with lmbda=0.5"),
            ({"seq_kd": True}, "not supported yet with seq_kd=True"),
            ({"loss_type": "jsd"}, "not supported yet with loss_type='jsd'"),
            ({"cross_tokenizer": "kl"}, r"cross_tokenizer must be one of \(None, 'uld', 'hybrid'\)"),
            ({"cross_tokenizer_shared_weight": 1.5}, "cross_tokenizer_shared_weight must be a number in"),
        ],
    )
    def test_config(self, tmp_path, kwargs, match):
        with pytest.raises(ValueError, match=match):
            make_args(tmp_path, **kwargs)


# ---- the teacher's top-k cache (cache_teacher_logits) ------------------------------------------------------------


def sparse_teacher(logits, ids, k, T):
    """What the cross-tokenizer cache stores, per position (all positions), from full logits: the top-k ids and
    log-probs at T, the log of the rest of the mass and the realised next token's log-prob."""
    logp = torch.log_softmax(logits / T, -1)
    values, top = logp[:, :-1].topk(k, -1)
    rest = logp[:, :-1].scatter(-1, top, -math.inf).logsumexp(-1)
    token = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    return top, values, rest, token


class TestCachedSpanLogProbs:
    SPANS = ([[1, 2, 5], [3, 4, -1]], [[2, 5, 7], [4, 6, -1]])

    def test_with_the_whole_vocabulary_it_is_span_log_probs(self):
        torch.manual_seed(3)
        logits, ids = torch.randn(2, 7, 11) * 2, torch.randint(0, 11, (2, 7))
        starts, ends = (torch.tensor(x) for x in self.SPANS)
        top, values, rest, token = sparse_teacher(logits, ids, 11, 1.5)
        got = cached_span_log_probs(top, values, rest, token, starts, ends, 11)
        torch.testing.assert_close(got, span_log_probs(logits, ids, starts, ends, 1.5))

    def test_top_k_and_chain_rule_exact_tail_spread_evenly(self):
        torch.manual_seed(4)
        logits, ids = torch.randn(2, 7, 11) * 2, torch.randint(0, 11, (2, 7))
        starts, ends = (torch.tensor(x) for x in self.SPANS)
        full = span_log_probs(logits, ids, starts, ends, 2.0)
        top, values, rest, token = sparse_teacher(logits, ids, 3, 2.0)
        got = cached_span_log_probs(top, values, rest, token, starts, ends, 11)
        rows, spans = (starts >= 0).nonzero(as_tuple=True)
        last_top = top[rows, ends[rows, spans] - 2]
        torch.testing.assert_close(got.gather(-1, last_top), full.gather(-1, last_top))  # top-k entries exact
        torch.testing.assert_close(got.exp().sum(-1), full.exp().sum(-1))  # same mass: p(earlier tokens)
        outside = torch.ones_like(got, dtype=torch.bool).scatter(-1, last_top, False)
        tail = got[outside].view(len(got), 8)
        assert (tail == tail[:, :1]).all()  # spread evenly over the 8 other tokens
        assert (tail[:, 0] <= got.gather(-1, last_top).min(-1).values).all()  # never above a top-k entry

    def test_bad_shapes_and_k(self):
        top, values = torch.zeros(1, 3, 2, dtype=torch.long), torch.zeros(1, 3, 2)
        with pytest.raises(ValueError, match="1 <= k <= vocab_size = 1"):
            cached_span_log_probs(top, values, torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([[1]]),
                                  torch.tensor([[2]]), 1)
        with pytest.raises(ValueError, match="tail_logprobs and token_logprobs must have shape"):
            cached_span_log_probs(top, values, torch.zeros(1, 2), torch.zeros(1, 3), torch.tensor([[1]]),
                                  torch.tensor([[2]]), 5)
        with pytest.raises(ValueError, match="1 <= start < end <= seq"):
            cached_span_log_probs(top, values, torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([[0]]),
                                  torch.tensor([[2]]), 5)

    def test_cached_uld_is_uld_without_a_tail_and_a_lower_bound_with_one(self):
        torch.manual_seed(5)
        logits, ids = torch.randn(2, 7, 23) * 3, torch.randint(0, 23, (2, 7))
        starts, ends = (torch.tensor(x) for x in self.SPANS)
        teacher = span_log_probs(logits, ids, starts, ends, 1.0)
        student = torch.log_softmax(torch.randn(len(teacher), 9) * 2, -1)  # a smaller vocabulary, as SmolLM2's
        full = uld_loss(student, teacher, reduction="none")
        _, top, tail, _ = cached_span_top_k(*sparse_teacher(logits, ids, 23, 1.0), starts, ends)
        torch.testing.assert_close(cached_uld_loss(student, top, tail, reduction="none"), full)
        for k in (1, 4, 12):
            _, top, tail, _ = cached_span_top_k(*sparse_teacher(logits, ids, k, 1.0), starts, ends)
            got = cached_uld_loss(student, top, tail, reduction="none")
            # sorted L1 on the first k places + the two tail masses compared as one bucket
            p_s = student.exp().sort(-1, descending=True).values
            p_s = torch.nn.functional.pad(p_s, (0, max(k - 9, 0)))
            p_t = teacher.exp().sort(-1, descending=True).values
            direct = (p_s[:, :k] - p_t[:, :k]).abs().sum(-1) + (p_s[:, k:].sum(-1) - p_t[:, k:].sum(-1)).abs()
            torch.testing.assert_close(got, direct)
            assert (got <= full + 1e-6).all()
            # a strict bound while both tails have tokens; past the student's 9 tokens its tail is empty: exact
            assert (got < full - 1e-4).any() if k < 9 else torch.allclose(got, full)
        assert cached_uld_loss(student, top, tail, num_items_in_batch=10).item() == pytest.approx(
            got.sum().item() / 10, rel=1e-5)

    def test_far_tail_splits_the_bucket_at_the_student_vocabulary(self):
        """With the teacher's mass past the student's 9 sorted places (where the student has none) the bound is
        tighter, still below uld_loss, and equals the direct formula."""
        torch.manual_seed(6)
        logits, ids = torch.randn(2, 7, 23) * 0.5, torch.randint(0, 23, (2, 7))  # flat: much mass past rank 9
        starts, ends = (torch.tensor(x) for x in self.SPANS)
        teacher = span_log_probs(logits, ids, starts, ends, 1.0)
        student = torch.log_softmax(torch.randn(len(teacher), 9) * 2, -1)
        full = uld_loss(student, teacher, reduction="none")
        logp = torch.log_softmax(logits, -1)[:, :-1]
        far = logp.sort(-1, descending=True).values[..., 9:].logsumexp(-1)
        _, top, tail, far_tail = cached_span_top_k(*sparse_teacher(logits, ids, 4, 1.0), starts, ends, far)
        bucket = cached_uld_loss(student, top, tail, reduction="none")
        split = cached_uld_loss(student, top, tail, far_tail, reduction="none")
        p_s = student.exp().sort(-1, descending=True).values
        p_t = teacher.exp().sort(-1, descending=True).values
        direct = ((p_s[:, :4] - p_t[:, :4]).abs().sum(-1) + (p_s[:, 4:].sum(-1) - p_t[:, 4:9].sum(-1)).abs()
                  + p_t[:, 9:].sum(-1))
        torch.testing.assert_close(split, direct)
        assert (bucket <= split + 1e-6).all() and (split <= full + 1e-6).all() and (split > bucket + 1e-3).any()

    def test_cached_uld_gradient_reaches_the_student(self):
        logits = torch.randn(3, 8, requires_grad=True)
        top = torch.log_softmax(torch.randn(3, 20), -1).topk(4, -1).values
        cached_uld_loss(torch.log_softmax(logits, -1), top, torch.log1p(-top.exp().sum(-1))).backward()
        assert logits.grad.abs().sum() > 0

    def test_span_token_mask(self):
        mask = span_token_mask(torch.tensor([[1, 3, -1], [2, -1, -1]]), torch.tensor([[3, 4, -1], [5, -1, -1]]), 6)
        assert mask.int().tolist() == [[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0]]


def cache_args(tmp_path, cache="cache", **kwargs):
    return make_args(tmp_path, cache_teacher_logits=True, teacher_logits_cache_dir=str(tmp_path / cache), **kwargs)


def loss_pair(live, cached):
    """The live and the cached trainer's loss on the same rows (the cached batch carries the cache index)."""
    rows = [cached.train_dataset[i] for i in (2, 0, 3, 1)]
    batch = cached.data_collator(rows)
    assert batch["teacher_cache_index"].tolist() == [2, 0, 3, 1]
    live_batch = live.data_collator([{k: v for k, v in row.items() if k != "teacher_cache_index"} for row in rows])
    with torch.no_grad():
        return live.compute_loss(live.model, live_batch), cached.compute_loss(cached.model, batch)


@pytest.fixture(scope="module")
def saved_teacher(tmp_path_factory, teacher, gemma):
    folder = tmp_path_factory.mktemp("teacher")
    teacher.save_pretrained(folder)
    gemma.save_pretrained(folder)
    return str(folder)


def forbid_the_teacher(monkeypatch):
    """Any teacher load or forward from here on fails the test."""
    import hf_kd.trainer.distill_trainer as distill_trainer
    import hf_kd.trainer.teacher_mixin as teacher_mixin

    def no_teacher(*args, **kwargs):
        raise AssertionError("a cached run must not load or run the teacher")

    monkeypatch.setattr(teacher_mixin, "load_teacher", no_teacher)
    monkeypatch.setattr(teacher_mixin, "compute_teacher_lm_top_k", no_teacher)
    monkeypatch.setattr(distill_trainer, "teacher_logits_for_batch", no_teacher)


class TestTeacherCache:
    @pytest.mark.parametrize("loss", ["uld", "hybrid"])
    def test_k_equal_to_the_teacher_vocabulary_is_the_live_loss(self, tmp_path_factory, smol, gemma, teacher, loss):
        """k = the teacher's 262,144 tokens (more than the student's 49,152): the cached loss is the live one, at
        T != 1 (the cache is tempered). Both parametrisations read one cache: uld / hybrid is not in its key."""
        tmp_path = tmp_path_factory.getbasetemp() / "full_vocab"
        options = dict(cross_tokenizer=loss, temperature=2.0, alpha=0.7)
        live = make_trainer(tmp_path, smol, gemma, teacher, args=make_args(tmp_path, **options))
        cached = make_trainer(tmp_path, smol, gemma, teacher, model=live.model,
                              args=cache_args(tmp_path, lm_cache_top_k=teacher.config.vocab_size, **options))
        expected, got = loss_pair(live, cached)
        # Only the top-k log-probs' float16 rounding in the file separates them.
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

    @pytest.mark.parametrize("loss", ["uld", "hybrid"])
    def test_k_64_against_the_live_loss(self, tmp_path, smol, gemma, teacher, loss):
        """The approximation at k = 64 on the tiny random teacher, close to uniform over 262,144 tokens (nearly all
        its mass outside its top 64; the figures are in docs/methods/cross_tokenizer.md). ULD's bucket tail is a
        lower bound; the hybrid's spread tail is near a flat tail's truth."""
        live = make_trainer(tmp_path, smol, gemma, teacher, args=make_args(tmp_path, cross_tokenizer=loss, alpha=1.0))
        cached = make_trainer(tmp_path, smol, gemma, teacher, model=live.model,
                              args=cache_args(tmp_path, lm_cache_top_k=64, cross_tokenizer=loss, alpha=1.0))
        expected, got = loss_pair(live, cached)
        relative = got.item() / expected.item() - 1
        print(f"{loss}: k = 64 cached / live kd loss - 1 = {relative:.2e}")
        if loss == "uld":  # a lower bound; tight here: every student tail token is above every teacher tail token
            assert -0.01 < relative <= 1e-6
        else:
            assert 0 < abs(relative) < 0.01

    def test_cached_run_never_loads_the_teacher(self, tmp_path, smol, gemma, saved_teacher, monkeypatch):
        first = make_trainer(tmp_path, smol, gemma, saved_teacher, args=cache_args(tmp_path, lm_cache_top_k=8),
                             eval_dataset=chat_data(2))
        files = sorted((tmp_path / "cache").glob("*.safetensors"))
        assert len(files) == 2 and first.train_dataset["teacher_cache_index"] == [0, 1, 2, 3]
        assert first.eval_dataset["teacher_cache_index"] == [4, 5]
        stamps = [f.stat().st_mtime_ns for f in files]
        forbid_the_teacher(monkeypatch)
        student = tiny_lm(len(smol), seed=1)
        before = copy.deepcopy(student.state_dict())
        trainer = make_trainer(tmp_path, smol, gemma, saved_teacher, model=student, eval_dataset=chat_data(2),
                               args=cache_args(tmp_path, lm_cache_top_k=8, eval_strategy="epoch"))
        trainer.train()
        assert trainer.teacher_model is None and trainer.teacher_placement["kind"] == "none"
        assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
        logs = [log for log in trainer.state.log_history if "kd_loss" in log]
        assert logs and all(math.isfinite(log["kd_loss"]) and log["kd_loss"] >= 0 for log in logs)
        assert any("eval_perplexity" in log for log in trainer.state.log_history)
        assert sorted((tmp_path / "cache").glob("*.safetensors")) == files  # nothing recomputed or rewritten
        assert [f.stat().st_mtime_ns for f in files] == stamps

    def test_resumed_cached_run_gives_the_same_student(self, tmp_path, smol, gemma, saved_teacher, monkeypatch):
        """A cached run stopped after its first checkpoint and resumed (the cache read again, the teacher never
        loaded) ends with the student of the uninterrupted run."""
        data = chat_data(8)
        straight = make_trainer(tmp_path / "a", smol, gemma, saved_teacher, train=data,
                                args=cache_args(tmp_path, max_steps=3, lm_cache_top_k=8))
        straight.train()
        args = cache_args(tmp_path, max_steps=3, lm_cache_top_k=8, save_strategy="steps", save_steps=1,
                          output_dir=str(tmp_path / "b"))
        forbid_the_teacher(monkeypatch)  # the cache written by the straight run serves both
        make_trainer(tmp_path / "b", smol, gemma, saved_teacher, train=data, args=args).train()
        resumed = make_trainer(tmp_path / "b", smol, gemma, saved_teacher, train=data, args=args,
                               model=tiny_lm(len(smol), seed=7))
        resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-1"))
        assert resumed.teacher_model is None
        for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
            torch.testing.assert_close(p, q, msg=name)

    def test_file_size_is_six_k_plus_sixteen_bytes_per_teacher_span_token(self, tmp_path, smol, gemma, teacher):
        trainer = make_trainer(tmp_path, smol, gemma, teacher, args=cache_args(tmp_path, lm_cache_top_k=16))
        rows = trainer.train_dataset
        tokens = sum(int(span_token_mask(torch.tensor([row["teacher_span_starts"]]),
                                         torch.tensor([row["teacher_span_ends"]]),
                                         len(row["teacher_input_ids"])).sum()) for row in rows)
        assert tokens == sum(len(row["student_span_starts"]) for row in rows)  # here one teacher token per span
        (path,) = (tmp_path / "cache").glob("*.safetensors")
        payload = tokens * (6 * 16 + 16) + 8 * (len(rows) + 1)
        assert payload <= path.stat().st_size <= payload + 1024  # + the safetensors header

    def test_key_holds_the_temperature_and_the_teacher_tokenizer(self, tmp_path, smol, gemma, teacher):
        first = make_trainer(tmp_path, smol, gemma, teacher,
                             args=cache_args(tmp_path, lm_cache_top_k=4, temperature=1.0))
        make_trainer(tmp_path, smol, gemma, teacher, args=cache_args(tmp_path, lm_cache_top_k=4, temperature=2.0))
        assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
        # Another teacher tokenizer giving these rows the same ids (a token added that no row uses) is another key.
        other = copy.deepcopy(gemma)
        other.add_tokens(["<never-in-the-data>"])
        trainer = make_trainer(tmp_path, smol, gemma, teacher, teacher_processing_class=other,
                               args=cache_args(tmp_path, lm_cache_top_k=4, temperature=1.0))
        assert trainer.train_dataset["teacher_input_ids"] == first.train_dataset["teacher_input_ids"]
        assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3

    def test_damaged_cache_file_is_an_error_naming_it(self, tmp_path, smol, gemma, teacher):
        make_trainer(tmp_path, smol, gemma, teacher, args=cache_args(tmp_path, lm_cache_top_k=4))
        (path,) = (tmp_path / "cache").glob("*.safetensors")
        raw = bytearray(path.read_bytes())
        raw[-3] ^= 0xFF
        path.write_bytes(bytes(raw))
        with pytest.raises(ValueError, match=f"{path}.*sha256 checksum.*It was not used; delete it to recompute it"):
            make_trainer(tmp_path, smol, gemma, teacher, args=cache_args(tmp_path, lm_cache_top_k=4))

    def test_a_same_tokenizer_file_is_not_read_as_a_cross_tokenizer_one(self, tmp_path, smol, gemma, teacher):
        """A file that lacks the span tensors (e.g. renamed from a same-tokenizer cache) is refused, not misread."""
        from safetensors.torch import load_file

        from hf_kd.teacher import LM_TOP_K_TENSORS, save_file_atomically

        make_trainer(tmp_path, smol, gemma, teacher, args=cache_args(tmp_path, lm_cache_top_k=4))
        (path,) = (tmp_path / "cache").glob("*.safetensors")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = {k: v for k, v in f.metadata().items() if k != "sha256"}
        tensors = load_file(path)
        save_file_atomically({k: tensors[k] for k in LM_TOP_K_TENSORS}, path, metadata)
        with pytest.raises(ValueError, match=f"{path} holds the tensors .* not .*tail_logprobs"):
            make_trainer(tmp_path, smol, gemma, teacher, args=cache_args(tmp_path, lm_cache_top_k=4))

    def test_top_k_larger_than_the_teacher_vocabulary(self, tmp_path, smol, gemma, teacher, monkeypatch):
        import hf_kd.trainer.teacher_mixin as teacher_mixin

        def no_pass(*args, **kwargs):
            raise AssertionError("the error must come before the teacher pass")

        monkeypatch.setattr(teacher_mixin, "compute_teacher_lm_top_k", no_pass)
        vocab = teacher.config.vocab_size
        with pytest.raises(ValueError, match=f"lm_cache_top_k={vocab + 1} is larger than the teacher's vocabulary "
                                             f"\\({vocab} tokens\\): choose 1 <= lm_cache_top_k <= {vocab}"):
            make_trainer(tmp_path, smol, gemma, teacher, args=cache_args(tmp_path, lm_cache_top_k=vocab + 1))
        assert not (tmp_path / "cache").exists()
