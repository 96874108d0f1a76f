"""The ``mtl`` command line: ``mtl train | tune | baseline | sweep-budget | register | promote``.

Every command loads and validates the whole config before it starts Ray, so a typo fails in
a second with the key and the file named, not minutes later inside a worker.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mtl.config import ConfigError, load_config


def _split(args: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG] [key=value ...]``: the config file is optional (embedded defaults)."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train one model on Ray Train x DeepSpeed")
    train.add_argument("args", nargs="*", metavar="[CONFIG] [key=value]")
    train.add_argument("--resume", metavar="RUN", help="continue RUN from its latest checkpoint")
    train.add_argument("--name", metavar="RUN", help="run name (default: benchmark-model-time)")
    tune = sub.add_parser("tune", help="PBT/PB2 over the loss weights, a Ray Train job per trial")
    tune.add_argument("args", nargs="*", metavar="[CONFIG] [key=value]")
    tune.add_argument(
        "--replay", metavar="POLICY_FILE", help="retrain one model on a PBT weight schedule"
    )
    base = sub.add_parser(
        "baseline", help="train every task alone; write the single-task baseline table"
    )
    base.add_argument("args", nargs="*", metavar="[CONFIG] [key=value]")
    base.add_argument("--out", required=True, help="where to write the baseline table (JSON)")
    sweep = sub.add_parser("sweep-budget", help="InterroGate at several budgets: Δ_MTL vs FLOPs")
    sweep.add_argument("args", nargs="*", metavar="[CONFIG] tau=0.05,0.25,1.0 [key=value]")
    reg = sub.add_parser("register", help="fix, verify and register the model of a finished run")
    reg.add_argument("run_id", help="MLflow run id of a finished `mtl train`")
    reg.add_argument("--name", default="", help="registered model name")
    promote = sub.add_parser("promote", help="point alias `champion` at a registered version")
    promote.add_argument("name")
    promote.add_argument("version")
    for p in (reg, promote):
        p.add_argument(
            "--tracking-uri", default="", help="default: $MLFLOW_TRACKING_URI, ./mlflow.db"
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come after options (`train cfg.yaml --resume RUN a=1`): collect them too.
    ns, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    ns.args += rest
    try:
        return _run(ns)
    except ConfigError as err:
        print(f"mtl: config error: {err}", file=sys.stderr)
    except (OSError, ValueError, RuntimeError, AssertionError) as err:
        # Input problems found before Ray starts (missing dataset, bad weights, unreachable
        # tracking store, corrupt checkpoint) are reported in one line, not a traceback.
        if not _is_input_error(err):
            raise
        print(f"mtl: {type(err).__name__}: {err}", file=sys.stderr)
    return 2


def _is_input_error(err: BaseException) -> bool:
    from mtl.data import DatasetCorruptError, DatasetMissingError
    from mtl.models.pretrained import MissingWeightsError, PretrainedWeightsError
    from mtl.prune import PruneVerificationError
    from mtl.tracking import TrackingError
    from mtl.train.engine import CheckpointError

    known = (
        DatasetMissingError,
        DatasetCorruptError,
        TrackingError,
        CheckpointError,
        PruneVerificationError,
        MissingWeightsError,
        PretrainedWeightsError,
    )
    return isinstance(err, known) or type(err) is ValueError


def _run(ns: argparse.Namespace) -> int:
    if ns.command in ("register", "promote"):
        return _registry(ns)
    path, overrides = _split(ns.args)
    taus = [a for a in overrides if a.startswith("tau=")]
    overrides = [a for a in overrides if not a.startswith("tau=")]
    cfg = load_config(path, overrides)
    if ns.command == "sweep-budget":
        from mtl.train.sweep import sweep_budget

        if len(taus) != 1:
            raise ValueError("give the budgets once, as tau=0.05,0.25,1.0")
        try:
            values = [float(t) for t in taus[0].removeprefix("tau=").split(",")]
        except ValueError:
            raise ValueError(f"{taus[0]!r}: budgets must be numbers, e.g. tau=0.05,0.25") from None
        sweep_budget(cfg, values)
        return 0
    if ns.command == "train":
        from mtl.train.launch import fit

        result = fit(cfg, resume=ns.resume, run_name=ns.name)
        shown = {k: v for k, v in result.metrics.items() if k.startswith("val/") or k == "step"}
        print(json.dumps(shown, indent=2, sort_keys=True))
        return 0
    if ns.command == "tune":
        from mtl.tune.driver import tune_weights

        sweep = tune_weights(cfg, replay=ns.replay)
        shown = {
            "sweep": sweep.name,
            "best_trial": sweep.best_trial,
            "fitness": sweep.fitness,
            "weights": sweep.weights,
            "schedule": sweep.schedule,
            "mlflow_parent_run": sweep.parent_run_id,
            "model_version": sweep.model_version,
        }
        print(json.dumps(shown, indent=2))
        return 0
    if ns.command == "baseline":
        from mtl.train.baseline import run_baselines

        table = run_baselines(cfg, Path(ns.out))
        print(json.dumps(table["tasks"], indent=2))
        return 0
    return 2


def _registry(ns: argparse.Namespace) -> int:
    from mtl.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(ns.tracking_uri)
    if ns.command == "promote":
        from mtl.tracking.registry import promote

        promote(uri, ns.name, ns.version)
        print(f"models:/{ns.name}@champion -> version {ns.version}")
        return 0
    from mlflow.tracking import MlflowClient

    from mtl.train.register import register_checkpoint

    run = MlflowClient(uri).get_run(ns.run_id)
    checkpoint = run.data.tags.get("mtl.checkpoint")
    if not checkpoint or not Path(checkpoint).is_dir():
        raise ValueError(f"run {ns.run_id} has no checkpoint on this machine ({checkpoint!r})")
    version = register_checkpoint(Path(checkpoint), uri, ns.run_id, run.data.metrics, ns.name)
    print(f"registered models:/{version.name}/{version.version} (alias candidate)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
