"""Backbone weights from a local file (``model.pretrained``): read safely, mapped, checked.

A file is read with ``safetensors`` (``.safetensors``) or ``torch.load(weights_only=True)``
(anything else, e.g. torchvision's ``.pth``), so no code in it runs. The backbone maps the
library's keys to its own (``pretrained_state``: torchvision's ``layer3.1.conv2`` is
``blocks.5.conv2``, a ViT's position embedding is resampled to the configured grid) and
grey images adapt the first convolution (timm's ``adapt_input_conv``: summed over RGB).
Then every key must fit: missing, unexpected or mis-shaped keys are listed in one error and
nothing is loaded. Nothing is downloaded; a missing file says where the published one is.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn

# Checkpoint containers that hold the state dict one level down.
_CONTAINERS = ("state_dict", "model", "model_state_dict", "module")
_SHOWN = 6  # keys listed per kind of mismatch


class PretrainedWeightsError(ValueError):
    """A ``model.pretrained`` file that cannot be read or does not fit the backbone."""


class MissingWeightsError(FileNotFoundError):
    """No file at ``model.pretrained``; the message says where the published one is."""


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a weights file, keyed by name (a container's ``state_dict`` unwrapped,
    a ``module.`` prefix from DataParallel removed).

    Raises:
        FileNotFoundError: No such file.
        PretrainedWeightsError: Truncated, corrupt, or not a file of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - each reader has its own error types
        raise PretrainedWeightsError(
            f"model.pretrained={path}: cannot read it as weights ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}). The file is truncated or not a torchvision "
            ".pth / timm .safetensors file; download it again"
        ) from None
    for key in _CONTAINERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise PretrainedWeightsError(
            f"model.pretrained={path}: holds no state dict of tensors (a {type(state).__name__})"
        )
    return {k.removeprefix("module."): v for k, v in state.items()}


def guess_architecture(state: dict[str, Tensor]) -> str:
    """A readable guess of what a library state dict is for, e.g. "resnet50" or
    "ViT with 768-dim tokens, 12 blocks, patch 16" ("" if unknown): for error messages."""
    stages = [
        len({m.group(1) for k in state if (m := re.match(rf"layer{s}\.(\d+)\.", k))})
        for s in (1, 2, 3, 4)
    ]
    if all(stages):
        bottleneck = any(".conv3." in k for k in state)
        known = {(2, 2, 2, 2, False): "resnet18", (3, 4, 6, 3, False): "resnet34",
                 (3, 4, 6, 3, True): "resnet50", (3, 4, 23, 3, True): "resnet101",
                 (3, 8, 36, 3, True): "resnet152"}  # fmt: skip
        return known.get((*stages, bottleneck), f"a ResNet with stages {stages}")
    patch = state.get("patch_embed.proj.weight")
    if patch is not None and patch.ndim == 4:
        blocks = len({m.group(1) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
        return f"a ViT with {patch.shape[0]}-dim tokens, {blocks} blocks, patch {patch.shape[-1]}"
    return ""


def load_pretrained(backbone: nn.Module, path: str | Path, name: str) -> None:
    """Load ``path`` into ``backbone`` (built as ``model.backbone=name``), all or nothing.

    Raises:
        MissingWeightsError: No such file; says where the published weights come from.
        PretrainedWeightsError: Unreadable, or keys that do not fit (listed).
    """
    from mtl.models.standard import WEIGHT_SOURCES

    try:
        raw = read_weights(path)
    except FileNotFoundError:
        source = WEIGHT_SOURCES.get(name)
        where = (
            f"Download {source} on a machine with internet access and copy the file to "
            f"{path} (on every node, or on shared storage)"
            if source
            else f"For model.backbone={name}, save a backbone state dict there with torch.save"
        )
        raise MissingWeightsError(
            f"model.pretrained={path}: no such file. Nothing is downloaded at run time. {where}, "
            "or set model.pretrained= to start from random weights"
        ) from None
    mapped = backbone.pretrained_state(raw) if hasattr(backbone, "pretrained_state") else raw
    expected = backbone.state_dict()
    first = getattr(backbone, "first_conv", None)
    if first in mapped and first in expected and mapped[first].ndim == 4:
        channels = expected[first].shape[1]
        if mapped[first].shape[1] == 3 and channels != 3:
            from timm.models import adapt_input_conv

            mapped[first] = adapt_input_conv(channels, mapped[first])
    # BatchNorm fills a missing counter itself (torchvision's older files have none).
    missing = [k for k in expected if k not in mapped and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in mapped if k not in expected]
    shapes = [
        f"{k} {tuple(mapped[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in mapped and mapped[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        guess = guess_architecture(raw)
        problems = [
            f"{len(items)} {what} ({', '.join(items[:_SHOWN])}{', ...' * (len(items) > _SHOWN)})"
            for what, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches (file != model)", shapes),
            )
            if items
        ]
        raise PretrainedWeightsError(
            f"model.pretrained={path} does not fit model.backbone={name}: "
            + "; ".join(problems)
            + (f". The file looks like weights for {guess}" if guess else "")
            + ". Nothing was loaded: use weights of the configured architecture, or set "
            "model.backbone to the file's"
        )
    backbone.load_state_dict(mapped, strict=False)  # checked above; strict would want counters
