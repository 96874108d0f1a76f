"""Loading ``model.pretrained`` has a real effect: a ResNet-18 started from a local
torchvision-format file (pretrained here on RGB digits, as ImageNet weights are RGB) learns a
related task on grey images faster than the same run, same seed and batches, from random
initialisation.

The loss compared is the progressive-validation loss: each batch is scored by the model
before it trains on that batch, so every scored image is unseen. Only rows with a real image
are used (the committed MNIST fixture blanks the rows the suite never draws).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtl.config import ModelConfig
from mtl.data.mnist_family import load_split
from mtl.models import build_model
from mtl.tasks import CLASSIFICATION, TaskSet, TaskSpec
from mtl.train.step import compute_loss

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

PRETRAIN_STEPS, STEPS, BATCH, LR = 40, 20, 32, 3e-4  # LR: a fine-tuning learning rate


def _images(raw: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 32, 32) in [0, 1], zero-padded to 32 px."""
    return F.pad(torch.from_numpy(raw.copy()).float().div(255).unsqueeze(1), (2, 2, 2, 2))


def _pretrain(x: torch.Tensor, y: torch.Tensor, path) -> None:
    """A torchvision resnet18 trained briefly on RGB digits, saved as torchvision saves."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=10)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for step in range(PRETRAIN_STEPS):
        i = torch.arange(step * 64, (step + 1) * 64) % len(x)
        loss = F.cross_entropy(net(x[i].expand(-1, 3, -1, -1)), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(net.state_dict(), path)


def _online_loss(cfg: ModelConfig, taskset: TaskSet, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean loss of the second half of STEPS Adam steps, each batch scored before its step."""
    torch.manual_seed(1)
    model = build_model(cfg, taskset)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    scored = []
    for step in range(STEPS):
        i = torch.arange(step * BATCH, (step + 1) * BATCH)
        batch = {"image": x[i], "targets": {"parity": y[i]}}
        loss, _ = compute_loss(model, batch, taskset, {"parity": 1.0})
        scored.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return sum(scored[STEPS // 2 :]) / (STEPS - STEPS // 2)


def test_pretrained_file_lowers_the_loss_after_n_steps(data_root, tmp_path) -> None:
    images, labels = load_split("mnist", data_root, "train")
    real = np.flatnonzero(images.reshape(len(images), -1).any(axis=1))  # fixture: 2,087 rows
    assert len(real) >= 1400 + STEPS * BATCH
    pretrain, finetune = real[:1400], real[1400 : 1400 + STEPS * BATCH]
    weights = tmp_path / "resnet18-digits.pth"
    _pretrain(_images(images[pretrain]), torch.from_numpy(labels[pretrain]), weights)

    # The related task: odd vs even digits, on grey images the pretrained net never saw.
    x, parity = _images(images[finetune]), torch.from_numpy(labels[finetune] % 2)
    taskset = TaskSet("parity", (TaskSpec("parity", CLASSIFICATION, 2, "accuracy", True),), 1, 32)
    random_init = _online_loss(ModelConfig(backbone="resnet18"), taskset, x, parity)
    pretrained = _online_loss(
        ModelConfig(backbone="resnet18", pretrained=str(weights)), taskset, x, parity
    )
    print(
        f"loss over steps {STEPS // 2}-{STEPS}: pretrained {pretrained:.3f}, "
        f"random {random_init:.3f}"
    )
    # Measured: ratio 0.52-0.75 over fine-tuning seeds 1-3 on the fixture and the full data.
    assert pretrained < 0.9 * random_init, (pretrained, random_init)
