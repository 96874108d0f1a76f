"""Task losses, domain masking, weight normalisation and scalarization."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mtl.losses import (
    IGNORE_INDEX,
    domain_counts,
    head_loss,
    normalize_weights,
    per_sample_loss,
    scalarize,
    task_losses,
)
from mtl.tasks import (
    BINARY,
    CLASSIFICATION,
    DENSE_CLASSIFICATION,
    DENSE_REGRESSION,
    DEPTH,
    NORMALS,
    SALIENCY,
    TASK_KINDS,
    TaskSet,
    TaskSpec,
)

MULTI_TASK = TaskSet(
    "toy",
    (
        TaskSpec("left", CLASSIFICATION, 3, "accuracy", True),
        TaskSpec("semseg", DENSE_CLASSIFICATION, 2, "miou", True),
        TaskSpec("recon", DENSE_REGRESSION, 1, "rmse", False),
    ),
    in_channels=1,
    image_size=2,
)
DIGITS = TaskSet(
    "digits",
    (TaskSpec("digit", CLASSIFICATION, 2, "accuracy", True),),
    in_channels=3,
    image_size=28,
    domains=("mnist", "mnist_m", "optdigits"),
)


def ce(logits: list[float], label: int) -> float:
    """Cross-entropy of one sample, by hand."""
    return math.log(sum(math.exp(v) for v in logits)) - logits[label]


def bce(logit: float, label: int) -> float:
    """Binary cross-entropy with a logit, by hand: -log σ(x) or -log(1 - σ(x))."""
    return math.log(1 + math.exp(-logit if label == 1 else logit))


# One head per kind, with the number of outputs its targets need.
SPECS = {
    CLASSIFICATION: TaskSpec("cls", CLASSIFICATION, 3, "accuracy", True),
    DENSE_CLASSIFICATION: TaskSpec("seg", DENSE_CLASSIFICATION, 3, "miou", True),
    DENSE_REGRESSION: TaskSpec("reg", DENSE_REGRESSION, 2, "rmse", False),
    BINARY: TaskSpec("attr", BINARY, 1, "accuracy", True),
    DEPTH: TaskSpec("depth", DEPTH, 1, "abs_err", False),
    NORMALS: TaskSpec("normals", NORMALS, 3, "mean_angle", False),
    SALIENCY: TaskSpec("sal", SALIENCY, 1, "max_f", True),
}


def random_pair(kind: str, n: int, size: tuple[int, int] = (3, 5)) -> tuple[Tensor, Tensor]:
    """Random (output, target) of ``kind`` in which about a third is unlabelled."""
    k = SPECS[kind].num_outputs
    drop = torch.rand(n, *size) < 0.3  # (B, H, W)
    if kind == CLASSIFICATION:
        target = torch.randint(0, k, (n,)).masked_fill(torch.rand(n) < 0.3, IGNORE_INDEX)
        return torch.randn(n, k), target
    if kind == BINARY:
        return torch.randn(n), torch.randint(-1, 2, (n,)).float()  # -1: unlabelled
    if kind == DENSE_CLASSIFICATION:
        return torch.randn(n, k, *size), torch.randint(0, k, (n, *size)).masked_fill(
            drop, IGNORE_INDEX
        )
    if kind == DEPTH:
        return torch.randn(n, 1, *size), (torch.rand(n, 1, *size) + 0.5) * ~drop[:, None]
    if kind == NORMALS:
        target = F.normalize(torch.randn(n, 3, *size), dim=1) * ~drop[:, None]
        return torch.randn(n, 3, *size), target
    if kind == SALIENCY:
        target = torch.randint(0, 2, (n, 1, *size)).float().masked_fill(drop[:, None], 255)
        return torch.randn(n, 1, *size), target
    return torch.randn(n, k, *size), torch.randn(n, k, *size)


def test_binary_loss_skips_unlabelled_samples() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, 4.0])
    target = torch.tensor([1.0, 0.0, -1.0, -1.0])  # the last two carry no label
    expected = (bce(2.0, 1) + bce(-1.0, 0)) / 2
    assert head_loss(SPECS[BINARY], logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_depth_loss_is_l1_over_measured_pixels() -> None:
    output = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    target = torch.tensor([0.0, 1.0, 5.0, 0.0]).view(1, 1, 2, 2)  # 0: no measurement
    assert head_loss(SPECS[DEPTH], output, target).item() == pytest.approx((1 + 2) / 2)


def test_normals_loss_is_one_minus_cosine_over_labelled_pixels() -> None:
    # pixels: same direction (scaled), orthogonal, 45 degrees, unlabelled (zero target)
    pred = torch.tensor([[2.0, 0, 0], [0, 3.0, 0], [1.0, 1.0, 0], [5.0, 1.0, 2.0]])
    gt = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 0]])
    output, target = pred.T.reshape(1, 3, 1, 4), gt.T.reshape(1, 3, 1, 4)  # (1, 3, 1, 4)
    expected = (0 + 1 + (1 - 1 / math.sqrt(2))) / 3
    loss = head_loss(SPECS[NORMALS], output, target)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_saliency_loss_ignores_values_outside_zero_one() -> None:
    output = torch.tensor([1.0, -2.0, 3.0, 0.0]).view(1, 1, 2, 2)
    target = torch.tensor([1.0, 0.0, 255.0, -1.0]).view(1, 1, 2, 2)
    expected = (bce(1.0, 1) + bce(-2.0, 0)) / 2
    assert head_loss(SPECS[SALIENCY], output, target).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("kind", TASK_KINDS)
def test_per_sample_loss_groups_match_head_loss(kind: str) -> None:
    torch.manual_seed(1)
    spec = SPECS[kind]
    output, target = random_pair(kind, 8)
    sums, counts = per_sample_loss(spec, output, target)
    assert sums.shape == counts.shape == (8,)
    whole = head_loss(spec, output, target)
    torch.testing.assert_close(sums.sum() / counts.sum(), whole)
    group = torch.tensor([0, 2, 3, 6])  # any group of samples: its mean is head_loss on it
    torch.testing.assert_close(
        sums[group].sum() / counts[group].sum().clamp(min=1),
        head_loss(spec, output[group], target[group]),
    )


def unlabelled_target(kind: str, output: Tensor) -> Tensor:
    """A target of ``kind`` for ``output`` in which nothing is labelled."""
    if kind in (CLASSIFICATION, DENSE_CLASSIFICATION):
        shape = output.shape[:1] + output.shape[2:]  # drop the class dim
        return torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    return {
        BINARY: torch.full_like(output, -1.0),
        DEPTH: torch.zeros_like(output),
        NORMALS: torch.zeros_like(output),
        SALIENCY: torch.full_like(output, 255.0),
    }[kind]


@pytest.mark.parametrize("kind", [k for k in TASK_KINDS if k != DENSE_REGRESSION])
def test_all_unlabelled_batch_is_a_connected_zero(kind: str) -> None:
    spec = SPECS[kind]
    output = random_pair(kind, 4)[0].requires_grad_()
    target = unlabelled_target(kind, output.detach())
    loss = head_loss(spec, output, target)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert output.grad is not None and (output.grad == 0).all()
    sums, counts = per_sample_loss(spec, output.detach(), target)
    assert (sums == 0).all() and (counts == 0).all()


def test_domain_losses_of_a_binary_head() -> None:
    taskset = TaskSet("attrs", (SPECS[BINARY],), 3, 8, domains=("a", "b"))
    logits = torch.tensor([1.0, -2.0, 0.5, 3.0])
    batch = {
        "targets": {"attr": torch.tensor([1.0, 1.0, -1.0, 0.0])},
        "domain": torch.tensor([0, 1, 0, 1]),
    }
    losses = task_losses({"attr": logits}, batch, taskset)
    assert losses["a"].item() == pytest.approx(bce(1.0, 1), rel=1e-6)  # sample 2 unlabelled
    assert losses["b"].item() == pytest.approx((bce(-2.0, 1) + bce(3.0, 0)) / 2, rel=1e-6)


def test_multi_task_losses_match_hand_computation() -> None:
    outputs = {
        "left": torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]]),
        "semseg": torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]]),  # (1, 2, 1, 2)
        "recon": torch.tensor([[[[0.5, 1.0]]]]),  # (1, 1, 1, 2)
    }
    batch = {
        "targets": {
            "left": torch.tensor([1, 0]),
            "semseg": torch.tensor([[[0, IGNORE_INDEX]]]),  # the ignored pixel must not count
            "recon": torch.tensor([[[[0.0, 0.0]]]]),
        }
    }
    losses = task_losses(outputs, batch, MULTI_TASK)
    assert list(losses) == ["left", "semseg", "recon"]
    expected_left = (ce([1, 2, 0], 1) + ce([0, 0, 3], 0)) / 2
    assert losses["left"].item() == pytest.approx(expected_left, rel=1e-6)
    assert losses["semseg"].item() == pytest.approx(ce([2, 0], 0), rel=1e-6)
    assert losses["recon"].item() == pytest.approx((0.25 + 1.0) / 2, rel=1e-6)
    assert all(v.ndim == 0 for v in losses.values())


def test_domain_losses_mask_samples_by_domain() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, 0.0]], requires_grad=True)
    batch = {
        "targets": {"digit": torch.tensor([0, 0, 1, 1])},
        "domain": torch.tensor([0, 1, 1, 0]),  # no optdigits sample in this batch
    }
    losses = task_losses({"digit": logits}, batch, DIGITS)
    assert list(losses) == ["mnist", "mnist_m", "optdigits"]
    assert losses["mnist"].item() == pytest.approx((ce([2, 0], 0) + ce([3, 0], 1)) / 2, rel=1e-6)
    assert losses["mnist_m"].item() == pytest.approx((ce([0, 1], 0) + ce([1, 1], 1)) / 2, rel=1e-6)
    assert losses["optdigits"].item() == 0.0


def test_absent_domain_still_reaches_every_parameter() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    batch = {
        "image": torch.rand(4, 1, 3, 4),
        "targets": {"digit": torch.tensor([0, 1, 1, 0])},
        "domain": torch.tensor([0, 0, 1, 1]),
    }
    losses = task_losses({"digit": model(batch["image"])}, batch, DIGITS)
    # Only the absent domain's loss is back-propagated: the graph must still exist.
    assert losses["optdigits"].requires_grad
    losses["optdigits"].backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert (param.grad == 0).all()


def test_domain_counts() -> None:
    batch = {"domain": torch.tensor([2, 0, 2, 2])}
    counts = domain_counts(batch, DIGITS)
    assert {k: int(v) for k, v in counts.items()} == {"mnist": 1, "mnist_m": 0, "optdigits": 3}
    with pytest.raises(ValueError, match="multi-task"):
        domain_counts(batch, MULTI_TASK)


def test_missing_target_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="no target for head 'left'"):
        task_losses({"left": torch.zeros(1, 3)}, {"targets": {}}, MULTI_TASK)
    with pytest.raises(KeyError, match="no output for head 'semseg'"):
        task_losses({"left": torch.zeros(1, 3)}, {"targets": {"left": torch.zeros(1)}}, MULTI_TASK)
    with pytest.raises(KeyError, match="'domain'"):
        task_losses({"digit": torch.zeros(1, 2)}, {"targets": {"digit": torch.zeros(1)}}, DIGITS)


def test_normalize_weights_uniform_and_scaled() -> None:
    keys = ["a", "b", "c", "d"]
    assert normalize_weights({}, keys) == {k: 0.25 for k in keys}
    weights = normalize_weights({"a": 2, "b": 1, "c": 1, "d": 0}, keys)
    assert weights == {"a": 0.5, "b": 0.25, "c": 0.25, "d": 0.0}
    assert list(weights) == keys


@pytest.mark.parametrize(
    "weights, match",
    [
        ({"a": 1.0, "b": 1.0, "z": 1.0}, r"unknown key\(s\) \['z'\]; valid keys: \['a', 'b'\]"),
        ({"a": 1.0}, r"no weight for \['b'\]"),
        ({"a": 1.0, "b": -0.5}, "negative"),
        ({"a": 0.0, "b": 0.0}, "all zero"),
        ({"a": float("nan"), "b": 1.0}, "non-finite"),
    ],
)
def test_normalize_weights_errors(weights: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        normalize_weights(weights, ["a", "b"])
    assert "tasks.weights" in str(err.value)


def test_scalarize_is_the_weighted_sum() -> None:
    a = torch.tensor(2.0, requires_grad=True)
    b = torch.tensor(4.0, requires_grad=True)
    total = scalarize({"a": a, "b": b}, {"a": 0.25, "b": 0.75})
    assert total.item() == pytest.approx(3.5)
    total.backward()
    assert a.grad.item() == pytest.approx(0.25) and b.grad.item() == pytest.approx(0.75)
    tensor_weights = {"a": torch.tensor(0.5), "b": torch.tensor(0.5)}
    assert scalarize({"a": a, "b": b}, tensor_weights).item() == pytest.approx(3.0)
    with pytest.raises(KeyError, match="differ"):
        scalarize({"a": a}, {"a": 0.5, "b": 0.5})
