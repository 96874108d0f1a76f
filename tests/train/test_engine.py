"""The DeepSpeed engine on CPU (one process, gloo): config, checkpoint shards, refusal."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist

from mtl.config import load_config
from mtl.train.engine import (
    CheckpointError,
    deepspeed_config,
    load_shard,
    save_shard,
    verify_checkpoint,
)

pytestmark = pytest.mark.slow  # the first DeepSpeed engine on a machine JIT-builds a comm op


@pytest.fixture(scope="module")
def process_group():
    if not dist.is_initialized():
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
        )
        dist.init_process_group("gloo")
    yield
    dist.destroy_process_group()


def _engine(stage: int):
    from mtl.train.engine import build_engine

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    cfg = load_config(None, [f"deepspeed.zero_stage={stage}", "train.micro_batch_size=8"])
    return build_engine(model, cfg, use_gpu=False)


def _train(engine, steps: int) -> None:
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        engine.backward(engine(x).pow(2).mean())
        engine.step()


def test_config_follows_the_tree():
    cfg = load_config(
        None, ["deepspeed.zero_stage=2", "train.grad_accum_steps=4", "deepspeed.precision=bf16"]
    )
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["optimizer"]["params"]["torch_adam"] is True


@pytest.mark.parametrize("stage", [0, 2])
def test_checkpoint_round_trip_restores_weights_and_step(process_group, tmp_path, stage):
    engine = _engine(stage)
    _train(engine, 3)
    save_shard(
        engine, tmp_path, "step3", {"progress": {"step": 3}, "world_size": 1, "zero_stage": stage}
    )
    saved = [p.detach().clone() for p in engine.module.parameters()]
    _train(engine, 2)
    state = load_shard(engine, tmp_path, world_size=1)
    assert state["progress"]["step"] == 3 and engine.global_steps == 3
    for before, after in zip(saved, engine.module.parameters(), strict=True):
        torch.testing.assert_close(before, after)


def test_tampered_or_incomplete_checkpoint_is_refused(process_group, tmp_path):
    engine = _engine(1)
    _train(engine, 1)
    save_shard(
        engine, tmp_path, "step1", {"progress": {"step": 1}, "world_size": 1, "zero_stage": 1}
    )
    weights = next(tmp_path.rglob("mp_rank_00_model_states.pt"))
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated, as by a crash mid-copy
    with pytest.raises(CheckpointError, match="checksum"):
        verify_checkpoint(tmp_path)
    before = [p.detach().clone() for p in engine.module.parameters()]
    with pytest.raises(CheckpointError):
        load_shard(engine, tmp_path, world_size=1)
    for a, b in zip(before, engine.module.parameters(), strict=True):
        torch.testing.assert_close(a, b)  # nothing half-loaded
    state = json.loads((tmp_path / "mtl_state.json").read_text())
    (tmp_path / "mtl_state.json").write_text(json.dumps({**state, "world_size": 2}))
    with pytest.raises(CheckpointError, match="rank 1 is missing"):
        verify_checkpoint(tmp_path)


def test_cosine_schedule_warms_up_then_decays_to_zero(process_group):
    from mtl.train.engine import build_engine

    torch.manual_seed(0)
    cfg = load_config(None, ["train.micro_batch_size=8", "train.warmup_steps=2", "train.lr=0.1"])
    engine = build_engine(torch.nn.Linear(6, 1), cfg, use_gpu=False, total_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(engine.get_lr()[0])
        _train(engine, 1)
    assert max(lrs) <= 0.1 + 1e-9
    assert lrs[1] < lrs[2]  # linear warm-up
    assert lrs[3] > lrs[4] > lrs[5]  # cosine decay
    assert engine.get_lr()[0] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("stage", [0, 2])
def test_interrogate_gates_get_their_own_learning_rate_without_decay(process_group, stage):
    """α and β: lr x gate_lr_scale and no weight decay, under the schedule, in ZeRO too."""
    from mtl.data import benchmark_taskset
    from mtl.models import build_model
    from mtl.train.engine import build_engine

    cfg = load_config(
        None,
        [
            "model.name=interrogate",
            "model.width=4",
            "model.depth=2",
            "train.lr=0.01",
            "train.weight_decay=0.1",
            "model.interrogate.gate_lr_scale=20",
            f"deepspeed.zero_stage={stage}",
            "train.micro_batch_size=8",
        ],
    )
    model = build_model(cfg.model, benchmark_taskset(cfg.data))
    engine = build_engine(model, cfg, use_gpu=False, total_steps=10)
    engine.lr_scheduler.step(3)  # past the warm-up's lr = 0 start
    groups = engine.optimizer.param_groups
    assert len(groups) == 2
    assert groups[1]["lr"] == pytest.approx(20 * groups[0]["lr"]) and 0 < groups[0]["lr"] < 0.01
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert sum(p.numel() for p in model.gate_parameters()) == sum(
        p.numel() for p in [*model.alpha, *model.beta]
    )


def test_interrogate_task_blocks_start_from_single_task_checkpoints(process_group, tmp_path):
    """init_from: each task's blocks and head equal its single-task run's; a missing run or
    another width is refused before anything loads."""
    from mtl.config import to_dict
    from mtl.data import benchmark_taskset
    from mtl.models import build_model
    from mtl.train.engine import build_engine
    from mtl.train.warm_start import load_single_task, single_task_checkpoints

    args = ["model.width=4", "model.depth=2", "tasks.names=[left,semseg]"]
    single_cfg = load_config(None, [*args, "train.micro_batch_size=8"])
    taskset = benchmark_taskset(single_cfg.data).subset(["left", "semseg"])
    singles = {}
    for seed, head in enumerate(("left", "semseg")):
        torch.manual_seed(seed)
        engine = build_engine(
            build_model(single_cfg.model, taskset.subset([head])), single_cfg, False
        )
        state = {"world_size": 1, "zero_stage": 0, "config": to_dict(single_cfg)}
        save_shard(
            engine, tmp_path / f"baseline-multimnist-{head}" / "checkpoint_00000001", "step1", state
        )
        singles[head] = engine.module

    cfg = load_config(
        None, [*args, "model.name=interrogate", f"model.interrogate.init_from={tmp_path}"]
    )
    model = build_model(cfg.model, taskset)
    load_single_task(model, single_task_checkpoints(cfg, taskset))
    for head, single in singles.items():
        for layer, block in enumerate(model.task_blocks[head]):
            for key, value in block.state_dict().items():
                torch.testing.assert_close(value, single.backbone.blocks[layer].state_dict()[key])
        for key, value in model.heads[head].state_dict().items():
            torch.testing.assert_close(value, single.heads[head].state_dict()[key])
    shared = model.shared_blocks[0].conv1.weight
    assert not torch.equal(shared, singles["left"].backbone.blocks[0].conv1.weight)

    wider = load_config(
        None,
        [
            *args,
            "model.width=8",
            "model.name=interrogate",
            f"model.interrogate.init_from={tmp_path}",
        ],
    )
    with pytest.raises(ValueError, match="width"):
        single_task_checkpoints(wider, taskset)
    missing = load_config(
        None,
        [*args, "model.name=interrogate", f"model.interrogate.init_from={tmp_path / 'nowhere'}"],
    )
    with pytest.raises(CheckpointError, match="mtl baseline"):
        single_task_checkpoints(missing, taskset)
