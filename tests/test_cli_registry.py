"""`mtl register` and `mtl promote` end to end: a real finished run, a real MLflow store."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mtl.cli import main

pytestmark = pytest.mark.slow

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
NAME = "tiny-cli"


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache_dir, data_root, ray_session):
    """One tiny run, trained and not registered: (run id, tracking URI, storage root)."""
    from mtl.config import load_config
    from mtl.train.launch import fit

    tmp = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = load_config(
        TINY,
        [
            "train.num_workers=1",
            "train.max_steps=8",
            "train.checkpoint_every_steps=8",
            "train.val_every_steps=8",
            f"train.storage_path={tmp / 'runs'}",
            f"tracking.tracking_uri={uri}",
            "tracking.register=false",
            "tracking.register_above_chance=false",  # 8 steps: the CLI path is under test
            f"data.cache_dir={cache_dir}",
            f"data.root={data_root}",
        ],
    )
    result = fit(cfg, run_name="for-cli")
    return result.mlflow_run_id, uri, tmp / "runs"


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ./mtl_runs, the default storage root, is not the run's
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _refused(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtl: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_register_then_promote(finished, capsys):
    run_id, uri, runs = finished
    argv = ["register", run_id, "--tracking-uri", uri, "--storage-path", str(runs)]
    assert main([*argv, "--name", NAME]) == 0
    assert f"registered models:/{NAME}/" in capsys.readouterr().out
    candidate = _client(uri).get_model_version_by_alias(NAME, "candidate")
    assert candidate.run_id == run_id
    assert main(["promote", NAME, str(candidate.version), "--tracking-uri", uri]) == 0
    assert f"version {candidate.version}" in capsys.readouterr().out
    champion = _client(uri).get_model_version_by_alias(NAME, "champion")
    assert str(champion.version) == str(candidate.version)


def test_promote_best_moves_champion_to_the_best_version_and_says_why(finished, capsys):
    """Two versions of one checkpoint whose runs report different val/mean_accuracy."""
    run_id, uri, runs = finished
    client, name = _client(uri), f"{NAME}-best"
    better = client.create_run(client.get_run(run_id).info.experiment_id).info.run_id
    metrics = client.get_run(run_id).data.metrics
    for key, value in metrics.items():
        client.log_metric(better, key, value + 0.1 if key == "val/mean_accuracy" else value)
    client.set_tag(better, "mtl.checkpoint", client.get_run(run_id).data.tags["mtl.checkpoint"])
    for run in (better, run_id):  # the better one first: candidate ends on the other
        argv = ["register", run, "--tracking-uri", uri, "--storage-path", str(runs)]
        assert main([*argv, "--name", name]) == 0
    capsys.readouterr()
    assert main(["promote", name, "--best", "mean_accuracy", "--tracking-uri", uri]) == 0
    out, err = capsys.readouterr()
    assert out == f"models:/{name}@champion -> version 1\n"
    assert "--best mean_accuracy (max is best" in err and "<- champion" in err
    assert f"version 2: mean_accuracy = {metrics['val/mean_accuracy']:.6g}" in err
    model = client.get_registered_model(name)
    assert model.aliases == {"candidate": 2, "champion": 1}
    assert model.tags["champion_decision"].startswith("v1 by mean_accuracy (max) among")
    unknown = _refused(capsys, ["promote", name, "--best", "left/miou", "--tracking-uri", uri])
    assert "can be ranked on 'left/miou'" in unknown


def test_register_refuses_a_checkpoint_outside_the_storage_root(finished, capsys):
    run_id, uri, _ = finished  # its checkpoint is not under ./mtl_runs of this directory
    before = len(_client(uri).search_model_versions(f"name='{NAME}-outside'"))
    err = _refused(capsys, ["register", run_id, "--tracking-uri", uri, "--name", f"{NAME}-outside"])
    assert "outside the storage root" in err and "--trust-checkpoint" in err
    assert "--storage-path" in err
    assert len(_client(uri).search_model_versions(f"name='{NAME}-outside'")) == before


def test_a_tag_pointing_elsewhere_needs_trust(finished, capsys, tmp_path):
    """A tag anyone with tracking access can set: a copied checkpoint outside the root."""
    run_id, uri, runs = finished
    tagged = Path(_client(uri).get_run(run_id).data.tags["mtl.checkpoint"])
    planted = shutil.copytree(tagged, tmp_path / "planted" / tagged.name)
    client = _client(uri)
    other = client.create_run(client.get_run(run_id).info.experiment_id).info.run_id
    for key, value in client.get_run(run_id).data.metrics.items():  # the floors read them
        client.log_metric(other, key, value)
    client.set_tag(other, "mtl.checkpoint", str(planted))
    argv = ["register", other, "--tracking-uri", uri, "--storage-path", str(runs)]
    err = _refused(capsys, [*argv, "--name", f"{NAME}-planted"])
    assert str(planted) in err and "--trust-checkpoint" in err
    # Linked into the root, it still resolves outside.
    (runs / "link").symlink_to(planted.parent)
    client.set_tag(other, "mtl.checkpoint", str(runs / "link" / tagged.name))
    assert "outside the storage root" in _refused(capsys, [*argv, "--name", f"{NAME}-planted"])
    # Confirmed explicitly, it registers.
    assert main([*argv, "--name", f"{NAME}-planted", "--trust-checkpoint"]) == 0
    assert client.get_model_version_by_alias(f"{NAME}-planted", "candidate").run_id == other


def test_unknown_run_id(finished, capsys):
    _, uri, runs = finished
    err = _refused(capsys, ["register", "0" * 32, "--tracking-uri", uri])
    assert "0" * 32 in err and "--tracking-uri" in err


def test_run_without_a_checkpoint(finished, capsys):
    run_id, uri, _ = finished
    client = _client(uri)
    bare = client.create_run(client.get_run(run_id).info.experiment_id).info.run_id
    assert "has no checkpoint" in _refused(capsys, ["register", bare, "--tracking-uri", uri])


def test_promote_of_a_missing_version_or_model(finished, capsys):
    _, uri, _ = finished
    assert "999" in _refused(capsys, ["promote", NAME, "999", "--tracking-uri", uri])
    assert "no-such-model" in _refused(
        capsys, ["promote", "no-such-model", "1", "--tracking-uri", uri]
    )
    assert "not a number" in _refused(capsys, ["promote", NAME, "one", "--tracking-uri", uri])


def test_a_store_that_does_not_exist_is_not_created(capsys, tmp_path):
    missing = tmp_path / "nowhere.db"
    err = _refused(capsys, ["promote", NAME, "1", "--tracking-uri", f"sqlite:///{missing}"])
    assert "no MLflow store" in err and not missing.exists()
