import re

import pytest
import torch
import torch.nn.functional as F

from hf_kd.losses import kd_loss, label_smoothing_targets, soft_cross_entropy

N, C = 6, 5


def _data(seed=0, n=N, c=C, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, c, generator=g, dtype=dtype) * 2
    teacher = torch.randn(n, c, generator=g, dtype=dtype) * 2
    labels = torch.randint(0, c, (n,), generator=g)
    return student, teacher, labels


def _manual_kd(student, teacher, labels, temperature, alpha):
    """Per-item Hinton loss written from the definition, with softmax/log (no log_target trick)."""
    p_t = torch.softmax(teacher / temperature, dim=-1)
    p_s = torch.softmax(student / temperature, dim=-1)
    soft = temperature**2 * (p_t * (p_t.log() - p_s.log())).sum(-1)
    hard = -torch.log_softmax(student, dim=-1).gather(-1, labels[:, None]).squeeze(-1)
    return alpha * soft + (1 - alpha) * hard


# ----- kd_loss: identities -----


def test_identical_logits_without_labels_is_zero():
    student, _, _ = _data()
    for temperature in (0.5, 1.0, 4.0):
        assert kd_loss(student, student.clone(), temperature=temperature).item() == pytest.approx(0.0, abs=1e-7)


def test_alpha_zero_is_cross_entropy():
    student, teacher, labels = _data()
    loss = kd_loss(student, teacher, labels, temperature=3.0, alpha=0.0)
    torch.testing.assert_close(loss, F.cross_entropy(student, labels))


def test_alpha_one_is_scaled_batchmean_kl():
    student, teacher, labels = _data()
    temperature = 3.0
    expected = temperature**2 * F.kl_div(
        F.log_softmax(student / temperature, -1), F.softmax(teacher / temperature, -1), reduction="batchmean"
    )
    torch.testing.assert_close(kd_loss(student, teacher, labels, temperature=temperature, alpha=1.0), expected)


def test_no_labels_ignores_alpha():
    student, teacher, _ = _data()
    a = kd_loss(student, teacher, temperature=2.0, alpha=0.1)
    b = kd_loss(student, teacher, temperature=2.0, alpha=1.0)
    torch.testing.assert_close(a, b)


def test_temperature_squared_factor():
    student, teacher, labels = _data()
    for temperature in (1.0, 2.0, 5.0):
        kl = F.kl_div(
            F.log_softmax(student / temperature, -1), F.softmax(teacher / temperature, -1), reduction="batchmean"
        )
        loss = kd_loss(student, teacher, labels, temperature=temperature, alpha=1.0)
        torch.testing.assert_close(loss / kl, torch.tensor(temperature**2))


def test_matches_manual_mixture():
    student, teacher, labels = _data()
    expected = _manual_kd(student, teacher, labels, 2.5, 0.3)
    torch.testing.assert_close(kd_loss(student, teacher, labels, 2.5, 0.3, reduction="none"), expected)
    torch.testing.assert_close(kd_loss(student, teacher, labels, 2.5, 0.3, reduction="sum"), expected.sum())
    torch.testing.assert_close(kd_loss(student, teacher, labels, 2.5, 0.3), expected.mean())


# ----- kd_loss: masking and gradient accumulation -----


def test_masked_items_ignored_in_both_terms():
    student, teacher, labels = _data()
    masked = labels.clone()
    masked[[1, 4]] = -100
    keep = masked != -100
    expected = _manual_kd(student[keep], teacher[keep], labels[keep], 2.0, 0.5)

    torch.testing.assert_close(kd_loss(student, teacher, masked), expected.mean())
    torch.testing.assert_close(kd_loss(student, teacher, masked, reduction="sum"), expected.sum())
    per_item = kd_loss(student, teacher, masked, reduction="none")
    assert per_item.shape == (N,)
    assert torch.all(per_item[~keep] == 0)
    torch.testing.assert_close(per_item[keep], expected)


def test_masked_items_with_inf_logits_do_not_leak():
    student, teacher, labels = _data()
    labels[0] = -100
    student[0, 0] = float("inf")
    teacher[0, 1] = float("-inf")
    assert torch.isfinite(kd_loss(student, teacher, labels))


def test_all_masked_gives_zero():
    student, teacher, _ = _data()
    labels = torch.full((N,), -100)
    assert kd_loss(student, teacher, labels).item() == 0.0


def test_num_items_in_batch_makes_micro_batches_sum_to_full_mean():
    student, teacher, labels = _data(n=8)
    labels[[0, 5, 6]] = -100  # the two halves hold different numbers of valid items
    total = int((labels != -100).sum())
    full = kd_loss(student, teacher, labels, temperature=2.0, alpha=0.7)
    for num_items in (total, torch.tensor(total), torch.tensor([float(total)])):
        accumulated = sum(
            kd_loss(student[s], teacher[s], labels[s], temperature=2.0, alpha=0.7, num_items_in_batch=num_items)
            for s in (slice(0, 3), slice(3, 8))
        )
        torch.testing.assert_close(accumulated, full)


def test_num_items_in_batch_without_labels():
    student, teacher, _ = _data()
    torch.testing.assert_close(
        kd_loss(student, teacher, num_items_in_batch=3), kd_loss(student, teacher, reduction="sum") / 3
    )


# ----- kd_loss: gradient, shapes, dtypes -----


def test_gradient_matches_closed_form():
    student, teacher, labels = _data(dtype=torch.float64)
    student.requires_grad_(True)
    temperature, alpha = 3.0, 0.4
    kd_loss(student, teacher, labels, temperature=temperature, alpha=alpha).backward()

    s = student.detach()
    onehot = F.one_hot(labels, C).double()
    p_s, p_t = torch.softmax(s / temperature, -1), torch.softmax(teacher / temperature, -1)
    expected = alpha * temperature * (p_s - p_t) / N + (1 - alpha) * (torch.softmax(s, -1) - onehot) / N
    torch.testing.assert_close(student.grad, expected)


def test_3d_input_equals_flattened():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 3, C, generator=g), torch.randn(2, 3, C, generator=g)
    labels = torch.randint(0, C, (2, 3), generator=g)
    labels[1, 2] = -100
    flat = (student.reshape(-1, C), teacher.reshape(-1, C), labels.reshape(-1))
    torch.testing.assert_close(kd_loss(student, teacher, labels), kd_loss(*flat))
    per_item = kd_loss(student, teacher, labels, reduction="none")
    assert per_item.shape == (2, 3)
    torch.testing.assert_close(per_item.reshape(-1), kd_loss(*flat, reduction="none"))


def test_bfloat16_inputs_are_upcast():
    student, teacher, labels = _data()
    loss = kd_loss(student.bfloat16(), teacher.bfloat16(), labels)
    assert loss.dtype == torch.float32
    expected = kd_loss(student.bfloat16().float(), teacher.bfloat16().float(), labels)
    torch.testing.assert_close(loss, expected)


def test_extreme_logits_stay_finite():
    student = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]], requires_grad=True)
    teacher = torch.tensor([[-1e4, 1e4, 0.0], [-1e4, 1e4, 0.0]])
    labels = torch.tensor([1, 0])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        s = student.detach().to(dtype).requires_grad_(True)
        loss = kd_loss(s, teacher.to(dtype), labels, temperature=1.0)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
        assert loss.item() > 1e3  # confidently wrong: a huge but finite loss


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        ({"temperature": 0.0}, "0.0"),
        ({"temperature": -1.5}, "-1.5"),
        ({"alpha": 1.5}, "1.5"),
        ({"alpha": -0.25}, "-0.25"),
        ({"reduction": "batchmean"}, "batchmean"),
        ({"num_items_in_batch": 0}, "0"),
        ({"num_items_in_batch": torch.tensor([1, 2])}, "(2,)"),
        ({"num_items_in_batch": 4, "reduction": "sum"}, "sum"),
    ],
)
def test_bad_arguments_raise(kwargs, bad):
    student, teacher, labels = _data()
    with pytest.raises(ValueError, match=re.escape(bad)):
        kd_loss(student, teacher, labels, **kwargs)


def test_bad_shapes_raise():
    student, teacher, labels = _data()
    with pytest.raises(ValueError, match=r"\(6, 4\)"):
        kd_loss(student, teacher[:, :4], labels)
    with pytest.raises(ValueError, match=r"\(5,\)"):
        kd_loss(student, teacher, labels[:5])
    with pytest.raises(ValueError, match=r"\(5,\)"):
        kd_loss(student[0], teacher[0])


def test_float_labels_raise():
    student, teacher, labels = _data()
    with pytest.raises(ValueError, match="float32"):
        kd_loss(student, teacher, labels.float())


def test_nan_teacher_raises():
    student, teacher, labels = _data()
    teacher[2, 3] = float("nan")
    with pytest.raises(ValueError, match="teacher_logits contain NaN"):
        kd_loss(student, teacher, labels)


# ----- label smoothing and soft cross-entropy -----


def test_label_smoothing_targets_values():
    targets = label_smoothing_targets(torch.tensor([2, 0]), num_classes=4, epsilon=0.2)
    expected = torch.tensor([[0.05, 0.05, 0.85, 0.05], [0.85, 0.05, 0.05, 0.05]])
    torch.testing.assert_close(targets, expected)
    torch.testing.assert_close(targets.sum(-1), torch.ones(2))


def test_label_smoothing_edge_epsilons():
    labels = torch.tensor([1, 3])
    torch.testing.assert_close(label_smoothing_targets(labels, 4, 0.0), F.one_hot(labels, 4).float())
    torch.testing.assert_close(label_smoothing_targets(labels, 4, 1.0), torch.full((2, 4), 0.25))


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.3])
def test_soft_cross_entropy_with_smoothed_targets_matches_torch(epsilon):
    student, _, labels = _data()
    labels[3] = -100
    targets = label_smoothing_targets(labels, C, epsilon)
    assert torch.all(targets[3] == 0)
    expected = F.cross_entropy(student, labels, label_smoothing=epsilon, ignore_index=-100)
    torch.testing.assert_close(soft_cross_entropy(student, targets), expected)
    expected_none = F.cross_entropy(student, labels, label_smoothing=epsilon, ignore_index=-100, reduction="none")
    torch.testing.assert_close(soft_cross_entropy(student, targets, reduction="none"), expected_none)


def test_soft_cross_entropy_matches_torch_probability_targets_and_kd():
    student, teacher, _ = _data()
    targets = torch.softmax(teacher, -1)
    torch.testing.assert_close(soft_cross_entropy(student, targets), F.cross_entropy(student, targets))
    # CE(q, p) = KL(q || p) + H(q): against teacher probabilities it differs from kd_loss(T=1) by the teacher entropy.
    entropy = -(targets * targets.log()).sum(-1).mean()
    expected = kd_loss(student, teacher, temperature=1.0) + entropy
    torch.testing.assert_close(soft_cross_entropy(student, targets), expected)


def test_soft_cross_entropy_zero_target_class_with_inf_logit():
    logits = torch.tensor([[0.0, float("-inf"), 1.0]])
    targets = torch.tensor([[0.5, 0.0, 0.5]])
    loss = soft_cross_entropy(logits, targets)
    expected = -(0.5 * torch.log_softmax(torch.tensor([0.0, 1.0]), -1)).sum()
    torch.testing.assert_close(loss, expected)


def test_soft_cross_entropy_3d_and_num_items_in_batch():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, C, generator=g)
    labels = torch.randint(0, C, (2, 4), generator=g)
    labels[0, :2] = -100
    targets = label_smoothing_targets(labels, C, 0.1)
    full = soft_cross_entropy(logits, targets)
    torch.testing.assert_close(full, F.cross_entropy(logits.reshape(-1, C), labels.reshape(-1), label_smoothing=0.1))
    total = int((labels != -100).sum())
    halves = soft_cross_entropy(logits[:1], targets[:1], num_items_in_batch=total) + soft_cross_entropy(
        logits[1:], targets[1:], num_items_in_batch=total
    )
    torch.testing.assert_close(halves, full)
    assert soft_cross_entropy(logits, targets, reduction="none").shape == (2, 4)


def test_soft_cross_entropy_bfloat16_upcast():
    student, teacher, _ = _data()
    loss = soft_cross_entropy(student.bfloat16(), torch.softmax(teacher, -1).bfloat16())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_label_smoothing_and_soft_ce_validation():
    with pytest.raises(ValueError, match="1.5"):
        label_smoothing_targets(torch.tensor([0]), 3, 1.5)
    with pytest.raises(ValueError, match="got 3"):
        label_smoothing_targets(torch.tensor([0, 3]), 3, 0.1)
    with pytest.raises(ValueError, match="got -1"):
        label_smoothing_targets(torch.tensor([-1]), 3, 0.1)
    with pytest.raises(ValueError, match="float32"):
        label_smoothing_targets(torch.tensor([0.0]), 3, 0.1)
    with pytest.raises(ValueError, match=r"\(6, 4\)"):
        soft_cross_entropy(torch.zeros(6, 5), torch.zeros(6, 4))
    with pytest.raises(ValueError, match="avg"):
        soft_cross_entropy(torch.zeros(6, 5), torch.zeros(6, 5), reduction="avg")


# ----- lm_kd_loss: token-level distillation of causal LMs -----

from scipy.spatial.distance import jensenshannon  # noqa: E402
from scipy.special import rel_entr  # noqa: E402

from hf_kd.losses import LMLossType, lm_kd_loss  # noqa: E402

B, L, V = 3, 7, 11


def _lm_data(seed=0, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, L, V, generator=g, dtype=dtype) * scale
    teacher = torch.randn(B, L, V, generator=g, dtype=dtype) * scale
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[2, 5:] = -100  # padding
    return student, teacher, labels


def _scipy_divergence(p_t, p_s, loss_type, beta):
    """Per-token divergence with scipy on numpy rows (natural log)."""
    if loss_type == "forward_kl" or (loss_type == "jsd" and beta == 0):
        return rel_entr(p_t, p_s).sum(-1)
    if loss_type == "reverse_kl" or beta == 1:
        return rel_entr(p_s, p_t).sum(-1)
    m = beta * p_t + (1 - beta) * p_s
    return beta * rel_entr(p_t, m).sum(-1) + (1 - beta) * rel_entr(p_s, m).sum(-1)


def _reference_lm_loss(student, teacher, labels, loss_type, beta=0.5, temperature=1.0, alpha=1.0):
    """The loss from its definition, token by token with scipy (float64 numpy)."""
    mask = labels != -100
    s, t, y = student[mask].double(), teacher[mask].double(), labels[mask]
    p_s = torch.softmax(s / temperature, -1).numpy()
    p_t = torch.softmax(t / temperature, -1).numpy()
    divergence = _scipy_divergence(p_t, p_s, loss_type, beta)
    ce = -torch.log_softmax(s, -1).gather(-1, y[:, None]).squeeze(-1).numpy()
    return (alpha * temperature**2 * divergence + (1 - alpha) * ce).sum(), int(mask.sum())


@pytest.mark.parametrize("loss_type", ["forward_kl", "reverse_kl", "jsd"])
def test_lm_identical_logits_give_zero(loss_type):
    student, _, labels = _lm_data()
    loss = lm_kd_loss(student, student.clone(), labels, loss_type=loss_type, temperature=2.0, beta=0.3)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    "loss_type,beta,temperature,alpha",
    [
        ("forward_kl", 0.5, 1.0, 1.0),
        ("reverse_kl", 0.5, 1.0, 1.0),
        ("jsd", 0.5, 1.0, 1.0),
        ("jsd", 0.1, 2.0, 1.0),
        ("jsd", 0.9, 0.5, 0.7),
        ("forward_kl", 0.5, 3.0, 0.25),
        ("reverse_kl", 0.5, 1.5, 0.6),
    ],
)
def test_lm_matches_scipy(loss_type, beta, temperature, alpha):
    student, teacher, labels = _lm_data(seed=1)
    total, count = _reference_lm_loss(student, teacher, labels, loss_type, beta, temperature, alpha)
    loss = lm_kd_loss(student, teacher, labels, loss_type, beta=beta, temperature=temperature, alpha=alpha)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(total / count, rel=1e-10)


def test_lm_jsd_half_is_scipy_jensenshannon_squared():
    # scipy's jensenshannon is the square root of the beta = 0.5 divergence (natural log by default).
    student, teacher, labels = _lm_data(seed=2)
    mask = labels != -100
    p_s = torch.softmax(student[mask], -1).numpy()
    p_t = torch.softmax(teacher[mask], -1).numpy()
    expected = (jensenshannon(p_t, p_s, axis=-1) ** 2).mean()
    assert lm_kd_loss(student, teacher, labels, "jsd", beta=0.5).item() == pytest.approx(expected, rel=1e-9)


def test_lm_jsd_end_points_are_trl_kls():
    # TRL's generalized_jsd_loss: beta = 0 is KL(teacher || student), beta = 1 is KL(student || teacher).
    student, teacher, labels = _lm_data(seed=3)
    forward = lm_kd_loss(student, teacher, labels, "forward_kl")
    reverse = lm_kd_loss(student, teacher, labels, "reverse_kl")
    torch.testing.assert_close(lm_kd_loss(student, teacher, labels, "jsd", beta=0.0), forward)
    torch.testing.assert_close(lm_kd_loss(student, teacher, labels, "jsd", beta=1.0), reverse)
    assert forward.item() != pytest.approx(reverse.item(), rel=1e-3)  # the two directions do differ here
    # The mixture formula itself vanishes towards the ends (M -> p_S or p_T): the end points are a convention.
    assert lm_kd_loss(student, teacher, labels, "jsd", beta=1e-6).item() < 1e-4


def test_lm_alpha_zero_is_completion_cross_entropy():
    student, teacher, labels = _lm_data(seed=4)
    expected = F.cross_entropy(student.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    for loss_type in LMLossType:
        loss = lm_kd_loss(student, teacher, labels, loss_type, temperature=4.0, alpha=0.0)
        torch.testing.assert_close(loss, expected)


def test_lm_temperature_squared_factor():
    student, teacher, labels = _lm_data(seed=5)
    temperature = 3.0
    scaled = lm_kd_loss(student, teacher, labels, temperature=temperature)
    # T^2 * KL of the tempered distributions == KL of logits / T at T = 1, times T^2.
    unscaled = lm_kd_loss(student / temperature, teacher / temperature, labels, temperature=1.0)
    torch.testing.assert_close(scaled, temperature**2 * unscaled)


def test_lm_masked_positions_ignored():
    student, teacher, labels = _lm_data(seed=6)
    loss = lm_kd_loss(student, teacher, labels, "jsd", alpha=0.5)
    # Anything at ignored positions, even NaN/inf, changes nothing.
    mask = (labels == -100).unsqueeze(-1).expand_as(student)
    poisoned_student = student.masked_fill(mask, float("nan"))
    poisoned_teacher = teacher.masked_fill(mask, float("inf"))
    torch.testing.assert_close(lm_kd_loss(poisoned_student, poisoned_teacher, labels, "jsd", alpha=0.5), loss)
    # Same as the loss on the counted tokens gathered into one sequence.
    keep = labels != -100
    flat = lm_kd_loss(student[keep][None], teacher[keep][None], labels[keep][None], "jsd", alpha=0.5)
    torch.testing.assert_close(flat, loss)


def test_lm_all_masked_is_zero_with_zero_gradient():
    student, teacher, labels = _lm_data(seed=7)
    student.requires_grad_(True)
    loss = lm_kd_loss(student, teacher, torch.full_like(labels, -100))
    assert loss.item() == 0.0
    loss.backward()
    assert student.grad is None or not student.grad.any()


@pytest.mark.parametrize("loss_type", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("chunk_size,temperature", [(1, 2.0), (4, 2.0), (1000, 2.0), (5, 1.0)])
def test_lm_chunked_equals_unchunked_values_and_gradients(loss_type, chunk_size, temperature):
    student, teacher, labels = _lm_data(seed=8)
    options = dict(loss_type=loss_type, beta=0.3, temperature=temperature, alpha=0.6)

    s_ref = student.clone().requires_grad_(True)
    t_ref = teacher.clone().requires_grad_(True)
    keep = labels != -100
    # Plain autograd on the whole tensor, written from the definition.
    p_t = torch.softmax(t_ref[keep] / temperature, -1)
    p_s = torch.softmax(s_ref[keep] / temperature, -1)
    if loss_type == "forward_kl":
        divergence = (p_t * (p_t.log() - p_s.log())).sum(-1)
    elif loss_type == "reverse_kl":
        divergence = (p_s * (p_s.log() - p_t.log())).sum(-1)
    else:
        m = 0.3 * p_t + 0.7 * p_s
        divergence = 0.3 * (p_t * (p_t.log() - m.log())).sum(-1) + 0.7 * (p_s * (p_s.log() - m.log())).sum(-1)
    ce = F.cross_entropy(s_ref[keep], labels[keep], reduction="none")
    reference = (0.6 * temperature**2 * divergence + 0.4 * ce).mean()
    reference.backward()

    s = student.clone().requires_grad_(True)
    t = teacher.clone().requires_grad_(True)
    loss = lm_kd_loss(s, t, labels, chunk_size=chunk_size, **options)
    (2.5 * loss).backward()  # the upstream gradient scales both buffers
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(s.grad, 2.5 * s_ref.grad)
    torch.testing.assert_close(t.grad, 2.5 * t_ref.grad)
    assert not s.grad[labels == -100].any()


def test_lm_gradient_only_for_inputs_that_require_it(monkeypatch):
    student, teacher, labels = _lm_data(seed=9)
    student.requires_grad_(True)
    lm_kd_loss(student, teacher, labels, chunk_size=2).backward()
    assert student.grad is not None and teacher.grad is None
    # Under no_grad (evaluation) no chunk gradient is computed at all, even for a tensor that requires grad.
    from hf_kd import losses

    asked = []
    chunk = losses._lm_chunk
    monkeypatch.setattr(losses, "_lm_chunk", lambda *args: asked.append(args[-1]) or chunk(*args))
    with torch.no_grad():
        assert not lm_kd_loss(student, teacher, labels, chunk_size=2).requires_grad
    assert asked == [(False, False)] * 8  # 16 counted tokens (21 less 5 masked), 2 per chunk
    lm_kd_loss(student, teacher, labels, chunk_size=8)
    assert asked[8:] == [(True, False)] * 2


def test_lm_non_contiguous_shifted_logits():
    # The caller's causal shift, logits[:, :-1] with labels[:, 1:], gives a non-contiguous view.
    student, teacher, labels = _lm_data(seed=10)
    full = student.clone().requires_grad_(True)
    loss = lm_kd_loss(full[:, :-1], teacher[:, :-1], labels[:, 1:], alpha=0.5)
    loss.backward()
    expected = lm_kd_loss(full[:, :-1].contiguous(), teacher[:, :-1].contiguous(), labels[:, 1:], alpha=0.5)
    torch.testing.assert_close(loss, expected)
    assert full.grad.shape == student.shape and not full.grad[:, -1].any()


def test_lm_num_items_in_batch_makes_micro_batches_sum_to_full_mean():
    student, teacher, labels = _lm_data(seed=11)
    full = lm_kd_loss(student, teacher, labels, "jsd", alpha=0.8)
    total = int((labels != -100).sum())
    parts = [
        lm_kd_loss(student[i : i + 1], teacher[i : i + 1], labels[i : i + 1], "jsd", alpha=0.8, num_items_in_batch=n)
        for i in range(B)
        for n in (total, torch.tensor(total))
    ]
    torch.testing.assert_close(sum(parts[::2]), full)
    torch.testing.assert_close(sum(parts[1::2]), full)
    # Without it each micro-batch is its own mean.
    counts = (labels != -100).sum(-1)
    sums = [lm_kd_loss(student[i : i + 1], teacher[i : i + 1], labels[i : i + 1], "jsd", alpha=0.8) * counts[i]
            for i in range(B)]
    torch.testing.assert_close(sum(sums) / total, full)


def test_lm_bfloat16_logits_are_computed_in_float32():
    student, teacher, labels = _lm_data(seed=12, dtype=torch.float32)
    s16 = student.bfloat16().requires_grad_(True)
    loss = lm_kd_loss(s16, teacher.bfloat16(), labels, "reverse_kl")
    assert loss.dtype == torch.float32
    expected = lm_kd_loss(s16.detach().float(), teacher.bfloat16().float(), labels, "reverse_kl")
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert s16.grad.dtype == torch.bfloat16


def test_lm_loss_type_enum_and_string_agree():
    student, teacher, labels = _lm_data(seed=13)
    assert LMLossType("jsd") is LMLossType.JSD and LMLossType.JSD == "jsd"
    torch.testing.assert_close(
        lm_kd_loss(student, teacher, labels, LMLossType.REVERSE_KL), lm_kd_loss(student, teacher, labels, "reverse_kl")
    )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"loss_type": "kl"}, r"loss_type must be one of \('forward_kl', 'reverse_kl', 'jsd'\), got 'kl'"),
        ({"beta": 1.5}, "beta must be in \\[0.0, 1.0\\], got 1.5"),
        ({"beta": -0.1}, "beta must be in"),
        ({"temperature": 0.0}, "temperature must be > 0, got 0.0"),
        ({"alpha": 1.2}, "alpha must be in \\[0.0, 1.0\\], got 1.2"),
        ({"chunk_size": 0}, "chunk_size must be a positive int, got 0"),
        ({"num_items_in_batch": 0}, "num_items_in_batch must be a positive int"),
    ],
)
def test_lm_bad_arguments_raise(kwargs, message):
    student, teacher, labels = _lm_data()
    with pytest.raises(ValueError, match=message):
        lm_kd_loss(student, teacher, labels, **kwargs)


def test_lm_bad_shapes_and_labels_raise():
    student, teacher, labels = _lm_data()
    with pytest.raises(ValueError, match=r"vocabulary has 11 entries and the teacher's 12"):
        lm_kd_loss(student, torch.randn(B, L, 12), labels)
    with pytest.raises(ValueError, match=r"same \(batch, seq\), got \(3, 7, 11\) and \(3, 6, 11\)"):
        lm_kd_loss(student, teacher[:, :6], labels)
    with pytest.raises(ValueError, match=r"student_logits must have shape \(batch, seq, vocab\), got \(21, 11\)"):
        lm_kd_loss(student.reshape(-1, V), teacher.reshape(-1, V), labels.reshape(-1))
    with pytest.raises(ValueError, match=r"labels must have shape \(3, 7\)"):
        lm_kd_loss(student, teacher, labels[:, 1:])
    bad = labels.clone()
    bad[1, 2] = V
    with pytest.raises(ValueError, match=r"labels must be in \[0, 11\) or -100"):
        lm_kd_loss(student, teacher, bad)
    with pytest.raises(ValueError, match="integer tensor"):
        lm_kd_loss(student, teacher, labels.double())
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        lm_kd_loss(student, teacher, labels.tolist())
    nan_teacher = teacher.clone()
    nan_teacher[1, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="teacher_logits contain NaN or inf at a counted position"):
        lm_kd_loss(student, nan_teacher, labels)


# ----- sparse_lm_kd_loss: token-level distillation from the teacher's top-k logits -----

from hf_kd.losses import sparse_lm_kd_loss  # noqa: E402


def _sparse_case(batch=2, seq=6, vocab=13, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, seq, vocab, generator=generator, dtype=dtype) * 2
    teacher = torch.randn(batch, seq, vocab, generator=generator, dtype=dtype) * 2
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels[0, :2] = -100
    labels[-1, -1] = -100
    return student, teacher, labels


def _top_k(teacher, k):
    values, ids = teacher.topk(k, dim=-1)
    return ids, values, torch.logsumexp(teacher, dim=-1)


@pytest.mark.parametrize("tail", ["bucket", "renormalise"])
@pytest.mark.parametrize(
    "loss_type,beta,temperature,alpha",
    [("forward_kl", 0.5, 1.0, 1.0), ("reverse_kl", 0.5, 2.0, 0.7), ("jsd", 0.3, 1.5, 0.5), ("jsd", 0.0, 1.0, 1.0)],
)
def test_sparse_lm_loss_with_k_equal_vocab_is_lm_kd_loss_values_and_gradients(tail, loss_type, beta, temperature, alpha):
    student, teacher, labels = _sparse_case()
    options = dict(loss_type=loss_type, beta=beta, temperature=temperature, alpha=alpha, num_items_in_batch=7)
    dense_student = student.clone().requires_grad_()
    dense = lm_kd_loss(dense_student, teacher, labels, **options)
    dense.backward()
    sparse_student = student.clone().requires_grad_()
    sparse = sparse_lm_kd_loss(sparse_student, *_top_k(teacher, teacher.shape[-1]), labels, **options, tail=tail)
    sparse.backward()
    torch.testing.assert_close(sparse, dense)
    torch.testing.assert_close(sparse_student.grad, dense_student.grad)


@pytest.mark.parametrize("loss_type", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_sparse_bucket_divergence_is_at_most_the_full_one(loss_type, k):
    # Data processing inequality: merging the tail tokens into one cell cannot increase an f-divergence (T = 1).
    for seed in range(5):
        student, teacher, labels = _sparse_case(seed=seed)
        full = lm_kd_loss(student, teacher, labels, loss_type)
        bucket = sparse_lm_kd_loss(student, *_top_k(teacher, k), labels, loss_type)
        assert 0 <= bucket.item() <= full.item() + 1e-12


def test_sparse_bucket_matches_a_hand_computed_partition():
    student, teacher, labels = _sparse_case(batch=1, seq=3, vocab=7)
    labels[:] = torch.tensor([[2, -100, 5]])
    k, temperature = 2, 2.0
    expected = 0.0
    for position in (0, 2):
        p_t, p_s = teacher[0, position].softmax(-1), student[0, position].softmax(-1)
        top = teacher[0, position].topk(k).indices
        rest = torch.ones(7, dtype=torch.bool)
        rest[top] = False
        cells_t = torch.cat([p_t[top], p_t[rest].sum()[None]]).log() / temperature
        cells_s = torch.cat([p_s[top], p_s[rest].sum()[None]]).log() / temperature
        q_t, q_s = cells_t.softmax(-1), cells_s.softmax(-1)
        expected += temperature**2 * (q_t * (q_t.log() - q_s.log())).sum().item()
    loss = sparse_lm_kd_loss(student, *_top_k(teacher, k), labels, temperature=temperature)
    assert loss.item() == pytest.approx(expected / 2, rel=1e-9)


def test_sparse_renormalise_matches_the_restricted_kl():
    student, teacher, labels = _sparse_case(batch=1, seq=1, vocab=9)
    labels[:] = 4
    ids, values, lse = _top_k(teacher, 3)
    p_t, log_s = values[0, 0].softmax(-1), student[0, 0, ids[0, 0]].log_softmax(-1)
    expected = (p_t * (p_t.log() - log_s)).sum().item()
    loss = sparse_lm_kd_loss(student, ids, values, lse, labels, tail="renormalise")
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_sparse_lm_loss_ignores_masked_positions_and_scales_by_num_items():
    student, teacher, labels = _sparse_case()
    ids, values, lse = _top_k(teacher, 4)
    loss = sparse_lm_kd_loss(student, ids, values, lse, labels, alpha=0.6)
    # Changing anything at a masked position changes nothing.
    garbage = ids.clone(), values.clone(), lse.clone(), student.clone()
    for tensor in garbage:
        tensor[0, :2] = 1e4 if tensor.is_floating_point() else 0
    assert sparse_lm_kd_loss(garbage[3], *garbage[:3], labels, alpha=0.6).item() == pytest.approx(loss.item())
    count = int((labels != -100).sum())
    scaled = sparse_lm_kd_loss(student, ids, values, lse, labels, alpha=0.6, num_items_in_batch=3 * count)
    assert scaled.item() == pytest.approx(loss.item() / 3)
    none = torch.full_like(labels, -100)
    assert sparse_lm_kd_loss(student, ids, values, lse, none).item() == 0.0


def test_sparse_lm_loss_is_zero_when_student_is_teacher_at_any_temperature():
    student, _, labels = _sparse_case()
    for temperature in (0.5, 1.0, 3.0):
        for tail in ("bucket", "renormalise"):
            loss = sparse_lm_kd_loss(student, *_top_k(student, 5), labels, temperature=temperature, tail=tail)
            assert abs(loss.item()) < 1e-10


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(tail="rest"), "tail must be one of"),
        (dict(k=0), "1 <= k <= vocab = 13"),
        (dict(k=14), "1 <= k <= vocab = 13"),
        (dict(bad_id=13), r"topk_ids at counted positions must be in \[0, 13\)"),
        (dict(loss_type="tvd"), "loss_type"),
    ],
)
def test_sparse_lm_loss_rejects_bad_input(change, message):
    student, teacher, labels = _sparse_case()
    k = change.pop("k", 4)
    if k <= 13:
        ids, values, lse = _top_k(teacher, k)
    else:
        ids, values, lse = torch.zeros(2, 6, k, dtype=torch.long), torch.zeros(2, 6, k), teacher[..., 0]
    if "bad_id" in change:
        ids[1, 0, 0] = change.pop("bad_id")
    with pytest.raises(ValueError, match=message):
        sparse_lm_kd_loss(student, ids, values, lse, labels, **change)


def _unchunked_sparse_reference(student_logits, topk_ids, topk_logits, teacher_logsumexp, labels, loss_type, beta,
                                temperature, alpha, tail):
    """sparse_lm_kd_loss as it was before it was chunked: plain autograd on all the counted rows at once."""
    from hf_kd.losses import _sparse_divergence
    from hf_kd.options import LMLossType

    keep = labels != -100
    student, targets, ids = student_logits[keep].double(), labels[keep], topk_ids[keep]
    vocab, k = student.shape[-1], ids.shape[-1]
    total = (1.0 - alpha) * F.cross_entropy(student, targets, reduction="sum")
    teacher_top, student_top = topk_logits[keep].double(), student.gather(-1, ids)
    if tail == "bucket" and k < vocab:
        lse = teacher_logsumexp[keep].double()
        rest = (-torch.expm1((torch.logsumexp(teacher_top, -1) - lse).clamp(max=0.0))).clamp(min=1e-300)
        teacher_top = torch.cat([teacher_top, (lse + rest.log())[:, None]], -1)
        outside = student.scatter(-1, ids, float("-inf"))
        student_top = torch.cat([student_top, torch.logsumexp(outside, -1, keepdim=True)], -1)
    log_t, log_s = F.log_softmax(teacher_top / temperature, -1), F.log_softmax(student_top / temperature, -1)
    divergence = _sparse_divergence(log_t, log_s, LMLossType(loss_type), beta)
    return (total + alpha * temperature**2 * divergence.sum()) / keep.sum()


@pytest.mark.parametrize("tail", ["bucket", "renormalise"])
@pytest.mark.parametrize(
    "loss_type,beta,temperature,alpha",
    [("forward_kl", 0.5, 1.0, 1.0), ("reverse_kl", 0.5, 2.0, 0.7), ("jsd", 0.3, 1.5, 0.5), ("jsd", 1.0, 0.7, 0.2),
     ("forward_kl", 0.5, 2.0, 0.0)],
)
@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_sparse_chunked_equals_the_unchunked_loss_values_and_gradients(tail, loss_type, beta, temperature, alpha,
                                                                        chunk_size):
    student, teacher, labels = _sparse_case(batch=3, seq=5, vocab=17, seed=4)
    top = _top_k(teacher, 5)
    options = dict(loss_type=loss_type, beta=beta, temperature=temperature, alpha=alpha, tail=tail)
    s_ref = student.clone().requires_grad_()
    reference = _unchunked_sparse_reference(s_ref, *top, labels, **options)
    reference.backward()
    s = student.clone().requires_grad_()
    loss = sparse_lm_kd_loss(s, *top, labels, **options, chunk_size=chunk_size)
    (2.5 * loss).backward()  # the upstream gradient scales the buffer
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(s.grad, 2.5 * s_ref.grad)
    assert not s.grad[labels == -100].any()


def test_sparse_loss_runs_chunk_by_chunk_without_gradients_under_no_grad(monkeypatch):
    from hf_kd import losses

    student, teacher, labels = _sparse_case(batch=3, seq=5, vocab=17, seed=4)
    top = _top_k(teacher, 5)
    count = int((labels != -100).sum())
    chunks = []
    original = losses._sparse_lm_chunk

    def spy(student_rows, targets, *args):
        chunks.append((targets.shape[0], args[-1]))
        return original(student_rows, targets, *args)

    monkeypatch.setattr(losses, "_sparse_lm_chunk", spy)
    sparse_lm_kd_loss(student.clone().requires_grad_(), *top, labels, chunk_size=4)
    assert [n for n, _ in chunks] == [4] * (count // 4) + ([count % 4] if count % 4 else [])
    assert all(needs == (True, False) for _, needs in chunks)
    chunks.clear()
    with torch.no_grad():
        assert not sparse_lm_kd_loss(student.clone().requires_grad_(), *top, labels, chunk_size=4).requires_grad
    assert chunks and all(needs == (False, False) for _, needs in chunks)
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        sparse_lm_kd_loss(student, *top, labels, chunk_size=0)


# ----- return_parts: the logged loss parts from the loss's own pass -----


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize(
    "loss_type,beta,temperature,alpha",
    [("forward_kl", 0.5, 2.0, 0.6), ("jsd", 0.3, 1.0, 1.0), ("reverse_kl", 0.5, 1.5, 0.0)],
)
def test_return_parts_equal_the_alpha_one_and_zero_calls_and_leave_the_loss_unchanged(sparse, loss_type, beta,
                                                                                       temperature, alpha):
    from hf_kd.losses import LMLossParts

    student, teacher, labels = _sparse_case(batch=3, seq=5, vocab=17, seed=6)
    if sparse:
        top = _top_k(teacher, 4)

        def loss_fn(s, **kwargs):
            return sparse_lm_kd_loss(s, *top, labels, loss_type, beta, temperature, chunk_size=3, **kwargs)
    else:
        def loss_fn(s, **kwargs):
            return lm_kd_loss(s, teacher, labels, loss_type, beta, temperature, chunk_size=3, **kwargs)

    s_plain = student.clone().requires_grad_()
    plain = loss_fn(s_plain, alpha=alpha, num_items_in_batch=20)
    plain.backward()
    s = student.clone().requires_grad_()
    parts = loss_fn(s, alpha=alpha, num_items_in_batch=20, return_parts=True)
    assert isinstance(parts, LMLossParts)
    parts.loss.backward()
    torch.testing.assert_close(parts.loss, plain)
    torch.testing.assert_close(s.grad, s_plain.grad)
    assert not parts.kd.requires_grad and not parts.ce.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(parts.kd, loss_fn(student, alpha=1.0))
        torch.testing.assert_close(parts.ce, loss_fn(student, alpha=0.0))
    # The parts recombine into the loss (normalised by the local count, not num_items_in_batch).
    count = int((labels != -100).sum())
    torch.testing.assert_close(alpha * parts.kd + (1 - alpha) * parts.ce, plain * 20 / count)
    masked = torch.full_like(labels, -100)
    empty = (sparse_lm_kd_loss(student, *_top_k(teacher, 4), masked, return_parts=True) if sparse
             else lm_kd_loss(student, teacher, masked, return_parts=True))
    assert empty.loss.item() == empty.kd.item() == empty.ce.item() == 0.0


# ----- logits given as hidden states and LM head (LMHeadInputs): projected chunk by chunk -----

from hf_kd.losses import LMHeadInputs  # noqa: E402


def _head_case(seed, batch=3, seq=5, hidden=6, vocab=11, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(batch, seq, hidden, generator=generator, dtype=dtype)
    teacher_hidden = torch.randn(batch, seq, hidden, generator=generator, dtype=dtype)
    student_head = torch.randn(vocab, hidden, generator=generator, dtype=dtype)
    teacher_head = torch.randn(vocab, hidden, generator=generator, dtype=dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels[0, :2] = -100  # a prompt
    labels[2, -1] = -100  # padding
    return student_hidden, student_head, teacher_hidden, teacher_head, labels


@pytest.mark.parametrize("loss_type", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("chunk_size,temperature,alpha", [(1, 2.0, 0.6), (4, 1.0, 1.0), (1000, 1.5, 0.0)])
def test_lm_loss_on_head_inputs_equals_the_loss_on_their_logits(loss_type, chunk_size, temperature, alpha):
    """The projection inside the loss changes nothing: same value, same gradients w.r.t. the hidden states and both
    heads as autograd through F.linear and lm_kd_loss on the full logits."""
    tensors = _head_case(seed=11)
    options = dict(loss_type=loss_type, beta=0.3, temperature=temperature, alpha=alpha, return_parts=True)
    ref = [t.clone().requires_grad_() for t in tensors[:4]]
    expected = lm_kd_loss(F.linear(ref[0], ref[1]), F.linear(ref[2], ref[3]), tensors[4], **options)
    (3.0 * expected.loss).backward()
    leaves = [t.clone().requires_grad_() for t in tensors[:4]]
    got = lm_kd_loss(LMHeadInputs(*leaves[:2]), LMHeadInputs(*leaves[2:]), tensors[4], chunk_size=chunk_size, **options)
    (3.0 * got.loss).backward()
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    for leaf, reference in zip(leaves, ref):
        torch.testing.assert_close(leaf.grad, reference.grad)
    assert not leaves[0].grad[tensors[4] == -100].any()


def test_lm_loss_mixes_head_inputs_and_logits_and_skips_frozen_heads(monkeypatch):
    """A student given as hidden states + head against teacher logits (the trainer's cached / live mix); a frozen
    (detached) head gets no gradient buffer, and no (batch, seq, vocab) tensor is made for the student."""
    student_hidden, student_head, teacher_hidden, teacher_head, labels = _head_case(seed=12, dtype=torch.float32)
    teacher_logits = F.linear(teacher_hidden, teacher_head)
    hidden = student_hidden.clone().requires_grad_()
    expected_hidden = student_hidden.clone().requires_grad_()
    lm_kd_loss(F.linear(expected_hidden, student_head), teacher_logits, labels, alpha=0.5).backward()
    made = []
    zeros_like = torch.zeros_like
    monkeypatch.setattr(torch, "zeros_like", lambda t, **kw: made.append(tuple(t.shape)) or zeros_like(t, **kw))
    lm_kd_loss(LMHeadInputs(hidden, student_head), teacher_logits, labels, alpha=0.5, chunk_size=4).backward()
    torch.testing.assert_close(hidden.grad, expected_hidden.grad)
    assert made == [tuple(hidden.shape)]  # the hidden states' buffer only: no head buffer, no logits buffer


@pytest.mark.parametrize("tail", ["bucket", "renormalise"])
@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_sparse_loss_on_head_inputs_equals_the_loss_on_their_logits(tail, alpha):
    student_hidden, student_head, teacher_hidden, teacher_head, labels = _head_case(seed=13)
    top = _top_k(F.linear(teacher_hidden, teacher_head), 4)
    options = dict(loss_type="jsd", beta=0.4, temperature=1.5, alpha=alpha, tail=tail)
    ref_hidden, ref_head = student_hidden.clone().requires_grad_(), student_head.clone().requires_grad_()
    expected = sparse_lm_kd_loss(F.linear(ref_hidden, ref_head), *top, labels, **options)
    expected.backward()
    hidden, head = student_hidden.clone().requires_grad_(), student_head.clone().requires_grad_()
    got = sparse_lm_kd_loss(LMHeadInputs(hidden, head), *top, labels, chunk_size=3, **options)
    got.backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(hidden.grad, ref_hidden.grad)
    torch.testing.assert_close(head.grad, ref_head.grad)


def test_lm_loss_on_bfloat16_head_inputs_sums_the_head_gradient_in_float32():
    student_hidden, student_head, teacher_hidden, teacher_head, labels = _head_case(
        seed=14, batch=4, seq=16, hidden=8, vocab=32, dtype=torch.float32
    )
    teacher_logits = F.linear(teacher_hidden, teacher_head)
    hidden32, head32 = student_hidden.clone().requires_grad_(), student_head.clone().requires_grad_()
    lm_kd_loss(LMHeadInputs(hidden32, head32), teacher_logits, labels, chunk_size=2).backward()
    hidden, head = student_hidden.bfloat16().requires_grad_(), student_head.bfloat16().requires_grad_()
    loss = lm_kd_loss(LMHeadInputs(hidden, head), teacher_logits, labels, chunk_size=2)
    loss.backward()
    assert loss.dtype == torch.float32 and head.grad.dtype == hidden.grad.dtype == torch.bfloat16
    torch.testing.assert_close(head.grad.float(), head32.grad, rtol=0.05, atol=0.02)
    torch.testing.assert_close(hidden.grad.float(), hidden32.grad, rtol=0.05, atol=0.02)


def test_head_inputs_bad_shapes_are_named():
    hidden, head, _, _, labels = _head_case(seed=15)
    with pytest.raises(ValueError, match=r"student_logits must be LMHeadInputs.*\(3, 5, 6\) and \(11, 7\)"):
        lm_kd_loss(LMHeadInputs(hidden, torch.randn(11, 7, dtype=hidden.dtype)), F.linear(hidden, head), labels)
    with pytest.raises(TypeError, match=r"teacher_logits.weight must be a torch.Tensor"):
        lm_kd_loss(F.linear(hidden, head), LMHeadInputs(hidden, head.tolist()), labels)
    with pytest.raises(ValueError, match=r"vocabulary has 11 entries and the teacher's 9"):
        lm_kd_loss(LMHeadInputs(hidden, head), LMHeadInputs(hidden, head[:9]), labels)
