"""Reliability diagrams and confidence histograms (Guo et al., 2017, https://huggingface.co/papers/1706.04599, fig. 1),
and the validation entropy per layer of self-distillation's source-layer selection.

Both plots are drawn from the per-bin statistics of [`hf_kd.metrics.reliability_bins`] (counts, accuracy and mean
confidence per equal-width confidence bin), so they can be redrawn from a saved `report.json` without the model.
Figures are rendered with matplotlib's Agg canvas through the object-oriented API: no display, no pyplot global
state, and the caller's matplotlib backend is left alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .import_utils import is_matplotlib_available
from .metrics import _calibration_gaps

__all__ = ["plot_confidence_histogram", "plot_layer_entropy", "plot_reliability_diagram"]

_BIN_KEYS = ("bin_lower", "bin_upper", "count", "accuracy", "confidence")


def _figure(num_panels: int, title: str | None):
    if not is_matplotlib_available():
        raise ImportError("Plots need matplotlib: pip install 'hf_kd[plots]' (or pip install matplotlib).")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.2 * num_panels, 4.4), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, num_panels, squeeze=False)[0]
    if title:
        figure.suptitle(title)
    return figure, axes


def _check_panels(panels: Mapping[str, Mapping]) -> dict[str, dict[str, np.ndarray]]:
    if not isinstance(panels, Mapping) or not panels:
        raise ValueError(
            "panels must be a non-empty mapping {panel title: reliability bins}, e.g. "
            f"{{'student': hf_kd.metrics.reliability_bins(probs, labels)}}; got {panels!r}"
        )
    checked = {}
    for name, bins in panels.items():
        missing = [key for key in _BIN_KEYS if key not in bins]
        if missing:
            raise ValueError(f"panel {name!r} lacks bin statistics {missing}; pass the output of reliability_bins")
        # None marks an empty bin in report.json; NaN does the same in memory.
        arrays = {
            key: np.asarray([np.nan if v is None else v for v in bins[key]], dtype=np.float64) for key in _BIN_KEYS
        }
        sizes = {len(a) for a in arrays.values()}
        if len(sizes) != 1 or arrays["count"].sum() <= 0:
            raise ValueError(f"panel {name!r} must have equally long bin arrays and at least one example")
        checked[str(name)] = arrays
    return checked


def _summary(bins: dict[str, np.ndarray]) -> tuple[float, float, float]:
    """(ECE, accuracy, mean confidence) recomputed from the bins, exactly as hf_kd.metrics computes them."""
    weights, gaps = _calibration_gaps(bins)
    nonempty = bins["count"] > 0
    total = bins["count"].sum()
    accuracy = float(np.sum(bins["count"][nonempty] * bins["accuracy"][nonempty]) / total)
    confidence = float(np.sum(bins["count"][nonempty] * bins["confidence"][nonempty]) / total)
    return float(np.sum(weights * gaps)), accuracy, confidence


def _save(figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    figure.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def plot_reliability_diagram(
    panels: Mapping[str, Mapping], path: str | os.PathLike, title: str | None = "Reliability diagram"
) -> Path:
    """
    Draw a reliability diagram per panel and save them side by side as one PNG.

    Each panel shows, per confidence bin, the accuracy (blue bars), the gap to the bin's mean confidence (red,
    hatched: above the bar when the model is over-confident, inside it when under-confident), the diagonal of perfect
    calibration, and the ECE with its number of bins. Empty bins are left blank.

    Args:
        panels (`Mapping[str, Mapping]`):
            `{panel title: bins}`, where bins are the output of [`hf_kd.metrics.reliability_bins`] (arrays or lists,
            `None`/NaN for empty bins), e.g. `{"student": ..., "teacher": ...}`.
        path (`str` or `os.PathLike`):
            Where to write the PNG (parent folders are created).
        title (`str`, *optional*, defaults to `"Reliability diagram"`):
            Figure title; `None` for none.

    Returns:
        `pathlib.Path`: `path`.
    """
    panels = _check_panels(panels)
    figure, axes = _figure(len(panels), title)
    for ax, (name, bins) in zip(axes, panels.items()):
        ece, accuracy, _ = _summary(bins)
        n_bins = len(bins["count"])
        centers = (bins["bin_lower"] + bins["bin_upper"]) / 2
        width = bins["bin_upper"] - bins["bin_lower"]
        nonempty = bins["count"] > 0
        ax.bar(centers[nonempty], bins["accuracy"][nonempty], width=width[nonempty], color="#4C72B0",
               edgecolor="black", linewidth=0.6, label="Accuracy")
        gap = bins["confidence"][nonempty] - bins["accuracy"][nonempty]
        ax.bar(centers[nonempty], gap, bottom=bins["accuracy"][nonempty], width=width[nonempty], color="#DD8452",
               alpha=0.45, hatch="//", edgecolor="#C44E52", linewidth=0.6, label="Gap to confidence")
        ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1, label="Perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("Confidence (max probability)")
        ax.set_ylabel("Accuracy")
        ax.set_title(name, fontsize=10)
        ax.text(0.04, 0.95, f"ECE = {ece:.4f} ({n_bins} bins)\naccuracy = {accuracy:.4f}", transform=ax.transAxes,
                va="top", fontsize=9, bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85})
        # Under the ECE box: the over-accurate, low-confidence corner is the emptiest part of a reliability diagram.
        ax.legend(loc="upper left", bbox_to_anchor=(0.0, 0.84), fontsize=8, framealpha=0.85)
    return _save(figure, path)


def plot_confidence_histogram(
    panels: Mapping[str, Mapping], path: str | os.PathLike, title: str | None = "Confidence histogram"
) -> Path:
    """
    Draw the distribution of top-label confidence per panel (the share of examples in each bin), with vertical lines
    at the accuracy and at the mean confidence: a mean confidence right of the accuracy means over-confidence.

    Args:
        panels (`Mapping[str, Mapping]`):
            `{panel title: bins}` as in [`plot_reliability_diagram`].
        path (`str` or `os.PathLike`):
            Where to write the PNG (parent folders are created).
        title (`str`, *optional*, defaults to `"Confidence histogram"`):
            Figure title; `None` for none.

    Returns:
        `pathlib.Path`: `path`.
    """
    panels = _check_panels(panels)
    figure, axes = _figure(len(panels), title)
    for ax, (name, bins) in zip(axes, panels.items()):
        _, accuracy, confidence = _summary(bins)
        centers = (bins["bin_lower"] + bins["bin_upper"]) / 2
        width = bins["bin_upper"] - bins["bin_lower"]
        share = bins["count"] / bins["count"].sum()
        ax.bar(centers, share, width=width, color="#4C72B0", edgecolor="black", linewidth=0.6)
        ax.axvline(accuracy, color="#C44E52", linestyle="--", linewidth=1.5, label=f"accuracy = {accuracy:.3f}")
        ax.axvline(confidence, color="#55A868", linestyle="-", linewidth=1.5,
                   label=f"mean confidence = {confidence:.3f}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("Confidence (max probability)")
        ax.set_ylabel("Share of examples")
        ax.set_title(name, fontsize=10)
        ax.legend(loc="upper left", fontsize=8)
    return _save(figure, path)


def plot_layer_entropy(
    exit_layers,
    entropy_by_epoch,
    path: str | os.PathLike,
    source_layer: int | None = None,
    phases=None,
    title: str | None = "Validation entropy per layer",
) -> Path:
    """
    Draw the mean validation entropy of every exit against its layer, one line per epoch, with the selected source
    layer of self-distillation marked: the curve whose sharpest drop picks the source layer of Park et al. (2024,
    https://huggingface.co/papers/2406.09719; [`hf_kd.self_kd.select_source_exit`]).

    Args:
        exit_layers (sequence of `int`):
            The layer of every exit, shallowest first (`config.exit_layers`).
        entropy_by_epoch (sequence of sequences of `float`):
            Per epoch, the mean predictive entropy (nats) of every exit.
        path (`str` or `os.PathLike`):
            Where to write the PNG (parent folders are created).
        source_layer (`int`, *optional*):
            The selected source layer (a value of `exit_layers`), drawn as a vertical line.
        phases (sequence of `str`, *optional*):
            The training phase of every epoch (`"warmup"`, `"distill"`, `"recalibrate"`), shown in the legend.
        title (`str`, *optional*, defaults to `"Validation entropy per layer"`):
            Figure title; `None` for none.

    Returns:
        `pathlib.Path`: `path`.
    """
    layers = [int(layer) for layer in exit_layers]
    curves = [np.asarray(curve, dtype=np.float64) for curve in entropy_by_epoch]
    if not curves or any(curve.shape != (len(layers),) for curve in curves):
        raise ValueError(
            f"entropy_by_epoch must hold, for at least one epoch, one entropy per exit ({len(layers)}), got "
            f"{[curve.shape for curve in curves]}"
        )
    if phases is not None and len(phases) != len(curves):
        raise ValueError(f"phases must name one phase per epoch ({len(curves)}), got {len(phases)}")
    figure, (ax,) = _figure(1, title)
    for epoch, curve in enumerate(curves, start=1):
        label = f"epoch {epoch}" + (f" ({phases[epoch - 1]})" if phases is not None else "")
        ax.plot(layers, curve, marker="o", linewidth=1.5, label=label)
    if source_layer is not None:
        ax.axvline(source_layer, color="gray", linestyle="--", linewidth=1.2, label=f"source layer {source_layer}")
    ax.set_xticks(layers)
    ax.set_xlabel("Layer of the exit")
    ax.set_ylabel("Mean predictive entropy (nats)")
    ax.legend(fontsize=8)
    return _save(figure, path)
