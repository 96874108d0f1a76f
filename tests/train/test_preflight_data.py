"""Driver-side data checks that fail before Ray starts (no Ray in these tests)."""

from __future__ import annotations

import pytest

from mtl.config import load_config
from mtl.data.synthetic_layouts import write_celeba
from mtl.train.launch import preflight


def test_a_split_smaller_than_one_batch_per_worker_fails_before_ray(tmp_path):
    write_celeba(tmp_path / "celeba", 20, 4, (24, 20))
    cfg = load_config(
        "configs/celeba.yaml",
        [
            f"data.root={tmp_path / 'celeba'}",
            "model.pretrained=",  # the config names ImageNet weights, absent here
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "train.num_workers=2",
            "train.micro_batch_size=16",
        ],
    )
    with pytest.raises(ValueError, match=r"20 training samples over train.num_workers=2"):
        preflight(cfg)
    cfg.train.micro_batch_size = 8
    assert preflight(cfg)["baseline"] is None  # 10 per worker: fits
