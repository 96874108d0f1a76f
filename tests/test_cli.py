"""Bad input through the real CLI: one clear line, exit code 2, and no Ray started."""

from __future__ import annotations

import socket

import pytest

from mtl.cli import main

TINY = "configs/tiny.yaml"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch, cache_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield


def _train(capsys, *args: str) -> str:
    from pathlib import Path

    config = str(Path(__file__).resolve().parent.parent / TINY)
    ray_before = _ray_up()  # the session's Ray is up already when slow tests ran first
    assert main(["train", config, *args]) == 2
    err = capsys.readouterr().err
    # The refusal comes last (one line; a missing dataset's lists the files); before it only
    # the project's own progress lines (a dataset cache built before a later check).
    lines = err.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("mtl: "))
    assert "Traceback" not in err and all(ln.startswith("[mtl] ") for ln in lines[:first]), err
    assert _ray_up() == ray_before, "Ray was started before the bad input was refused"
    return "\n".join(lines[first:])


def _ray_up() -> bool:
    import sys

    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def test_unknown_key(capsys):
    assert "train.epocs" in _train(capsys, "train.epocs=1")


def test_wrong_type(capsys):
    assert "train.micro_batch_size" in _train(capsys, "train.micro_batch_size=big")


def test_negative_weight(capsys):
    assert "weights must be >= 0" in _train(capsys, "tasks.weights.left=-0.5")


def test_weight_for_an_unknown_task(capsys, cache_dir):
    err = _train(capsys, "tasks.weights={left: 1, nose: 1}", f"data.cache_dir={cache_dir}")
    assert "nose" in err and "tasks.weights" in err


def test_missing_dataset_says_where_to_put_it(capsys, tmp_path):
    err = _train(capsys, f"data.root={tmp_path / 'empty'}", f"data.cache_dir={tmp_path / 'cache'}")
    assert "train-images-idx3-ubyte" in err and "MTL_DATA_DIR" in err


def test_unreachable_mlflow(capsys, cache_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = _train(
        capsys, f"tracking.tracking_uri=http://127.0.0.1:{port}", f"data.cache_dir={cache_dir}"
    )
    assert "unreachable" in err


def test_resume_of_unknown_run(capsys, tmp_path, cache_dir):
    err = _train(
        capsys, "--resume", "nope", f"data.cache_dir={cache_dir}", f"train.storage_path={tmp_path}"
    )
    assert "no checkpoint to resume" in err


def test_reusing_a_run_name_is_refused_instead_of_silently_resuming(capsys, tmp_path, cache_dir):
    (tmp_path / "taken" / "checkpoint_00000004").mkdir(parents=True)
    err = _train(
        capsys, "--name", "taken", f"data.cache_dir={cache_dir}", f"train.storage_path={tmp_path}"
    )
    assert "already exists" in err and "--resume taken" in err
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["checkpoint_00000004"]


def _resnet_file(path, arch: str = "resnet50"):
    import torch
    import torchvision

    torch.save(getattr(torchvision.models, arch)(weights=None).state_dict(), path)
    return path


def test_weights_of_another_architecture(capsys, tmp_path):
    weights = _resnet_file(tmp_path / "resnet50.pth")
    err = _train(capsys, "model.backbone=resnet18", f"model.pretrained={weights}")
    assert "PretrainedWeightsError" in err and "does not fit model.backbone=resnet18" in err
    assert "looks like weights for resnet50" in err and "Nothing was loaded" in err


def test_truncated_weights_file(capsys, tmp_path):
    whole = _resnet_file(tmp_path / "whole.pth", "resnet18").read_bytes()
    cut = tmp_path / "resnet18-f37072fd.pth"
    cut.write_bytes(whole[: len(whole) // 2])
    err = _train(capsys, "model.backbone=resnet18", f"model.pretrained={cut}")
    assert "truncated" in err and str(cut) in err


def test_missing_weights_file_says_where_it_comes_from(capsys, tmp_path):
    weights = f"model.pretrained={tmp_path}/vit.safetensors"
    err = _train(capsys, "model.backbone=vit_s16", "data.image_size=32", weights)
    assert "MissingWeightsError" in err and "Nothing is downloaded" in err
    assert "huggingface.co/timm/vit_small_patch16_224" in err


def test_image_size_the_vit_patches_cannot_tile(capsys):
    err = _train(capsys, "model.backbone=vit_s16", "data.image_size=36")
    assert "data.image_size=36x36 cannot be tiled by model.patch_size=16" in err


def _failing_fit(monkeypatch):
    """A run that fails after it started: the driver raises RunFailed (MLflow run FAILED)."""
    import mtl.train.launch
    from mtl.train.guards import RunFailed

    def fit(cfg, **_):
        raise RunFailed("run tiny failed at step 8: worker died; continue it with --resume tiny")

    monkeypatch.setattr(mtl.train.launch, "fit", fit)


def test_internal_failure_is_one_line_and_exit_1(capsys, monkeypatch):
    _failing_fit(monkeypatch)
    assert main(["train", "train.max_steps=1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("mtl: train failed: RunFailed: run tiny failed at step 8")
    assert "--resume tiny" in err and "--verbose" in err


def test_verbose_prints_the_traceback(capsys, monkeypatch):
    _failing_fit(monkeypatch)
    assert main(["--verbose", "train", "train.max_steps=1"]) == 1
    assert "Traceback" in capsys.readouterr().err
    assert main(["train", "train.max_steps=1", "--verbose"]) == 1  # after the command too
    assert "Traceback" in capsys.readouterr().err


def test_config_errors_are_exit_2_with_verbose_too(capsys):
    assert main(["--verbose", "train", "train.lr=nan"]) == 2
    assert "train.lr=nan: must be a finite number" in capsys.readouterr().err


def test_a_registration_floor_on_a_metric_the_run_never_reports(capsys, cache_dir):
    err = _train(capsys, "tracking.register_if.left/miou=0.5", f"data.cache_dir={cache_dir}")
    assert "tracking.register_if" in err and "left/accuracy" in err


@pytest.mark.parametrize(
    ("flags", "level"),
    [(["-q"], "WARNING"), (["--quiet"], "WARNING"), ([], "INFO"), (["-v"], "DEBUG")],
)
def test_quiet_and_verbose_set_the_log_level_before_the_command_runs(capsys, flags, level):
    import logging

    try:
        for argv in ([*flags, "promote", "some-model"], ["promote", "some-model", *flags]):
            assert main(argv) == 2  # neither a version nor --best: refused after parsing
            assert logging.getLevelName(logging.getLogger("mtl").getEffectiveLevel()) == level
            assert "give a version or --best METRIC" in capsys.readouterr().err
    finally:
        main(["promote", "some-model"])  # back to the default level for later tests
        capsys.readouterr()


def test_quiet_and_verbose_together_are_refused(capsys):
    with pytest.raises(SystemExit) as done:  # a usage error, like argparse's own
        main(["-q", "-v", "promote", "some-model", "1"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "--quiet or --verbose, not both" in err and err.count("\n") == 1


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "tune", "baseline", "sweep-budget", "register", "promote"):
        assert command in out
    assert "predict" in out and "serve" in out and "exit codes" in out
