"""Configuration of a transformer sequence classifier with letKD KD layers applied per token.

Görgün, Gürbüz & Alatan, "Knowledge Distillation Layer that Lets the Student Decide", BMVC 2023
(https://huggingface.co/papers/2309.02843). A KD layer (`hf_kd.KDLayer`) sits after one or two transformer layers of
the student and transforms every token's hidden state; the student's own classification head reads the result.
"""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_multi_exit import _as_backbone_config

KD_LAYER_LOCATIONS = ("intermediate", "penultimate")


def _check_kd_layer_templates(kd_layer_templates) -> dict[str, int]:
    """Validate `{location: number of templates}`; locations are `"intermediate"` and `"penultimate"`."""
    if kd_layer_templates is None:
        return {}
    if not isinstance(kd_layer_templates, dict):
        raise ValueError(
            f"kd_layer_templates must be a dict {{location: num_templates}} with locations in {KD_LAYER_LOCATIONS}, "
            f"got {kd_layer_templates!r}."
        )
    checked = {}
    for location in KD_LAYER_LOCATIONS:  # a fixed order, whatever the user's
        if location not in kd_layer_templates:
            continue
        value = kd_layer_templates[location]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"kd_layer_templates[{location!r}] must be an integer >= 1, got {value!r}.")
        checked[location] = value
    unknown = sorted(set(kd_layer_templates) - set(KD_LAYER_LOCATIONS))
    if unknown:
        raise ValueError(f"Unknown KD layer location(s) {unknown}: accepted locations are {KD_LAYER_LOCATIONS}.")
    return checked


def _check_kd_layer_residual_weights(weights, kd_layer_templates: dict[str, int]) -> dict[str, float]:
    """One residual weight per KD layer (default 1.0, the official `value_ratio`)."""
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(kd_layer_templates))
    if unknown:
        raise ValueError(
            f"kd_layer_residual_weights names location(s) {unknown} without a KD layer (KD layers: "
            f"{sorted(kd_layer_templates)})."
        )
    checked = {}
    for location in kd_layer_templates:
        value = weights.get(location, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"kd_layer_residual_weights[{location!r}] must be a number >= 0, got {value!r}.")
        checked[location] = float(value)
    return checked


class KDLayerConfig(PreTrainedConfig):
    r"""
    Configuration of a [`KDLayerForSequenceClassification`]: a transformers sequence classifier (the "backbone",
    with its own head) and letKD KD layers applied per token after some of its transformer layers.

    Args:
        backbone_config (`dict` or `PreTrainedConfig`):
            The configuration of the whole sequence classifier (e.g. a `BertConfig` with `num_labels`), built with
            `AutoModelForSequenceClassification.from_config`. Its encoder layers must live in a `ModuleList` named
            `encoder.layer` (BERT, MiniLM, RoBERTa, MPNet, ELECTRA, ...). A `dict` must hold a `model_type`.
        kd_layer_templates (`dict[str, int]`, *optional*):
            `{location: K}`: a KD layer with `K` templates at each location. `"penultimate"` is after the last
            transformer layer (what the head reads); `"intermediate"` after layer `intermediate_layer`. letKD's
            defaults are 4096 templates at the penultimate location and 8 per class at the intermediate one.
        intermediate_layer (`int`, *optional*, defaults to `num_hidden_layers - 1`):
            1-based transformer layer after which the intermediate KD layer sits, in `[1, num_hidden_layers - 1]`
            (the last layer is the penultimate location). The paper puts it in the last stage of a CNN, after its
            first block: one layer before the last is the closest transformer analogue.
        kd_layer_residual_weights (`dict[str, float]`, *optional*, defaults to 1.0 each):
            Weight of each KD layer's values in its residual, `x^ = x + w * v` (official `value_ratio`).
        kd_layer_score_scale (`float`, *optional*, defaults to 3.0):
            Initial learnable scale of the template scores (official `scale_cls`).
        kwargs:
            Passed to [`PreTrainedConfig`]. `num_labels`, `id2label` and `label2id` default to the backbone's.

    Example:

    ```python
    >>> from transformers import BertConfig
    >>> from hf_kd.modeling import KDLayerConfig
    >>> backbone = BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_labels=2)
    >>> config = KDLayerConfig(backbone_config=backbone, kd_layer_templates={"penultimate": 256, "intermediate": 16})
    >>> config.intermediate_layer, config.num_labels
    (2, 2)
    ```
    """

    model_type = "hf_kd_kd_layer"
    keys_to_ignore_at_inference = ["kd_layer_scores", "kd_features", "hidden_states", "attentions"]
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="bert", optional=True)
    }

    def __init__(
        self,
        backbone_config=None,
        kd_layer_templates=None,
        intermediate_layer=None,
        kd_layer_residual_weights=None,
        kd_layer_score_scale=3.0,
        **kwargs,
    ):
        self.backbone_config = backbone_config = _as_backbone_config(backbone_config)
        self.kd_layer_templates = _check_kd_layer_templates(kd_layer_templates)
        self.kd_layer_residual_weights = _check_kd_layer_residual_weights(
            kd_layer_residual_weights, self.kd_layer_templates
        )
        if not kd_layer_score_scale > 0:
            raise ValueError(f"kd_layer_score_scale must be > 0, got {kd_layer_score_scale!r}.")
        self.kd_layer_score_scale = float(kd_layer_score_scale)

        depth = getattr(backbone_config, "num_hidden_layers", None)
        if intermediate_layer is None and depth is not None and depth >= 2:
            intermediate_layer = depth - 1
        if "intermediate" in self.kd_layer_templates and depth is not None:
            if depth < 2:
                raise ValueError(
                    f"An intermediate KD layer needs a backbone with >= 2 layers (the last one is the penultimate "
                    f"location), got num_hidden_layers={depth}."
                )
            if isinstance(intermediate_layer, bool) or not isinstance(intermediate_layer, int) or not (
                1 <= intermediate_layer <= depth - 1
            ):
                raise ValueError(
                    f"intermediate_layer must be an integer in [1, {depth - 1}] (1-based; layer {depth} is the "
                    f"penultimate location), got {intermediate_layer!r}."
                )
        self.intermediate_layer = intermediate_layer

        if backbone_config is not None:
            # The student's label space is its head's: the trainer's label checks read it here.
            kwargs.setdefault("id2label", dict(backbone_config.id2label))
            kwargs.setdefault("label2id", dict(backbone_config.label2id))
        super().__init__(**kwargs)


__all__ = ["KDLayerConfig"]
