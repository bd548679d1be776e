"""Configuration of the multi-exit (early-exit) encoder classifier.

A multi-exit model puts a small classifier ("exit" or "off-ramp") after some transformer layers of an encoder
backbone, as in DeeBERT (Xin et al., 2020, https://huggingface.co/papers/2004.12993) and PABEE (Zhou et al., 2020,
https://huggingface.co/papers/2006.04152). At inference an example leaves at the first exit that is confident
enough, so easy examples run fewer layers.
"""

from __future__ import annotations

from enum import Enum

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


class ExitHeadType(str, Enum):
    """The classifier of each exit ([`MultiExitConfig`]`.exit_head_type`), on the pooled hidden state `u`."""

    LINEAR = "linear"
    """`classifier(dropout(u))`."""
    POOLER = "pooler"
    """`classifier(dropout(tanh(dense(u))))`, BERT's pooler then a linear classifier."""


class ExitPooling(str, Enum):
    """How each exit pools its layer's hidden states into one vector ([`MultiExitConfig`]`.exit_pooling`)."""

    MEAN = "mean"
    """The mean over the tokens of `attention_mask` (padding left out)."""
    CLS = "cls"
    """The first token ([CLS])."""


def _check_option(enum_class: type[Enum], value, name: str) -> str:
    """`value` as the string of one of `enum_class`'s members (what config.json stores); a clear error otherwise."""
    try:
        return enum_class(value).value
    except ValueError:
        raise ValueError(f"{name} must be one of {tuple(m.value for m in enum_class)}, got {value!r}.") from None


def _as_backbone_config(backbone_config):
    """A backbone config given as a dict (as config.json stores it) or a config, as a `PreTrainedConfig` (or `None`).

    Shared by the wrapper configs (`MultiExitConfig`, `KDLayerConfig`)."""
    if isinstance(backbone_config, dict):
        backbone_config = dict(backbone_config)
        if "model_type" not in backbone_config:
            raise ValueError("backbone_config as a dict must contain a 'model_type' (e.g. 'bert', 'mpnet').")
        backbone_config.pop("transformers_version", None)
        backbone_config = AutoConfig.for_model(**backbone_config)
    if backbone_config is not None and not isinstance(backbone_config, PreTrainedConfig):
        raise TypeError(f"backbone_config must be a dict or a PreTrainedConfig, got {type(backbone_config)}.")
    return backbone_config


def _check_exit_layers(exit_layers, depth: int | None, unit: str, owner: str) -> list[int] | None:
    """Validate 1-based exit positions in a stack of `depth` blocks; sort, deduplicate and add the last block.

    Shared by [`MultiExitConfig`] (`unit="layer"`) and `MultiExitImageConfig` (`unit="stage"`) so both read and check
    `exit_layers` the same way. `depth=None` (no backbone yet) only checks the types. The default (`None`) is every
    block.
    """
    if exit_layers is None:
        return list(range(1, depth + 1)) if depth is not None else None
    bad = [i for i in exit_layers if isinstance(i, bool) or not isinstance(i, int)]
    if bad:
        raise ValueError(f"exit_layers must be 1-based integer {unit} indices, got {bad[0]!r}.")
    if depth is None:
        return sorted(set(exit_layers))
    for i in exit_layers:
        if not 1 <= i <= depth:
            raise ValueError(
                f"exit {unit} {i} is out of range: exit_layers are 1-based and {owner} has {depth} {unit}s "
                f"(valid: 1..{depth})."
            )
    # The last block is always an exit, so every example gets a prediction from the full-depth classifier.
    return sorted(set(exit_layers) | {depth})


def _check_exit_loss_weights(exit_loss_weights, exit_layers: list[int] | None) -> list[float] | None:
    """Validate one non-negative loss weight per exit (positive sum); `None` stays `None` (uniform)."""
    if exit_loss_weights is None:
        return None
    exit_loss_weights = [float(w) for w in exit_loss_weights]
    if exit_layers is not None and len(exit_loss_weights) != len(exit_layers):
        raise ValueError(
            f"exit_loss_weights has {len(exit_loss_weights)} weights but there are {len(exit_layers)} exits "
            f"(exit_layers={exit_layers})."
        )
    if any(not w >= 0 for w in exit_loss_weights) or sum(exit_loss_weights) <= 0:
        raise ValueError(f"exit_loss_weights must be >= 0 with a positive sum, got {exit_loss_weights}.")
    return exit_loss_weights


class _MultiExitConfigMixin:
    """`num_exits` and `normalized_exit_loss_weights` from `exit_layers` and `exit_loss_weights`, shared by the
    sequence and image multi-exit configs."""

    @property
    def num_exits(self) -> int:
        """Number of exits (including the final one)."""
        return len(self.exit_layers or [])

    @property
    def normalized_exit_loss_weights(self) -> list[float]:
        """The per-exit loss weights normalised to sum to 1 (uniform `1 / num_exits` when unset)."""
        if self.exit_loss_weights is None:
            return [1.0 / self.num_exits] * self.num_exits
        total = sum(self.exit_loss_weights)
        return [w / total for w in self.exit_loss_weights]


class MultiExitConfig(_MultiExitConfigMixin, PreTrainedConfig):
    r"""
    Configuration of a [`MultiExitForSequenceClassification`]: an encoder backbone with one classification head
    ("exit") after each layer listed in `exit_layers`.

    Args:
        backbone_config (`dict` or `PreTrainedConfig`, *optional*):
            The configuration of the encoder backbone (any transformers encoder whose config has
            `num_hidden_layers` and `hidden_size`; the step-by-step early-exit inference supports BERT-like models,
            e.g. BERT and MiniLM, and MPNet). A `dict` must hold a `model_type` and is turned into the matching config
            class with `AutoConfig.for_model`. Required: there is no default backbone.
        exit_layers (`list[int]`, *optional*, defaults to every layer `[1, ..., num_hidden_layers]`):
            1-based indices of the layers after which an exit head sits, i.e. exit `j` reads the output of layer
            `exit_layers[j]`. They are sorted and deduplicated; the last layer is always added, so the final exit is
            the full-depth classifier.
        num_labels (`int`, *optional*, defaults to 2):
            Number of classes K of every exit.
        classifier_dropout (`float`, *optional*):
            Dropout before each exit's linear layer. Defaults to the backbone's `classifier_dropout` if it has one
            that is not `None`, else its `hidden_dropout_prob`, else 0.1.
        exit_pooling ([`ExitPooling`] or `str`, *optional*, defaults to `"mean"`):
            What each exit reads of its layer's hidden states `h` `(batch, seq_len, hidden)`:
            - `"mean"`: the mean of `h` over the non-padding tokens (the attention mask). The default, because
              early layers' [CLS] states carry little about the input: with the pretrained all-MiniLM-L6-v2 frozen, a
              logistic regression on Rotten Tomatoes reaches 0.76 validation accuracy from layer-1 mean-pooled states
              and 0.63 (the majority class) from layer-1 [CLS] states.
            - `"cls"`: the first-token ([CLS]) state `h[:, 0]`, as DeeBERT and PABEE.
        exit_head_type ([`ExitHeadType`] or `str`, *optional*, defaults to `"linear"`):
            The exit head on the pooled state `u` `(batch, hidden)`:
            - `"linear"`: `Linear(hidden, K)(dropout(u))`, the cheapest head (the default, so early exits cost
              almost nothing on top of their layer).
            - `"pooler"`: a BERT-pooler-like `Linear(hidden, K)(dropout(tanh(Linear(hidden, hidden)(u))))`, one
              pooler per exit, as DeeBERT's off-ramps.
        exit_loss_weights (`list[float]`, *optional*, defaults to uniform):
            Non-negative weight of each exit's cross-entropy in the training loss, one per exit (after the final layer
            has been added to `exit_layers`). They are normalised to sum to 1, so the loss is on the scale of a
            single cross-entropy whatever the number of exits.
        initializer_range (`float`, *optional*):
            Standard deviation of the normal initialisation of the exit heads. Defaults to the backbone's
            `initializer_range`, else 0.02.
        kwargs:
            Passed to [`PreTrainedConfig`] (`id2label`, `label2id`, `problem_type`, ...).

    Examples:

    ```python
    >>> from transformers import BertConfig
    >>> from hf_kd.modeling import MultiExitConfig, MultiExitForSequenceClassification

    >>> backbone = BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37)
    >>> config = MultiExitConfig(backbone_config=backbone, exit_layers=[1, 2], num_labels=3)
    >>> config.exit_layers  # the final layer is always an exit
    [1, 2, 3]
    >>> model = MultiExitForSequenceClassification(config)
    ```
    """

    model_type = "hf_kd_multi_exit"
    # Declaring the backbone as a sub-config makes `attn_implementation=...` (from_pretrained) reach the backbone.
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="bert", optional=True)
    }

    def __init__(
        self,
        backbone_config=None,
        exit_layers=None,
        num_labels=None,
        classifier_dropout=None,
        exit_head_type="linear",
        exit_pooling="mean",
        exit_loss_weights=None,
        initializer_range=None,
        **kwargs,
    ):
        self.backbone_config = backbone_config = _as_backbone_config(backbone_config)

        depth = getattr(backbone_config, "num_hidden_layers", None) if backbone_config is not None else None
        if backbone_config is not None and (depth is None or getattr(backbone_config, "hidden_size", None) is None):
            raise ValueError(
                f"backbone_config ({type(backbone_config).__name__}) has no `num_hidden_layers`/`hidden_size`: "
                "a multi-exit model needs a transformer encoder with a stack of layers."
            )
        self.exit_layers = exit_layers = _check_exit_layers(exit_layers, depth, unit="layer", owner="the backbone")

        self.exit_head_type = _check_option(ExitHeadType, exit_head_type, "exit_head_type")
        self.exit_pooling = _check_option(ExitPooling, exit_pooling, "exit_pooling")

        if classifier_dropout is None and backbone_config is not None:
            classifier_dropout = getattr(backbone_config, "classifier_dropout", None)
            if classifier_dropout is None:
                classifier_dropout = getattr(backbone_config, "hidden_dropout_prob", 0.1)
        self.classifier_dropout = 0.1 if classifier_dropout is None else classifier_dropout

        self.exit_loss_weights = _check_exit_loss_weights(exit_loss_weights, exit_layers)

        if initializer_range is None:
            initializer_range = getattr(backbone_config, "initializer_range", None) or 0.02
        self.initializer_range = initializer_range
        if num_labels is not None:
            kwargs["num_labels"] = num_labels
        super().__init__(**kwargs)


__all__ = ["MultiExitConfig"]
