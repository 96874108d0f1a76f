"""End to end on streamed datasets in their published layouts: Ray Train x DeepSpeed (2 CPU
workers, loader processes), registration in MLflow, and the registered model served by pyfunc.

- NYUD-v2 (LibMTL layout): a dense multi-task run, semseg + depth + normals, rectangular
  input, augmentation on, on the config's standard backbone shrunk to torchvision's
  ResNet-18 (dilated to output stride 8, ASPP heads), started from a local torchvision-format
  weights file that every worker loads.
- Office-Home: a multi-domain run (4 domains, one shared 65-class head), domain sampling,
  on the small trunk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_e2e import _load_candidate  # tests/train is on sys.path (pytest's rootdir mode)

from mtl.config import load_config
from mtl.train.launch import fit

pytestmark = pytest.mark.slow


def tiny(config: str, root: Path, tmp: Path, *extra: str):
    return load_config(
        config,
        [
            f"data.root={root}",
            "model.width=8",
            "model.depth=2",
            "tasks.baseline=",
            "data.loader_workers=1",
            "train.num_workers=2",
            "train.cpus_per_worker=1",
            "train.micro_batch_size=4",
            "train.max_steps=6",
            "train.log_every_steps=3",
            "train.val_every_steps=6",
            "train.checkpoint_every_steps=6",
            f"train.storage_path={tmp / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
            "deepspeed.zero_stage=1",
            "tracking.register_above_chance=false",  # 6 steps: registration's path is tested
            *extra,
        ],
    )


def _history(result, key: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(result.tracking_uri)
    return [m.value for m in client.get_metric_history(result.mlflow_run_id, key)]


def test_nyuv2_dense_multitask_trains_registers_and_serves(tmp_path, ray_session):
    import torch
    import torchvision

    from mtl.data.synthetic_layouts_dense import write_nyuv2_libmtl

    root = write_nyuv2_libmtl(tmp_path / "nyuv2", 24, 8, (24, 32))
    weights = tmp_path / "resnet18.pth"  # the published format, random (seeded) values
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    cfg = tiny(
        "configs/nyuv2.yaml",
        root,
        tmp_path,
        "data.image_size=[16,24]",
        "model.backbone=resnet18",
        f"model.pretrained={weights}",
        "model.head_channels=8",
    )
    assert (cfg.model.output_stride, cfg.model.dense_head) == (8, "aspp")
    result = fit(cfg, run_name="nyuv2-tiny")
    m = result.metrics
    assert m["step"] == 6
    for key in ("semseg/miou", "depth/abs_err", "depth/rel_err", "normals/mean_angle"):
        assert np.isfinite(m[f"val/{key}"]), key
    assert 0.0 <= m["val/normals/within_11.25"] <= m["val/normals/within_30"] <= 1.0
    waits = _history(result, "train/data_wait_fraction")
    assert len(waits) == 2 and all(0.0 <= w <= 1.0 for w in waits)
    assert result.model_version is not None
    model = _load_candidate(result.tracking_uri, cfg.tracking.model_name or "nyuv2-hard_sharing")
    x = np.random.default_rng(0).random((2, 3, 16, 24), dtype=np.float32)
    out = model.predict(x)
    assert out["semseg"].shape == (2, 13, 16, 24)
    assert out["depth"].shape == (2, 1, 16, 24) and out["normals"].shape == (2, 3, 16, 24)


def test_office_home_multidomain_trains_registers_and_serves(tmp_path, ray_session):
    from mtl.data.synthetic_layouts import write_office_home

    root = tmp_path / "office_home"
    write_office_home(root, per_class=3, used_classes=3, size=(20, 24))
    cfg = tiny(
        "configs/office_home.yaml",
        root,
        tmp_path,
        "data.image_size=16",
        "model.backbone=resnet",
        "model.pretrained=",
    )
    result = fit(cfg, run_name="office-home-tiny")
    m = result.metrics
    for domain in ("Art", "Clipart", "Product", "Real_World"):
        assert 0.0 <= m[f"val/{domain}/accuracy"] <= 1.0
    assert result.model_version is not None
    model = _load_candidate(
        result.tracking_uri, cfg.tracking.model_name or "office_home-hard_sharing"
    )
    x = np.random.default_rng(0).random((2, 3, 16, 16), dtype=np.float32)
    (head,) = model.predict(x).values()
    assert head.shape == (2, 65)
