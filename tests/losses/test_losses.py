"""Task losses, domain masking, weight normalisation and scalarization."""

from __future__ import annotations

import math

import pytest
import torch

from mtl.losses import (
    IGNORE_INDEX,
    domain_counts,
    normalize_weights,
    scalarize,
    task_losses,
)
from mtl.tasks import CLASSIFICATION, DENSE_CLASSIFICATION, DENSE_REGRESSION, TaskSet, TaskSpec

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
