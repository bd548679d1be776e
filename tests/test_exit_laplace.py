"""Per-exit last-layer Laplace (Meronen et al., 2024): KFAC factors and predictives against dense autograd references,
the per-exit hyperparameter search against brute force, persistence and bad input."""

import math

import pytest
import torch
from torch.func import hessian
from torch.nn import functional as F

from hf_kd.modeling.exit_laplace import (
    EXIT_LAPLACE_FILENAME,
    PRIOR_VARIANCE_GRID,
    TEMPERATURE_GRID,
    KronLastLayerLaplace,
    MultiExitLaplace,
    select_exit_temperatures,
)

K, D = 3, 4  # classes, features


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def head(seed=0, scale=1.0, num_features=D, num_classes=K):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(num_features, num_classes)
    with torch.no_grad():
        layer.weight.mul_(scale)
    return layer


def features(n, seed=1, num_features=D):
    return torch.randn(n, num_features, generator=torch.Generator().manual_seed(seed))


def augmented(x):
    return torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)


def exact_ggn(layer, x, labels=None):
    """The Hessian of sum_n CE(W a_n, y_n) w.r.t. the row-major vec([W | b]), by autograd: the dense reference.
    (It equals the Gauss-Newton matrix: the logits are linear in the weights; the labels do not enter it.)"""
    labels = torch.zeros(x.shape[0], dtype=torch.long) if labels is None else labels
    a = augmented(x)
    w0 = torch.cat([layer.weight, layer.bias[:, None]], 1).detach().reshape(-1)

    def loss(w):
        return F.cross_entropy(a @ w.reshape(K, -1).T, labels, reduction="sum")

    return hessian(loss)(w0)


def fitted(layer, x, **kwargs):
    return KronLastLayerLaplace(layer.weight, layer.bias, **kwargs).fit(x)


def dense_precision(la, prior_precision):
    u, v = la.kron_factors
    if la.prior_structure.value == "per_factor":
        root = math.sqrt(prior_precision)
        return torch.kron(u + root * torch.eye(K), v + root * torch.eye(D + 1))
    return torch.kron(u, v) + prior_precision * torch.eye(K * (D + 1))


def dense_logit_covariance(precision, x):
    """J Sigma J^T with J = I_K (x) a^T, the Jacobian of the logits w.r.t. vec([W | b]): (n, K, K)."""
    covariance = torch.linalg.inv(precision)
    jac = torch.stack([torch.kron(torch.eye(K), a[None]) for a in augmented(x)])  # (n, K, K (d + 1))
    return jac @ covariance @ jac.transpose(1, 2)


def factored_covariance(la, x, prior_precision=None):
    _, basis, variances = la.logit_distribution(x, prior_precision)
    return basis @ torch.diag_embed(variances) @ basis.T


# ------------------------------------------------------------------------------------------------------- KFAC


def test_kfac_is_the_exact_ggn_for_one_example():
    layer, x = head(), features(1)
    H = exact_ggn(layer, x)
    # Gauss-Newton J^T Lambda J with Lambda the Hessian of CE w.r.t. the logits: equal to H for a linear layer.
    a = augmented(x)[0]
    logits = layer(x)[0].detach()
    lam = hessian(lambda z: F.cross_entropy(z[None], torch.tensor([1])))(logits)
    jac = torch.kron(torch.eye(K), a[None])
    torch.testing.assert_close(jac.T @ lam @ jac, H)
    u, v = fitted(layer, x).kron_factors
    torch.testing.assert_close(torch.kron(u, v), H)


def test_kfac_is_exact_when_every_example_has_the_same_logit_hessian():
    layer, x = head(scale=0.0), features(9)  # zero weight: every example has the logits b, hence the same Lambda
    labels = torch.randint(0, K, (9,), generator=torch.Generator().manual_seed(3))
    u, v = fitted(layer, x).kron_factors
    torch.testing.assert_close(torch.kron(u, v), exact_ggn(layer, x, labels))


def test_kfac_factors_are_the_means_of_the_exact_curvature_for_many_examples():
    n = 50
    layer, x = head(scale=2.0), features(n)
    la = fitted(layer, x)
    u, v = la.kron_factors
    logits = layer(x).detach()
    lambdas = torch.stack([hessian(lambda z: F.cross_entropy(z[None], torch.tensor([0])))(z) for z in logits])
    torch.testing.assert_close(u, math.sqrt(n) * lambdas.mean(0))
    torch.testing.assert_close(v, math.sqrt(n) * (augmented(x).T @ augmented(x)) / n)

    H, approx = exact_ggn(layer, x), torch.kron(u, v)
    # Exact in general N: the bias-bias block (a_n[-1] = 1 for every example) and the null space 1_K (x) anything
    # (softmax is invariant to adding a constant to every logit).
    bias = torch.arange(K) * (D + 1) + D
    torch.testing.assert_close(approx[bias][:, bias], H[bias][:, bias])
    null = torch.kron(torch.ones(K), torch.randn(D + 1))
    torch.testing.assert_close(approx @ null, torch.zeros(K * (D + 1)), atol=1e-10, rtol=0)
    torch.testing.assert_close(H @ null, torch.zeros(K * (D + 1)), atol=1e-10, rtol=0)
    # Elsewhere an approximation: not equal, but close in Frobenius norm on these well-spread examples.
    error = torch.linalg.norm(approx - H) / torch.linalg.norm(H)
    assert 1e-3 < error < 0.5


def test_streamed_batches_equal_one_batch():
    layer, x = head(), features(30)
    one = fitted(layer, x)
    streamed = fitted(layer, [x[:7], x[7:20], x[20:]])
    for a, b in zip(one.kron_factors, streamed.kron_factors):
        torch.testing.assert_close(a, b)
    assert streamed.num_data == 30


# ------------------------------------------------------------------------------------------------- predictive


@pytest.mark.parametrize("prior_structure", ["per_factor", "isotropic"])
@pytest.mark.parametrize("prior_precision", [0.25, 2.0])
def test_logit_covariance_matches_the_dense_kronecker_posterior(prior_structure, prior_precision):
    layer, x = head(scale=2.0), features(40)
    la = fitted(layer, x, prior_structure=prior_structure)
    test_x = features(5, seed=7)
    expected = dense_logit_covariance(dense_precision(la, prior_precision), test_x)
    torch.testing.assert_close(factored_covariance(la, test_x, prior_precision), expected)
    mean, _, _ = la.logit_distribution(test_x)
    torch.testing.assert_close(mean, layer(test_x).detach())


def test_per_factor_covariance_is_the_official_formula():
    """Meronen et al.'s code: Cov[f] = (phi^T V_inv phi) U_inv, U_inv = (U + sqrt(lam) I)^-1, V_inv likewise."""
    layer, x = head(), features(25)
    la, lam = fitted(layer, x), 0.5
    u, v = la.kron_factors
    u_inv = torch.linalg.inv(u + math.sqrt(lam) * torch.eye(K))
    v_inv = torch.linalg.inv(v + math.sqrt(lam) * torch.eye(D + 1))
    a = augmented(features(4, seed=5))
    expected = torch.einsum("ni,ij,nj->n", a, v_inv, a)[:, None, None] * u_inv
    torch.testing.assert_close(factored_covariance(la, a[:, :-1], lam), expected)


def test_isotropic_prior_with_one_example_is_the_full_covariance_laplace():
    """Where KFAC is exact, the isotropic prior gives the full last-layer Laplace: autograd Hessian + lam I."""
    layer, x = head(), features(1)
    lam = 1 / 2.0
    la = fitted(layer, x, prior_structure="isotropic")
    full = exact_ggn(layer, x) + lam * torch.eye(K * (D + 1))
    test_x = features(6, seed=9)
    torch.testing.assert_close(factored_covariance(la, test_x, lam), dense_logit_covariance(full, test_x))


def test_mc_predictive_matches_sampling_weights_from_the_dense_posterior():
    layer, x = head(scale=2.0), features(20)
    la = fitted(layer, x, num_samples=40000, seed=0)
    la.prior_precision, la.temperature = 0.5, 1.5
    test_x = features(4, seed=11)
    covariance = torch.linalg.inv(dense_precision(la, 0.5))
    w_map = torch.cat([layer.weight, layer.bias[:, None]], 1).detach().reshape(-1)
    posterior = torch.distributions.MultivariateNormal(w_map, covariance_matrix=covariance)
    torch.manual_seed(0)
    weights = posterior.sample((40000,)).reshape(-1, K, D + 1)  # (S, K, d + 1)
    reference = ((augmented(test_x) @ weights.transpose(1, 2)) / 1.5).softmax(-1).mean(0)  # (n, K)
    probs = la.predictive(test_x, "mc")
    torch.testing.assert_close(probs, reference, atol=1e-2, rtol=0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))


def test_mc_draws_are_shared_across_inputs_and_reproducible():
    layer, x = head(), features(10)
    la = fitted(layer, x, num_samples=5, seed=3)
    test_x = features(3, seed=4)
    assert torch.equal(la.predictive(test_x), la.predictive(test_x))
    # Shared draws: an input's prediction does not depend on the batch it is in.
    torch.testing.assert_close(la.predictive(test_x[1:2]), la.predictive(test_x)[1:2])
    other = fitted(layer, x, num_samples=5, seed=4)
    assert not torch.allclose(other.predictive(test_x), la.predictive(test_x))


def test_probit_formula_and_zero_variance_limit():
    layer, x = head(scale=2.0), features(15)
    la = fitted(layer, x)
    la.prior_precision, la.temperature = 0.7, 1.3
    test_x = features(5, seed=2)
    var = torch.diagonal(dense_logit_covariance(dense_precision(la, 0.7), test_x), dim1=1, dim2=2)
    logits = layer(test_x).detach() / 1.3
    expected = (logits / torch.sqrt(1 + math.pi / 8 * var / 1.3**2)).softmax(-1)
    torch.testing.assert_close(la.predictive(test_x, "probit"), expected)
    # The fused prediction path and the factored one of the hyperparameter search agree.
    torch.testing.assert_close(la.probit(*la.logit_distribution(test_x), 1.3), expected)
    # An overwhelming prior removes the weight uncertainty: both predictives become softmax(f / T).
    for link in ("probit", "mc"):
        torch.testing.assert_close(
            la.predictive(test_x, link, prior_precision=1e16), logits.softmax(-1), atol=1e-6, rtol=0
        )


def test_laplace_softens_confident_predictions():
    layer, x = head(scale=3.0), features(10)
    la = fitted(layer, x)
    far = 5 * features(50, seed=8)  # far from the 10 training points: large logit variance
    plain = layer(far).detach().softmax(-1).max(-1).values
    for link in ("mc", "probit"):
        assert (la.predictive(far, link).max(-1).values <= plain + 1e-12).float().mean() > 0.9


# -------------------------------------------------------------------------------------------- hyperparameters


def three_exits(n=60, seed=0):
    """Three exits with features of different widths, their heads and labels."""
    g = torch.Generator().manual_seed(seed)
    widths = (3, 5, 4)
    heads = [head(seed=seed + k, scale=2.0, num_features=w) for k, w in enumerate(widths)]
    feats = [torch.randn(n, w, generator=g) for w in widths]
    labels = torch.randint(0, K, (n,), generator=g)
    return heads, feats, labels


def nll(probs, labels):
    return float(-probs.detach()[torch.arange(len(labels)), labels].clamp_min(1e-12).log().mean())


@pytest.mark.parametrize("link", ["mc", "probit"])
def test_selection_without_mie_is_the_per_exit_grid_minimum(link):
    heads, feats, labels = three_exits()
    la = MultiExitLaplace(heads, num_samples=20).fit(feats)
    grid_t, grid_v = (0.5, 1.0, 2.0), (0.5, 2.0, 4.0)
    selection = la.select_hyperparameters(feats, labels, temperatures=grid_t, prior_variances=grid_v, link_approx=link)
    for k, e in enumerate(la.exits):
        scores = {(t, v): nll(e.predictive(feats[k], link, t, 1 / v), labels) for v in grid_v for t in grid_t}
        best = min(scores, key=scores.get)
        assert (e.temperature, e.prior_variance) == best
        assert selection["exits"][k]["nll"] == pytest.approx(scores[best])
        assert selection["exits"][k]["softmax_nll"] == pytest.approx(nll(heads[k](feats[k]).softmax(-1), labels))
    assert la.link_approx.value == link and selection["mie"] is False


def test_selection_with_mie_is_greedy_over_the_exits():
    heads, feats, labels = three_exits(seed=1)
    la = MultiExitLaplace(heads, num_samples=20).fit(feats)
    flops = [1.0, 2.5, 4.0]
    grid_t, grid_v = (0.5, 1.0, 2.0), (0.5, 4.0)
    la.select_hyperparameters(feats, labels, mie=True, exit_flops=flops, temperatures=grid_t, prior_variances=grid_v)
    w = [f / flops[-1] for f in flops]
    fixed = []  # weighted probabilities of the exits already chosen
    for k, e in enumerate(la.exits):
        scores = {
            (t, v): nll((sum(fixed) + w[k] * e.predictive(feats[k], "mc", t, 1 / v)) / sum(w[: k + 1]), labels)
            for v in grid_v
            for t in grid_t
        }
        best = min(scores, key=scores.get)
        assert (e.temperature, e.prior_variance) == best
        fixed.append(w[k] * e.predictive(feats[k], "mc"))


@pytest.mark.parametrize("mie", [False, True])
def test_select_exit_temperatures_brute_force(mie):
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(3, 80, K, generator=g)
    labels = torch.randint(0, K, (80,), generator=g)
    flops = [1.0, 2.0, 3.0] if mie else None
    chosen = select_exit_temperatures(logits, labels, mie=mie, exit_flops=flops)
    w = [1 / 3, 2 / 3, 1.0]
    fixed = []
    for k, z in enumerate(logits):
        scores = {}
        for t in TEMPERATURE_GRID:
            p = (z / t).softmax(-1)
            scores[t] = nll((sum(fixed) + w[k] * p) / sum(w[: k + 1]) if mie else p, labels)
        assert chosen[k] == min(scores, key=scores.get)
        fixed.append(w[k] * (z / chosen[k]).softmax(-1))


def test_default_grids_are_the_papers():
    assert TEMPERATURE_GRID == (0.3, 0.5, 0.7, 1.0, 1.3, 1.5, 1.7, 2.0, 2.5, 3.0)
    assert PRIOR_VARIANCE_GRID == (0.5, 0.7, 1.0, 1.3, 1.5, 1.7, 2.0, 2.5, 3.0, 4.0)
    heads, _, _ = three_exits()
    la = MultiExitLaplace(heads)
    assert la.temperatures == [1.0] * 3 and la.prior_variances == [2.0] * 3  # the official defaults


# ----------------------------------------------------------------------------------------------- persistence


def test_save_load_round_trip(tmp_path):
    heads, feats, labels = three_exits()
    la = MultiExitLaplace(heads, prior_structure="isotropic", num_samples=7, seed=5, link_approx="probit").fit(feats)
    la.select_hyperparameters(feats, labels, temperatures=(0.5, 2.0), prior_variances=(1.0, 3.0))
    path = la.save(tmp_path)
    assert path.endswith(EXIT_LAPLACE_FILENAME) and not list(tmp_path.glob("*.tmp"))
    loaded = MultiExitLaplace.load(tmp_path)
    assert loaded.metadata() == la.metadata()
    for link in ("mc", "probit"):
        assert torch.equal(loaded.predict(feats, link), la.predict(feats, link))
    assert loaded.exits[1].num_samples == 7 and loaded.selection == la.selection
    loaded.check_heads(heads)


def test_check_heads_rejects_changed_weights():
    heads, feats, _ = three_exits()
    la = MultiExitLaplace(heads).fit(feats)
    with torch.no_grad():
        heads[2].bias.add_(0.1)
    with pytest.raises(ValueError, match="exit 2's classifier changed"):
        la.check_heads(heads)
    with pytest.raises(ValueError, match="fitted on 3 exits"):
        la.check_heads(heads[:2])


# ------------------------------------------------------------------------------------------------- bad input


def test_bad_input():
    layer, x = head(), features(5)
    la = KronLastLayerLaplace(layer.weight, layer.bias)
    with pytest.raises(ValueError, match="not fitted"):
        la.predictive(x)
    with pytest.raises(ValueError, match="no training features"):
        la.fit([])
    with pytest.raises(ValueError, match=r"features must be a \(n, 4\) tensor"):
        la.fit(features(5, num_features=3))
    with pytest.raises(ValueError, match="prior_structure must be one of"):
        KronLastLayerLaplace(layer.weight, layer.bias, prior_structure="diag")
    with pytest.raises(ValueError, match="num_samples"):
        KronLastLayerLaplace(layer.weight, layer.bias, num_samples=0)
    la.fit(x)
    with pytest.raises(ValueError, match="link_approx must be one of"):
        la.predictive(x, "bridge")
    for name, value in (("temperature", 0.0), ("prior_variance", -1.0), ("prior_precision", float("nan"))):
        with pytest.raises(ValueError, match=name):
            setattr(la, name, value)

    heads, feats, labels = three_exits()
    multi = MultiExitLaplace(heads)
    with pytest.raises(ValueError, match="not fitted"):
        multi.predict(feats)
    multi.fit(feats)
    with pytest.raises(ValueError, match="expected the features of 3 exits"):
        multi.predict(feats[:2])
    with pytest.raises(ValueError, match="mie=True needs exit_flops"):
        multi.select_hyperparameters(feats, labels, mie=True)
    with pytest.raises(ValueError, match="only used with mie=True"):
        multi.select_hyperparameters(feats, labels, exit_flops=[1, 2, 3])
    with pytest.raises(ValueError, match="exit_flops must hold 3"):
        multi.select_hyperparameters(feats, labels, mie=True, exit_flops=[1, 2])
    with pytest.raises(ValueError, match="empty grid"):
        multi.select_hyperparameters(feats, labels, temperatures=())
    with pytest.raises(ValueError, match="validation examples"):
        multi.select_hyperparameters(feats, labels[:10])
    with pytest.raises(ValueError, match="exit_index"):
        multi.predict_exit(3, feats[0])
    with pytest.raises(ValueError, match="same classes"):
        MultiExitLaplace([head(), head(num_classes=4)])
