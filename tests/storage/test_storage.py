"""mtl.storage against a real S3 API (moto's server) and the local disk, side by side."""

from __future__ import annotations

import pytest

from mtl import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path, prefix):
    return str(tmp_path / "runs") if request.param == "local" else prefix


def test_write_read_list_move_delete(root):
    run = storage.join(root, "run-a")
    assert not storage.exists(run) and storage.checkpoints(run) == []
    for step in (12, 4, 100):
        storage.write_text(storage.join(run, f"checkpoint_{step:08d}", "mtl_state.json"), "{}")
    storage.write_text(storage.join(run, "checkpoint_manager_snapshot.json"), "snap")
    storage.write_text(storage.join(run, "checkpoint_tmp", "x"), "not a checkpoint")
    assert storage.is_dir(run) and storage.is_file(
        storage.join(run, "checkpoint_00000004/mtl_state.json")
    )
    assert [storage.name(c) for c in storage.checkpoints(run)] == [
        "checkpoint_00000004", "checkpoint_00000012", "checkpoint_00000100",
    ]  # fmt: skip
    assert ("checkpoint_manager_snapshot.json", False) in storage.children(run)
    snapshot = storage.join(run, "checkpoint_manager_snapshot.json")
    storage.move(snapshot, snapshot + ".stale")
    assert not storage.exists(snapshot) and storage.read_text(snapshot + ".stale") == "snap"
    storage.delete_dir(storage.checkpoints(run)[-1])
    assert len(storage.checkpoints(run)) == 2
    storage.delete_dir(run)
    assert not storage.exists(run)
    storage.delete_dir(run)  # a missing folder is no error


def test_local_copy_downloads_a_folder(root):
    ckpt = storage.join(root, "run", "checkpoint_00000004")
    storage.write_text(storage.join(ckpt, "mtl_state.json"), '{"step": 4}')
    storage.write_text(storage.join(ckpt, "deepspeed", "step4", "model.pt"), "weights")
    with storage.local_copy(ckpt) as local:
        assert (local / "mtl_state.json").read_text() == '{"step": 4}'
        assert (local / "deepspeed" / "step4" / "model.pt").read_text() == "weights"
        copied = local
    assert copied.exists() == (not storage.is_remote(root))  # a download is temporary


def test_prune_keeps_the_newest_per_trial(root):
    for trial in ("trial_a", "trial_b"):
        for step in (2, 4, 6):
            storage.write_text(storage.join(root, trial, f"checkpoint_{step:06d}", "f"), "x")
    removed = storage.prune_checkpoints(root, 1)
    assert sorted(storage.name(p) for p in removed) == sorted(
        ["checkpoint_000002", "checkpoint_000004"] * 2
    )
    assert [storage.name(c) for c in storage.checkpoints(storage.join(root, "trial_a"))] == [
        "checkpoint_000006"
    ]


def test_uris_and_containment(tmp_path):
    assert storage.join("s3://b/runs/", "x", "checkpoint_1") == "s3://b/runs/x/checkpoint_1"
    assert storage.is_under("s3://b/runs/x/checkpoint_1", "s3://b/runs")
    assert not storage.is_under("s3://b/runsother/x", "s3://b/runs")
    assert not storage.is_under("s3://other/runs/x", "s3://b/runs")
    assert not storage.is_under("s3://b/runs/../secret", "s3://b/runs")
    assert not storage.is_under(str(tmp_path), "s3://b/runs")
    assert storage.is_under(str(tmp_path / "a"), str(tmp_path))
    with pytest.raises(ValueError, match="relative name"):
        storage.join("s3://b/runs", "../x")
    with pytest.raises(ValueError, match="gs:// is not supported"):
        storage.check_scheme("gs://b/runs")
    with pytest.raises(ValueError, match="names no bucket"):
        storage.check_scheme("s3:///runs")
    path, fs = storage.ray_storage("s3://b/runs/")
    assert (path, fs.type_name) == ("b/runs", "s3") and storage.uri_of(
        fs, "b/runs/x"
    ) == "s3://b/runs/x"
    assert storage.ray_storage(str(tmp_path)) == (str(tmp_path), None)


def test_reachability(s3, monkeypatch):
    storage.check_reachable(s3.url("runs"))  # the bucket is there
    with pytest.raises(ValueError, match=r"bucket 'nope' does not exist at the endpoint http"):
        storage.check_reachable("s3://nope/runs")
    from tests.s3server import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    with pytest.raises(
        ValueError, match=rf"cannot reach bucket 'mtl' at the endpoint {dead} \(AWS_ENDPOINT_URL\)"
    ):
        storage.check_reachable("s3://mtl/runs")


def test_a_policy_file_is_replayed_from_either_store(root):
    import json

    from mtl.tune.space import read_policy, replay_schedule

    w = [{"weights": {"left": x, "right": 1 - x}} for x in (0.5, 0.6, 0.3)]
    rows = [["t1", "t0", 1, 0, w[0], w[1]], ["t0", "t1", 1, 2, w[1], w[2]]]
    policy = storage.join(root, "sweep", "pbt_policy_t0.txt")
    storage.write_text(policy, "".join(json.dumps(r) + "\n" for r in rows))
    assert read_policy(policy) == (w[0], [(0, w[1]), (2, w[2])])
    assert [step for step, _ in replay_schedule(policy, 4)] == [0, 4, 8]
    with pytest.raises(ValueError, match="does not exist"):
        read_policy(storage.join(root, "sweep", "pbt_policy_none.txt"))
