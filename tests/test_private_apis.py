"""Private (or undocumented) APIs of our dependencies that mtl relies on, one check each.

An upgrade that moves, renames or reshapes one fails here by name: the message says which API,
which of our files uses it, the version installed now and the version it was last checked
against (the "Private APIs relied on" block of constraints.txt's header, above ``-- pins --``).
Fast: nothing here starts Ray, a DeepSpeed engine or an MLflow server.

To add one: a ``@relied_on(name, package, used_by)`` check below (it raises, or fails an
``assert``, when the API is not what the file expects) and its name in the header block.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent
CONSTRAINTS = REPO / "constraints.txt"
BLOCK_TITLE = "# Private APIs relied on"


@dataclass(frozen=True)
class PrivateApi:
    name: str  # as listed in constraints.txt
    package: str  # the distribution that provides it
    used_by: str  # our file(s) that rely on it
    check: Callable[[], None]


PRIVATE_APIS: list[PrivateApi] = []


def relied_on(name: str, package: str, used_by: str) -> Callable:
    def register(check: Callable[[], None]) -> Callable[[], None]:
        PRIVATE_APIS.append(PrivateApi(name, package, used_by, check))
        return check

    return register


def _accepts(func: Callable, *names: str) -> None:
    """``func`` takes each of ``names`` as a keyword (or has ``**kwargs``)."""
    params = inspect.signature(func).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    missing = [n for n in names if n not in params]
    assert not missing, f"{func.__qualname__}{inspect.signature(func)} lacks {missing}"


def _positional(func: Callable, *names: str) -> None:
    """``func``'s leading parameters are ``names``, in order."""
    got = list(inspect.signature(func).parameters)[: len(names)]
    assert got == list(names), f"{func.__qualname__} starts with {got}, not {list(names)}"


def checked_versions() -> dict[str, str]:
    """``package -> version`` from the header block: lines ``#   <package> <version>: ...``."""
    found: dict[str, str] = {}
    for line in _header_block().splitlines():
        if m := re.match(r"#\s{2,}([A-Za-z][\w.-]*) (\d[\w.+-]*):", line):
            found[m.group(1)] = m.group(2)
    return found


def _header_block() -> str:
    header = CONSTRAINTS.read_text().split("# -- pins --")[0]
    start = header.find(BLOCK_TITLE)
    assert start >= 0, f"constraints.txt's header has no {BLOCK_TITLE!r} block"
    return header[start:]


# --- Ray ---------------------------------------------------------------------------------


def _pbt(**extra):
    from ray.tune.schedulers import PopulationBasedTraining

    kwargs = dict(time_attr="step", metric="fitness", mode="max", perturbation_interval=4)
    kwargs.update(hyperparam_mutations={}, custom_explore_fn=lambda c: c, synch=True)
    return PopulationBasedTraining(**{**kwargs, **extra})


@relied_on(
    "PopulationBasedTraining._trial_state/_synch/_next_perturbation_sync/_perturbation_interval",
    "ray",
    "mtl/tune/driver.py (_recovering)",
)
def _pbt_sync_state():
    from ray.tune.schedulers.pb2 import PB2

    for pbt in (_pbt(), PB2(time_attr="step", metric="fitness", mode="max",
                            perturbation_interval=4, hyperparam_bounds={"x": [0.0, 1.0]},
                            synch=True)):  # fmt: skip
        assert isinstance(pbt._trial_state, dict)
        assert pbt._synch is True
        assert pbt._perturbation_interval == 4
        assert pbt._next_perturbation_sync == 4  # the first sync point: one interval


@relied_on("_PBTTrialState.last_train_time/last_score", "ray", "mtl/tune/driver.py, tests/tune")
def _pbt_trial_state():
    from ray.tune.experiment import Trial
    from ray.tune.schedulers.pbt import _PBTTrialState

    state = _PBTTrialState(Trial("f", stub=True, trial_id="t"))
    assert state.last_train_time == 0 and state.last_score is None


@relied_on(
    "PopulationBasedTraining.on_trial_result/on_trial_error(tune_controller, trial, ...)",
    "ray",
    "mtl/tune/driver.py (_recovering overrides them)",
)
def _pbt_hooks():
    from ray.tune.schedulers import PopulationBasedTraining

    _positional(PopulationBasedTraining.on_trial_result, "self", "tune_controller", "trial")
    _positional(PopulationBasedTraining.on_trial_error, "self", "tune_controller", "trial")


@relied_on(
    "TuneController.get_live_trials and Trial.is_finished",
    "ray",
    "mtl/tune/driver.py (_LiveTrials)",
)
def _live_trials():
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment import Trial

    _positional(TuneController.get_live_trials, "self")
    trial = Trial("f", stub=True, trial_id="t")
    assert not trial.is_finished()
    trial.set_status(Trial.ERROR)
    assert trial.is_finished()


@relied_on(
    "PopulationBasedTraining._quantiles leaves out finished (ERROR) trials",
    "ray",
    "mtl/tune/driver.py (a guard-stopped trial is never a PBT donor)",
)
def _quantiles_skip_finished():
    from ray.tune.experiment import Trial
    from ray.tune.schedulers.pbt import _PBTTrialState

    pbt = _pbt(quantile_fraction=0.5)
    trials = [Trial("f", stub=True, trial_id=f"t{i}") for i in range(4)]
    pbt._trial_state = {t: _PBTTrialState(t) for t in trials}
    for t, score in zip(trials, (0.9, 0.6, 0.3, 0.1), strict=True):
        pbt._trial_state[t].last_score = score
    trials[0].set_status(Trial.ERROR)
    lower, upper = pbt._quantiles()
    assert trials[0] not in upper and upper == [trials[1]], (lower, upper)


@relied_on(
    "PopulationBasedTraining._log_config_on_step: pbt_policy_<trial_id>.txt, pbt_global.txt",
    "ray",
    "mtl/tune/space.py (read_policy), mtl/tune/report.py (_policy_files)",
)
def _policy_line_format():
    import tempfile

    from mtl.tune.space import read_policy

    with tempfile.TemporaryDirectory() as folder:
        pbt = _pbt(log_config=True)

        def trial(trial_id: str, weights: dict) -> SimpleNamespace:
            return SimpleNamespace(
                trial_id=trial_id, local_experiment_path=folder, local_dir=folder,
                last_result={"training_iteration": 2}, config={"weights": weights},
            )  # fmt: skip

        receiver, donor = trial("a_00000", {"x": 0.2}), trial("a_00001", {"x": 0.8})
        tags = SimpleNamespace(orig_tag="0_a"), SimpleNamespace(orig_tag="1_b")
        pbt._log_config_on_step(*tags, receiver, donor, {"weights": {"x": 0.7}})
        first, policy = read_policy(Path(folder) / "pbt_policy_a_00000.txt")
        assert first == {"weights": {"x": 0.8}} and policy == [(2, {"weights": {"x": 0.7}})]
        (line,) = (Path(folder) / "pbt_global.txt").read_text().splitlines()
        assert json.loads(line)[:4] == ["0_a", "1_b", 2, 2]


@relied_on(
    "PopulationBasedTraining._custom_explore_fn, PB2._hyperparam_bounds",
    "ray",
    "tests/tune/test_tune_inputs.py",
)
def _scheduler_fields():
    from ray.tune.schedulers.pb2 import PB2

    explore = lambda c: c  # noqa: E731
    assert _pbt(custom_explore_fn=explore)._custom_explore_fn is explore
    pb2 = PB2(time_attr="step", metric="fitness", mode="max", hyperparam_bounds={"x": [0, 1]})
    assert set(pb2._hyperparam_bounds) == {"x"}


@relied_on(
    "ray.autoscaler._private.commands.prepare_config, ray.autoscaler._private.util.validate_config",
    "ray",
    "tests/test_cluster_yaml.py",
)
def _autoscaler_schema():
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    _positional(prepare_config, "config")
    _positional(validate_config, "config")


@relied_on(
    "ray.train.WorkerGroupError(TrainingFailedError).worker_failures (alpha)",
    "ray",
    "mtl/train/launch.py (_worker_cause)",
)
def _worker_failures():
    from ray.train import TrainingFailedError, WorkerGroupError

    failure = ValueError("rank 0 broke")
    err = WorkerGroupError("failed", {0: failure})  # (error_message, worker_failures)
    assert isinstance(err, TrainingFailedError) and err.worker_failures == {0: failure}


@relied_on(
    "ray.train.torch.config._TorchBackend.on_start, _set_torch_distributed_env_vars, "
    "TorchConfig.backend_cls",
    "ray",
    "mtl/train/rendezvous.py",
)
def _torch_backend():
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

    _positional(_TorchBackend.on_start, "self", "worker_group", "backend_config")
    assert callable(_set_torch_distributed_env_vars)
    assert not inspect.signature(_set_torch_distributed_env_vars).parameters
    assert isinstance(TorchConfig.backend_cls, property)
    assert TorchConfig().backend_cls is _TorchBackend
    assert hasattr(TorchConfig(), "timeout_s")


@relied_on(
    "ray.train._internal.worker_group.WorkerGroup; worker groups' execute, execute_single, "
    "execute_single_async",
    "ray",
    "mtl/train/rendezvous.py",
)
def _worker_group():
    from ray.train._internal.worker_group import WorkerGroup
    from ray.train.v2._internal.execution.worker_group.execution_group import ExecutionGroup

    for group in (WorkerGroup, ExecutionGroup):
        _positional(group.execute, "self")
        _positional(group.execute_single, "self")
        _positional(group.execute_single_async, "self")


# --- Hugging Face datasets ---------------------------------------------------------------


@relied_on(
    "datasets.table.InMemoryTable(pa.Table), datasets.Dataset(arrow_table, info=, fingerprint=)",
    "datasets",
    "mtl/data/arrow.py (to_hf)",
)
def _datasets_table():
    import datasets
    import datasets.table
    import pyarrow as pa

    table = datasets.table.InMemoryTable(pa.table({"x": pa.array([1, 2, 3], pa.int64())}))
    features = datasets.Features({"x": datasets.Value("int64")})
    ds = datasets.Dataset(table, info=datasets.DatasetInfo(features=features), fingerprint="f")
    assert ds["x"][:] == [1, 2, 3] and ds.features == features
    assert hasattr(datasets.features.features, "FeatureType")


# --- MLflow ------------------------------------------------------------------------------


@relied_on(
    "mlflow.tracking._tracking_service.utils._get_store -> RestStore.get_host_creds",
    "mlflow",
    "mtl/tracking/__init__.py (_rest_sender)",
)
def _mlflow_store():
    from mlflow.store.tracking.rest_store import RestStore
    from mlflow.tracking._tracking_service.utils import _get_store

    store = _get_store("http://127.0.0.1:9")  # nothing is contacted
    assert isinstance(store, RestStore)
    assert store.get_host_creds().host == "http://127.0.0.1:9"


@relied_on(
    "mlflow.utils.rest_utils.http_request(max_retries=, timeout=, json=), verify_rest_response",
    "mlflow",
    "mtl/tracking/__init__.py (_rest_sender)",
)
def _mlflow_rest():
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    _positional(http_request, "host_creds", "endpoint", "method")
    _accepts(http_request, "max_retries", "timeout", "json")
    _positional(verify_rest_response, "response", "endpoint")


@relied_on(
    "mlflow.protos.service_pb2.LogBatch, mlflow.utils.proto_json_utils.message_to_json, "
    "Metric/RunTag.to_proto",
    "mlflow",
    "mtl/tracking/__init__.py (_rest_sender)",
)
def _mlflow_log_batch():
    from mlflow.entities import Metric, RunTag
    from mlflow.protos.service_pb2 import LogBatch
    from mlflow.utils.proto_json_utils import message_to_json

    body = message_to_json(
        LogBatch(
            run_id="r",
            metrics=[Metric("loss", 0.5, 1, 2).to_proto()],
            tags=[RunTag("k", "v").to_proto()],
        )
    )
    sent = json.loads(body)
    assert sent["run_id"] == "r" and sent["metrics"][0]["key"] == "loss"
    assert sent["tags"] == [{"key": "k", "value": "v"}]


@relied_on(
    "mlflow.protos.databricks_pb2.RESOURCE_ALREADY_EXISTS, ErrorCode.Name",
    "mlflow",
    "mtl/tracking/registry.py",
)
def _mlflow_error_codes():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    name = ErrorCode.Name(RESOURCE_ALREADY_EXISTS)
    assert name == "RESOURCE_ALREADY_EXISTS"
    assert MlflowException("x", error_code=RESOURCE_ALREADY_EXISTS).error_code == name


@relied_on(
    "logger 'mlflow.store.db.utils' (schema migration lines)",
    "mlflow",
    "mtl/tracking/__init__.py (_quiet_migrations)",
)
def _mlflow_migration_logger():
    import mlflow.store.db.utils as utils

    assert "getLogger(__name__)" in inspect.getsource(utils)
    assert utils.__name__ == "mlflow.store.db.utils"


@relied_on(
    "mlflow.tracking._model_registry.utils._registry_uri and "
    "mlflow.tracking._tracking_service.utils._tracking_uri",
    "mlflow",
    "tests/conftest.py (_mlflow_uris_restored)",
)
def _mlflow_global_uris():
    import os

    import mlflow
    import mlflow.tracking._model_registry.utils as registry
    import mlflow.tracking._tracking_service.utils as tracking

    assert hasattr(registry, "_registry_uri") and hasattr(tracking, "_tracking_uri")
    before = registry._registry_uri
    try:  # the variable is what set_registry_uri writes, so resetting it undoes that
        mlflow.set_registry_uri("sqlite:///private-api-check.db")
        assert registry._registry_uri == "sqlite:///private-api-check.db"
    finally:
        registry._registry_uri = before
        os.environ.pop("MLFLOW_REGISTRY_URI", None)


@relied_on(
    "mlflow.pyfunc.scoring_server.init(model) -> the ASGI app",
    "mlflow",
    "mtl/tracking/registry.py (serve)",
)
def _mlflow_scoring_server():
    from mlflow.pyfunc import scoring_server

    _positional(scoring_server.init, "model")


# --- DeepSpeed ---------------------------------------------------------------------------


@relied_on(
    "deepspeed.moe.layer.MoE(...).deepspeed_moe.experts.deepspeed_experts, .num_experts, "
    "expert params allreduce=False, forward -> (out, l_aux, counts)",
    "deepspeed",
    "mtl/train/expert_parallel.py, mtl/train/engine.py (parameter_groups)",
)
def _deepspeed_moe():
    from torch import nn

    from mtl.train.engine import import_deepspeed

    import_deepspeed(use_gpu=False)
    from deepspeed.moe.layer import MoE

    layer = MoE(
        hidden_size=8, expert=nn.Sequential(nn.Linear(8, 8)), num_experts=2, ep_size=1, k=1,
        drop_tokens=False, top2_2nd_expert_sampling=False,
    )  # fmt: skip
    experts = layer.deepspeed_moe.experts.deepspeed_experts
    assert isinstance(experts, nn.ModuleList) and len(experts) == 2 and layer.num_experts == 2
    assert all(getattr(p, "allreduce", True) is False for p in experts.parameters())
    returns = inspect.signature(MoE.forward).return_annotation
    assert "Tuple" in str(returns) or "tuple" in str(returns), returns


@relied_on(
    "deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer(param_groups)",
    "deepspeed",
    "mtl/train/engine.py (parameter_groups)",
)
def _deepspeed_moe_groups():
    from mtl.train.engine import import_deepspeed

    import_deepspeed(use_gpu=False)
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    _positional(split_params_into_different_moe_groups_for_optimizer, "param_groups")


@relied_on(
    "deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(dir, tag=)",
    "deepspeed",
    "mtl/train/engine.py (consolidated_weights)",
)
def _zero_to_fp32():
    from mtl.train.engine import import_deepspeed

    import_deepspeed(use_gpu=False)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    _positional(get_fp32_state_dict_from_zero_checkpoint, "checkpoint_dir")
    _accepts(get_fp32_state_dict_from_zero_checkpoint, "tag")


@relied_on(
    "ZeRO-0 checkpoint layout <tag>/mp_rank_00_model_states.pt holding 'module'",
    "deepspeed",
    "mtl/train/engine.py (consolidated_weights)",
)
def _model_states_file():
    from mtl.train.engine import import_deepspeed

    import_deepspeed(use_gpu=False)
    from deepspeed.runtime.engine import DeepSpeedEngine

    name = inspect.getsource(DeepSpeedEngine._get_ckpt_name)
    assert '"mp_rank_" + mp_rank_str + "_model_states.pt"' in name
    assert "dict(module=module_state_dict" in inspect.getsource(
        DeepSpeedEngine._common_checkpoint_state
    )


@relied_on(
    "checkpoint types LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address",
    "deepspeed",
    "mtl/train/engine.py (the weights-only allowlist)",
)
def _deepspeed_checkpoint_types():
    import importlib

    from mtl.train.engine import import_deepspeed

    import_deepspeed(use_gpu=False)
    for path in (
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
    ):
        module, name = path.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        assert f"{cls.__module__}.{cls.__qualname__}" == path


# --- PyTorch, torchvision, timm ----------------------------------------------------------


@relied_on(
    "TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides torch.load(weights_only=False)",
    "torch",
    "mtl/train/engine.py (tensors_only_loads: DeepSpeed's own loads)",
)
def _forced_weights_only():
    import os
    import pickle
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "f.pt"
        torch.save({"x": torch.ones(1), "obj": SimpleNamespace(a=1)}, path)
        saved = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
        try:
            with pytest.raises(pickle.UnpicklingError):
                torch.load(path, weights_only=False)
        finally:
            if saved is None:
                os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
            else:
                os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = saved
    assert hasattr(torch.serialization, "safe_globals")


@relied_on(
    "torch.distributed.TCPStore(master_listen_fd=, use_libuv=)",
    "torch",
    "mtl/train/rendezvous.py (open_store)",
)
def _tcpstore_fd():
    from torch.distributed import TCPStore

    doc = TCPStore.__init__.__doc__ or ""
    assert "master_listen_fd" in doc and "use_libuv" in doc, doc[:300]


@relied_on(
    "torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, "
    "flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)",
    "torch",
    "mtl/models/flops.py",
)
def _flops():
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    assert torch.ops.aten._scaled_dot_product_flash_attention_for_cpu is not None
    _positional(sdpa_flop_count, "query_shape", "key_shape", "value_shape")
    _accepts(FlopCounterMode, "display", "custom_mapping")
    assert sdpa_flop_count((1, 2, 4, 8), (1, 2, 4, 8), (1, 2, 4, 8)) > 0


@relied_on(
    "torchvision.transforms.v2._utils.query_size, Transform._call_kernel, "
    "make_params/transform hooks",
    "torchvision",
    "mtl/data/transforms.py (RandomScaleCrop)",
)
def _v2_transform_hooks():
    import torch
    from torchvision import tv_tensors

    from mtl.data.transforms import RandomScaleCrop

    image = tv_tensors.Image(torch.rand(1, 12, 18))
    mask = tv_tensors.Mask(torch.zeros(12, 18, dtype=torch.long))
    out_image, out_mask = RandomScaleCrop((6, 9), (0.5, 0.5))(image, mask)
    assert out_image.shape == (1, 6, 9) and out_mask.shape == (6, 9)
    assert isinstance(out_mask, tv_tensors.Mask)


@relied_on(
    "timm adapt_input_conv(in_chans, conv_weight), resample_abs_pos_embed(num_prefix_tokens=), "
    "resample_patch_embed(patch_embed, new_size)",
    "timm",
    "mtl/models/pretrained.py, mtl/models/standard.py",
)
def _timm_helpers():
    from timm.layers import resample_abs_pos_embed, resample_patch_embed
    from timm.models import adapt_input_conv

    _positional(adapt_input_conv, "in_chans", "conv_weight")
    _positional(resample_abs_pos_embed, "posemb", "new_size")
    _accepts(resample_abs_pos_embed, "num_prefix_tokens")
    _positional(resample_patch_embed, "patch_embed", "new_size")


@relied_on(
    "timm vision_transformer.Block layout: norm1, attn, ls1, norm2, mlp.fc1/act/norm/fc2, ls2",
    "timm",
    "mtl/prune.py, mtl/models/moe.py, mtl/models/interrogate.py",
)
def _timm_block():
    from timm.models.vision_transformer import Block

    block = Block(dim=8, num_heads=2)
    for name in ("norm1", "attn", "ls1", "norm2", "mlp", "ls2"):
        assert hasattr(block, name), name
    for name in ("fc1", "act", "norm", "fc2"):
        assert hasattr(block.mlp, name), f"mlp.{name}"


@relied_on(
    "torchjd PCGradWeighting draws its projection order with torch.randperm on the global CPU "
    "generator",
    "torchjd",
    "mtl/methods/pcgrad.py",
)
def _torchjd_pcgrad_order():
    import torch
    from torchjd.aggregation import PCGradWeighting

    # Three pairwise-conflicting gradients: the projected sum depends on the order.
    jacobian = torch.tensor([[1.0, 0.0, 0.2], [-0.7, 1.0, 0.0], [-0.2, -0.9, 1.0]])
    gram = jacobian @ jacobian.T

    def seeded(seed: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return PCGradWeighting()(gram)

    assert torch.equal(seeded(0), seeded(0)), "the same seed must give the same order"
    outcomes = {tuple(seeded(s).tolist()) for s in range(12)}
    assert len(outcomes) > 1, "the order no longer follows the global generator"


# --- the tests ---------------------------------------------------------------------------


@pytest.mark.parametrize("api", PRIVATE_APIS, ids=lambda a: f"{a.package}:{a.check.__name__}")
def test_private_api_is_as_the_code_expects(api: PrivateApi):
    try:
        api.check()
    except Exception as err:  # noqa: BLE001 - every way it broke is reported the same way
        checked = checked_versions().get(api.package, "?")
        pytest.fail(
            f"private API {api.name} of {api.package} (relied on by {api.used_by}) is not "
            f"what the code expects under {api.package} {version(api.package)}; it was "
            f"checked against {api.package} {checked} (constraints.txt). "
            f"{type(err).__name__}: {err}",
            pytrace=False,
        )


def test_constraints_header_lists_every_private_api_and_the_versions_checked():
    block = " ".join(_header_block().replace("#", " ").split())
    missing = [a.name for a in PRIVATE_APIS if " ".join(a.name.split()) not in block]
    assert not missing, f"add to constraints.txt's {BLOCK_TITLE!r} block: {missing}"
    versions = checked_versions()
    packages = sorted({a.package for a in PRIVATE_APIS})
    assert sorted(versions) == packages, f"one '#   <package> <version>:' line each: {packages}"
