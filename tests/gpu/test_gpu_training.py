"""The GPU path: NCCL + bf16, ``train.device=auto``, ZeRO-3 save/consolidate/register and
token-routed expert parallelism, each a tiny bounded run on CUDA.

Skipped without a CUDA device. Needs ``DS_ACCELERATOR=cuda`` in the environment before
pytest starts: tests/conftest.py defaults it to ``cpu`` for the CPU suite, and the shared
Ray instance's workers inherit it (``benchmarks/gpu_check.sh`` sets it). One GPU gives a
world of 1 (NCCL still runs the collectives); two or more give 2 workers.
"""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from mtl.config import load_config

CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False)"),
    pytest.mark.skipif(
        CUDA and os.environ.get("DS_ACCELERATOR") != "cuda",
        reason=f"DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')!r}: run the GPU tests with "
        "DS_ACCELERATOR=cuda (tests/conftest.py defaults it to cpu), e.g. benchmarks/gpu_check.sh",
    ),
]


def workers() -> int:
    return min(2, torch.cuda.device_count())


def tiny(tmp: Path, cache_dir: Path, *extra: str):
    return load_config(
        "configs/tiny.yaml",
        [
            f"data.cache_dir={cache_dir}",
            "tasks.baseline=",
            "train.device=auto",
            f"train.num_workers={workers()}",
            "train.max_steps=12",
            "train.val_every_steps=12",
            "train.val_batches=2",
            "train.checkpoint_every_steps=12",
            f"train.storage_path={tmp / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
            "tracking.register_above_chance=false",  # 12 steps: the path is tested, not quality
            *extra,
        ],
    )


def saved_on(path: Path) -> set[str]:
    """The devices the tensors of a ``torch.save`` file were on when saved."""
    where: set[str] = set()

    def record(storage, location):
        where.add(location)
        return storage

    torch.load(path, map_location=record, weights_only=True)
    return where


def history(result, key: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(result.tracking_uri)
    return [m.value for m in client.get_metric_history(result.mlflow_run_id, key)]


def test_nccl_bf16_engine_trains_a_batchnorm_model_on_cuda(cache_dir):
    """In this process, no Ray: an NCCL world of 1, DeepSpeed's CUDA accelerator, bf16 with
    BatchNorm statistics in bf16 on the GPU, 4 steps under ZeRO 2."""
    import torch.distributed as dist

    from mtl.data import load_splits, make_loader
    from mtl.losses import normalize_weights
    from mtl.models import build_model
    from mtl.train.engine import build_engine
    from mtl.train.loop import active_taskset
    from mtl.train.step import compute_loss, to_device

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    os.environ["LOCAL_RANK"] = "0"
    torch.cuda.set_device(0)
    dist.init_process_group("nccl")
    try:
        cfg = load_config(
            "configs/tiny.yaml",
            [f"data.cache_dir={cache_dir}", "deepspeed.precision=bf16", "deepspeed.zero_stage=2"],
        )
        taskset = active_taskset(cfg)
        engine = build_engine(build_model(cfg.model, taskset), cfg, use_gpu=True, total_steps=4)
        assert dist.get_backend() == "nccl" and engine.device.type == "cuda"
        bn = engine.module.backbone.stem[1]
        assert bn.running_mean.dtype == torch.bfloat16 and bn.running_mean.is_cuda
        train, _ = load_splits(cfg.data, taskset)
        weights = normalize_weights({}, taskset.loss_keys)
        losses = []
        for batch in make_loader(train, 16, train=True, seed=0):
            batch = to_device(batch, engine.device, torch.bfloat16)
            loss, _ = compute_loss(engine, batch, taskset, weights)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            if len(losses) == 4:
                break
        assert engine.global_steps == 4 and all(math.isfinite(v) for v in losses), losses
        assert int(bn.num_batches_tracked) == 4
    finally:
        dist.destroy_process_group()


def test_device_auto_picks_cuda_and_trains_bf16_over_nccl(tmp_path, cache_dir, ray_session):
    """``train.device=auto`` chooses the GPUs when the cluster has one per worker (and the
    CPU when it has fewer); the run trains bf16 over NCCL and its weights live on CUDA."""
    from mtl.train.launch import _use_gpu, fit

    cfg = tiny(tmp_path, cache_dir, "deepspeed.precision=bf16", "deepspeed.zero_stage=1")
    assert _use_gpu(cfg)
    gpus = int(ray_session.cluster_resources().get("GPU", 0))
    more = load_config(None, ["train.device=auto", f"train.num_workers={gpus + 1}"])
    assert not _use_gpu(more)  # auto falls back to the CPU when GPUs are short
    result = fit(cfg, run_name="gpu-auto-bf16")
    assert result.metrics["step"] == 12 and result.model_version == "1"
    losses = history(result, "train/loss")
    assert losses and all(math.isfinite(v) for v in losses), losses
    model_file = next(Path(result.checkpoint).rglob("mp_rank_00_model_states.pt"))
    assert {loc.split(":")[0] for loc in saved_on(model_file)} == {"cuda"}


def test_zero3_on_gpu_saves_consolidates_and_registers(tmp_path, cache_dir, ray_session):
    """ZeRO-3 bf16 on the GPUs: the checkpoint holds each rank's partition (saved from CUDA),
    the driver consolidates it on CPU, and the registered model predicts what the
    consolidated weights predict (to 1e-5)."""
    import mlflow

    from mtl.models import build_model
    from mtl.train.engine import consolidated_weights
    from mtl.train.launch import fit
    from mtl.train.loop import active_taskset

    cfg = tiny(tmp_path, cache_dir, "deepspeed.precision=bf16", "deepspeed.zero_stage=3")
    result = fit(cfg, run_name="gpu-zero3")
    assert result.metrics["step"] == 12 and result.model_version == "1"
    ckpt = Path(result.checkpoint)
    assert json.loads((ckpt / "mtl_state.json").read_text())["zero_stage"] == 3
    for rank in range(workers()):
        part = next(ckpt.rglob(f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"))
        assert next(ckpt.rglob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))
        assert {loc.split(":")[0] for loc in saved_on(part)} <= {"cuda", "cpu"}
    model = build_model(cfg.model, active_taskset(cfg))
    model.load_state_dict(consolidated_weights(ckpt))
    model.eval()
    x = np.random.default_rng(0).random((3, 1, 36, 36), dtype=np.float32)
    previous = mlflow.get_registry_uri()
    mlflow.set_registry_uri(result.tracking_uri)
    try:
        served = mlflow.pyfunc.load_model("models:/multimnist-hard_sharing@candidate")
    finally:
        mlflow.set_registry_uri(previous)
    predicted = served.predict(x)
    with torch.no_grad():
        expected = model(torch.from_numpy(x))
    for head, value in expected.items():
        np.testing.assert_allclose(predicted[head], value.numpy(), rtol=1e-5, atol=1e-5)


def test_token_routed_experts_train_on_gpu(tmp_path, cache_dir, ray_session):
    """DeepSpeed MoE in the ViT's MLPs, 4 experts, ep_size = the workers (1 GPU: every
    expert local; 2 GPUs: 2 each, all-to-all over NCCL), ZeRO 2: trains, logs a positive
    balance loss, is not registered, and each rank saves its own experts from CUDA."""
    from mtl.train.launch import fit

    n = workers()
    cfg = tiny(
        tmp_path,
        cache_dir,
        "model.name=moe",
        "model.backbone=vit",
        "model.moe.routing=token",
        "model.width=16",
        "model.num_heads=2",
        "model.moe.num_experts=4",
        "model.moe.top_k=2",
        f"model.moe.ep_size={n}",
        "model.moe.load_balance_weight=0.1",
        "deepspeed.zero_stage=2",
        "data.val_size=64",
    )
    result = fit(cfg, run_name="gpu-token-moe")
    assert result.metrics["step"] == 12 and result.model_version is None
    balance = history(result, "train/loss/aux/load_balance")
    assert balance and all(math.isfinite(v) and v > 0 for v in balance), balance
    ckpt = Path(result.checkpoint)
    per_rank = 4 // n
    for rank in range(n):
        files = json.loads((ckpt / f"manifest.rank{rank}.json").read_text())
        own = set(range(rank * per_rank, (rank + 1) * per_rank))
        saved = {e for e in range(4) if any(f"layer_0_expert_{e}_" in f for f in files)}
        assert saved == own, (rank, sorted(files))
    expert = next(ckpt.rglob("layer_0_expert_0_mp_rank_00_model_states.pt"))
    assert {loc.split(":")[0] for loc in saved_on(expert)} == {"cuda"}
