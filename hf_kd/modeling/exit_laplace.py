"""Last-layer Laplace approximation per exit of a multi-exit classifier, with per-exit temperature and prior.

Meronen et al., "Fixing Overconfidence in Dynamic Neural Networks" (WACV 2024,
https://huggingface.co/papers/2302.06359; official code AaltoML/calibrated-dnn) make every exit of an early-exit
network Bayesian in its last linear layer only, post hoc: a Kronecker-factored (KFAC) Gauss-Newton posterior over the
exit's final `nn.Linear` (weight and bias), fitted from one pass over the training data, a prior variance and a
temperature chosen per exit on validation data, and a Monte-Carlo predictive. Written in-house: laplace-torch
(Daxberger et al., 2021, https://huggingface.co/papers/2106.14806), whose small API this module follows (`fit`,
hyperparameter selection, a predictive call with a `link_approx` option, `state_dict`), needs torchvision, which
cannot be installed beside this project's torch.

The maths, for one exit with `K` classes, features `phi` `(d,)` (the input of the exit's final linear layer) and
`a = [phi; 1]` `(d + 1,)`; `W` `(K, d + 1)` is the trained weight with the bias as last column, `f = W a` the logits:

- **Curvature.** The Hessian of the cross-entropy w.r.t. the logits is `Lambda(a) = diag(p) - p p^T`,
  `p = softmax(f)`. The logits are linear in `W`, so the Gauss-Newton matrix is the exact Hessian of the training
  loss `sum_n CE(W a_n, y_n)` w.r.t. `vec(W)` (row-major): `H = sum_n Lambda_n (x) a_n a_n^T`.
- **KFAC** (Martens & Grosse, 2015): `U = sqrt(N) * mean_n Lambda_n` `(K, K)`, `V = sqrt(N) * mean_n a_n a_n^T`
  `(d + 1, d + 1)`, so `U (x) V = N * E[Lambda] (x) E[a a^T] ~ H`: exact for one example, or when every example has
  the same `Lambda` (e.g. a zero weight), an approximation otherwise. The `sqrt(N)` per factor is the official code's.
  The official code gets the factors from BackPACK's `KFAC()` (a one-sample Monte-Carlo estimate of `Lambda`,
  running-averaged over mini-batches with `rho_b = min(1 - 1/(b+1), 0.95)`); here `Lambda` is exact and the mean
  runs over every training example, which has the same expectation without the sampling noise.
- **Prior** `N(0, sigma0^2 I)`, precision `lambda = 1 / sigma0^2`. [`KronPrior`] `"per_factor"` (default, the
  official code's): posterior precision `(U + sqrt(lambda) I) (x) (V + sqrt(lambda) I)`; `"isotropic"`: the exact
  `U (x) V + lambda I` (laplace-torch's Kronecker convention). With the eigendecompositions `U = Q_U diag(l) Q_U^T`
  and `V = Q_V diag(m) Q_V^T`, both are `(Q_U (x) Q_V) diag(D) (Q_U (x) Q_V)^T` with
  `D_ij = (l_i + sqrt(lambda)) (m_j + sqrt(lambda))` or `l_i m_j + lambda`.
- **Logit distribution.** `f ~ N(W a, Q_U diag(c) Q_U^T)` with `c_i = sum_j (Q_V^T a)_j^2 / D_ij`: with
  `"per_factor"` this is the official `(phi^T V^-1 phi) U^-1` (Kronecker-factored covariance; the Laplace posterior is
  Gaussian and `f` linear in `W`, so this is exact for the posterior, no linearisation).
- **Predictive** with temperature `T`. `"mc"` (the official code's, `M = 50` samples): `z_1..z_M ~ N(0, I_K)` are
  drawn once per exit and shared by every input (stored with the fit, so predictions are deterministic),
  `p = (1/M) sum_m softmax((W a + Q_U (sqrt(c) * z_m)) / T)`. `"probit"` (not in the official code; the extended
  probit of laplace-torch): `p = softmax((W a / T) / sqrt(1 + (pi/8) v / T^2))` with `v = diag(Q_U diag(c) Q_U^T)`.
  `T` and `sigma0^2` are chosen per exit on validation data by the log-likelihood over the grids of the paper
  ([`TEMPERATURE_GRID`], [`PRIOR_VARIANCE_GRID`]); with model-internal ensembling the search is greedy over the
  exits, scoring the ensemble at each exit with the earlier exits fixed.

[`MultiExitLaplace`] holds one [`KronLastLayerLaplace`] per exit and is saved next to the model weights as
`exit_laplace.safetensors` ([`EXIT_LAPLACE_FILENAME`]) by the multi-exit models' `save_pretrained`, and read back by
their `from_pretrained`, through [`ExitLaplaceMixin`]. This file needs only torch, safetensors and transformers, so
a saved model predicts with its Laplace posterior under `trust_remote_code=True` without hf_kd.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from enum import Enum

import torch
from torch import nn

from .exit_policies import _mie_weights, _model_internal_ensemble

__all__ = [
    "EXIT_LAPLACE_FILENAME",
    "EXIT_LAPLACE_PROBS",
    "PRIOR_VARIANCE_GRID",
    "TEMPERATURE_GRID",
    "ExitLaplaceMixin",
    "capture_exit_features",
    "KronLastLayerLaplace",
    "KronPrior",
    "LinkApprox",
    "MultiExitLaplace",
    "select_exit_temperatures",
]

EXIT_LAPLACE_PROBS = "exit_laplace_probs"
"""Name of the `(batch, num_exits, num_labels)` calibrated per-exit probabilities that `EarlyExitTrainer` adds to its
evaluation predictions when the model has a fitted [`MultiExitLaplace`]."""

EXIT_LAPLACE_FILENAME = "exit_laplace.safetensors"
"""File written next to `model.safetensors` by `save_pretrained` when the model has a fitted [`MultiExitLaplace`]."""

TEMPERATURE_GRID = (0.3, 0.5, 0.7, 1.0, 1.3, 1.5, 1.7, 2.0, 2.5, 3.0)
"""Temperatures searched per exit (Meronen et al., 2024, official code)."""

PRIOR_VARIANCE_GRID = (0.5, 0.7, 1.0, 1.3, 1.5, 1.7, 2.0, 2.5, 3.0, 4.0)
"""Prior variances `sigma0^2` searched per exit (Meronen et al., 2024, official code)."""

_FORMAT = "hf_kd.exit_laplace"
_FORMAT_VERSION = 1
_METADATA_KEY = "hf_kd_exit_laplace"
_DEFAULT_PRIOR_VARIANCE = 2.0  # the official code's default sigma0^2
# Maximum relative difference between the fitted mean and the model's head before predictions are refused.
_HEAD_RTOL = 1e-4


class LinkApprox(str, Enum):
    """How [`KronLastLayerLaplace`] turns the Gaussian over an exit's logits into class probabilities."""

    MC = "mc"
    """Monte-Carlo: the mean of `softmax(f_m / T)` over `num_samples` logit samples `f_m`, whose standard normal
    draws are shared by every input (Meronen et al., 2024)."""
    PROBIT = "probit"
    """Extended probit approximation: `softmax((f / T) / sqrt(1 + (pi / 8) var / T^2))`, one softmax, no sampling."""


class KronPrior(str, Enum):
    """How the isotropic prior precision `lambda = 1 / sigma0^2` enters the Kronecker-factored posterior."""

    PER_FACTOR = "per_factor"
    """`(U + sqrt(lambda) I) (x) (V + sqrt(lambda) I)`: the official code of Meronen et al. (2024); its prior-variance
    grid is tuned for this form."""
    ISOTROPIC = "isotropic"
    """`U (x) V + lambda I`: the exact Gaussian prior on top of the KFAC likelihood curvature (laplace-torch)."""


def _check_choice(enum_class, value, name: str):
    try:
        return enum_class(value)
    except ValueError:
        raise ValueError(f"{name} must be one of {[m.value for m in enum_class]}, got {value!r}.") from None


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    return float(value)


def _check_grid(name: str, values) -> tuple[float, ...]:
    values = tuple(values)
    if not values:
        raise ValueError(f"{name} must hold at least one value, got an empty grid.")
    return tuple(_check_positive(f"every value of {name}", v) for v in values)


def _probit_softmax(mean: torch.Tensor, scaled_variance: torch.Tensor, temperature: float) -> torch.Tensor:
    """`softmax(f / sqrt(T^2 + s))` `(n, K)` for mean logits `f` and `s = (pi/8) v` `(n, K)`: the extended probit
    `softmax((f / T) / sqrt(1 + (pi/8) v / T^2))` with one division fewer."""
    return (mean * torch.rsqrt(scaled_variance + temperature**2)).softmax(-1)


def _augment(features: torch.Tensor) -> torch.Tensor:
    """`[phi, 1]`: `(n, d)` -> `(n, d + 1)`, so that the bias is the last column of the weight."""
    return torch.cat([features, features.new_ones(features.shape[0], 1)], dim=1)


class KronLastLayerLaplace:
    r"""Kronecker-factored Laplace posterior over one linear classification layer (weight and bias).

    The formulas are in this module's docstring: KFAC factors `U = sqrt(N) E[Lambda]`, `V = sqrt(N) E[a a^T]` of the
    cross-entropy's Gauss-Newton matrix, a prior of variance `sigma0^2` added as [`KronPrior`] says, and a Gaussian
    over the logits turned into probabilities by Monte-Carlo or probit ([`LinkApprox`]) at temperature `T`
    (Meronen et al., 2024, https://huggingface.co/papers/2302.06359). Factors are accumulated and decomposed in
    float64; predictions are computed in the features' dtype (float32 at least).

    Args:
        weight (`torch.Tensor` of shape `(K, d)`): the trained (MAP) weight of the layer.
        bias (`torch.Tensor` of shape `(K,)`, *optional*): its bias (zeros when the layer has none).
        prior_structure ([`KronPrior`] or `str`, *optional*, defaults to `"per_factor"`).
        num_samples (`int`, *optional*, defaults to 50): Monte-Carlo samples `M` of the `"mc"` predictive.
        seed (`int`, *optional*, defaults to 0): seed of the `M` shared standard normal draws `(M, K)`.

    Example:

    ```python
    >>> head = torch.nn.Linear(16, 3)
    >>> la = KronLastLayerLaplace(head.weight, head.bias)
    >>> la.fit(train_features)  # (N, 16), the inputs of `head` on the training data
    >>> la.prior_precision, la.temperature = 1 / 2.0, 1.3
    >>> probs = la.predictive(test_features, link_approx="mc")  # (n, 3)
    ```
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        prior_structure: KronPrior | str = KronPrior.PER_FACTOR,
        num_samples: int = 50,
        seed: int = 0,
    ):
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or 0 in weight.shape:
            raise ValueError(
                f"weight must be a (num_classes, num_features) tensor, got {getattr(weight, 'shape', weight)}."
            )
        num_classes, num_features = weight.shape
        if bias is None:
            bias = weight.new_zeros(num_classes)
        if bias.shape != (num_classes,):
            raise ValueError(f"bias must have shape ({num_classes},) to match the weight, got {tuple(bias.shape)}.")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}.")
        self.prior_structure = _check_choice(KronPrior, prior_structure, "prior_structure")
        # The mean of the posterior: a snapshot of the layer at fit time, so factors and mean always belong together.
        self.weight_map = torch.cat([weight.detach(), bias.detach()[:, None]], dim=1).to("cpu", torch.float64)
        self.num_samples, self.seed = num_samples, seed
        generator = torch.Generator().manual_seed(seed)
        self.normal_draws = torch.randn(num_samples, num_classes, generator=generator, dtype=torch.float64)
        self.prior_precision = 1.0 / _DEFAULT_PRIOR_VARIANCE
        self.temperature = 1.0
        self.num_data = 0
        self._logit_hessian_sum = torch.zeros(num_classes, num_classes, dtype=torch.float64)
        self._gram_sum = torch.zeros(num_features + 1, num_features + 1, dtype=torch.float64)
        self._eigen = None  # (l, Q_U, m, Q_V) once fitted
        self._cache = {}  # (device, dtype, prior precision) -> tensors of the predictive

    @property
    def num_classes(self) -> int:
        return self.weight_map.shape[0]

    @property
    def num_features(self) -> int:
        """`d`, the number of input features (without the appended 1)."""
        return self.weight_map.shape[1] - 1

    @property
    def is_fitted(self) -> bool:
        return self._eigen is not None

    @property
    def prior_variance(self) -> float:
        """`sigma0^2 = 1 / prior_precision`."""
        return 1.0 / self.prior_precision

    @prior_variance.setter
    def prior_variance(self, value: float) -> None:
        self.prior_precision = 1.0 / _check_positive("prior_variance", value)

    @property
    def prior_precision(self) -> float:
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value: float) -> None:
        self._prior_precision = _check_positive("prior_precision", value)

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = _check_positive("temperature", value)

    # ------------------------------------------------------------------------------------------------ fitting

    def _check_features(self, features, finite: bool = False) -> torch.Tensor:
        if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[1] != self.num_features:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"features must be a (n, {self.num_features}) tensor, got {shape}.")
        if not features.is_floating_point():
            raise ValueError(f"features must be floating point, got {features.dtype}.")
        # Only the fit checks finiteness (a NaN would poison every factor); a prediction propagates it like softmax.
        if finite and not torch.isfinite(features).all():
            raise ValueError("the training features must be finite.")
        return features

    def reset(self) -> None:
        """Drop the accumulated factor sums (and the fit)."""
        self.num_data = 0
        self._logit_hessian_sum.zero_()
        self._gram_sum.zero_()
        self._eigen, self._cache = None, {}

    def update(self, features: torch.Tensor) -> None:
        """Add a batch of training features `(n, d)` (the inputs of the layer) to the factor sums; [`finalize`]
        after the last batch."""
        a = _augment(self._check_features(features, finite=True).detach().to("cpu", torch.float64))  # (n, d + 1)
        probs = (a @ self.weight_map.T).softmax(-1)  # (n, K)
        # sum_n diag(p_n) - p_n p_n^T, and sum_n a_n a_n^T
        self._logit_hessian_sum += torch.diag(probs.sum(0)) - probs.T @ probs
        self._gram_sum += a.T @ a
        self.num_data += a.shape[0]
        self._eigen, self._cache = None, {}

    def finalize(self) -> None:
        """Turn the accumulated sums into the KFAC factors `U`, `V` and their eigendecompositions."""
        if self.num_data == 0:
            raise ValueError("no training features were given: call update(features) with at least one example first.")
        scale = 1.0 / math.sqrt(self.num_data)  # sqrt(N) * mean = sum / sqrt(N)
        u = self._logit_hessian_sum * scale
        v = self._gram_sum * scale
        eig_u, q_u = torch.linalg.eigh((u + u.T) / 2)
        eig_v, q_v = torch.linalg.eigh((v + v.T) / 2)
        # Both factors are positive semi-definite; rounding can leave tiny negative eigenvalues. Contiguous (eigh
        # returns column-major) so that a saved and reloaded fit runs the same kernels and predicts bit for bit.
        self._eigen = (eig_u.clamp_min(0), q_u.contiguous(), eig_v.clamp_min(0), q_v.contiguous())
        self._cache = {}

    def fit(self, features: torch.Tensor | Iterable[torch.Tensor]) -> KronLastLayerLaplace:
        """Fit the factors from the layer's training inputs: a `(N, d)` tensor or an iterable of `(n, d)` batches.

        Starts from scratch (previous sums are dropped), then [`update`] per batch and [`finalize`]. Returns self.
        """
        self.reset()
        for batch in [features] if isinstance(features, torch.Tensor) else features:
            self.update(batch)
        self.finalize()
        return self

    @property
    def kron_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(U, V)`, float64 `(K, K)` and `(d + 1, d + 1)`: `U (x) V` approximates the Gauss-Newton matrix of the
        summed training cross-entropy w.r.t. the row-major `vec([W | b])` (the prior is not included)."""
        eig_u, q_u, eig_v, q_v = self._fitted()
        return q_u @ torch.diag(eig_u) @ q_u.T, q_v @ torch.diag(eig_v) @ q_v.T

    def _fitted(self):
        if self._eigen is None:
            raise ValueError("this Laplace approximation is not fitted: call fit(train_features) first.")
        return self._eigen

    def _inverse_precision_eigenvalues(self, prior_precision: float) -> torch.Tensor:
        """`1 / D` `(K, d + 1)`: the posterior covariance's eigenvalues in the `Q_U (x) Q_V` basis."""
        eig_u, _, eig_v, _ = self._fitted()
        if self.prior_structure is KronPrior.PER_FACTOR:
            root = math.sqrt(prior_precision)
            return 1.0 / ((eig_u + root)[:, None] * (eig_v + root)[None, :])
        return 1.0 / (eig_u[:, None] * eig_v[None, :] + prior_precision)

    def _predictive_tensors(self, device, dtype, prior_precision: float):
        """`(weight_map, Q_U, Q_V, 1 / D^T (d + 1, K))` on `device` in `dtype`, cached per prior precision."""
        key = (str(device), dtype, prior_precision)
        if key not in self._cache:
            _, q_u, _, q_v = self._fitted()
            to = dict(device=device, dtype=dtype)
            inverse = self._inverse_precision_eigenvalues(prior_precision).T.contiguous()
            self._cache[key] = (self.weight_map.to(**to), q_u.to(**to), q_v.to(**to), inverse.to(**to))
        return self._cache[key]

    def _prior_or_default(self, prior_precision: float | None) -> float:
        """`prior_precision` checked (> 0), or the selected `self.prior_precision` when `None`."""
        return self.prior_precision if prior_precision is None else _check_positive("prior_precision", prior_precision)

    def _probit_tensors(self, device, dtype, prior_precision: float):
        """`([W^T | Q_V[:d]] (d, K + d + 1), [b | Q_V[d]] (K + d + 1,), (pi/8) (1 / D^T) (Q_U o Q_U)^T (d + 1, K))`:
        one `addmm` of the features gives the mean logits and `Q_V^T a`, one product of its squares `(pi/8) v`
        (cached per prior precision; the probit prediction of an early-exit model runs at every exit of every batch,
        so its op count matters on small models)."""
        key = (str(device), dtype, prior_precision, "probit")
        if key not in self._cache:
            weight, q_u, q_v, inverse = self._predictive_tensors(device, dtype, prior_precision)
            self._cache[key] = (
                torch.cat([weight[:, :-1].T, q_v[:-1]], 1).contiguous(),
                torch.cat([weight[:, -1], q_v[-1]]),
                (math.pi / 8) * inverse @ q_u.square().T,
            )
        return self._cache[key]

    def _draws(self, device, dtype) -> torch.Tensor:
        key = (str(device), dtype, "draws")
        if key not in self._cache:
            self._cache[key] = self.normal_draws.to(device=device, dtype=dtype)
        return self._cache[key]

    # --------------------------------------------------------------------------------------------- predictive

    def logit_distribution(
        self, features: torch.Tensor, prior_precision: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r"""The Gaussian over the logits of each input, in factored form.

        Args:
            features (`torch.Tensor` of shape `(n, d)`): inputs of the layer.
            prior_precision (`float`, *optional*, defaults to `self.prior_precision`).

        Returns:
            `(mean, basis, variances)`: `mean` `(n, K)` = the layer's logits (with the fitted weights), `basis` `Q_U`
            `(K, K)` and `variances` `c` `(n, K)`, so that the covariance of input `i` is
            `basis @ diag(variances[i]) @ basis.T`.
        """
        features = self._check_features(features)
        prior_precision = self._prior_or_default(prior_precision)
        dtype = torch.promote_types(features.dtype, torch.float32)
        weight, q_u, q_v, inverse = self._predictive_tensors(features.device, dtype, prior_precision)
        features = features.to(dtype)
        mean = features @ weight[:, :-1].T + weight[:, -1]  # (n, K)
        projected = features @ q_v[:-1] + q_v[-1]  # b = Q_V^T a, (n, d + 1)
        variances = projected.square() @ inverse  # c_i = sum_j b_j^2 / D_ij, (n, K)
        return mean, q_u, variances

    def logit_samples(self, mean: torch.Tensor, basis: torch.Tensor, variances: torch.Tensor) -> torch.Tensor:
        """The `M` Monte-Carlo logit samples `W a + Q_U (sqrt(c) * z_m)` `(n, M, K)` of [`logit_distribution`]'s
        output, with the shared draws `z_m`."""
        draws = self._draws(mean.device, mean.dtype)  # (M, K)
        return mean[:, None, :] + (variances.sqrt()[:, None, :] * draws[None]) @ basis.T

    @staticmethod
    def probit(mean: torch.Tensor, basis: torch.Tensor, variances: torch.Tensor, temperature: float) -> torch.Tensor:
        """The extended probit predictive `softmax((f / T) / sqrt(1 + (pi/8) v / T^2))` `(n, K)` of
        [`logit_distribution`]'s output, computed as `softmax(f / sqrt(T^2 + (pi/8) v))`."""
        scaled = (variances @ basis.square().T) * (math.pi / 8)  # (pi/8) v, v = diag(Q_U diag(c) Q_U^T), (n, K)
        return _probit_softmax(mean, scaled, temperature)

    def _fused_probit(self, features: torch.Tensor, temperature: float, prior_precision: float) -> torch.Tensor:
        """[`probit`] of `features` `(n, d)` in one `addmm`, one product and the softmax (see `_probit_tensors`)."""
        dtype = torch.promote_types(features.dtype, torch.float32)
        weight_t, bias, marginal = self._probit_tensors(features.device, dtype, prior_precision)
        out = torch.addmm(bias, features.to(dtype), weight_t)  # [W a | Q_V^T a], (n, K + d + 1)
        k = self.num_classes
        return _probit_softmax(out[:, :k], out[:, k:].square() @ marginal, temperature)

    def predictive(
        self,
        features: torch.Tensor,
        link_approx: LinkApprox | str = LinkApprox.MC,
        temperature: float | None = None,
        prior_precision: float | None = None,
    ) -> torch.Tensor:
        r"""Predictive class probabilities `(n, K)` of inputs with features `(n, d)` (see [`LinkApprox`]).

        Args:
            features (`torch.Tensor` of shape `(n, d)`): inputs of the layer.
            link_approx ([`LinkApprox`] or `str`, *optional*, defaults to `"mc"`): `"mc"` or `"probit"`.
            temperature (`float`, *optional*, defaults to `self.temperature`), prior_precision (`float`, *optional*,
                defaults to `self.prior_precision`): override the selected values, e.g. during a grid search.
        """
        link_approx = _check_choice(LinkApprox, link_approx, "link_approx")
        temperature = self.temperature if temperature is None else _check_positive("temperature", temperature)
        if link_approx is LinkApprox.PROBIT:
            features = self._check_features(features)
            return self._fused_probit(features, temperature, self._prior_or_default(prior_precision))
        mean, basis, variances = self.logit_distribution(features, prior_precision)
        return (self.logit_samples(mean, basis, variances) / temperature).softmax(-1).mean(1)

    def predictive_flops(self, link_approx: LinkApprox | str = LinkApprox.MC) -> float:
        """Estimated FLOPs (multiply-adds count 2) of the predictive per input, on top of the layer's own `2 K d`:
        `2 (d + 1)^2` for `Q_V^T a`, `2 K (d + 1)` for `c` (MC) or for `(pi/8) v` (probit, whose `Q_U` product is
        folded into a cached matrix), then `2 M K^2 + 4 M K` (MC) or `4 K` (probit)."""
        link_approx = _check_choice(LinkApprox, link_approx, "link_approx")
        k, d1 = self.num_classes, self.num_features + 1
        if link_approx is LinkApprox.PROBIT:
            return 2.0 * d1 * d1 + 2.0 * k * d1 + 4.0 * k
        return 2.0 * d1 * d1 + 2.0 * k * d1 + self.num_samples * (2.0 * k * k + 4.0 * k)

    # -------------------------------------------------------------------------------------------- persistence

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fitted state as float64 tensors: `weight_map`, the eigendecompositions of `U` and `V`, and the
        shared normal draws (the scalars are in [`MultiExitLaplace`]'s metadata)."""
        eig_u, q_u, eig_v, q_v = self._fitted()
        return {
            "weight_map": self.weight_map,
            "eigenvalues_u": eig_u,
            "eigenvectors_u": q_u,
            "eigenvalues_v": eig_v,
            "eigenvectors_v": q_v,
            "normal_draws": self.normal_draws,
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {"weight_map", "eigenvalues_u", "eigenvectors_u", "eigenvalues_v", "eigenvectors_v", "normal_draws"}
        if set(state) != expected:
            raise ValueError(f"a KronLastLayerLaplace state has the keys {sorted(expected)}, got {sorted(state)}.")
        state = {k: v.to("cpu", torch.float64) for k, v in state.items()}
        k, d1 = state["weight_map"].shape
        shapes = {"eigenvalues_u": (k,), "eigenvectors_u": (k, k), "eigenvalues_v": (d1,), "eigenvectors_v": (d1, d1)}
        for name, shape in shapes.items():
            if tuple(state[name].shape) != shape:
                raise ValueError(
                    f"{name} must have shape {shape} for a ({k}, {d1}) weight, got {tuple(state[name].shape)}."
                )
        if state["normal_draws"].ndim != 2 or state["normal_draws"].shape[1] != k:
            raise ValueError(
                f"normal_draws must have shape (num_samples, {k}), got {tuple(state['normal_draws'].shape)}."
            )
        self.weight_map = state["weight_map"]
        self.normal_draws = state["normal_draws"]
        self.num_samples = state["normal_draws"].shape[0]
        self._eigen = (
            state["eigenvalues_u"],
            state["eigenvectors_u"],
            state["eigenvalues_v"],
            state["eigenvectors_v"],
        )
        self._cache = {}


def _nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the gold labels, probabilities floored at 1e-12 (as hf_kd.metrics)."""
    return float(-probs.gather(1, labels[:, None]).clamp_min(1e-12).log().mean())


def _greedy_selection(candidates, labels: torch.Tensor, mie_weights: torch.Tensor | None) -> list[tuple]:
    """Pick one candidate per exit by validation NLL.

    `candidates[k]` is a callable returning an iterable of `(params, probs (n, C))` for exit `k`. Without MIE every
    exit is scored alone; with MIE weights `(K,)` exit `k` is scored by the ensemble `(S + w_k p) / (W + w_k)`, `S`
    and `W` the weighted sum and total weight of the probabilities already chosen for exits `< k` (Meronen et al.'s
    greedy sequential search). Returns `(params, probs, nll)` per exit; ties keep the first candidate.
    """
    chosen, running, total = [], None, 0.0
    for k, exit_candidates in enumerate(candidates):
        best = None
        for params, probs in exit_candidates():
            scored = probs
            if mie_weights is not None and running is not None:
                weight = float(mie_weights[k])
                scored = (running + weight * probs) / (total + weight)
            nll = _nll(scored, labels)
            if best is None or nll < best[2]:
                best = (params, probs, nll)
        chosen.append(best)
        if mie_weights is not None:
            weight = float(mie_weights[k])
            running = weight * best[1] if running is None else running + weight * best[1]
            total += weight
    return chosen


def _check_selection_inputs(num_exits: int, labels, mie: bool, exit_flops) -> tuple[torch.Tensor, torch.Tensor | None]:
    labels = torch.as_tensor(labels).to("cpu")
    if labels.ndim != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must be a 1-D tensor of class indices, got {labels.dtype} of shape {tuple(labels.shape)}."
        )
    if not isinstance(mie, bool):
        raise ValueError(f"mie must be True or False, got {mie!r}.")
    weights = None
    if mie:
        if exit_flops is None:
            raise ValueError(
                "mie=True needs exit_flops (one cumulative FLOPs count per exit, e.g. model.exit_flops())."
            )
        flops = torch.as_tensor(exit_flops, dtype=torch.float64)
        if flops.shape != (num_exits,) or not (torch.isfinite(flops).all() and (flops > 0).all()):
            raise ValueError(f"exit_flops must hold {num_exits} finite values > 0, got {exit_flops!r}.")
        weights = flops / flops[-1]  # the MIE weights w_i = FLOPs_i / FLOPs_K
    elif exit_flops is not None:
        raise ValueError("exit_flops is only used with mie=True (the MIE weights); pass mie=True or leave it out.")
    return labels.long(), weights


def select_exit_temperatures(
    exit_logits: Sequence[torch.Tensor] | torch.Tensor,
    labels: torch.Tensor,
    mie: bool = False,
    exit_flops: Sequence[float] | None = None,
    temperatures: Sequence[float] = TEMPERATURE_GRID,
) -> list[float]:
    r"""Temperature scaling per exit by grid search on validation data ("+TS" of Meronen et al., 2024).

    Exit `k`'s temperature minimises the validation NLL of `softmax(z_k / T)` over `temperatures`; with `mie=True`
    the search is greedy over the exits: exit `k`'s temperature minimises the NLL of the model-internal ensemble
    `sum_{i<=k} w_i p_i / sum_{i<=k} w_i` (`w_i = exit_flops[i] / exit_flops[-1]`) with the earlier exits' temperatures
    fixed, as the Laplace search of [`MultiExitLaplace.select_hyperparameters`].

    Args:
        exit_logits (`(K, N, C)` tensor or a sequence of `K` `(N, C)` tensors): validation logits of every exit.
        labels (`torch.Tensor` of shape `(N,)`): gold class indices.
        mie (`bool`, *optional*, defaults to `False`), exit_flops (`Sequence[float]`, required with `mie=True`).
        temperatures (`Sequence[float]`, *optional*, defaults to [`TEMPERATURE_GRID`]): the grid, values > 0.

    Returns:
        `list[float]`: one temperature per exit.
    """
    exit_logits = [torch.as_tensor(z).to("cpu", torch.float64) for z in exit_logits]
    temperatures = _check_grid("temperatures", temperatures)
    labels, weights = _check_selection_inputs(len(exit_logits), labels, mie, exit_flops)
    for k, logits in enumerate(exit_logits):
        if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
            raise ValueError(f"exit {k}'s logits must have shape ({labels.shape[0]}, C), got {tuple(logits.shape)}.")

    def candidates(logits):
        return lambda: (((t,), (logits / t).softmax(-1)) for t in temperatures)

    return [params[0] for params, _, _ in _greedy_selection([candidates(z) for z in exit_logits], labels, weights)]


class MultiExitLaplace:
    r"""One [`KronLastLayerLaplace`] per exit of a multi-exit classifier (Meronen et al., 2024,
    https://huggingface.co/papers/2302.06359), with the per-exit hyperparameter search and persistence.

    The small API of laplace-torch: [`fit`] (one pass over the training features), [`select_hyperparameters`]
    (temperature and prior variance per exit on validation data, greedy over the exits with MIE), [`predict`] /
    `__call__` (per-exit predictive probabilities, `link_approx="mc"` or `"probit"`), [`state_dict`] /
    [`load_state_dict`], [`save`] / [`load`]. The multi-exit models wrap it:
    `model.fit_exit_laplace(train_dataloader, eval_dataloader)` fits and attaches it, `save_pretrained` writes it and
    `from_pretrained` reads it back, and `predict_with_exits(..., link_approx="mc")` and `predict_exit_probs(...)`
    use it.

    Args:
        heads (sequence of `nn.Linear`): each exit's final linear layer, shallowest first; their current weights
            are the posterior means.
        prior_structure ([`KronPrior`] or `str`, *optional*, defaults to `"per_factor"`).
        num_samples (`int`, *optional*, defaults to 50): Monte-Carlo samples of the `"mc"` predictive.
        seed (`int`, *optional*, defaults to 0): exit `k` draws its shared normal samples with seed `seed + k`.
        link_approx ([`LinkApprox`] or `str`, *optional*, defaults to `"mc"`): the default predictive, also the one
            [`select_hyperparameters`] scores.

    Example:

    ```python
    >>> la = MultiExitLaplace.from_model(model)
    >>> train_features, _ = model.collect_exit_features(train_dataloader)
    >>> la.fit(train_features)
    >>> la.select_hyperparameters(*model.collect_exit_features(eval_dataloader), mie=True,
    ...                           exit_flops=model.exit_flops())
    >>> probs = la(test_features)  # (num_exits, n, num_labels)
    ```
    """

    def __init__(
        self,
        heads: Sequence[nn.Linear],
        prior_structure: KronPrior | str = KronPrior.PER_FACTOR,
        num_samples: int = 50,
        seed: int = 0,
        link_approx: LinkApprox | str = LinkApprox.MC,
    ):
        heads = list(heads)
        if not heads or not all(isinstance(h, nn.Linear) for h in heads):
            raise ValueError(
                f"heads must be a non-empty sequence of nn.Linear, got {[type(h).__name__ for h in heads]}."
            )
        if len({h.out_features for h in heads}) != 1:
            raise ValueError(
                f"every exit must predict the same classes, got {[h.out_features for h in heads]} outputs."
            )
        self.link_approx = _check_choice(LinkApprox, link_approx, "link_approx")
        self.exits = [
            KronLastLayerLaplace(h.weight, h.bias, prior_structure, num_samples, seed + k) for k, h in enumerate(heads)
        ]
        self.prior_structure = self.exits[0].prior_structure
        self.seed = seed
        self.selection: dict | None = None  # what select_hyperparameters chose and scored
        self._checked_heads = None  # stamp of the heads that last passed check_heads

    @classmethod
    def from_model(cls, model: nn.Module, **kwargs) -> MultiExitLaplace:
        """Build it on the final linear layers (`exits[k].classifier`) of a multi-exit model; `kwargs` as in
        `__init__`."""
        return cls(_exit_classifiers(model), **kwargs)

    @property
    def num_exits(self) -> int:
        return len(self.exits)

    @property
    def is_fitted(self) -> bool:
        return all(e.is_fitted for e in self.exits)

    @property
    def temperatures(self) -> list[float]:
        return [e.temperature for e in self.exits]

    @property
    def prior_variances(self) -> list[float]:
        return [e.prior_variance for e in self.exits]

    def _check_exit_features(self, features) -> list[torch.Tensor]:
        features = list(features)
        if len(features) != self.num_exits:
            raise ValueError(f"expected the features of {self.num_exits} exits, got {len(features)}.")
        return features

    def fit(self, features: Sequence[torch.Tensor] | Iterable[Sequence[torch.Tensor]]) -> MultiExitLaplace:
        """Fit every exit's factors from its training features.

        Args:
            features: one `(N, d_k)` tensor per exit, or an iterable of batches, each one `(n, d_k)` tensor per exit
                (streamed: the training features need not fit in memory).

        Returns:
            self.
        """
        if isinstance(features, (list, tuple)) and all(isinstance(f, torch.Tensor) for f in features):
            batches = [features]
        else:
            batches = features
        for e in self.exits:
            e.reset()
        for batch in batches:
            for e, f in zip(self.exits, self._check_exit_features(batch)):
                e.update(f)
        for e in self.exits:
            e.finalize()
        return self

    def select_hyperparameters(
        self,
        features: Sequence[torch.Tensor],
        labels: torch.Tensor,
        mie: bool = False,
        exit_flops: Sequence[float] | None = None,
        temperatures: Sequence[float] = TEMPERATURE_GRID,
        prior_variances: Sequence[float] = PRIOR_VARIANCE_GRID,
        link_approx: LinkApprox | str | None = None,
    ) -> dict:
        r"""Choose each exit's temperature `T` and prior variance `sigma0^2` by validation log-likelihood.

        Every `(sigma0^2, T)` of the grids is scored by the NLL of the exit's predictive on the validation data (the
        search of Meronen et al., 2024). With `mie=True` the search is greedy over the exits: exit `k`'s pair
        minimises the NLL of the model-internal ensemble `sum_{i<=k} w_i p_i / sum_{i<=k} w_i` with the pairs of
        exits `< k` fixed (`w_i = exit_flops[i] / exit_flops[-1]`). The chosen values are set on the exits.

        Args:
            features (sequence of `K` tensors `(N, d_k)`): validation features of every exit.
            labels (`torch.Tensor` of shape `(N,)`): gold class indices.
            mie (`bool`, *optional*, defaults to `False`): select for the model-internal ensemble.
            exit_flops (`Sequence[float]`, required with `mie=True`): cumulative FLOPs of each exit.
            temperatures, prior_variances (`Sequence[float]`, *optional*): the grids, defaults
                [`TEMPERATURE_GRID`] and [`PRIOR_VARIANCE_GRID`].
            link_approx ([`LinkApprox`] or `str`, *optional*, defaults to `self.link_approx`): the predictive scored;
                it becomes the default of [`predict`].

        Returns:
            `dict` (also kept as `self.selection` and saved with the fit): `mie`, `link_approx`, `num_examples` and
            `exits`, one dict per exit with the chosen `temperature` and `prior_variance`, the scored validation
            `nll` (of the ensemble with MIE) and `softmax_nll`, the exit's plain softmax NLL on the same data.
        """
        self._require_fitted()
        features = self._check_exit_features(features)
        labels, weights = _check_selection_inputs(self.num_exits, labels, mie, exit_flops)
        temperatures = _check_grid("temperatures", temperatures)
        prior_variances = _check_grid("prior_variances", prior_variances)
        link_approx = (
            self.link_approx if link_approx is None else _check_choice(LinkApprox, link_approx, "link_approx")
        )
        for k, f in enumerate(features):
            if f.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"exit {k} has {f.shape[0]} validation examples but there are {labels.shape[0]} labels."
                )

        def candidates(exit_laplace: KronLastLayerLaplace, exit_features: torch.Tensor):
            def generate():
                for variance in prior_variances:
                    mean, basis, variances = exit_laplace.logit_distribution(exit_features, 1.0 / variance)
                    samples = (
                        exit_laplace.logit_samples(mean, basis, variances) if link_approx is LinkApprox.MC else None
                    )
                    for t in temperatures:
                        if samples is None:
                            probs = exit_laplace.probit(mean, basis, variances, t)
                        else:
                            probs = (samples / t).softmax(-1).mean(1)
                        yield (t, variance), probs.to(torch.float64).cpu()

            return generate

        chosen = _greedy_selection([candidates(e, f) for e, f in zip(self.exits, features)], labels, weights)
        summary = []
        for e, f, ((t, variance), _, nll) in zip(self.exits, features, chosen):
            e.temperature, e.prior_variance = t, variance
            mean = e.logit_distribution(f)[0].to(torch.float64).cpu()
            summary.append(
                {
                    "temperature": t,
                    "prior_variance": variance,
                    "nll": nll,
                    "softmax_nll": _nll(mean.softmax(-1), labels),
                }
            )
        self.link_approx = link_approx
        self.selection = {
            "mie": mie,
            "link_approx": link_approx.value,
            "num_examples": int(labels.shape[0]),
            "exits": summary,
        }
        return self.selection

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise ValueError("this MultiExitLaplace is not fitted: call fit(train_features) first.")

    def predict_exit(
        self, exit_index: int, features: torch.Tensor, link_approx: LinkApprox | str | None = None
    ) -> torch.Tensor:
        """Predictive probabilities `(n, K)` of exit `exit_index` (0-based) from its features `(n, d)`, with the
        exit's selected temperature and prior; `link_approx` defaults to `self.link_approx`."""
        self._require_fitted()
        if isinstance(exit_index, bool) or not isinstance(exit_index, int) or not 0 <= exit_index < self.num_exits:
            raise ValueError(f"exit_index must be an integer in [0, {self.num_exits}), got {exit_index!r}.")
        return self.exits[exit_index].predictive(features, self.link_approx if link_approx is None else link_approx)

    def predict(self, features: Sequence[torch.Tensor], link_approx: LinkApprox | str | None = None) -> torch.Tensor:
        """Predictive probabilities of every exit, `(K, n, C)`, from one `(n, d_k)` feature tensor per exit."""
        features = self._check_exit_features(features)
        return torch.stack([self.predict_exit(k, f, link_approx) for k, f in enumerate(features)])

    __call__ = predict

    def predictive_flops(self, link_approx: LinkApprox | str | None = None) -> list[float]:
        """Per exit, the FLOPs of the predictive per input on top of the exit head (see
        [`KronLastLayerLaplace.predictive_flops`])."""
        return [e.predictive_flops(self.link_approx if link_approx is None else link_approx) for e in self.exits]

    # -------------------------------------------------------------------------------------------- persistence

    def metadata(self) -> dict:
        """The JSON-serialisable part of the state: format, settings, per-exit hyperparameters and the selection."""
        return {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "num_exits": self.num_exits,
            "prior_structure": self.prior_structure.value,
            "link_approx": self.link_approx.value,
            "seed": self.seed,
            "num_data": [e.num_data for e in self.exits],
            "temperatures": self.temperatures,
            "prior_variances": self.prior_variances,
            "selection": self.selection,
        }

    def card_summary(self) -> dict:
        """The settings a model card reports: predictive, prior structure, Monte-Carlo samples, per-exit temperature
        and prior variance, and whether they were selected for MIE."""
        return {
            "link_approx": self.link_approx.value,
            "prior_structure": self.prior_structure.value,
            "num_samples": self.exits[0].num_samples,
            "temperatures": [round(t, 4) for t in self.temperatures],
            "prior_variances": [round(v, 4) for v in self.prior_variances],
            "selected_for_mie": None if self.selection is None else self.selection["mie"],
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every exit's tensors (see [`KronLastLayerLaplace.state_dict`]) under `exits.{k}.`; float64."""
        self._require_fitted()
        return {f"exits.{k}.{name}": t for k, e in enumerate(self.exits) for name, t in e.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], metadata: dict) -> None:
        """Restore what [`state_dict`] and [`metadata`] returned (the number of exits must match)."""
        if not isinstance(metadata, dict) or metadata.get("format") != _FORMAT:
            raise ValueError(
                f"not an hf_kd exit Laplace state: metadata format is {metadata.get('format')!r}, "
                f"expected {_FORMAT!r}."
            )
        if metadata.get("version", 0) > _FORMAT_VERSION:
            raise ValueError(
                f"exit Laplace format version {metadata['version']} is newer than this code's "
                f"({_FORMAT_VERSION}): update hf_kd / the model's code."
            )
        if metadata["num_exits"] != self.num_exits:
            raise ValueError(f"the state has {metadata['num_exits']} exits, this MultiExitLaplace {self.num_exits}.")
        for k, e in enumerate(self.exits):
            prefix = f"exits.{k}."
            e.load_state_dict({name[len(prefix) :]: t for name, t in state.items() if name.startswith(prefix)})
            e.prior_structure = _check_choice(KronPrior, metadata["prior_structure"], "prior_structure")
            e.num_data = int(metadata["num_data"][k])
            e.temperature = metadata["temperatures"][k]
            e.prior_variance = metadata["prior_variances"][k]
        self.prior_structure = self.exits[0].prior_structure
        self.link_approx = _check_choice(LinkApprox, metadata["link_approx"], "link_approx")
        self.seed = int(metadata["seed"])
        self.selection = metadata.get("selection")

    def save(self, save_directory: str | os.PathLike) -> str:
        """Write [`EXIT_LAPLACE_FILENAME`] (safetensors, metadata as JSON) into `save_directory` atomically; returns
        its path."""
        from safetensors.torch import save_file

        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, EXIT_LAPLACE_FILENAME)
        tmp = path + ".tmp"
        tensors = {k: t.contiguous() for k, t in self.state_dict().items()}
        save_file(tensors, tmp, metadata={_METADATA_KEY: json.dumps(self.metadata())})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> MultiExitLaplace:
        """Read a [`save`]d fit: `path` is the file or the folder holding [`EXIT_LAPLACE_FILENAME`]."""
        from safetensors import safe_open

        if os.path.isdir(path):
            path = os.path.join(path, EXIT_LAPLACE_FILENAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no fitted exit Laplace at {path}.")
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get(_METADATA_KEY)
            if raw is None:
                raise ValueError(f"{path} has no {_METADATA_KEY!r} metadata: not written by MultiExitLaplace.save.")
            state = {name: f.get_tensor(name) for name in f.keys()}
        metadata = json.loads(raw)
        heads = []
        for k in range(int(metadata["num_exits"])):
            weight_map = state[f"exits.{k}.weight_map"]
            head = nn.Linear(weight_map.shape[1] - 1, weight_map.shape[0], dtype=torch.float64)
            with torch.no_grad():
                head.weight.copy_(weight_map[:, :-1])
                head.bias.copy_(weight_map[:, -1])
            heads.append(head)
        laplace = cls(
            heads, metadata["prior_structure"], seed=int(metadata["seed"]), link_approx=metadata["link_approx"]
        )
        laplace.load_state_dict(state, metadata)
        return laplace

    def check_heads(self, heads: Sequence[nn.Linear]) -> None:
        """Raise a `ValueError` unless `heads` are the layers this posterior was fitted on (same shape, weights equal
        within a relative 1e-4): a posterior of other weights would give silently wrong predictions."""
        heads = list(heads)
        if len(heads) != self.num_exits:
            raise ValueError(f"the exit Laplace was fitted on {self.num_exits} exits, the model has {len(heads)}.")
        # Every prediction checks the heads: skip the comparison while the parameters are the same tensors, not
        # modified in place since the last passing check (`_version` counts in-place writes: optimiser steps,
        # load_state_dict, copy_).
        stamp = tuple((p.data_ptr(), p._version, tuple(p.shape)) for h in heads for p in h.parameters())
        if stamp == self._checked_heads:
            return
        for k, (e, head) in enumerate(zip(self.exits, heads)):
            bias = head.bias if head.bias is not None else head.weight.new_zeros(head.out_features)
            current = torch.cat([head.weight.detach(), bias.detach()[:, None]], 1).to("cpu", torch.float64)
            if current.shape != e.weight_map.shape:
                raise ValueError(
                    f"exit {k}'s classifier has shape {tuple(current.shape)} (weight | bias), the exit "
                    f"Laplace was fitted on {tuple(e.weight_map.shape)}."
                )
            scale = float(e.weight_map.abs().max()) or 1.0
            difference = float((current - e.weight_map).abs().max())
            if difference > _HEAD_RTOL * scale:
                raise ValueError(
                    f"exit {k}'s classifier changed since the exit Laplace was fitted (max abs difference "
                    f"{difference:.3g}): refit it with model.fit_exit_laplace(...)."
                )
        self._checked_heads = stamp


# ------------------------------------------------------------------------------------------------------------------
# Model integration: feature capture, fit, persistence. Mixed into both multi-exit models.
# ------------------------------------------------------------------------------------------------------------------


def _exit_classifiers(model: nn.Module) -> list[nn.Linear]:
    exits = getattr(model, "exits", None)
    heads = [getattr(e, "classifier", None) for e in (exits or [])]
    if not heads or not all(isinstance(h, nn.Linear) for h in heads):
        raise TypeError(
            f"{type(model).__name__} is not a multi-exit model whose exits end in an nn.Linear `classifier` "
            "(model.exits[k].classifier)."
        )
    return heads


@contextlib.contextmanager
def capture_exit_features(model: nn.Module):
    """Record the input of every exit's final linear layer during the forward passes run inside the block.

    Yields a list that, after one forward pass, holds one `(batch, d_k)` tensor per exit (shallowest first); it is
    cleared by each new pass of the first exit. Works for any multi-exit model whose exits are `model.exits[k]` with an
    `nn.Linear` `classifier` (both hf_kd multi-exit models).
    """
    heads = _exit_classifiers(model)
    captured: list[torch.Tensor | None] = [None] * len(heads)
    features: list[torch.Tensor] = []

    def hook(k):
        def record(module, args):
            captured[k] = args[0].detach()
            if all(c is not None for c in captured):
                features[:] = list(captured)
                captured[:] = [None] * len(heads)

        return record

    handles = [h.register_forward_pre_hook(hook(k)) for k, h in enumerate(heads)]
    try:
        yield features
    finally:
        for handle in handles:
            handle.remove()


class ExitLaplaceMixin:
    """Per-exit last-layer Laplace for the multi-exit models: fit, attach, save and load (Meronen et al., 2024).

    `model.exit_laplace` is `None` or a fitted [`MultiExitLaplace`]; it is not part of `model.state_dict()`.
    `save_pretrained` writes it to [`EXIT_LAPLACE_FILENAME`] next to the weights (and removes a stale file when the
    model has none), `from_pretrained` reads it back (locally or from the Hub) and checks it against the loaded heads.
    """

    _exit_laplace: MultiExitLaplace | None = None

    @property
    def exit_laplace(self) -> MultiExitLaplace | None:
        return self._exit_laplace

    @exit_laplace.setter
    def exit_laplace(self, laplace: MultiExitLaplace | None) -> None:
        if laplace is not None:
            if not isinstance(laplace, MultiExitLaplace) or not laplace.is_fitted:
                raise ValueError(f"exit_laplace must be a fitted MultiExitLaplace or None, got {laplace!r}.")
            laplace.check_heads(_exit_classifiers(self))
        object.__setattr__(self, "_exit_laplace", laplace)

    def _require_exit_laplace(self) -> MultiExitLaplace:
        if self._exit_laplace is None:
            raise ValueError(
                f"link_approx needs a fitted per-exit Laplace approximation, but this {type(self).__name__} has none: "
                "call model.fit_exit_laplace(train_dataloader, eval_dataloader) or load a folder that has "
                f"{EXIT_LAPLACE_FILENAME}; pass link_approx=None for the plain softmax."
            )
        self._exit_laplace.check_heads(_exit_classifiers(self))
        return self._exit_laplace

    def _exit_predictive(self, link_approx) -> tuple[MultiExitLaplace | None, list[float]]:
        """The exit Laplace a prediction with `link_approx` uses (`None` for the softmax; an error when there is none
        or it is stale) and its per-exit extra FLOPs."""
        if link_approx is None:
            return None, [0.0] * len(_exit_classifiers(self))
        link_approx = _check_choice(LinkApprox, link_approx, "link_approx")
        laplace = self._require_exit_laplace()
        return laplace, laplace.predictive_flops(link_approx)

    def _model_inputs(self, batch: dict) -> dict:
        accepted = inspect.signature(self.forward).parameters
        device = next(self.parameters()).device
        return {
            k: v.to(device) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()
            if k in accepted and k not in ("labels", "return_dict", "output_hidden_states")
        }

    @torch.no_grad()
    def collect_exit_features(self, dataloader: Iterable[dict]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """One forward pass over `dataloader` (batches as dicts of model inputs, with `labels` or `label`), keeping the
        input of every exit's final linear layer.

        Returns:
            `(features, labels)`: `K` float32 CPU tensors `(N, d_k)`, and the labels `(N,)` (`None` when the batches
            have none). Call `model.eval()` first.
        """
        from tqdm.auto import tqdm

        chunks, labels = [], []
        with capture_exit_features(self) as features:
            for batch in tqdm(dataloader, desc="Exit features", unit="batch", leave=False):
                self(**self._model_inputs(batch))
                chunks.append([f.float().cpu() for f in features])
                label = batch.get("labels", batch.get("label"))
                if label is not None:
                    labels.append(torch.as_tensor(label).cpu())
        if not chunks:
            raise ValueError("the dataloader is empty: there are no features to collect.")
        if labels and len(labels) != len(chunks):
            raise ValueError("some batches have labels and some have not.")
        return [torch.cat(c) for c in zip(*chunks)], (torch.cat(labels) if labels else None)

    @torch.no_grad()
    def fit_exit_laplace(
        self,
        train_dataloader: Iterable[dict],
        eval_dataloader: Iterable[dict] | None = None,
        mie: bool = False,
        exit_flops: Sequence[float] | None = None,
        link_approx: LinkApprox | str = LinkApprox.MC,
        prior_structure: KronPrior | str = KronPrior.PER_FACTOR,
        num_samples: int = 50,
        seed: int = 0,
        temperatures: Sequence[float] = TEMPERATURE_GRID,
        prior_variances: Sequence[float] = PRIOR_VARIANCE_GRID,
    ) -> MultiExitLaplace:
        r"""Fit a last-layer Laplace approximation per exit and attach it as `model.exit_laplace`.

        One forward pass over `train_dataloader` accumulates every exit's KFAC factors (features streamed, not kept);
        then, with `eval_dataloader`, one pass caches the validation features and
        [`MultiExitLaplace.select_hyperparameters`] picks each exit's temperature and prior variance (greedy over the
        exits with `mie=True`). Without
        `eval_dataloader` every exit keeps `T = 1` and `sigma0^2 = 2` (the official defaults). Puts the model in eval
        mode. Batches are dicts of model inputs (and `labels`, required in `eval_dataloader`).

        Args:
            train_dataloader, eval_dataloader: iterables of batches (e.g. `torch.utils.data.DataLoader`).
            mie (`bool`, *optional*, defaults to `False`): select the hyperparameters for the model-internal ensemble.
            exit_flops (`Sequence[float]`, *optional*): MIE weights' FLOPs; defaults to the model's estimate for the
                first validation batch's shape (for the sequence model the weights barely depend on the length).
            link_approx, prior_structure, num_samples, seed: see [`MultiExitLaplace`].
            temperatures, prior_variances: the search grids.

        Returns:
            The fitted [`MultiExitLaplace`] (also `model.exit_laplace`).
        """
        self.eval()
        laplace = MultiExitLaplace.from_model(
            self, prior_structure=prior_structure, num_samples=num_samples, seed=seed, link_approx=link_approx
        )

        def train_features():
            from tqdm.auto import tqdm

            with capture_exit_features(self) as features:
                for batch in tqdm(train_dataloader, desc="Exit Laplace: KFAC factors", unit="batch", leave=False):
                    self(**self._model_inputs(batch))
                    yield list(features)

        laplace.fit(train_features())
        if eval_dataloader is not None:
            features, labels = self.collect_exit_features(eval_dataloader)
            if labels is None:
                raise ValueError("eval_dataloader batches need `labels` (or `label`) to select the hyperparameters.")
            if mie and exit_flops is None:
                exit_flops = self._batch_exit_flops(self._model_inputs(next(iter(eval_dataloader))))
            laplace.select_hyperparameters(
                features,
                labels,
                mie=mie,
                exit_flops=exit_flops if mie else None,
                temperatures=temperatures,
                prior_variances=prior_variances,
            )
        self.exit_laplace = laplace
        return laplace

    def _exit_probs(self, exit_logits, features, laplace, link_approx, mie: bool, exit_flops) -> torch.Tensor:
        """`(K, n, C)` per-exit probabilities: softmax of `exit_logits` (`laplace=None`) or the exit Laplace
        predictive of `features`, then MIE over the exits when `mie`."""
        if not isinstance(mie, bool):
            raise ValueError(f"mie must be True or False, got {mie!r}.")
        if laplace is None:
            probs = torch.stack(exit_logits).float().softmax(-1)
        else:
            probs = laplace.predict(features, link_approx)
        return _model_internal_ensemble(probs, _mie_weights(exit_flops)) if mie else probs

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus [`EXIT_LAPLACE_FILENAME`] when `model.exit_laplace` is set (a stale
        file of an earlier fit is removed when it is not). With `push_to_hub=True` the folder, file included, is then
        pushed with `push_to_hub`."""
        push_to_hub = kwargs.pop("push_to_hub", False)
        is_main_process = kwargs.get("is_main_process", args[0] if args else True)
        hub_kwargs = {
            k: kwargs.pop(k) for k in ("repo_id", "commit_message", "private", "create_pr", "revision") if k in kwargs
        }
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if is_main_process:
            path = os.path.join(save_directory, EXIT_LAPLACE_FILENAME)
            laplace = self._exit_laplace
            if laplace is not None:
                try:
                    laplace.check_heads(_exit_classifiers(self))
                except ValueError as error:  # trained on after the fit: a stale posterior must not be shipped
                    warnings.warn(f"the exit Laplace fit was not saved: {error}", stacklevel=2)
                    laplace = None
            if laplace is not None:
                laplace.save(save_directory)
            elif os.path.isfile(path):
                os.remove(path)
        if push_to_hub and is_main_process:
            repo_id = hub_kwargs.pop("repo_id", os.path.basename(os.path.normpath(save_directory)))
            self.push_to_hub(repo_id, token=kwargs.get("token"), **hub_kwargs)
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, then the per-exit Laplace fit ([`EXIT_LAPLACE_FILENAME`]) of the folder
        or Hub repo when it has one, attached as `model.exit_laplace`."""
        result = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        if pretrained_model_name_or_path is None:
            return result
        from transformers.utils import cached_file

        hub = {
            k: kwargs[k]
            for k in ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")
            if kwargs.get(k) is not None
        }
        path = cached_file(
            pretrained_model_name_or_path,
            EXIT_LAPLACE_FILENAME,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **hub,
        )
        if path is not None:
            model = result[0] if isinstance(result, tuple) else result
            try:
                model.exit_laplace = MultiExitLaplace.load(path)
            except ValueError as error:  # e.g. weights replaced after the fit: load the model, not the stale fit
                warnings.warn(f"{EXIT_LAPLACE_FILENAME} was not loaded: {error}", stacklevel=2)
        return result
