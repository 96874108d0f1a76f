"""Standard backbones: our parameter and FLOP counts against the published ones, and the
cost of the hard-sharing models that the shipped configs build on them.

``trunks``: torchvision's ResNet-18/34/50 and timm's ViT-S/16 at 3x224x224, without their
classifiers (as ``mtl.models.standard`` builds them). Ours: ``count_params`` and
``count_flops`` (torch's FLOP counter, 2 FLOPs per multiply-add, so GMACs = GFLOPs / 2).
Published, with the 1000-class classifier subtracted (its MACs equal its weights):

- ResNets: torchvision's weight enums (``meta["num_params"]``, ``meta["_ops"]`` in giga
  multiply-adds), read without downloading anything.
- ViT-S/16: timm's model card of ``vit_small_patch16_224.augreg_in21k_ft_in1k``
  (huggingface.co/timm/vit_small_patch16_224.augreg_in21k_ft_in1k, "Model Stats"):
  22.1 M params, 4.6 GMACs at 224x224, head included. Both are rounded to 0.1, so a ratio
  within about 0.5% (params) or 1% (GMACs) of 1 is a match.

``models``: whole hard-sharing models (trunk and heads) of configs/nyuv2.yaml,
configs/celeba.yaml and configs/office_home.yaml (also with ``model.backbone=vit_s16``),
built with random weights (``model.pretrained=``) and counted on one image of the config's
size.

    .venv/bin/python benchmarks/backbones.py --threads 1
    .venv/bin/python benchmarks/backbones.py --table benchmarks/results/backbones.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from mtl.config import ModelConfig, load_config
from mtl.models import BACKBONES, build_model
from mtl.models.flops import count_flops, count_params
from mtl.train.loop import active_taskset

RESULTS = Path(__file__).parent / "results" / "backbones.json"
SIZE = (224, 224)
CLASSES = 1000  # the ImageNet classifier the published figures include

# timm's model card of vit_small_patch16_224.augreg_in21k_ft_in1k (Model Stats), head included.
VIT_S16_CARD = {"params_m": 22.1, "gmacs": 4.6, "features": 384}
VIT_S16_SOURCE = "huggingface.co/timm/vit_small_patch16_224.augreg_in21k_ft_in1k (model card)"

# (dataset, config, overrides) of the hard-sharing models measured.
MODELS = [
    ("NYUD-v2", "configs/nyuv2.yaml", ["data.nyuv2_layout=libmtl"]),
    ("CelebA", "configs/celeba.yaml", []),
    ("Office-Home", "configs/office_home.yaml", []),
    ("Office-Home", "configs/office_home.yaml", ["model.backbone=vit_s16"]),
]


def published(name: str) -> dict[str, Any]:
    """Published trunk figures (classifier subtracted): params, GMACs, and their source."""
    if name == "vit_s16":
        fc = VIT_S16_CARD["features"] * CLASSES + CLASSES
        return {
            "params": VIT_S16_CARD["params_m"] * 1e6 - fc,
            "gmacs": VIT_S16_CARD["gmacs"] - fc / 1e9,  # MACs of a linear = its weights
            "source": VIT_S16_SOURCE,
        }
    import torchvision.models as tvm

    enum = {"resnet18": tvm.ResNet18_Weights, "resnet34": tvm.ResNet34_Weights}.get(
        name, tvm.ResNet50_Weights
    )
    weights = enum.IMAGENET1K_V1
    features = 2048 if name == "resnet50" else 512
    return {
        "params": weights.meta["num_params"] - (features * CLASSES + CLASSES),
        "gmacs": weights.meta["_ops"] - features * CLASSES / 1e9,
        "source": f"torchvision {type(weights).__name__}.IMAGENET1K_V1.meta",
    }


def trunk_row(name: str) -> dict[str, Any]:
    """Our counts of one backbone at 3x224x224 next to the published ones."""
    torch.manual_seed(0)
    backbone = BACKBONES[name](ModelConfig(backbone=name), 3, SIZE)
    flops = count_flops(backbone, torch.zeros(1, 3, *SIZE))
    pub = published(name)
    return {
        "part": "trunk",
        "backbone": name,
        "input": f"3x{SIZE[0]}x{SIZE[1]}",
        "params": count_params(backbone),
        "flops": flops,
        "published_params": pub["params"],
        "published_gmacs": pub["gmacs"],
        "source": pub["source"],
    }


def model_row(label: str, path: str, overrides: list[str]) -> dict[str, Any]:
    """Params and FLOPs (per image) of a config's whole hard-sharing model and its trunk."""
    overrides = ["model.pretrained=", "tasks.baseline=", *overrides]
    cfg = load_config(path, overrides)
    taskset = active_taskset(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model, taskset)
    x = torch.zeros(1, taskset.in_channels, *taskset.image_size)
    start = time.perf_counter()
    flops = count_flops(model, x)
    print(f"{label} {cfg.model.backbone}: counted in {time.perf_counter() - start:.1f} s")
    return {
        "part": "model",
        "dataset": label,
        "config": path,
        "overrides": overrides,
        "model": cfg.model.name,
        "backbone": cfg.model.backbone,
        "output_stride": model.backbone.output_stride,
        "input": f"{taskset.in_channels}x{taskset.image_size[0]}x{taskset.image_size[1]}",
        "heads": len(taskset.heads),
        "head_kinds": sorted({h.kind for h in taskset.heads}),
        "params": count_params(model),
        "flops": flops,
        "trunk_params": count_params(model.backbone),
        "trunk_flops": count_flops(model.backbone, x),
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown tables of stored rows (the README's are printed by this function)."""
    lines = []
    trunks = [r for r in rows if r["part"] == "trunk"]
    if trunks:
        lines += [
            "| backbone | input | params ours (M) | params published (M) | GMACs ours | "
            "GMACs published | params ratio | GMACs ratio |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in trunks:
            gmacs = r["flops"] / 2e9
            lines.append(
                f"| {r['backbone']} | {r['input']} | {r['params'] / 1e6:.3f} | "
                f"{r['published_params'] / 1e6:.3f} | {gmacs:.3f} | {r['published_gmacs']:.3f} "
                f"| {r['params'] / r['published_params']:.3f} | "
                f"{gmacs / r['published_gmacs']:.3f} |"
            )
    models = [r for r in rows if r["part"] == "model"]
    if models:
        lines += [
            "",
            "| dataset | backbone (output stride) | input | heads | params (M) | GFLOPs | "
            "GMACs | trunk share of params | trunk share of FLOPs |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in models:
            lines.append(
                f"| {r['dataset']} | {r['backbone']} ({r['output_stride']}) | {r['input']} | "
                f"{r['heads']} {'/'.join(r['head_kinds'])} | {r['params'] / 1e6:.2f} | "
                f"{r['flops'] / 1e9:.2f} | {r['flops'] / 2e9:.2f} | "
                f"{r['trunk_params'] / r['params']:.1%} | {r['trunk_flops'] / r['flops']:.1%} |"
            )
    return "\n".join(lines)


def versions() -> dict[str, str]:
    import timm
    import torchvision

    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--table", type=Path, help="print the tables of a result file")
    ns = parser.parse_args()
    if ns.table:
        print(table(json.loads(ns.table.read_text())["rows"]))
        return
    torch.set_num_threads(ns.threads)
    rows = [trunk_row(name) for name in ("resnet18", "resnet34", "resnet50", "vit_s16")]
    rows += [model_row(*case) for case in MODELS]
    meta = {
        **versions(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.ctime(),
        "counter": "torch.utils.flop_counter via mtl.models.flops (2 FLOPs per multiply-add)",
    }
    ns.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
