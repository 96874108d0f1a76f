"""bf16 on CPU through the real DeepSpeed engine (one process, gloo), with BatchNorm models.

DeepSpeed 0.19 casts a bf16 engine's parameters but not its buffers, so a BatchNorm held a
bf16 weight beside fp32 running statistics and the first forward pass failed ("expected
scalar type BFloat16 but found Float"). ``build_engine`` now gives the norms' statistics the
parameters' dtype (``norm_statistics_in``); the first test pins DeepSpeed's behaviour, so an
upgrade that casts buffers again says the workaround can go.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist

from mtl.config import load_config
from mtl.train.engine import norm_statistics_in

BF16 = ["deepspeed.precision=bf16", "train.num_workers=1", "train.micro_batch_size=16"]


def test_norm_statistics_follow_the_training_dtype_and_nothing_else():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    norm_statistics_in(model, torch.float32)
    assert model[1].running_mean.dtype == torch.float32
    norm_statistics_in(model, torch.bfloat16)
    bn = model[1]
    assert bn.running_mean.dtype == bn.running_var.dtype == torch.bfloat16
    assert bn.num_batches_tracked.dtype == torch.long  # a counter, not a statistic
    assert bn.weight.dtype == model[0].weight.dtype == torch.float32  # DeepSpeed casts those


@pytest.fixture(scope="module")
def process_group():
    if not dist.is_initialized():
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT="29537", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
        )
        dist.init_process_group("gloo")
    yield
    dist.destroy_process_group()


def _tiny(cache_dir, *extra: str):
    from mtl.models import build_model
    from mtl.train.loop import active_taskset

    cfg = load_config("configs/tiny.yaml", [*BF16, f"data.cache_dir={cache_dir}", *extra])
    taskset = active_taskset(cfg)
    torch.manual_seed(0)
    return cfg, taskset, build_model(cfg.model, taskset)


def _batches(cfg, taskset, n: int):
    from mtl.data import load_splits, make_loader

    train, val = load_splits(cfg.data, taskset)
    loader = make_loader(train, cfg.train.micro_batch_size, train=True, seed=0)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == n:
            break
    return batches, make_loader(val, cfg.train.micro_batch_size, train=False)


@pytest.mark.slow
def test_deepspeed_alone_leaves_batchnorm_statistics_in_fp32(process_group, cache_dir, one_thread):
    """The cause, as DeepSpeed 0.19.8 has it: without ``norm_statistics_in`` a BatchNorm
    model's first bf16 forward fails."""
    import deepspeed

    from mtl.train.engine import deepspeed_config
    from mtl.train.step import to_device

    cfg, taskset, model = _tiny(cache_dir)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=deepspeed_config(cfg)
    )
    bn = engine.module.backbone.stem[1]
    assert (bn.weight.dtype, bn.running_mean.dtype) == (torch.bfloat16, torch.float32)
    (batch,), _ = _batches(cfg, taskset, 1)
    with pytest.raises(RuntimeError, match="expected scalar type BFloat16 but found Float"):
        engine(to_device(batch, engine.device, torch.bfloat16)["image"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_bf16_trains_a_batchnorm_model_on_cpu(process_group, cache_dir, one_thread, stage):
    """tiny.yaml's ResNet (BatchNorm in trunk and dense heads): 4 bf16 optimizer steps on
    the CPU accelerator, the loss finite, weights and running statistics moved, then a
    validation pass in bf16."""
    from mtl.losses import normalize_weights
    from mtl.train.engine import build_engine
    from mtl.train.step import compute_loss, evaluate, to_device

    cfg, taskset, model = _tiny(cache_dir, f"deepspeed.zero_stage={stage}")
    engine = build_engine(model, cfg, use_gpu=False, total_steps=4)
    bn = engine.module.backbone.stem[1]
    assert bn.weight.dtype == bn.running_mean.dtype == torch.bfloat16
    before = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
    weights = normalize_weights({}, taskset.loss_keys)
    batches, val = _batches(cfg, taskset, 4)
    losses = []
    for batch in batches:
        loss, _ = compute_loss(
            engine, to_device(batch, engine.device, torch.bfloat16), taskset, weights
        )
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert engine.global_steps == 4
    assert all(math.isfinite(v) for v in losses), losses
    conv = engine.module.backbone.stem[0].weight
    assert not torch.equal(before["backbone.stem.0.weight"], conv.detach().float())
    assert not torch.equal(before["backbone.stem.1.running_mean"], bn.running_mean.float())
    assert int(bn.num_batches_tracked) == 4
    metrics = evaluate(engine.module, val, taskset, engine.device, torch.bfloat16, max_batches=2)
    values = metrics.compute(metrics.totals())
    assert values and all(math.isfinite(v) for v in values.values()), values
