"""Greedy generation that skips decoder layers of a [`MultiExitForCausalLM`].

- [`self_speculative_generate`]: LayerSkip's lossless self-speculative decoding (Elhoushi et al., 2024,
  https://huggingface.co/papers/2404.16710). The first `E` layers and exit `E` draft `k` tokens; the remaining layers
  verify them in one pass that starts from the draft's hidden states at layer `E` and reuses the draft's KV cache of
  layers `1..E`. The output is the full model's greedy output.
- [`confident_generate`]: CALM-style per-token early exit (Schuster et al., 2022,
  https://huggingface.co/papers/2207.07061). Each token leaves at the first exit whose confidence clears that exit's
  threshold. The KV entries of the layers a token skipped are computed later, in the next token's pass (FREE, Bae et
  al., 2023, https://huggingface.co/papers/2310.05424; EE-LLM, Chen et al., 2023,
  https://huggingface.co/papers/2312.04916), so later tokens attend to exact keys and values.
- [`fit_exit_thresholds`]: per-exit thresholds with a risk guarantee, by Learn-then-Test (Angelopoulos et al., 2021,
  https://huggingface.co/papers/2110.01052).

Both generators are greedy only and run the backbone's decoder layers one slice at a time with their own KV cache
and attention mask. They support Llama-family backbones with `"sdpa"` or `"eager"` attention and no sliding window.

Like the modeling file, this file imports only torch and transformers (scipy inside [`fit_exit_thresholds`]), so a
model saved with `trust_remote_code=True` loads where hf_kd is not installed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache
from transformers.utils import ModelOutput


@dataclass
class EarlyExitGenerateOutput(ModelOutput):
    """Output of [`self_speculative_generate`], [`confident_generate`] and `MultiExitForCausalLM.generate(early_exit=...)`.

    Args:
        sequences (`torch.LongTensor` of shape `(batch_size, prompt_len + new_len)`):
            The prompt followed by the generated tokens, as `generate` returns them: after a row's EOS its tokens are
            the pad token, and generation stops once every row has emitted EOS (or after `max_new_tokens`).
        exit_layers (`torch.LongTensor` of shape `(batch_size, new_len)`, *optional*):
            [`confident_generate`] only: the layer whose exit chose each generated token (the first token comes from
            the prompt's full pass, so its entry is the last layer).
        layers_run (`int`):
            Decoder-layer evaluations per row after the prompt's pass (every row of a batch runs the same ones): one
            layer applied to one token position counts 1 (drafts that verification rejects and deferred KV
            computation included; the prompt's pass, the same for every method, excluded). Plain greedy decoding of
            `n` tokens costs `num_layers * (n - 1)`.
        accepted_per_step (`torch.LongTensor` of shape `(batch_size, num_verify_passes)`, *optional*):
            [`self_speculative_generate`] only: per row and verification pass, how many drafted tokens were accepted
            (the pass adds that many plus one token to the row); `-1` where the row had already finished.
        num_verify_passes (`int`, *optional*): [`self_speculative_generate`] only: the number of verification passes.
    """

    sequences: torch.LongTensor | None = None
    exit_layers: torch.LongTensor | None = None
    layers_run: int | None = None
    accepted_per_step: list[int] | None = None
    num_verify_passes: int | None = None


@dataclass
class ExitThresholdFit:
    """Outcome of [`fit_exit_thresholds`].

    Args:
        thresholds (`dict[int, float]`): per early exit layer, the smallest certified threshold; an exit for which no
            threshold of the grid is certified is absent (it never fires).
        epsilon (`float`), delta (`float`): the target disagreement rate and the error probability of the guarantee.
        num_tokens (`int`): calibration tokens (non-padding positions).
        disagreement (`dict[int, float]`): per exit in `thresholds`, the calibration rate of tokens that leave there and
            disagree with the final exit (what the guarantee bounds by `epsilon`).
        temperatures (`dict[int, float]`, *optional*): the per-exit temperatures the confidences were computed with.
    """

    thresholds: dict[int, float]
    epsilon: float
    delta: float
    num_tokens: int
    disagreement: dict[int, float]
    temperatures: dict[int, float] | None = None


# --------------------------------------------------------------------------------------------------- decoder slices


def _attention_mask(valid: torch.Tensor, num_new: int, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The 4D mask of `num_new` new positions, the last ones of `valid` `(batch, kv_len)` (True: a real token), over
    all `kv_len` cached positions: causal and without padding keys; `(batch, 1, num_new, kv_len)`, boolean (True:
    attend) for sdpa, additive for eager."""
    kv_len = valid.shape[1]
    keys = torch.arange(kv_len, device=valid.device)
    queries = keys[kv_len - num_new :, None]
    # A padding query sees itself: a row with no key at all would make sdpa return NaN, which the next layer's keys
    # and values would carry (and 0 * NaN is NaN even behind the mask).
    allowed = (valid[:, None, :] & (keys <= queries)) | (keys == queries)
    allowed = allowed[:, None]
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=valid.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _run_layers(model, hidden: torch.Tensor, first: int, last: int, start: int, valid: torch.Tensor, cache):
    """Decoder layers `first + 1 .. last` (1-based) on the hidden states `(batch, q, hidden)` of slots
    `start .. start + q - 1`, appending their keys and values to `cache` (whose layers in that range must hold
    exactly `start` slots). `valid` `(batch, >= start + q)` marks real tokens; position ids count them, as
    `generate` does for left padding."""
    num_new = hidden.shape[1]
    valid = valid[:, : start + num_new]
    position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, start:]
    decoder = model.backbone.model
    mask = _attention_mask(valid, num_new, model.backbone.config._attn_implementation, hidden.dtype)
    rotary = decoder.rotary_emb(hidden, position_ids=position_ids)
    for layer in decoder.layers[first:last]:
        hidden = layer(
            hidden, attention_mask=mask, position_embeddings=rotary, position_ids=position_ids, use_cache=True,
            **{model._cache_argument: cache},
        )
    return hidden


def _check_backbone(model) -> None:
    implementation = model.backbone.config._attn_implementation
    if implementation not in ("sdpa", "eager"):
        raise ValueError(
            f"Early-exit generation builds its own attention masks for 'sdpa' or 'eager' attention; the backbone uses "
            f"{implementation!r}. Load it with attn_implementation='sdpa'."
        )
    if getattr(model.backbone.config, "sliding_window", None) is not None:
        raise ValueError("Early-exit generation does not support sliding-window attention (the cache is cropped).")


class _Stopping:
    """Greedy `generate`'s end of sequence: after a row's EOS its tokens become the pad token, and generation stops
    once every row has emitted EOS."""

    def __init__(self, model, batch_size: int, device, eos_token_id, pad_token_id):
        config = model.backbone.generation_config
        eos = config.eos_token_id if eos_token_id is None else eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.eos = torch.tensor(eos, dtype=torch.long, device=device)
        pad = config.pad_token_id if pad_token_id is None else pad_token_id
        self.pad = pad if pad is not None else (eos[0] if eos else 0)
        self.done = torch.zeros(batch_size, dtype=torch.bool, device=device)

    def update(self, tokens: torch.Tensor, kept: torch.Tensor | None = None) -> None:
        """Mark the rows whose new tokens `(batch, n)` (those where `kept`, when given) hold an EOS."""
        is_eos = torch.isin(tokens, self.eos)
        self.done |= (is_eos if kept is None else is_eos & kept).any(-1)

    def finish(self, prompt: torch.LongTensor, new: torch.LongTensor) -> torch.LongTensor:
        """`prompt` then `new` `(batch, n)`, with the pad token after each row's first EOS, cut where every row ended."""
        is_eos = torch.isin(new, self.eos)
        after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
        new = new.masked_fill(after_eos, self.pad)
        ended = is_eos.long().cumsum(-1) > 0
        if ended.all(0).any():  # every row has stopped at the first such step: generate ends there
            new = new[:, : int(ended.all(0).long().argmax()) + 1]
        return torch.cat([prompt, new], dim=-1)


def _prepare(model, input_ids, attention_mask, max_new_tokens: int, slots_per_token: int = 1) -> torch.Tensor:
    """Checks the inputs; returns which cache slots hold real tokens, `(batch, prompt_len + max_new_tokens *
    slots_per_token + 1)`: the prompt's attention mask, then True for the slots of generated tokens (a generator that
    leaves holes in the cache marks them False itself)."""
    _check_backbone(model)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch_size, seq_len), got shape {tuple(input_ids.shape)}.")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}.")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("Early-exit generation needs left padding: the last prompt position of a row is padding.")
    new_slots = torch.ones(
        input_ids.shape[0], max_new_tokens * slots_per_token + 1, dtype=torch.bool, device=input_ids.device
    )
    return torch.cat([attention_mask.bool(), new_slots], dim=-1)


def _prefill(model, input_ids, valid):
    """The prompt through every layer; returns the cache and the first generated token `(batch,)`."""
    cache = DynamicCache(config=model.backbone.config)
    hidden = model.backbone.model.embed_tokens(input_ids)
    depth = model.config.exit_layers[-1]
    hidden = _run_layers(model, hidden, 0, depth, 0, valid, cache)
    return cache, model.exit_logits_from_hidden(hidden[:, -1], depth).argmax(-1)


# --------------------------------------------------------------------------------------------------- LayerSkip


@torch.no_grad()
def self_speculative_generate(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    exit_layer: int | None = None,
    max_new_tokens: int = 20,
    num_draft_tokens: int = 4,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> EarlyExitGenerateOutput:
    """
    Lossless self-speculative greedy decoding (LayerSkip, Elhoushi et al., 2024,
    https://huggingface.co/papers/2404.16710): the output is `model.backbone.generate(do_sample=False)`'s.

    Each cycle starts from the last accepted token `x` and
    1. drafts `k` tokens `d_1..d_k` with layers `1..E` and exit `E` (one token at a time, KV cache of layers `1..E`);
    2. runs `d_k` through layers `1..E` (the draft never needed its exit), then verifies `x, d_1..d_k` in **one** pass
       of layers `E+1..L` started from their hidden states at layer `E`: layers `1..E` are never recomputed;
    3. accepts the longest prefix of drafts that the final exit agrees with, plus the final exit's next token (a
       correction, or a bonus token when all `k` drafts are accepted), and crops the KV cache of every layer back to
       the accepted tokens.

    Batches: every row keeps its **own** acceptance length; one pass serves the whole batch, and the cache keeps one
    length, that of the longest acceptance among the rows still running. A row that accepted fewer drafts leaves its
    rejected drafts' slots in the cache as padding (masked keys, skipped by the position ids, as left padding is), so
    rows drift apart by up to `k` tokens per cycle, the batch ends when its slowest row does, and the cache can hold up
    to `k + 1` slots per generated token. (Accepting the
    minimum across rows would keep the cache dense but, with weak drafts, a batch of 8 almost never accepts a
    draft.)

    Args:
        model ([`MultiExitForCausalLM`]): in eval mode; its backbone must use sdpa or eager attention.
        input_ids (`torch.LongTensor` of shape `(batch_size, prompt_len)`): prompts, **left**-padded.
        attention_mask (`torch.Tensor` of shape `(batch_size, prompt_len)`, *optional*): 0 for padding.
        exit_layer (`int`): the draft exit `E`, one of `config.exit_layers` except the last layer.
        max_new_tokens (`int`, *optional*, defaults to `20`): tokens to generate at most.
        num_draft_tokens (`int`, *optional*, defaults to `4`): `k`, tokens drafted per cycle (fewer near the end).
        eos_token_id (`int` or `list[int]`, *optional*): defaults to the backbone's generation config.
        pad_token_id (`int`, *optional*): after EOS; defaults to the generation config's, else the first EOS.

    Returns:
        [`EarlyExitGenerateOutput`] with `sequences`, `layers_run`, `accepted_per_step` and `num_verify_passes`.
    """
    model._check_exit_layer(exit_layer)
    depth = model.config.exit_layers[-1]
    if exit_layer == depth:
        raise ValueError(f"exit_layer must be an early exit (< {depth}) to draft with, got {exit_layer}.")
    if not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be an int >= 1, got {num_draft_tokens!r}.")
    # A cycle moves the cache by at most k + 1 slots and gives every running row at least one token.
    valid = _prepare(model, input_ids, attention_mask, max_new_tokens, slots_per_token=num_draft_tokens + 1)
    batch, device = input_ids.shape[0], input_ids.device
    stopping = _Stopping(model, batch, device, eos_token_id, pad_token_id)
    embed = model.backbone.model.embed_tokens

    cache, token = _prefill(model, input_ids, valid)
    # Row r's tokens so far are tokens[r, :count[r]]; rows run ahead of each other by up to k tokens.
    tokens = torch.full((batch, max_new_tokens + num_draft_tokens + 1), stopping.pad, dtype=torch.long, device=device)
    tokens[:, 0] = token
    count = torch.ones(batch, dtype=torch.long, device=device)
    stopping.update(token[:, None])
    slot = input_ids.shape[1]  # the cache slot of `token`, the last token of each row, not yet in any layer's cache
    accepted_per_step, layers_run = [], 0
    while True:
        running = ~stopping.done & (count < max_new_tokens)
        if not bool(running.any()):
            break
        # A cycle adds at most k + 1 tokens to a row: never draft past the longest remaining budget.
        k = min(num_draft_tokens, int((max_new_tokens - count[running]).max()) - 1)
        drafts, hidden_at_exit = [], []
        current = token
        for i in range(k + 1):
            hidden = _run_layers(model, embed(current[:, None]), 0, exit_layer, slot + i, valid, cache)
            hidden_at_exit.append(hidden)
            if i < k:
                current = model.exit_logits_from_hidden(hidden[:, -1], exit_layer).argmax(-1)
                drafts.append(current)
        hidden = _run_layers(model, torch.cat(hidden_at_exit, dim=1), exit_layer, depth, slot, valid, cache)
        verified = model.exit_logits_from_hidden(hidden, depth).argmax(-1)  # (batch, k + 1)
        layers_run += depth * (k + 1)

        drafted = torch.stack(drafts, dim=1) if drafts else verified[:, :0]
        accepted = (drafted == verified[:, :k]).long().cumprod(-1).sum(-1)  # (batch,) leading drafts verified
        longest = int(accepted[running].max())
        accepted = accepted.clamp(max=longest)  # finished rows do not hold the cache
        # Every layer caches x, d_1..d_k: nothing past the longest acceptance is kept. A row that accepted fewer
        # leaves its rejected drafts in the cache as padding (masked; position ids skip them), so that every row
        # keeps its own acceptance and one cache length serves the batch.
        if longest < k:
            cache.crop(longest - k)
        offsets = torch.arange(1, longest + 1, device=device)
        valid[:, slot + 1 : slot + longest + 1] = offsets <= accepted[:, None]
        # Row r gains verified[r, :accepted[r] + 1]: its accepted drafts (equal to the verified tokens) and the final
        # exit's next token.
        kept = (torch.arange(longest + 1, device=device) <= accepted[:, None]) & running[:, None]
        for j in range(longest + 1):
            rows = kept[:, j].nonzero().squeeze(-1)
            tokens[rows, count[rows] + j] = verified[rows, j]
        stopping.update(verified[:, : longest + 1], kept)
        count += (accepted + 1) * running
        accepted_per_step.append(torch.where(running, accepted, -1))
        slot += longest + 1
        token = verified.gather(1, accepted[:, None]).squeeze(1)
    return EarlyExitGenerateOutput(
        sequences=stopping.finish(input_ids, tokens[:, :max_new_tokens]),
        layers_run=layers_run,
        accepted_per_step=torch.stack(accepted_per_step, dim=1) if accepted_per_step else tokens[:, :0],
        num_verify_passes=len(accepted_per_step),
    )


# --------------------------------------------------------------------------------------------------- CALM


def _exit_settings(model, thresholds, temperatures) -> tuple[dict[int, float], dict[int, float]]:
    """`thresholds` and `temperatures` keyed by int layer (the config's when `None`), checked."""
    depth = model.config.exit_layers[-1]
    if thresholds is None:
        thresholds = model.config.exit_thresholds
    if thresholds == {}:
        raise ValueError(
            "No exit has a threshold: the fit certified none (each early exit disagrees with the final exit too often "
            "for this epsilon and delta), so every token would run every layer; use generate() without early_exit."
        )
    if thresholds is None:
        raise ValueError(
            "early_exit='confident' needs per-exit confidence thresholds: pass thresholds={exit_layer: threshold} or "
            "fit them first with model.fit_exit_thresholds(calibration_texts, epsilon=..., delta=..., tokenizer=...)."
        )
    if temperatures is None:
        temperatures = model.config.exit_temperatures or {}
    thresholds = {int(layer): float(value) for layer, value in thresholds.items()}
    temperatures = {int(layer): float(value) for layer, value in temperatures.items()}
    for layer, value in thresholds.items():
        model._check_exit_layer(layer)
        if layer == depth:
            raise ValueError(f"thresholds are for the early exits; the last layer ({depth}) always exits.")
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"The threshold of exit {layer} must be a probability in [0, 1], got {value}.")
    for layer, value in temperatures.items():
        model._check_exit_layer(layer)
        if not value > 0:
            raise ValueError(f"The temperature of exit {layer} must be > 0, got {value}.")
    return thresholds, temperatures


@torch.no_grad()
def confident_generate(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    thresholds: dict[int, float] | None = None,
    temperatures: dict[int, float] | None = None,
    max_new_tokens: int = 20,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> EarlyExitGenerateOutput:
    """
    Greedy decoding with per-token early exit (CALM, Schuster et al., 2022, https://huggingface.co/papers/2207.07061)
    and deferred KV computation for the skipped layers (FREE, Bae et al., 2023,
    https://huggingface.co/papers/2310.05424; EE-LLM, Chen et al., 2023, https://huggingface.co/papers/2312.04916).

    A token runs the layers up to the first exit `e` in `thresholds` whose confidence, the maximum of
    `softmax(exit_logits / temperature_e)`, is at least `thresholds[e]`, and that exit picks the next token (its
    argmax); with no exit confident enough it runs every layer. Layers `e+1..L` then lack its keys and values: they are
    computed in the next token's pass, where the skipped token's hidden state at layer `e` joins the new token at layer
    `e+1` and both run the remaining layers together. Every token's KV entries are thus the full model's, and the only
    difference from greedy decoding of the full model is which exit chose each token. The deferred work is not saved
    (`layers_run` counts it): it runs in parallel with the next token, one pass instead of two.

    Batches: each row takes its token at its own first confident exit, so a row's output does not depend on the other
    rows. One pass serves the batch and runs layers until every row still running has chosen: a row that chose
    earlier keeps going through those layers with the others (which computes its KV entries there), and the layers
    after the batch's last decision are deferred for all rows alike.

    Args:
        model ([`MultiExitForCausalLM`]): in eval mode; its backbone must use sdpa or eager attention.
        input_ids (`torch.LongTensor` of shape `(batch_size, prompt_len)`): prompts, **left**-padded.
        attention_mask (`torch.Tensor` of shape `(batch_size, prompt_len)`, *optional*): 0 for padding.
        thresholds (`dict[int, float]`, *optional*, defaults to `model.config.exit_thresholds`):
            Confidence threshold in `[0, 1]` per early exit layer; exits not listed never fire (and cost nothing).
            `0.0` always fires; a threshold above every confidence never does.
        temperatures (`dict[int, float]`, *optional*, defaults to `model.config.exit_temperatures`, else none):
            Per-exit temperature of the confidence (e.g. from [`calibrate_exit_temperatures`]); `1.0` when absent.
        max_new_tokens (`int`, *optional*, defaults to `20`): tokens to generate at most.
        eos_token_id (`int` or `list[int]`, *optional*): defaults to the backbone's generation config.
        pad_token_id (`int`, *optional*): after EOS; defaults to the generation config's, else the first EOS.

    Returns:
        [`EarlyExitGenerateOutput`] with `sequences`, `exit_layers` and `layers_run`.
    """
    thresholds, temperatures = _exit_settings(model, thresholds, temperatures)
    valid = _prepare(model, input_ids, attention_mask, max_new_tokens)
    stopping = _Stopping(model, input_ids.shape[0], input_ids.device, eos_token_id, pad_token_id)
    depth = model.config.exit_layers[-1]
    exit_points = sorted(thresholds)

    cache, token = _prefill(model, input_ids, valid)
    generated, exits = [token], [torch.full_like(token, depth)]
    stopping.update(token[:, None])
    slot, layers_run = input_ids.shape[1], 0  # `slot`: the cache position of `token`
    # Tokens that left early and still owe layers their KV entries: (hidden states (batch, n, hidden) after their last
    # layer, that layer), oldest first. Layer numbers decrease along the list: a token that exits carries every older
    # token that owes the layers it ran.
    pending: list[tuple[torch.Tensor, int]] = []
    while len(generated) < max_new_tokens and not bool(stopping.done.all()):
        hidden, start, done = model.backbone.model.embed_tokens(token[:, None]), slot, 0
        # Each row takes its token at its own first confident exit; finished rows have nothing to decide.
        decided, exit_layer = stopping.done.clone(), torch.full_like(token, depth)
        while True:
            while pending and pending[-1][1] == done:  # the owed layers come next: the pending tokens join here
                block, _ = pending.pop()
                hidden, start = torch.cat([block, hidden], dim=1), start - block.shape[1]
            stop = min([layer for layer in exit_points if layer > done] + [pending[-1][1] if pending else depth])
            hidden = _run_layers(model, hidden, done, stop, start, valid, cache)
            layers_run += (stop - done) * hidden.shape[1]
            done = stop
            if done == depth:
                token = torch.where(decided, token, model.exit_logits_from_hidden(hidden[:, -1], depth).argmax(-1))
                break
            if done in thresholds:
                logits = model.exit_logits_from_hidden(hidden[:, -1], done)
                confidence = torch.softmax(logits.float() / temperatures.get(done, 1.0), dim=-1).amax(-1)
                leaving = ~decided & (confidence >= thresholds[done])
                token = torch.where(leaving, logits.argmax(-1), token)
                exit_layer = torch.where(leaving, done, exit_layer)
                decided |= leaving
                if bool(decided.all()):
                    pending.append((hidden, done))
                    break
        generated.append(token)
        exits.append(exit_layer)
        stopping.update(token[:, None])
        slot += 1
    sequences = stopping.finish(input_ids, torch.stack(generated, dim=1))
    return EarlyExitGenerateOutput(
        sequences=sequences,
        exit_layers=torch.stack(exits, dim=1)[:, : sequences.shape[1] - input_ids.shape[1]],
        layers_run=layers_run,
    )


# --------------------------------------------------------------------------------------------------- Learn-then-Test


def min_calibration_tokens(epsilon: float, delta: float) -> int:
    """The fewest calibration tokens `n` with which zero errors reject `H0: risk > epsilon` at level `delta`:
    `(1 - epsilon)^n <= delta`, i.e. `n >= log(delta) / log(1 - epsilon)`."""
    return math.ceil(math.log(delta) / math.log1p(-epsilon))


def learn_then_test_threshold(
    confidence: torch.Tensor,
    disagree: torch.Tensor,
    epsilon: float,
    delta: float,
    grid: Sequence[float],
) -> float | None:
    """
    The smallest threshold of `grid` certified by fixed-sequence testing (Learn-then-Test, Angelopoulos et al., 2021,
    https://huggingface.co/papers/2110.01052).

    The risk of threshold `t` is the rate of tokens that leave at this exit and disagree with the final exit,
    `R(t) = P(confidence >= t and disagree)`, non-increasing in `t`. Going down `grid` from its largest value, each
    `t` is tested for `H0: R(t) > epsilon` with the binomial tail p-value `P(Binomial(n, epsilon) <= errors(t))`
    (`n` tokens, `errors(t)` of them leaving and disagreeing); the walk stops at the first `t` not rejected at
    `delta`. Every rejected threshold then has `R(t) <= epsilon` with probability at least `1 - delta` (fixed
    sequence testing spends the whole `delta` on each test, since a test is only reached if all before it rejected).

    Args:
        confidence (`torch.Tensor` of shape `(n,)`): the exit's confidence per calibration token.
        disagree (`torch.BoolTensor` of shape `(n,)`): whether the exit's argmax differs from the final exit's.
        epsilon (`float`): tolerated risk, in `(0, 1)`.
        delta (`float`): error probability, in `(0, 1)`.
        grid (`Sequence[float]`): candidate thresholds (any order: tested from the largest down).

    Returns:
        `float` or `None`: the smallest certified threshold, `None` when even the largest is not certified.
    """
    from scipy.stats import binom

    n = confidence.numel()
    chosen = None
    for threshold in sorted(grid, reverse=True):
        errors = int(((confidence >= threshold) & disagree).sum())
        if binom.cdf(errors, n, epsilon) > delta:
            break
        chosen = float(threshold)
    return chosen


def _calibration_batches(texts_or_input_ids, attention_mask, tokenizer, batch_size: int):
    """`(input_ids, attention_mask)` batches of at most `batch_size` rows."""
    if isinstance(texts_or_input_ids, torch.Tensor):
        ids = texts_or_input_ids
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    elif texts_or_input_ids and all(isinstance(text, str) for text in texts_or_input_ids):
        if tokenizer is None:
            raise ValueError("Calibration texts need a tokenizer: pass tokenizer=... (or token ids).")
        encoded = tokenizer(list(texts_or_input_ids), padding=True, return_tensors="pt")
        ids, mask = encoded["input_ids"], encoded["attention_mask"]
    elif texts_or_input_ids and all(isinstance(row, (list, tuple)) for row in texts_or_input_ids):
        width = max(len(row) for row in texts_or_input_ids)
        ids = torch.tensor([list(row) + [0] * (width - len(row)) for row in texts_or_input_ids])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in texts_or_input_ids])
    else:
        raise ValueError(
            "texts_or_input_ids must be a non-empty list of strings, a list of token-id lists or a (batch, seq_len) "
            f"LongTensor, got {type(texts_or_input_ids).__name__}."
        )
    for start in range(0, ids.shape[0], batch_size):
        yield ids[start : start + batch_size], mask[start : start + batch_size]


@torch.no_grad()
def fit_exit_thresholds(
    model,
    texts_or_input_ids,
    epsilon: float,
    delta: float,
    tokenizer=None,
    attention_mask: torch.Tensor | None = None,
    temperatures: dict[int, float] | None = None,
    grid: Sequence[float] | None = None,
    batch_size: int = 8,
) -> ExitThresholdFit:
    """
    Per-exit confidence thresholds with a risk guarantee, by Learn-then-Test (Angelopoulos et al., 2021,
    https://huggingface.co/papers/2110.01052) on teacher-forced calibration text, for [`confident_generate`].

    Every non-padding position of the calibration text is a token. For each early exit `e` the risk of threshold `t`
    is the rate of tokens whose exit-`e` confidence is at least `t` and whose exit-`e` argmax differs from the final
    exit's: the tokens that would leave at `e` with another prediction than the full model. Each exit's threshold is
    the smallest of `grid` certified by [`learn_then_test_threshold`] (fixed-sequence testing, binomial p-values) at
    level `delta / num_early_exits` (Bonferroni across exits): with probability at least `1 - delta` over the
    calibration text, **every** exit's risk is at most `epsilon`; a token leaves at one exit only, so the rate of tokens
    on which the whole cascade disagrees with the final exit is then at most `num_early_exits * epsilon` (pass
    `epsilon / num_early_exits` for a cascade-level `epsilon`). The guarantee is per token and teacher-forced (the
    prefix is the calibration text); it does not bound the divergence of a whole generated sequence.

    Args:
        model ([`MultiExitForCausalLM`]): the model (not modified; [`MultiExitForCausalLM.fit_exit_thresholds`]
            stores the fit on its config).
        texts_or_input_ids: calibration data: a list of strings (with `tokenizer`), a list of token-id lists, or a
            `(batch_size, seq_len)` LongTensor (with `attention_mask`, else every position counts).
        epsilon (`float`): tolerated disagreement rate per exit, in `(0, 1)`.
        delta (`float`): probability that the guarantee fails, in `(0, 1)`.
        tokenizer (*optional*): the tokenizer of the texts (any padding side).
        attention_mask (`torch.Tensor` of shape `(batch_size, seq_len)`, *optional*): with a LongTensor of ids.
        temperatures (`dict[int, float]`, *optional*, defaults to `model.config.exit_temperatures`, else none):
            Per-exit temperatures of the confidence; generation must use the same (the model method stores them).
        grid (`Sequence[float]`, *optional*, defaults to `0.00, 0.01, ..., 1.00`): candidate thresholds.
        batch_size (`int`, *optional*, defaults to `8`): rows per forward pass.

    Returns:
        [`ExitThresholdFit`].

    Raises:
        `ValueError`: when the calibration text has fewer tokens than [`min_calibration_tokens`] at
        `(epsilon, delta / num_early_exits)`: even zero disagreements could not certify any threshold.
    """
    for name, value in (("epsilon", epsilon), ("delta", delta)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {value!r}.")
    early_exits = model.config.exit_layers[:-1]
    if not early_exits:
        raise ValueError("The model has no early exit to fit a threshold for: exit_layers=[last layer].")
    if temperatures is None:
        temperatures = model.config.exit_temperatures or {}
    temperatures = {int(layer): float(value) for layer, value in temperatures.items()}
    grid = [round(0.01 * i, 2) for i in range(101)] if grid is None else list(grid)

    confidences = {layer: [] for layer in early_exits}
    disagreements = {layer: [] for layer in early_exits}
    for ids, mask in _calibration_batches(texts_or_input_ids, attention_mask, tokenizer, batch_size):
        ids, mask = ids.to(model.device), mask.to(model.device).bool()
        out = model(input_ids=ids, attention_mask=mask)
        final = out.exit_logits[-1].argmax(-1)[mask]
        for layer, logits in zip(early_exits, out.exit_logits[:-1]):
            logits = logits[mask].float()
            confidences[layer].append(torch.softmax(logits / temperatures.get(layer, 1.0), dim=-1).amax(-1).cpu())
            disagreements[layer].append((logits.argmax(-1) != final).cpu())

    num_tokens = sum(c.numel() for c in confidences[early_exits[0]])
    level = delta / len(early_exits)
    needed = min_calibration_tokens(epsilon, level)
    if num_tokens < needed:
        raise ValueError(
            f"The calibration set has {num_tokens} tokens, too few for epsilon={epsilon} and delta={delta}: with "
            f"{len(early_exits)} early exits each test runs at delta/{len(early_exits)}={level:.4g}, and even zero "
            f"disagreements only reject H0 (risk > epsilon) from n >= log({level:.4g})/log(1-{epsilon}) = {needed} "
            "tokens. Add calibration text, or raise epsilon or delta."
        )
    thresholds, rates = {}, {}
    for layer in early_exits:
        confidence, disagree = torch.cat(confidences[layer]), torch.cat(disagreements[layer])
        threshold = learn_then_test_threshold(confidence, disagree, epsilon, level, grid)
        if threshold is not None:
            thresholds[layer] = threshold
            rates[layer] = float(((confidence >= threshold) & disagree).float().mean())
    return ExitThresholdFit(
        thresholds=thresholds, epsilon=epsilon, delta=delta, num_tokens=num_tokens, disagreement=rates,
        temperatures=temperatures or None,
    )


__all__ = [
    "EarlyExitGenerateOutput",
    "ExitThresholdFit",
    "confident_generate",
    "fit_exit_thresholds",
    "learn_then_test_threshold",
    "min_calibration_tokens",
    "self_speculative_generate",
]
