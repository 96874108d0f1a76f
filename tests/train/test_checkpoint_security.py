"""Checkpoints are read as tensors only: a pickle payload planted in a DeepSpeed file, with the
manifest re-hashed so that it verifies, is refused by resume (``load_shard``) and by
consolidation (``consolidated_weights``: registration, warm start) at ZeRO 0, 1 and 2,
before it runs. DeepSpeed engines on CPU in this process (gloo, one rank), no Ray.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mtl.config import load_config, to_dict
from mtl.train.engine import (
    DS_SUBDIR,
    CheckpointError,
    consolidated_weights,
    load_shard,
    save_shard,
    tensors_only_loads,
    verify_checkpoint,
)

REPO = Path(__file__).resolve().parents[2]
FORCE = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")


class Payload:
    """Unpickling it runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def plant(checkpoint: Path, pattern: str, marker: Path) -> Path:
    """Add a ``Payload`` to the DeepSpeed file matching ``pattern`` and re-hash every
    manifest, as someone who can write the run folder can; returns the file."""
    (target,) = (checkpoint / DS_SUBDIR).rglob(pattern)
    with tensors_only_loads(checkpoint):
        saved = torch.load(target, map_location="cpu", weights_only=True)
    saved["payload"] = Payload(marker)
    torch.save(saved, target)
    for manifest in checkpoint.glob("manifest.rank*.json"):
        digests = json.loads(manifest.read_text())
        for rel in digests:
            digests[rel] = hashlib.sha256((checkpoint / rel).read_bytes()).hexdigest()
        manifest.write_text(json.dumps(digests))
    return target


@pytest.fixture(scope="module")
def process_group():
    """One gloo rank, left up for the session: DeepSpeed caches a clone of the world group,
    so a destroyed and re-created group breaks the next module's engines."""
    if not dist.is_initialized():
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT="29547", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
        )
        dist.init_process_group("gloo")
        groups = sys.modules.get("deepspeed.utils.groups")
        if groups is not None:  # an earlier module's group was destroyed: drop its clone
            groups._WORLD_GROUP = None


def saved_engine(directory: Path, stage: int, precision: str = "fp32"):
    """A trained tiny engine and its checkpoint in ``directory`` (the state the loop saves)."""
    from mtl.train.engine import build_engine

    torch.manual_seed(0)
    cfg = load_config(
        None,
        [f"deepspeed.zero_stage={stage}", f"deepspeed.precision={precision}"]
        + ["train.micro_batch_size=8"],
    )
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    engine = build_engine(model, cfg, use_gpu=False, total_steps=4)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1)).to(engine.module[0].weight)
    for _ in range(2):
        engine.backward(engine(x).float().pow(2).mean())
        engine.step()
    state = {
        "progress": {"step": 2},
        "world_size": 1,
        "zero_stage": stage,
        "config": to_dict(cfg),
    }
    save_shard(engine, directory, "step2", state)
    return engine


@pytest.mark.slow  # the first DeepSpeed engine on a machine JIT-builds a comm op
@pytest.mark.parametrize(
    ("stage", "precision", "pattern"),
    [
        (0, "fp32", "mp_rank_00_model_states.pt"),
        (1, "fp32", "mp_rank_00_model_states.pt"),
        (2, "bf16", "*optim_states.pt"),
    ],
    ids=["zero0-model-states", "zero1-model-states", "zero2-bf16-optim-states"],
)
def test_planted_payload_is_refused_by_resume_and_consolidation(
    process_group, tmp_path, stage, precision, pattern
):
    clean = tmp_path / "clean"
    engine = saved_engine(clean, stage, precision)
    expected = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}

    # A clean checkpoint loads under the same guard, and DeepSpeed's files need nothing
    # beyond the allowlist.
    assert load_shard(engine, clean, world_size=1)["progress"] == {"step": 2}
    weights = consolidated_weights(clean)
    assert weights.keys() == expected.keys()
    for key, value in expected.items():
        # fp32 masters; bf16 modules hold them rounded
        torch.testing.assert_close(weights[key].to(value.dtype), value, rtol=0, atol=0)

    tampered, marker = tmp_path / "tampered", tmp_path / "payload-ran"
    shutil.copytree(clean, tampered)
    target = plant(tampered, pattern, marker)
    # Every checksum matches: the verification refuses it for what the file holds.
    with pytest.raises(CheckpointError) as refused:
        verify_checkpoint(tampered)
    assert_refuses(refused.value, target, marker)

    # `--resume` of a copied run folder holding it: refused on the driver, before Ray starts.
    from mtl.train.launch import latest_checkpoint

    copied = tmp_path / "runs" / "copied"
    shutil.copytree(tampered, copied / "checkpoint_00000002")
    with pytest.raises(CheckpointError, match="refusing to resume") as refused:
        latest_checkpoint(copied)
    copy = copied / "checkpoint_00000002" / target.relative_to(tampered)
    assert_refuses(refused.value, copy, marker)

    for load in (lambda: load_shard(engine, tampered, 1), lambda: consolidated_weights(tampered)):
        with pytest.raises(CheckpointError) as refused:
            load()
        assert_refuses(refused.value, target, marker)

    # The loads themselves refuse it too, past the verification: DeepSpeed's resume
    # reader and (ZeRO 1-2) its zero-to-fp32 reader, each asking torch for a full unpickle.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    readers = [lambda: engine.load_checkpoint(str(tampered / DS_SUBDIR), tag="step2")]
    if stage > 0:
        readers.append(
            lambda: get_fp32_state_dict_from_zero_checkpoint(str(tampered / DS_SUBDIR), "step2")
        )
    for read in readers:
        with pytest.raises(CheckpointError) as refused:
            with tensors_only_loads(tampered):
                read()
        assert_refuses(refused.value, target, marker)

    # The trap is real: a full unpickle of that file runs it.
    torch.load(target, map_location="cpu", weights_only=False)
    assert marker.exists()


def assert_refuses(err: CheckpointError, target: Path, marker: Path) -> None:
    message = str(err)
    assert str(target) in message, message
    assert "non-tensor objects" in message and "trusted run" in message, message
    assert "posix.system" in message, message
    assert not marker.exists(), "the payload ran"
    assert not any(name in os.environ for name in FORCE)  # the environment is restored


@pytest.mark.slow
def test_a_tag_outside_the_checkpoint_is_refused(process_group, tmp_path):
    saved_engine(tmp_path, 0)
    state = json.loads((tmp_path / "mtl_state.json").read_text())
    (tmp_path / "mtl_state.json").write_text(json.dumps({**state, "tag": "../../elsewhere"}))
    manifest = tmp_path / "manifest.rank0.json"
    digests = json.loads(manifest.read_text())
    digests["mtl_state.json"] = hashlib.sha256(
        (tmp_path / "mtl_state.json").read_bytes()
    ).hexdigest()
    manifest.write_text(json.dumps(digests))
    with pytest.raises(CheckpointError, match=r"tag '\.\./\.\./elsewhere' is not a folder"):
        consolidated_weights(tmp_path)


def test_the_guard_overrides_an_explicit_full_unpickle_and_restores_the_environment(
    tmp_path, monkeypatch
):
    """What DeepSpeed does inside (``torch.load(..., weights_only=False)``) reads tensors
    only within the guard; a user's TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set aside, then back."""
    marker = tmp_path / "payload-ran"
    path = tmp_path / "ckpt" / "bad.pt"
    path.parent.mkdir()
    torch.save({"w": torch.ones(2), "x": Payload(marker)}, path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    before = set(torch.serialization.get_safe_globals())  # torch's own (exceptions, ...)
    with pytest.raises(CheckpointError, match="bad.pt contains non-tensor objects"):
        with tensors_only_loads(path.parent):
            with tensors_only_loads(path.parent):  # nested: the outer one stays in force
                pass
            assert os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1"
            assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ
            assert before < set(torch.serialization.get_safe_globals())
            torch.load(path, weights_only=False)
    assert not marker.exists()
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    assert set(torch.serialization.get_safe_globals()) == before  # the allowlist is scoped


def _torch_loads(tree: ast.AST) -> list[ast.Call]:
    """Calls of ``torch.load`` (or a bare ``load`` imported from torch) in a module."""
    from_torch = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization")
        for alias in node.names
        if alias.name == "load"
    }
    calls = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if (
            isinstance(f, ast.Attribute)
            and f.attr == "load"
            and isinstance(f.value, ast.Name)
            and f.value.id == "torch"
        ) or (isinstance(f, ast.Name) and f.id in from_torch):
            calls.append(node)
    return calls


def test_every_torch_load_in_the_source_reads_tensors_only():
    """``grep -rn "weights_only=False" mtl jobs benchmarks`` prints nothing, and every
    ``torch.load`` there passes ``weights_only=True`` explicitly."""
    files = sorted(p for d in ("mtl", "jobs", "benchmarks") for p in (REPO / d).rglob("*.py"))
    assert files
    unsafe = [str(p.relative_to(REPO)) for p in files if "weights_only=False" in p.read_text()]
    assert not unsafe, f"weights_only=False in {unsafe}"
    missing = []
    for path in files:
        for call in _torch_loads(ast.parse(path.read_text(), filename=str(path))):
            kw = {k.arg: k.value for k in call.keywords}
            value = kw.get("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                missing.append(f"{path.relative_to(REPO)}:{call.lineno}")
    assert not missing, f"torch.load without weights_only=True at {missing}"
