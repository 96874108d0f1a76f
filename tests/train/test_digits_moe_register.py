"""configs/digits_moe.yaml registers: a tiny run of the multi-domain task-expert MoE trains
on Ray x DeepSpeed, its fixed model takes ``{"image", "domain"}`` and, loaded back from the
registry with ``mlflow.pyfunc``, predicts every domain as the trained (routed) model does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mtl.config import load_config

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "digits_moe.yaml"
DOMAINS = ("mnist", "mnist_m", "optdigits")


@pytest.fixture(scope="module")
def registered(tmp_path_factory, cache_dir, data_root, ray_session):
    from mtl.train.launch import fit

    tmp = tmp_path_factory.mktemp("digits-moe")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = load_config(
        CONFIG,
        [
            "model.width=8",
            "model.depth=2",
            "data.train_size=256",
            "data.val_size=64",
            "train.num_workers=1",
            "train.micro_batch_size=32",
            "train.lr=0.01",
            "train.max_steps=150",
            "train.log_every_steps=50",
            "train.val_every_steps=150",
            "train.checkpoint_every_steps=150",
            f"train.storage_path={tmp / 'runs'}",
            f"tracking.tracking_uri={uri}",
            f"data.cache_dir={cache_dir}",
            f"data.root={data_root}",
        ],
    )
    return fit(cfg, run_name="digits-moe")


def _load(uri: str, model_uri: str):
    import mlflow

    previous = mlflow.get_registry_uri()
    mlflow.set_registry_uri(uri)
    try:
        return mlflow.pyfunc.load_model(model_uri)
    finally:
        mlflow.set_registry_uri(previous)


def test_run_registers_a_model_that_takes_the_domain(registered):
    from mlflow.tracking import MlflowClient

    result = registered
    print({k: round(v, 3) for k, v in result.metrics.items() if k.startswith("val/")})
    assert result.model_version == "1"
    client = MlflowClient(tracking_uri=result.tracking_uri, registry_uri=result.tracking_uri)
    version = client.get_model_version_by_alias("digits-moe", "candidate")
    assert version.tags["domains"] == ",".join(DOMAINS)
    assert client.get_run(result.mlflow_run_id).info.status == "FINISHED"
    model = _load(result.tracking_uri, "models:/digits-moe@candidate")
    inputs = model.metadata.get_input_schema().inputs
    assert [(spec.name, str(spec.type), spec.shape) for spec in inputs] == [
        ("image", "float32", (-1, 3, 28, 28)),
        ("domain", "int64", (-1,)),
    ]


def test_registered_model_predicts_each_domain_as_the_trained_model(registered):
    from mlflow.exceptions import MlflowException

    from mtl.data import load_splits, make_loader
    from mtl.train.loop import active_taskset
    from mtl.train.register import load_trained

    cfg, trained = load_trained(Path(registered.checkpoint))
    routes = trained.routes()
    print(f"routes per domain: {routes}")
    assert len({str(r) for r in routes.values()}) > 1, "domains share one route: domain unused"
    _, val = load_splits(cfg.data, active_taskset(cfg))
    batch = next(iter(make_loader(val, 48, train=False)))
    x, own = batch["image"], batch["domain"].long()
    model = _load(registered.tracking_uri, "models:/digits-moe/1")
    for domain in [own, *(torch.full_like(own, d) for d in range(len(DOMAINS)))]:
        out = model.predict({"image": x.numpy(), "domain": domain.numpy()})["digit"]
        with torch.no_grad():
            expected = trained(x, domain)["digit"].numpy()
        np.testing.assert_allclose(out, expected, atol=1e-4)
    per_domain = [model.predict({"image": x.numpy(), "domain": np.full(48, d)})["digit"]
                  for d in range(len(DOMAINS))]  # fmt: skip
    assert not np.allclose(per_domain[0], per_domain[1])  # the domain changes the answer
    with pytest.raises(MlflowException, match="domain"):
        model.predict(x.numpy())  # images alone: the schema names the missing input
