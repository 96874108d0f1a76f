"""Driver-side data checks that fail before Ray starts (no Ray in these tests)."""

from __future__ import annotations

import logging

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


def _baseline_cfg(tmp_path, table):
    import json

    (tmp_path / "baseline.json").write_text(json.dumps(table))
    return load_config(
        "configs/tiny.yaml",
        [
            "tasks.names=[left,semseg]",
            f"tasks.baseline={tmp_path / 'baseline.json'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ],
    )


GOOD_TASKS = {
    "left": {"metric": "left/accuracy", "value": 0.9, "higher_is_better": True},
    "semseg": {"metric": "semseg/miou", "value": 0.5, "higher_is_better": True},
}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"benchmark": "celeba"}, "is for benchmark 'celeba', not 'multimnist'"),
        (
            {
                "tasks": {
                    **GOOD_TASKS,
                    "semseg": {**GOOD_TASKS["semseg"], "metric": "semseg/pixacc"},
                }
            },
            "baseline tasks.semseg scores 'semseg/pixacc'",
        ),
        (
            {"tasks": {**GOOD_TASKS, "left": {**GOOD_TASKS["left"], "higher_is_better": False}}},
            "higher_is_better=False",
        ),
        ({"tasks": {"left": GOOD_TASKS["left"]}}, r"no entry for \['semseg'\]"),
    ],
)
def test_a_baseline_table_for_another_setup_is_refused_before_ray(tmp_path, change, message):
    table = {"benchmark": "multimnist", "config": {}, "tasks": GOOD_TASKS, **change}
    with pytest.raises(ValueError, match=f"does not fit this run: .*{message}.*mtl baseline"):
        preflight(_baseline_cfg(tmp_path, table))


def test_a_baseline_from_another_backbone_or_input_size_is_warned_about(
    tmp_path, caplog, cache_dir, monkeypatch
):
    # mtl.log.configure (run by CLI tests in this process) stops propagation to the root logger.
    monkeypatch.setattr(logging.getLogger("mtl"), "propagate", True)
    config = {"model": {"backbone": "vit"}, "data": {"image_size": 28}}
    table = {"benchmark": "multimnist", "config": config, "tasks": GOOD_TASKS}
    cfg = _baseline_cfg(tmp_path, table)
    cfg.data.cache_dir = str(cache_dir)
    with caplog.at_level("WARNING", logger="mtl"):
        assert preflight(cfg)["baseline"] == {"left": 0.9, "semseg": 0.5}
    out = caplog.text
    assert "built with model.backbone='vit', this run uses 'resnet'" in out
    assert "built with data.image_size=28, this run uses 36" in out
