"""ZeRO-3 on CPU (DS_ACCELERATOR=cpu, gloo): DeepSpeed 0.19.8 trains, saves and
consolidates it there.

1. Two engine processes (torch.multiprocessing, gloo) train tiny.yaml's model with its
   parameters partitioned over both ranks (fp32 and bf16), each saves its shard as a worker
   does; the shards are merged into one checkpoint folder as Ray Train merges them. The full
   fp32 state dict consolidated from it (``consolidated_weights``: DeepSpeed's zero_to_fp32)
   equals a copy gathered from the live engines (``GatheredParameters``): exactly in fp32;
   in bf16 the engines hold bf16 copies of the fp32 master weights, so the consolidated
   weights rounded to bf16 equal them exactly. Buffers (BatchNorm statistics) equal too.
2. The real fit path (Ray Train, 2 workers, ZeRO-3, bf16) checkpoints, consolidates,
   registers; the registered model predicts what the consolidated weights predict.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from mtl.config import load_config

pytestmark = pytest.mark.slow

STEPS = 3
PRECISIONS = ("fp32", "bf16")


def _config(cache_dir: str, precision: str, *extra: str):
    return load_config(
        "configs/tiny.yaml",
        [
            "deepspeed.zero_stage=3",
            f"deepspeed.precision={precision}",
            "train.num_workers=2",
            f"data.cache_dir={cache_dir}",
            *extra,
        ],
    )


def _rank(rank: int, world: int, port: int, out: str, cache_dir: str) -> None:
    """One engine process: for each precision train, save this rank's shard, gather."""
    import deepspeed
    import torch.distributed as dist

    from mtl.config import to_dict
    from mtl.data import load_splits, make_loader
    from mtl.losses import normalize_weights
    from mtl.models import build_model
    from mtl.train.engine import PRECISION_DTYPES, build_engine, save_shard
    from mtl.train.loop import active_taskset
    from mtl.train.step import compute_loss, to_device

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for precision in PRECISIONS:
        cfg = _config(cache_dir, precision)
        taskset = active_taskset(cfg)
        torch.manual_seed(0)
        engine = build_engine(build_model(cfg.model, taskset), cfg, use_gpu=False, total_steps=8)
        train, _ = load_splits(cfg.data, taskset)
        loader = make_loader(train, 16, train=True, rank=rank, world_size=world, seed=0)
        weights, dtype = normalize_weights({}, taskset.loss_keys), PRECISION_DTYPES[precision]
        for step, batch in enumerate(loader):
            loss, _ = compute_loss(engine, to_device(batch, engine.device, dtype), taskset, weights)
            engine.backward(loss)
            engine.step()
            if step + 1 == STEPS:
                break
        state = {
            "progress": {"step": STEPS, "epoch": 0, "micro_in_epoch": STEPS},
            "world_size": world,
            "zero_stage": 3,
            "config": to_dict(cfg),
        }
        save_shard(engine, Path(out) / precision / f"rank{rank}", f"step{STEPS}", state)
        params = dict(engine.module.named_parameters())
        local = {n: p.ds_tensor.numel() for n, p in params.items()}
        with deepspeed.zero.GatheredParameters(list(params.values())):  # collective
            gathered = {n: p.detach().clone() for n, p in params.items()}
        buffers = {n: b.detach().clone() for n, b in engine.module.named_buffers()}
        torch.save(
            {"params": gathered, "buffers": buffers, "local_numel": local},
            Path(out) / precision / f"gathered{rank}.pt",
        )
        dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _merge(parts: list[Path], into: Path) -> Path:
    """The ranks' folders as one checkpoint, as Ray Train merges the workers' reports."""
    for part in parts:
        shutil.copytree(part, into, dirs_exist_ok=True)
    return into


@pytest.fixture(scope="module")
def zero3_shards(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("zero3")
    torch.multiprocessing.spawn(
        _rank, args=(2, _free_port(), str(out), str(cache_dir)), nprocs=2, join=True
    )
    return out


@pytest.mark.parametrize("precision", PRECISIONS)
def test_zero3_consolidates_to_the_weights_gathered_from_the_engines(zero3_shards, precision):
    from mtl.train.engine import consolidated_weights, read_state

    run = zero3_shards / precision
    ckpt = _merge([run / "rank0", run / "rank1"], run / "checkpoint_00000003")
    assert read_state(ckpt)["zero_stage"] == 3  # every rank's manifest verified
    tag = ckpt / "deepspeed" / f"step{STEPS}"
    for r in (0, 1):  # each rank's optimizer partition and its model-state file
        assert len(list(tag.glob(f"*zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))) == 1
        assert len(list(tag.glob(f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"))) == 1
    full = consolidated_weights(ckpt)
    ranks = [torch.load(run / f"gathered{r}.pt", weights_only=True) for r in (0, 1)]
    gathered, buffers = ranks[0]["params"], ranks[0]["buffers"]
    # Really partitioned: each rank held part of the weights, together all of them.
    total = sum(p.numel() for p in gathered.values())
    held = [sum(r["local_numel"].values()) for r in ranks]
    assert all(0 < h < total for h in held) and sum(held) >= total, (held, total)
    assert set(full) == set(gathered) | set(buffers)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    for name, param in gathered.items():
        assert full[name].dtype == torch.float32 and param.dtype == dtype
        torch.testing.assert_close(full[name].to(dtype), param, rtol=0, atol=0)
        torch.testing.assert_close(ranks[1]["params"][name], param, rtol=0, atol=0)
    for name, buffer in buffers.items():
        torch.testing.assert_close(full[name].to(buffer.dtype), buffer, rtol=0, atol=0)
    # The steps moved the weights away from the shared initialisation.
    from mtl.models import build_model
    from mtl.train.loop import active_taskset

    cfg = _config("", precision)
    torch.manual_seed(0)
    init = build_model(cfg.model, active_taskset(cfg)).state_dict()
    assert not torch.equal(init["backbone.stem.0.weight"], full["backbone.stem.0.weight"])


def test_zero3_bf16_fit_checkpoints_consolidates_and_registers(tmp_path, cache_dir, ray_session):
    """Ray Train x DeepSpeed, 2 workers, ZeRO-3 in bf16: the run's checkpoint holds both
    ranks' partitions, the consolidated weights load strictly into a fresh model, and the
    model registered from them predicts the same as that model (to 1e-5: the registered
    program is a torch.export of it, run in fp32)."""
    import mlflow

    from mtl.models import build_model
    from mtl.train.engine import consolidated_weights
    from mtl.train.launch import fit
    from mtl.train.loop import active_taskset

    cfg = _config(
        str(cache_dir),
        "bf16",
        "train.max_steps=8",
        "train.checkpoint_every_steps=8",
        "train.val_every_steps=8",
        "train.val_batches=1",
        "tracking.register_above_chance=false",  # 8 steps: the registration path is tested
        f"train.storage_path={tmp_path / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "tasks.baseline=",
    )
    result = fit(cfg, run_name="zero3-bf16")
    assert result.metrics["step"] == 8 and result.model_version == "1"
    ckpt = Path(result.checkpoint)
    state = json.loads((ckpt / "mtl_state.json").read_text())
    assert state["zero_stage"] == 3 and state["world_size"] == 2
    assert len(list(ckpt.rglob("*zero_pp_rank_1_*optim_states.pt"))) == 1
    model = build_model(cfg.model, active_taskset(cfg))
    model.load_state_dict(consolidated_weights(ckpt))  # strict: every weight and buffer
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
