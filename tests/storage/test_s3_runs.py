"""Training runs whose storage is an S3 API (moto's server): ``train.storage_path=s3://...``.

Real Ray Train x DeepSpeed workers write their checkpoints into the bucket; a resume
continues from the one there; a checkpoint in the bucket with a file missing or changed is
refused before anything is loaded; ``mtl register`` and the run's own registration read the
checkpoint from the bucket. The bucket's listing is read with boto3, not through mtl.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtl import storage
from mtl.cli import main
from mtl.config import load_config
from mtl.train.engine import CheckpointError
from mtl.train.launch import RAY_SNAPSHOT, fit

TINY = Path(__file__).resolve().parent.parent.parent / "configs" / "tiny.yaml"
RUN = "s3run"


def _cfg(root: str, tmp: Path, cache_dir: Path, *extra: str):
    return load_config(
        TINY,
        [
            "train.num_workers=1",
            "train.max_steps=4",
            "train.checkpoint_every_steps=2",
            "train.val_every_steps=2",
            "train.log_every_steps=2",
            "train.keep_checkpoints=3",
            "data.train_size=128",
            "data.val_size=32",
            f"data.cache_dir={cache_dir}",
            f"train.storage_path={root}",
            f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
            "tracking.register=false",
            "tracking.register_above_chance=false",  # 4 steps: the storage path is under test
            *extra,
        ],
    )


def _checkpoint_keys(s3, root: str, run: str) -> dict[str, list[str]]:
    """checkpoint folder -> its object names, from the bucket's own listing (boto3)."""
    prefix = root.split("://", 1)[1].split("/", 1)[1]
    found: dict[str, list[str]] = {}
    for key in s3.keys(f"{prefix}/{run}/"):
        parts = key[len(prefix) + 1 :].split("/")
        if len(parts) > 2 and parts[1].startswith("checkpoint_"):
            found.setdefault(parts[1], []).append("/".join(parts[2:]))
    return found


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("s3runs")


@pytest.fixture(scope="module")
def root(s3):
    return s3.url("runs")


@pytest.fixture(scope="module")
def trained(s3, root, work, cache_dir, data_root, ray_session):
    """One tiny 1-worker run, 4 steps, a checkpoint every 2, stored in S3."""
    return fit(_cfg(root, work, cache_dir), run_name=RUN)


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing is written to ./mtl_runs; MLflow's ./mlruns is here


@pytest.mark.slow
def test_checkpoints_are_written_to_the_bucket(trained, s3, root, work):
    assert trained.checkpoint == f"{root}/{RUN}/checkpoint_00000004"
    found = _checkpoint_keys(s3, root, RUN)
    assert sorted(found) == ["checkpoint_00000002", "checkpoint_00000004"]
    for files in found.values():
        assert "mtl_state.json" in files and "manifest.rank0.json" in files, files
        assert any(f.startswith("deepspeed/") and f.endswith(".pt") for f in files), files
    state = json.loads(s3.read(f"runs/{RUN}/checkpoint_00000004/mtl_state.json"))
    assert state["progress"]["step"] == 4
    assert not (work / "runs").exists() and not Path("mtl_runs").exists()  # nothing local

    from mlflow.tracking import MlflowClient

    tags = MlflowClient(trained.tracking_uri).get_run(trained.mlflow_run_id).data.tags
    assert tags["mtl.checkpoint"] == trained.checkpoint


@pytest.mark.slow
def test_mtl_register_reads_the_checkpoint_from_the_bucket(trained, root, capsys):
    from mlflow.tracking import MlflowClient

    uri = trained.tracking_uri
    argv = ["register", trained.mlflow_run_id, "--tracking-uri", uri, "--name", "s3-tiny"]
    assert main([*argv, "--storage-path", root]) == 0
    assert "registered models:/s3-tiny/" in capsys.readouterr().out
    version = MlflowClient(uri, registry_uri=uri).get_model_version_by_alias("s3-tiny", "candidate")
    assert version.tags["checkpoint"] == trained.checkpoint  # the S3 URI, not a temp folder

    # A root elsewhere in the bucket does not hold it: refused in one line, nothing registered.
    assert main([*argv, "--storage-path", f"{root}-other"]) == 2
    err = capsys.readouterr().err
    assert "lies outside the storage root" in err and err.count("\n") == 1, err


def _copy_run(s3, source: str, target: str) -> None:
    client = s3.client()
    for key in s3.keys(f"runs/{source}/"):
        copied = f"runs/{target}/" + key[len(f"runs/{source}/") :]
        client.copy_object(Bucket=s3.bucket, Key=copied, CopySource=f"{s3.bucket}/{key}")


@pytest.mark.slow
def test_a_half_uploaded_checkpoint_is_refused_on_resume(trained, s3, root, work, cache_dir):
    _copy_run(s3, RUN, "copied")
    newest = f"{root}/copied/checkpoint_00000004"
    manifest = json.loads(s3.read("runs/copied/checkpoint_00000004/manifest.rank0.json"))
    shard = next(rel for rel in manifest if rel.endswith(".pt"))
    key = f"runs/copied/checkpoint_00000004/{shard}"
    body = s3.read(key)

    s3.client().delete_object(Bucket=s3.bucket, Key=key)  # the upload stopped before it
    cfg = _cfg(root, work, cache_dir, "train.max_steps=6")
    with pytest.raises(CheckpointError, match="refusing to resume") as refused:
        fit(cfg, resume="copied")
    message = str(refused.value)
    assert f"{newest}: {shard} (rank 0) is missing" in message and "Nothing was loaded" in message
    assert "/tmp" not in message.split("Delete")[0]  # names the S3 object, not the download

    s3.client().put_object(Bucket=s3.bucket, Key=key, Body=body[:-1] + bytes([body[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        fit(cfg, resume="copied")

    # As the refusal advises: delete it, and the run resumes from the previous checkpoint
    # (Ray's snapshot in the bucket, which names the deleted one, is set aside).
    storage.delete_dir(newest)
    resumed = fit(_cfg(root, work, cache_dir), resume="copied")
    assert resumed.metrics["resumed_from_step"] == 2 and resumed.metrics["step"] == 4
    assert s3.keys(f"runs/copied/{RAY_SNAPSHOT}.stale")
    assert "checkpoint_00000004" in _checkpoint_keys(s3, root, "copied")


@pytest.mark.slow
def test_resume_continues_from_the_bucket_and_registers(trained, s3, root, work, cache_dir):
    cfg = _cfg(root, work, cache_dir, "train.max_steps=6", "tracking.register=true")
    resumed = fit(cfg, resume=RUN)
    assert resumed.metrics["resumed_from_step"] == 4 and resumed.metrics["step"] == 6
    assert resumed.mlflow_run_id == trained.mlflow_run_id  # the same MLflow run goes on
    assert resumed.checkpoint == f"{root}/{RUN}/checkpoint_00000006"
    assert "checkpoint_00000006" in _checkpoint_keys(s3, root, RUN)
    assert resumed.model_version is not None  # registered from the checkpoint in S3


def test_an_unreachable_bucket_fails_before_ray(s3, work, cache_dir, capsys, monkeypatch):
    from tests.s3server import free_port

    args = ["train", str(TINY), "train.num_workers=1", f"data.cache_dir={cache_dir}"]
    args.append(f"tracking.tracking_uri=sqlite:///{work / 'unreached.db'}")
    assert main([*args, "train.storage_path=s3://no-such-bucket/runs"]) == 2
    err = capsys.readouterr().err
    assert "bucket 'no-such-bucket' does not exist" in err and s3.endpoint in err, err

    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    assert main([*args, f"train.storage_path={s3.url('runs')}"]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach bucket 'mtl' at the endpoint {dead} (AWS_ENDPOINT_URL)" in err, err
    assert err.count("\n") == 1, err

    assert main([*args, "train.storage_path=gs://bucket/runs"]) == 2
    assert "gs:// is not supported" in capsys.readouterr().err
