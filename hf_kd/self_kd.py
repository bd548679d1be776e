"""Source-layer selection and re-calibration sets of self-knowledge distillation for learning ambiguity.

Park, Jeong, Cho & Park, "Self-Knowledge Distillation for Learning Ambiguity" (2024,
https://huggingface.co/papers/2406.09719). A multi-exit model (one classifier per layer) is first trained on every
exit (warm-up). After each warm-up epoch the mean predictive entropy of every exit on validation data is measured:
it falls with depth, and the layer where it drops most sharply is where the model stops representing the ambiguity
of its inputs. That layer (the *source*) then teaches the main classifier, and the training samples on which the
model is most at odds with the gold label (lowest *level of ambiguity*) are re-calibrated towards uniform.

The paper's text was not available; every choice below is the documented default of the project's PAPERS.md
section 2, with the alternatives it names. Pure functions on numpy arrays, so they are tested on their own:

- [`entropy_drops`], [`select_source_exit`]: the entropy-drop rule.
- [`selection_is_stable`]: the warm-up's stopping rule.
- [`level_of_ambiguity`], [`recalibration_indices`]: the re-calibration set.
"""

from __future__ import annotations

import math

import numpy as np

from .options import AmbiguityScore, EntropyDropRule, SourceLayerSide, to_enum

__all__ = [
    "entropy_drops",
    "level_of_ambiguity",
    "recalibration_indices",
    "select_source_exit",
    "selection_is_stable",
]

def entropy_drops(exit_entropies) -> np.ndarray:
    r"""
    Entropy drops between consecutive exits, `drops[j] = H[j] - H[j + 1]`: the drop entering exit `j + 1`.

    Args:
        exit_entropies (array-like of shape `(num_exits,)`):
            Mean predictive entropy of every exit on validation data, shallowest first.

    Returns:
        `np.ndarray` of shape `(num_exits - 1,)`, float64 (positive where the entropy falls).
    """
    entropies = np.asarray(exit_entropies, dtype=np.float64)
    if entropies.ndim != 1 or entropies.size < 2 or not np.isfinite(entropies).all():
        raise ValueError(f"exit_entropies must be >= 2 finite values, one per exit, got {exit_entropies!r}")
    return entropies[:-1] - entropies[1:]


def select_source_exit(
    exit_entropies,
    rule: EntropyDropRule | str = "largest",
    threshold: float = 0.5,
    side: SourceLayerSide | str = "after_drop",
) -> int:
    r"""
    The source layer of self-distillation by the entropy-drop rule (PAPERS.md section 2.2): "the source layer is
    selected where this drop in entropy initially appears".

    With `drops[j] = H[j] - H[j + 1]` ([`entropy_drops`]) over the candidate drops:

    - `rule="largest"` (default): the largest drop (the first one on ties).
    - `rule="first_significant"`: the first drop of at least `threshold * max(drops)`, the earliest large drop. When
      no candidate drop is positive (entropy never falls) this is the largest one, as `"largest"`.

    and the drop entering exit `j + 1` gives the source:

    - `side="after_drop"` (default; PAPERS.md's `s = argmax_l (H_{l-1} - H_l)`): exit `j + 1`, the first exit
      after the drop. The final exit is the main classifier, not a source, so the drop into it is not a candidate:
      this needs 3 exits or more.
    - `side="before_drop"`: exit `j`, the last exit before the drop, which still holds the higher entropy. Every drop
      is a candidate; 2 exits suffice.

    Args:
        exit_entropies (array-like of shape `(num_exits,)`):
            Mean validation entropy per exit, shallowest first (`num_exits >= 2`).
        rule ([`~hf_kd.options.EntropyDropRule`] or `str`, *optional*, defaults to `"largest"`):
            `"largest"` or `"first_significant"`.
        threshold (`float`, *optional*, defaults to `0.5`): `delta` in `(0, 1]` of `"first_significant"`.
        side ([`~hf_kd.options.SourceLayerSide`] or `str`, *optional*, defaults to `"after_drop"`):
            `"after_drop"` or `"before_drop"`.

    Returns:
        `int`: the 0-based index of the source exit, in `[0, num_exits - 1)` (never the final exit).

    Raises:
        `ValueError`: an unknown `rule` or `side`, `threshold` outside `(0, 1]`, or too few exits for `side`.

    Example:

    ```python
    >>> from hf_kd.self_kd import select_source_exit
    >>> select_source_exit([1.05, 1.02, 0.60, 0.55, 0.20])  # largest candidate drop 1.02 -> 0.60, into exit 2
    2
    >>> select_source_exit([1.05, 1.02, 0.60, 0.55, 0.20], side="before_drop")  # the exit before that drop
    1
    ```
    """
    rule = to_enum(EntropyDropRule, rule, "rule")
    side = to_enum(SourceLayerSide, side, "side")
    if not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    drops = entropy_drops(exit_entropies)
    num_exits = drops.size + 1
    if side is SourceLayerSide.AFTER_DROP:
        if num_exits < 3:
            raise ValueError(
                f"side='after_drop' needs at least 3 exits (the exit after the drop must not be the main classifier), "
                f"got {num_exits}; use side='before_drop' or more exits"
            )
        candidates, offset = drops[:-1], 1  # drops into exits 1 .. num_exits - 2
    else:
        candidates, offset = drops, 0  # the exit before each drop: 0 .. num_exits - 2
    best = int(np.argmax(candidates))
    if rule is EntropyDropRule.FIRST_SIGNIFICANT and candidates[best] > 0:
        best = int(np.flatnonzero(candidates >= threshold * candidates[best])[0])
    return best + offset


def selection_is_stable(selections, window: int) -> bool:
    """Whether the last `window` selections (one per warm-up epoch) are all the same: the warm-up's stopping rule,
    "the selected source layer remains unchanged" (`window = E`, PAPERS.md's default 2)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    return len(selections) >= window and len(set(selections[-window:])) == 1


def level_of_ambiguity(exit_probs, labels, source_exit: int, score: AmbiguityScore | str = "source") -> np.ndarray:
    r"""
    The level of ambiguity (LA) of every training sample: the probability its gold label gets at the source layer.

    - `score="source"` (default): `LA(x) = p_s(y | x)`.
    - `score="lower_mean"`: `LA(x) = mean_{j <= s} p_j(y | x)`, over the exits up to and including the source.

    A low LA means that even the lower layers, which still represent ambiguity, find the gold label unlikely: the
    sample is "extremely ambiguous" (or mislabelled), and training it towards its single label only strengthens
    confidence that the data do not support.

    Args:
        exit_probs (array-like of shape `(num_exits, N, K)`):
            Probabilities of every exit on the training samples.
        labels (array-like of shape `(N,)`):
            Gold class indices; `-100` rows get `+inf` (never selected).
        source_exit (`int`):
            0-based index of the source exit.
        score ([`~hf_kd.options.AmbiguityScore`] or `str`, *optional*, defaults to `"source"`):
            `"source"` or `"lower_mean"`.

    Returns:
        `np.ndarray` of shape `(N,)`, float64, in `[0, 1]` (`+inf` at ignored rows).
    """
    score = to_enum(AmbiguityScore, score, "score")
    probs = np.asarray(exit_probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 3 or labels.shape != probs.shape[1:2]:
        raise ValueError(
            f"exit_probs must be (num_exits, N, K) and labels (N,), got {probs.shape} and {labels.shape}"
        )
    if not 0 <= source_exit < probs.shape[0]:
        raise ValueError(f"source_exit must be in [0, {probs.shape[0]}), got {source_exit}")
    valid = labels != -100
    rows = np.arange(labels.size)
    gold = probs[:, rows, np.where(valid, labels, 0)]  # (num_exits, N)
    scores = gold[source_exit] if score is AmbiguityScore.SOURCE else gold[: source_exit + 1].mean(axis=0)
    return np.where(valid, scores, np.inf)


def recalibration_indices(scores, percent: float) -> np.ndarray:
    """
    The re-calibration set: the `floor(percent / 100 * n)` samples with the lowest score, `n` the number of finite
    scores (labelled samples), ties broken by index. Sorted indices, `int64`.

    Args:
        scores (array-like of shape `(N,)`):
            [`level_of_ambiguity`] of every training sample (`+inf` for ignored rows).
        percent (`float`):
            `m` in `[0, 100)` (PAPERS.md's default 10).
    """
    if not (isinstance(percent, (int, float)) and 0 <= percent < 100):
        raise ValueError(f"percent must be in [0, 100), got {percent!r}")
    scores = np.asarray(scores, dtype=np.float64)
    count = math.floor(percent * int(np.isfinite(scores).sum()) / 100)
    return np.sort(np.argsort(scores, kind="stable")[:count]).astype(np.int64)
