"""Distillation between causal LMs with **different tokenizers** (issue 19): align the two tokenizations of one text,
find the tokens both vocabularies share, and build the rows [`hf_kd.DistillTrainer`] reads with
`DistillConfig(cross_tokenizer="uld" | "hybrid")`.

Token-level KD compares the teacher's and the student's next-token distributions position by position; with two
tokenizers neither the positions nor the vocabularies match. The method (ULD, Boizard et al., 2024,
https://huggingface.co/papers/2402.12030, with the span alignment and hybrid loss of TRL's GOLD trainer,
`trl/experimental/gold`):

1. The text is tokenised by both tokenizers with character offsets, and the two token sequences are cut where both
   have a token boundary ([`align_token_spans`]): each aligned span covers the same characters on both sides (one
   token on each side most of the time; several where one tokenizer splits what the other keeps whole).
2. Each side gives each span one probability vector over its own vocabulary, by the chain rule
   ([`hf_kd.losses.span_log_probs`]).
3. The vectors are compared with ULD ([`hf_kd.losses.uld_loss`], sorted L1), or with the hybrid loss
   ([`hf_kd.losses.hybrid_loss`]): exact KL on the tokens both vocabularies share ([`shared_vocabulary_map`]), ULD on
   the rest.

Functions here are pure (tokenizers and lists in, lists and tensors out); the losses live in [`hf_kd.losses`].
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple, Sequence

import torch

from .losses import cached_span_log_probs, cached_span_top_k, cached_uld_loss, hybrid_loss, span_log_probs, uld_loss

__all__ = [
    "CROSS_TOKENIZER_COLUMNS",
    "AlignedSpan",
    "CrossTokenizerCollator",
    "align_token_spans",
    "cached_span_log_probs",
    "cached_span_top_k",
    "cached_uld_loss",
    "check_offset_tokenizer",
    "hybrid_loss",
    "shared_vocabulary_map",
    "span_log_probs",
    "span_token_mask",
    "token_bytes",
    "tokenizer_fingerprint",
    "tokenize_cross_tokenizer_dataset",
    "tokenize_cross_tokenizer_example",
    "uld_loss",
]

CROSS_TOKENIZER_COLUMNS = (
    "teacher_input_ids",
    "student_span_starts",
    "student_span_ends",
    "teacher_span_starts",
    "teacher_span_ends",
)
"""The columns a cross-tokenizer row has besides the student's `input_ids`, `attention_mask` and `labels`: the
teacher's token ids of the same text, and the token ranges `[start, end)` of each aligned completion span on each
side (one entry per span, the same spans in the same order)."""


class AlignedSpan(NamedTuple):
    """One aligned span: the characters `[char_start, char_end)` of the text, and the tokens `[start, end)` covering
    exactly them on each side (indices into the offset lists given to [`align_token_spans`])."""

    char_start: int
    char_end: int
    student_start: int
    student_end: int
    teacher_start: int
    teacher_end: int


def _cuts(offsets: Sequence[Sequence[int]], side: str, length: int | None) -> tuple[dict[int, int], int]:
    """The character positions where `side`'s tokenization may be cut, each mapped to the index of the first token
    after it, and the text length the tokens cover. Zero-width tokens (special tokens: BOS, EOS) are skipped.

    A cut after token `i` needs the next token to start where `i` ends: byte-level tokenizers give the pieces of one
    multi-byte character overlapping offsets (SmolLM2 spells " 🤗" `ĠðŁ` `(c, c + 2)`, `¤` and `Ĺ` `(c + 1, c + 2)`),
    and no cut falls inside them. A gap between tokens (characters no token covers) or tokens that do not start at 0 mean the
    offsets do not tile the text, which this method needs: an error."""
    tokens = [(i, int(s), int(e)) for i, (s, e) in enumerate(offsets) if e > s]
    if not tokens:
        raise ValueError(f"The {side} tokenization has no token covering any character (empty text?)")
    if tokens[0][1] != 0:
        raise ValueError(f"The {side} tokens start at character {tokens[0][1]}, not 0: the offsets do not tile the text")
    cuts, reach = {0: tokens[0][0]}, 0
    for (i, _, end), following in zip(tokens, tokens[1:] + [None]):
        reach = max(reach, end)
        if following is None:
            cuts[reach] = len(offsets)
        elif following[1] >= reach:
            if following[1] > reach:
                raise ValueError(
                    f"The {side} offsets leave characters {reach}..{following[1]} uncovered (between tokens {i} and "
                    f"{following[0]}): cross-tokenizer distillation needs offsets that tile the text (a tokenizer "
                    "that trims whitespace from its offsets cannot be aligned)"
                )
            cuts[reach] = following[0]
    if length is not None and reach != length:
        raise ValueError(f"The {side} tokens cover characters 0..{reach} of a text of {length} characters")
    return cuts, reach


def align_token_spans(
    student_offsets: Sequence[Sequence[int]],
    teacher_offsets: Sequence[Sequence[int]],
    text_length: int | None = None,
) -> list[AlignedSpan]:
    """
    Align two tokenizations of one text: cut both where both have a token boundary.

    Every character of the text belongs to exactly one span, and on each side every token that covers characters
    belongs to exactly one span (a span merges the tokens of one side that together cover what one token, or a
    different split, of the other side covers: `" naïve"` is `Ġna` + `Ã¯ve` for SmolLM2 and `▁naïve` for Gemma, one
    span of 2 + 1 tokens). Most spans are one token on each side. Zero-width tokens (BOS, EOS and other special
    tokens with offsets `(c, c)`) cover no character and belong to no span.

    Args:
        student_offsets, teacher_offsets (sequences of `(start, end)` character offsets):
            One pair per token, in order, as fast tokenizers return them (`return_offsets_mapping=True`).
        text_length (`int`, *optional*):
            The text's length in characters: both tokenizations must cover exactly `[0, text_length)`. Without it,
            both must cover the same prefix.

    Returns:
        `list[AlignedSpan]`, in text order, tiling `[0, text_length)`.

    Raises:
        `ValueError`: offsets that do not tile the text (a gap, a token that does not start at 0, a shorter or longer
        coverage on one side), naming the side.
    """
    student_cuts, student_end = _cuts(student_offsets, "student", text_length)
    teacher_cuts, teacher_end = _cuts(teacher_offsets, "teacher", text_length)
    if student_end != teacher_end:
        raise ValueError(
            f"The student tokens cover characters 0..{student_end} and the teacher tokens 0..{teacher_end}: the two "
            "tokenizations are not of the same text"
        )
    common = sorted(set(student_cuts) & set(teacher_cuts))
    return [
        AlignedSpan(a, b, student_cuts[a], _last_index(student_cuts, b, student_offsets),
                    teacher_cuts[a], _last_index(teacher_cuts, b, teacher_offsets))
        for a, b in zip(common, common[1:])
    ]


def _last_index(cuts: dict[int, int], position: int, offsets) -> int:
    """One past the last token that ends at or before cut `position` (zero-width tokens at the end excluded)."""
    index = cuts[position]
    while index > 0 and offsets[index - 1][1] == offsets[index - 1][0]:
        index -= 1
    return index


# ----- shared vocabulary -----


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character standing for each byte (`Ġ` = space)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    return '"ByteLevel"' in json.dumps(decoder)


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer) -> dict[int, bytes]:
    """
    The UTF-8 bytes each ordinary token of `tokenizer` stands for, so that tokens of two tokenizers can be compared.

    Markers are normalised to the bytes they decode to: a byte-level BPE tokenizer (GPT-2, SmolLM2; detected by its
    `ByteLevel` decoder) writes each byte as one printable character (`Ġ` = space, `Ċ` = newline, `Ã©` = the two bytes
    of `é`), mapped back to the byte; otherwise (SentencePiece: Gemma, Llama 2) `▁` is a space, a byte-fallback
    token `<0xHH>` is the byte `0xHH`, and other characters are their UTF-8 bytes. Special and added control tokens
    (`<bos>`, `<|im_start|>`, `<unused12>`) stand for no text and are left out.

    Returns:
        `dict[int, bytes]`: token id to bytes, for every ordinary token.
    """
    special = set(tokenizer.all_special_ids)
    special |= {i for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items() if added.special}
    byte_level = _is_byte_level(tokenizer)
    alphabet = _unicode_to_byte()
    out = {}
    for token, index in tokenizer.get_vocab().items():
        if index in special:
            continue
        if byte_level:
            if all(c in alphabet for c in token):
                out[index] = bytes(alphabet[c] for c in token)
            continue
        match = _BYTE_TOKEN.fullmatch(token)
        out[index] = bytes([int(match.group(1), 16)]) if match else token.replace("▁", " ").encode("utf-8")
    return out


def _bytes_to_id(tokenizer) -> dict[bytes, int]:
    """Bytes to one token id: where several tokens stand for the same bytes (SentencePiece's `<0x0A>` and `\\n`), the
    ordinary token wins over the byte-fallback one (the tokenizer only uses a byte token for what it cannot spell),
    then the lower id."""
    vocab = {index: token for token, index in tokenizer.get_vocab().items()}
    out: dict[bytes, int] = {}
    def preference(item):
        return bool(_BYTE_TOKEN.fullmatch(vocab[item[0]])), item[0]

    for index, value in sorted(token_bytes(tokenizer).items(), key=preference):
        out.setdefault(value, index)
    return out


def shared_vocabulary_map(student_tokenizer, teacher_tokenizer) -> tuple[torch.LongTensor, torch.LongTensor]:
    """
    The tokens both vocabularies hold: `(student_ids, teacher_ids)`, `student_ids[i]` and `teacher_ids[i]` standing
    for the same bytes after [`token_bytes`]'s normalisation of the markers (`Ġ`/`Ċ`/byte characters of byte-level
    BPE, `▁`/`<0xHH>` of SentencePiece), sorted by student id. Special tokens are never shared. For
    `HuggingFaceTB/SmolLM2-135M-Instruct` (49,152 tokens) and `google/gemma-3-270m` (262,144) the map holds the
    size given in `docs/methods/cross_tokenizer.md` (a plain string comparison, as GOLD does, misses every token
    with a leading space, since one writes it `Ġ` and the other `▁`).

    Returns:
        `(student_ids, teacher_ids)`: two int64 tensors of shape `(shared,)`, possibly empty.
    """
    student, teacher = _bytes_to_id(student_tokenizer), _bytes_to_id(teacher_tokenizer)
    pairs = sorted((index, teacher[value]) for value, index in student.items() if value in teacher)
    student_ids = torch.tensor([s for s, _ in pairs], dtype=torch.long)
    teacher_ids = torch.tensor([t for _, t in pairs], dtype=torch.long)
    return student_ids, teacher_ids


# ----- rows for DistillTrainer -----


def check_offset_tokenizer(tokenizer, side: str) -> None:
    """`ValueError` unless `tokenizer` is a fast tokenizer (only those return the character offsets the alignment
    needs); `side` (`"student"` / `"teacher"`) names it."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if tokenizer is None:
        raise ValueError(f"cross_tokenizer needs the {side}'s tokenizer to align the two tokenizations, got None")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"cross_tokenizer needs character offsets from the {side}'s tokenizer, but {type(tokenizer).__name__} "
            f"({getattr(tokenizer, 'name_or_path', '')!r}) is a slow (Python) tokenizer without "
            "return_offsets_mapping: load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
        )


def _bos_prefix(tokenizer) -> list[int]:
    """The BOS id the tokenizer puts in front of a text with its special tokens (Gemma's `<bos>`), else nothing."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []


def _tokenize_piece(tokenizer, text: str, offset: int, special: bool, side: str) -> tuple[list[int], list[tuple]]:
    encoded = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    unk = tokenizer.unk_token_id
    if unk is not None and unk in ids:
        raise ValueError(
            f"The {side}'s tokenizer ({getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)!r}) cannot "
            f"round-trip the text {text[:80]!r}: it maps part of it to its unknown token {tokenizer.unk_token!r}, so "
            "the two tokenizations cannot be aligned"
        )
    return ids, [(s + offset, e + offset) if e > s else (s + offset, s + offset) for s, e in encoded["offset_mapping"]]


def tokenize_cross_tokenizer_example(example: dict, student_tokenizer, teacher_tokenizer, max_length: int = 1024) -> dict:
    """
    One example in TRL's formats (`text`, `messages`, `prompt` + `completion`) tokenised by both tokenizers, with its
    aligned completion spans: the row of [`tokenize_cross_tokenizer_dataset`].

    The student's `input_ids`, `attention_mask` and `labels` are those of [`hf_kd.lm_data.tokenize_lm_example`]
    (same pieces, special tokens, EOS and truncation to `max_length`). The teacher reads the same text (for
    conversational data: the text of the **student's** chat template, pieces located as for the student), each piece
    tokenised apart as for the student, after its BOS when its tokenizer adds one (Gemma), and with its EOS at the end
    when the student's EOS was appended; the two EOS form the last span. The spans ([`align_token_spans`]) kept are
    the completion spans that have a prediction on both sides (not at token 0) and lie within the student's
    `max_length` tokens; the teacher row is cut after the last kept span (no limit of its own: it reads the
    characters the student reads).

    Returns:
        `dict`: `input_ids`, `attention_mask`, `labels` (the student's), and the lists of [`CROSS_TOKENIZER_COLUMNS`].

    Raises:
        `ValueError`: what [`hf_kd.lm_data.tokenize_lm_example`] refuses, prompt-only data (no completion to
        distil), or a text one tokenizer cannot round-trip (unknown tokens, offsets that do not tile the text).
    """
    from .lm_data import lm_example_pieces, tokenize_lm_example

    student = tokenize_lm_example(example, student_tokenizer, max_length)
    pieces = lm_example_pieces(example, student_tokenizer)
    if pieces is None or "labels" not in student:
        raise ValueError("cross-tokenizer distillation needs completions to distil: prompt-only rows have none")
    pieces, special = pieces
    student_ids, student_offsets, teacher_offsets = [], [], []
    teacher_ids = _bos_prefix(teacher_tokenizer)
    teacher_offsets = [(0, 0)] * len(teacher_ids)
    completion_chars, position = [], 0
    for index, (text, is_completion) in enumerate(pieces):
        if not text:
            continue
        ids, offsets = _tokenize_piece(student_tokenizer, text, position, special and index == 0, "student")
        student_ids += ids
        student_offsets += offsets
        ids, offsets = _tokenize_piece(teacher_tokenizer, text, position, False, "teacher")
        teacher_ids += ids
        teacher_offsets += offsets
        if is_completion:
            completion_chars.append((position, position + len(text)))
        position += len(text)
    spans = align_token_spans(student_offsets, teacher_offsets, position)
    eos = student_tokenizer.eos_token_id
    if special and eos is not None and student_ids[-1:] != [eos]:  # tokenize_lm_example appended the student's EOS
        student_ids = student_ids + [eos]
        if teacher_tokenizer.eos_token_id is not None:  # the two EOS, zero-width, form the last span
            spans.append(AlignedSpan(position, position, len(student_ids) - 1, len(student_ids),
                                     len(teacher_ids), len(teacher_ids) + 1))
            teacher_ids = teacher_ids + [teacher_tokenizer.eos_token_id]
    full_student = student["input_ids"]
    if student_ids[:max_length] != full_student:
        raise ValueError(  # the pieces are those of tokenize_lm_example: a mismatch is a bug, not bad input
            "The student's tokens with offsets differ from tokenize_lm_example's for the same example"
        )

    def in_completion(span: AlignedSpan) -> bool:
        return any(a <= span.char_start and span.char_end <= b for a, b in completion_chars)

    kept = [
        span for span in spans
        if in_completion(span) and span.student_start >= 1 and span.teacher_start >= 1
        and span.student_end <= len(full_student)
    ]
    teacher_length = max([span.teacher_end for span in kept] + [1])
    return {
        **student,
        "teacher_input_ids": teacher_ids[:teacher_length],
        "student_span_starts": [span.student_start for span in kept],
        "student_span_ends": [span.student_end for span in kept],
        "teacher_span_starts": [span.teacher_start for span in kept],
        "teacher_span_ends": [span.teacher_end for span in kept],
    }


def tokenize_cross_tokenizer_dataset(dataset, student_tokenizer, teacher_tokenizer, max_length: int = 1024):
    """
    A causal-LM dataset in TRL's formats tokenised for cross-tokenizer distillation: each row by
    [`tokenize_cross_tokenizer_example`] (the student's `input_ids`, `attention_mask`, `labels` and the teacher's ids
    and aligned spans). Both tokenizers must be fast ([`check_offset_tokenizer`]).

    Args:
        dataset ([`~datasets.Dataset`]): rows with `text`, `messages` or `prompt` + `completion`.
        student_tokenizer, teacher_tokenizer (`PreTrainedTokenizerFast`): the two tokenizers.
        max_length (`int`, *optional*, defaults to `1024`): the student's row length (see
            [`hf_kd.lm_data.tokenize_lm_dataset`]).

    Returns:
        [`~datasets.Dataset`]: the format columns replaced by the student's and [`CROSS_TOKENIZER_COLUMNS`].

    Raises:
        `ValueError`: a slow tokenizer, or a row [`tokenize_cross_tokenizer_example`] refuses (named by its index).
    """
    check_offset_tokenizer(student_tokenizer, "student")
    check_offset_tokenizer(teacher_tokenizer, "teacher")
    student_tokenizer = getattr(student_tokenizer, "tokenizer", student_tokenizer)
    teacher_tokenizer = getattr(teacher_tokenizer, "tokenizer", teacher_tokenizer)

    def tokenize(example, index):
        try:
            return tokenize_cross_tokenizer_example(example, student_tokenizer, teacher_tokenizer, max_length)
        except ValueError as error:
            raise ValueError(f"Row {index}: {error}") from None

    consumed = [c for c in ("text", "messages", "prompt", "completion") if c in dataset.column_names]
    from .lm_data import tokenized_fingerprint

    fingerprint = tokenized_fingerprint(dataset, [student_tokenizer, teacher_tokenizer], (__file__,),
                                        max_length=max_length)
    return dataset.map(tokenize, with_indices=True, remove_columns=consumed, desc="Tokenizing (two tokenizers)",
                       new_fingerprint=fingerprint)


@dataclass
class CrossTokenizerCollator:
    """
    Batch cross-tokenizer rows: the student's columns by `student_collator` (e.g. [`hf_kd.lm_data.LMDataCollator`]),
    `teacher_input_ids` right-padded with `teacher_pad_token_id` plus its `teacher_attention_mask`, and the span
    columns padded with `-1` (no span).

    Args:
        student_collator (`Callable`): collates the rows without the cross-tokenizer columns.
        teacher_pad_token_id (`int`): the id the teacher's rows are padded with (masked).

    Returns (from a call on a list of rows):
        `dict[str, torch.Tensor]`: the student collator's batch plus `teacher_input_ids`, `teacher_attention_mask`
        `(batch, longest teacher row)` and the four span columns `(batch, most spans)`, all int64.
    """

    student_collator: object
    teacher_pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        extra = [{k: row[k] for k in CROSS_TOKENIZER_COLUMNS} for row in features]
        batch = self.student_collator([{k: v for k, v in row.items() if k not in CROSS_TOKENIZER_COLUMNS}
                                       for row in features])

        def pad(rows, value):
            width = max(max((len(r) for r in rows), default=0), 1)
            return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)

        teacher = [row["teacher_input_ids"] for row in extra]
        batch["teacher_input_ids"] = pad(teacher, self.teacher_pad_token_id)
        batch["teacher_attention_mask"] = pad([[1] * len(r) for r in teacher], 0)
        for name in CROSS_TOKENIZER_COLUMNS[1:]:
            batch[name] = pad([row[name] for row in extra], -1)
        return batch


# ----- the teacher's top-k cache (cache_teacher_logits) -----


def span_token_mask(span_starts: torch.Tensor, span_ends: torch.Tensor, length: int) -> torch.Tensor:
    """
    Which tokens of each row lie inside one of its aligned spans: `True` at token `i` of row `r` when
    `span_starts[r, j] <= i < span_ends[r, j]` for some span `j` (`-1` entries, padding, mark none).

    Shifted by one, `mask[:, 1:]`, it marks the positions whose prediction [`span_log_probs`] reads (position `t`
    predicts token `t + 1`): the chain rule's earlier factors and each span's last distribution. Those are the
    positions the cross-tokenizer teacher cache stores, as "completion tokens" of the teacher's row.

    Args:
        span_starts, span_ends (`torch.Tensor` of shape `(batch, spans)`): one side's span columns
            ([`CrossTokenizerCollator`]'s `teacher_span_starts` / `teacher_span_ends`).
        length (`int`): tokens per row (the padded row length).

    Returns:
        `torch.Tensor` of shape `(batch, length)`, bool.
    """
    positions = torch.arange(length, device=span_starts.device)
    inside = (span_starts[:, :, None] <= positions) & (positions < span_ends[:, :, None]) & (span_starts[:, :, None] >= 0)
    return inside.any(1)


def tokenizer_fingerprint(tokenizer) -> str:
    """A SHA-256 of a fast tokenizer's full definition (its `tokenizer.json`: model, normaliser, pre-tokenizer, added
    tokens), part of the cross-tokenizer cache key: the teacher's ids of a text, and so its cached logits, depend on
    it."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
