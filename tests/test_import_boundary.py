"""The pure core never imports Ray, DeepSpeed or MLflow (STYLE.md: import boundary)."""

import subprocess
import sys

PURE = [
    "mtl.config",
    "mtl.tasks",
    "mtl.data",
    "mtl.models",
    "mtl.losses",
    "mtl.metrics",
    "mtl.prune",
    "mtl.train.step",
    "mtl.tune.space",
    "mtl.tune.resources",
    "mtl.config_checks",
    "mtl.methods",
    "mtl.single_gate_eval",
    "mtl.prune_single_gate",
    *(f"mtl.methods.{m}" for m in ("ew", "uw", "dwa", "rlw", "famo", "pcgrad", "cagrad")),
    *(f"mtl.methods.{m}" for m in ("mgda_ub", "imtl_g", "nash_mtl", "gradients", "combine")),
]
HEAVY = ("ray", "deepspeed", "mlflow")


def test_pure_core_imports_no_heavy_framework():
    code = (
        "import sys\n"
        f"for m in {PURE!r}: __import__(m)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_kernels_import_nothing_of_mtl():
    code = (
        "import sys\n"
        "import kernels.gate_mix, kernels.grouped_mlp\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mtl', *"
        f"{HEAVY!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
