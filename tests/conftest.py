"""Shared fixtures: the data root, a tiny config, and one Ray instance per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# MNIST: $MTL_DATA_DIR if set, else the full files beside the checkout, else the subset
# committed in the repository. The subset holds the very images the tests draw, at their own
# rows, so every build (and the stored loss curve) is the same with either; see
# tests/fixtures/make_mnist_subset.py.
FIXTURE_DATA = REPO / "tests" / "fixtures" / "data"
_SHARED_DATA = REPO.parent / "shared" / "data"
if not os.environ.get("MTL_DATA_DIR"):
    _full = (_SHARED_DATA / "MNIST" / "raw").is_dir()
    os.environ["MTL_DATA_DIR"] = str(_SHARED_DATA if _full else FIXTURE_DATA)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only
os.environ.setdefault("DS_ACCELERATOR", "cpu")
if "TRITON_INTERPRET" not in os.environ:
    import torch

    # kernels/ under Triton's interpreter on a machine without CUDA (read when a kernel is
    # defined, so before any test module imports one); fp32 only there.
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ["MTL_DATA_DIR"])
    if not (root / "MNIST" / "raw").is_dir():
        pytest.fail(f"MNIST raw files not found under {root}; set MTL_DATA_DIR")
    return root


@pytest.fixture(scope="session", autouse=True)
def _never_download():
    """Tests never touch the network: with ``data.download`` on by default, a test of a
    missing file would otherwise fetch MNIST (or wait on a firewall) instead of failing."""
    from mtl.data import mnist_family

    def offline(root: Path, source: mnist_family.MnistSource) -> None:
        raise OSError("tests never download (tests/conftest.py)")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mnist_family, "download", offline)
        yield


MLFLOW_URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@pytest.fixture(autouse=True)
def _mlflow_uris_restored():
    """Undo what a test left in MLflow's process-wide tracking and registry URIs (a test that
    loads ``models:/`` sets the registry URI; restoring ``get_registry_uri()``'s resolved
    value would pin a later test to an old store, or to a server that has been stopped)."""
    import sys

    env = {k: os.environ.get(k) for k in MLFLOW_URI_ENV}
    yield
    for module, name in (
        ("mlflow.tracking._model_registry.utils", "_registry_uri"),
        ("mlflow.tracking._tracking_service.utils", "_tracking_uri"),
    ):
        loaded = sys.modules.get(module)
        if loaded is not None and hasattr(loaded, name):  # private: see test_private_apis
            setattr(loaded, name, None)
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One dataset cache for the whole session, so tiny benchmarks are built once."""
    return tmp_path_factory.mktemp("mtl-cache")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: thread start-up costs more than the maths on a busy 2-core machine
    (10x slower with 2 threads), so modules of tiny models run single-threaded."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for every test that needs Ray (starting one costs seconds)."""
    ray = pytest.importorskip("ray")
    # address="local" never joins a cluster someone else started on this machine.
    ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()
