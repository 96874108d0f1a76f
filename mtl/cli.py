"""The ``mtl`` command line: multi-task training on Ray Train x DeepSpeed x MLflow.

::

    mtl [-q|--quiet] [-v|--verbose] COMMAND ...     (flags also accepted after the command)
      train [CONFIG] [key=value ...] [--resume RUN] [--name RUN]
      tune [CONFIG] [key=value ...] [--replay POLICY_FILE]
      baseline [CONFIG] [key=value ...] --out FILE
      sweep-budget [CONFIG] tau=0.05,0.25,1.0 [key=value ...]
      register RUN_ID [--name NAME] [--storage-path P] [--trust-checkpoint] [--tracking-uri URI]
      promote NAME VERSION [--tracking-uri URI]
      promote NAME --best METRIC [--mode max|min] [--tracking-uri URI]
      predict MODEL_URI INPUT [INPUT ...] --out DIR [--batch-size N] [--domain NAME]
              [--tracking-uri URI]
      serve MODEL_URI [--port P] [--host H] [--max-bytes N] [--tracking-uri URI]

Every command loads and validates the whole config before it starts Ray, so a typo fails in
a second with the key and the file named, not minutes later inside a worker.

Output: program results (the final JSON of train/tune, ``registered models:/...``, the promote
decision) go to stdout; progress, warnings and decisions go through ``logging`` to stderr,
``mtl.log.configure`` sets the level from ``--quiet`` (warnings and errors only) and
``--verbose`` (debug lines, Ray's own lines, tracebacks).

Exit codes: 0 done; 2 bad input (one line on stderr naming the problem and the fix); 1 an
internal failure (one line; ``--verbose`` adds the traceback). ``jobs/*.py`` use the same
``guarded`` wrapper, so ``ray job submit`` users see the same lines and codes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from mtl.config import ConfigError, TrainConfig, load_config

VERBOSE_HINT = "(rerun with --verbose for the traceback)"
log = logging.getLogger(__name__)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (usage is one ``--help`` away), exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        where = self.prog.removeprefix("mtl").strip()
        where = f"{where}: " if where else ""
        self.exit(2, f"mtl: {where}{message} (see `{self.prog} --help`)\n")


def global_flags(parser: argparse.ArgumentParser, default: object = False) -> None:
    """``--verbose`` / ``--quiet``, accepted before or after the command."""
    parser.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        default=default,
        help="debug lines, Ray's own lines and tracebacks on failure",
    )
    parser.add_argument(
        "--quiet", "-q", action="store_true", default=default, help="warnings and errors only"
    )


def _split(args: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG] [key=value ...]``: the config file is optional (embedded defaults)."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="mtl",
        description=__doc__.splitlines()[0].replace("``", "`") + " `mtl COMMAND --help` for one.",
        epilog="exit codes: 0 done; 2 bad input (one line naming the problem and the fix); "
        "1 an internal failure (one line; --verbose adds the traceback)",
    )
    global_flags(parser)
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
    reg.add_argument("run_id", metavar="RUN_ID", help="MLflow run id of a finished `mtl train`")
    reg.add_argument("--name", default="", help="registered model name")
    reg.add_argument(
        "--storage-path",
        default=TrainConfig.storage_path,
        help="where your runs live (train.storage_path: a folder or s3://bucket/prefix); the "
        "run's checkpoint must lie under it",
    )
    reg.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="register a checkpoint outside --storage-path (its weights, read as tensors only, "
        "become a model others load: only for checkpoints you trust)",
    )
    promote = sub.add_parser(
        "promote",
        help="point alias `champion` at a registered version, or at the best one on a metric",
    )
    promote.add_argument("name", metavar="NAME", help="registered model name")
    promote.add_argument(
        "version", nargs="?", metavar="VERSION", help="the version (or give --best METRIC)"
    )
    promote.add_argument(
        "--best",
        metavar="METRIC",
        help="the best version on METRIC (a version tag, e.g. metric/accuracy or delta_mtl) "
        "among versions with the same task set and evaluation data",
    )
    promote.add_argument(
        "--mode",
        choices=("max", "min"),
        help="with --best: higher or lower is better (default: the metric's own direction)",
    )
    predict = sub.add_parser(
        "predict", help="run a registered model on image files or folders, write every head"
    )
    predict.add_argument(
        "model_uri",
        metavar="MODEL_URI",
        help="e.g. models:/NAME@candidate, models:/NAME/2, runs:/...",
    )
    predict.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image files, or folders searched recursively for png/jpg/jpeg/bmp/webp",
    )
    predict.add_argument(
        "--out", required=True, metavar="DIR", help="writes DIR/predictions.jsonl, DIR/<head>/"
    )
    predict.add_argument("--batch-size", type=int, default=64, metavar="N", help="default 64")
    predict.add_argument(
        "--domain",
        default="",
        metavar="NAME",
        help="the images' domain, for a model that routes by domain (its tag `domains`)",
    )
    serve = sub.add_parser(
        "serve", help="serve a registered model over REST (MLflow's scoring server)"
    )
    serve.add_argument(
        "model_uri", metavar="MODEL_URI", help="e.g. models:/digits-moe@candidate or models:/NAME/2"
    )
    serve.add_argument("--port", "-p", type=int, default=5001)
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default loopback; the endpoint has no authentication)",
    )
    serve.add_argument(
        "--max-bytes",
        type=int,
        default=0,
        help="largest request body, larger ones get HTTP 413 (default: what "
        "tracking.serve_max_rows images of this model take as JSON)",
    )
    for p in (reg, promote, predict, serve):
        p.add_argument(
            "--tracking-uri",
            default="",
            metavar="URI",
            help="default: $MLFLOW_TRACKING_URI, ./mlflow.db",
        )
    for p in sub.choices.values():
        global_flags(p, default=argparse.SUPPRESS)  # after the command; keeps the global value
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come after options (`train cfg.yaml --resume RUN a=1`): collect them too.
    ns, rest = parser.parse_known_args(argv)
    if rest and (any(a.startswith("-") for a in rest) or not hasattr(ns, "args")):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if rest:
        ns.args += rest
    if ns.quiet and ns.verbose:
        parser.error("give --quiet or --verbose, not both")
    from mtl.log import configure

    configure(-1 if ns.quiet else 1 if ns.verbose else 0)
    return guarded(ns.command, lambda: _run(ns), verbose=ns.verbose)


def guarded(command: str, action: Callable[[], int], *, verbose: bool = False) -> int:
    """Run ``action``; bad input is one line and exit 2, any other failure one line and exit 1.

    Args:
        command: What is running, for the failure line (``mtl: train failed: ...``).
        action: Does the work and returns the exit code.
        verbose: Print the traceback too.
    """
    try:
        return action()
    except KeyboardInterrupt:
        print(f"mtl: {command} interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every failure ends in one line and a code
        if verbose:
            traceback.print_exc()
        if _is_input_error(err):
            print(_input_line(err), file=sys.stderr)
            return 2
        hint = "" if verbose else f" {VERBOSE_HINT}"
        print(
            f"mtl: {command} failed: {type(err).__name__}: {_one_line(err)}{hint}", file=sys.stderr
        )
        return 1


def _one_line(err: BaseException) -> str:
    """The message on one line; a long one (a remote traceback) keeps its first line."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if len(lines) > 4:
        return f"{lines[0]} (...)"
    return " ".join(lines) or repr(err)


def _input_line(err: BaseException) -> str:
    if isinstance(err, ConfigError):
        return f"mtl: config error: {_one_line(err)}"
    if type(err) is ValueError:
        return f"mtl: {_one_line(err)}"
    from mtl.data import DatasetMissingError

    if isinstance(err, DatasetMissingError):  # its lines say which file goes where: keep them
        return f"mtl: {type(err).__name__}: {str(err).strip()}"
    return f"mtl: {type(err).__name__}: {_one_line(err)}"


def _is_input_error(err: BaseException) -> bool:
    if isinstance(err, ConfigError) or type(err) is ValueError:
        return True  # without importing torch: a config error answers in a fraction of a second
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
    return isinstance(err, known)


def _run(ns: argparse.Namespace) -> int:
    if ns.command in ("register", "promote", "predict", "serve"):
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
    from mlflow.exceptions import MlflowException

    from mtl.tracking import check_reachable, resolve_tracking_uri

    if ns.command == "promote":
        _check_promote(ns)
    uri = resolve_tracking_uri(ns.tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        # MLflow would create an empty store there and then find nothing in it.
        raise ValueError(
            f"no MLflow store at {uri}: give the one your runs use, --tracking-uri URI"
        )
    check_reachable(uri)
    try:
        if ns.command == "promote":
            if ns.best is not None:
                return _promote_best(uri, ns.name, ns.best, ns.mode)
            return _promote(uri, ns.name, ns.version)
        if ns.command == "predict":
            return _predict(uri, ns)
        if ns.command == "serve":
            return _serve(uri, ns)
        return _register(uri, ns)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise ValueError(f"{_one_line(err)} (in {uri}; check the id or --tracking-uri)") from None


def _promote(uri: str, name: str, version: str) -> int:
    from mtl.tracking.registry import promote

    if not version.isdigit():
        raise ValueError(
            f"version {version!r} is not a number: give one, e.g. mtl promote {name} 1"
        )
    promote(uri, name, version)
    print(f"models:/{name}@champion -> version {version}")
    return 0


def _check_promote(ns: argparse.Namespace) -> None:
    """``promote NAME VERSION`` or ``promote NAME --best METRIC [--mode]``, nothing else."""
    if (ns.version is None) == (ns.best is None):
        raise ValueError(
            f"give a version or --best METRIC, one of them: mtl promote {ns.name} 3, or "
            f"mtl promote {ns.name} --best metric/accuracy"
        )
    if ns.mode is not None and ns.best is None:
        raise ValueError(f"--mode {ns.mode} goes with --best METRIC")


def _promote_best(uri: str, name: str, metric: str, mode: str | None) -> int:
    from mtl.tracking.policy import promote_best

    decision = promote_best(uri, name, metric, mode=mode)
    for line in decision.lines(name):  # what was compared and why, on stderr
        log.info("%s", line)
    print(f"models:/{name}@champion -> version {decision.version}")
    return 0


def _predict(uri: str, ns: argparse.Namespace) -> int:
    from mtl.predict import predict_images

    summary = predict_images(
        ns.model_uri, ns.inputs, ns.out, uri=uri, batch_size=ns.batch_size, domain=ns.domain
    )
    dense = (
        f"; maps of {', '.join(summary.dense_heads)} in {ns.out}/<head>/"
        if summary.dense_heads
        else ""
    )
    images = f"{summary.images} image{'s' if summary.images != 1 else ''}"
    print(f"predicted {images}: {summary.predictions}{dense}")
    return 0


def _serve(uri: str, ns: argparse.Namespace) -> int:
    import socket

    from mtl.tracking.registry import serve

    if not 0 < ns.port < 65536 or ns.max_bytes < 0:
        raise ValueError(f"--port {ns.port} must be in 1..65535 and --max-bytes >= 0")
    try:  # a taken port is a one-line error now, not a uvicorn log line after the load
        with socket.create_server((ns.host, ns.port)):
            pass
    except OSError as err:
        raise ValueError(
            f"cannot listen on {ns.host}:{ns.port} ({err}): choose another --port"
        ) from None
    if ns.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "listening on %s: anyone who reaches it can call the model (no authentication); "
            "put an authenticating proxy in front",
            ns.host,
        )
    serve(ns.model_uri, uri, host=ns.host, port=ns.port, max_bytes=ns.max_bytes)
    return 0


def _register(uri: str, ns: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from mtl import storage
    from mtl.train.register import register_checkpoint

    run = MlflowClient(uri).get_run(ns.run_id)
    tagged = run.data.tags.get("mtl.checkpoint")
    if not tagged or tagged == "None":
        raise ValueError(f"run {ns.run_id} has no checkpoint ({tagged!r})")
    storage.check_scheme(tagged, "the run's checkpoint (MLflow tag mtl.checkpoint)")
    storage.check_reachable(tagged, "the run's checkpoint (MLflow tag mtl.checkpoint)")
    if not storage.is_dir(tagged):
        where = "in S3" if storage.is_remote(tagged) else "on this machine"
        raise ValueError(f"run {ns.run_id} has no checkpoint {where} ({tagged!r})")
    checkpoint = checkpoint_under_root(tagged, ns.storage_path, trusted=ns.trust_checkpoint)
    version = register_checkpoint(checkpoint, uri, ns.run_id, run.data.metrics, ns.name)
    print(f"registered models:/{version.name}/{version.version} (alias candidate)")
    return 0


def checkpoint_under_root(tagged: str, storage_path: str, *, trusted: bool = False) -> Path | str:
    """The checkpoint named by a run's MLflow tag, if it lies under the storage root.

    Anyone who can write tags on the tracking server can point ``mtl.checkpoint`` anywhere,
    and registering ships the weights it finds there (read as tensors only) as a model others
    load, so a path outside the runs this machine wrote needs ``--trust-checkpoint``.
    Local links are resolved before the comparison; an ``s3://`` checkpoint must be in the
    root's bucket under its prefix (the URI is returned as it is).

    Raises:
        ValueError: Outside the root and not ``trusted``.
    """
    from mtl import storage

    if storage.is_remote(tagged) or storage.is_remote(storage_path):
        checkpoint, root = tagged, storage_path
    else:
        checkpoint = Path(tagged).resolve()
        root = Path(storage_path).expanduser().resolve()
    if not trusted and not storage.is_under(str(checkpoint), str(root)):
        raise ValueError(
            f"checkpoint {checkpoint} (MLflow tag mtl.checkpoint) lies outside the storage root "
            f"{root}: give the root your runs use with --storage-path DIR (or s3://bucket/prefix), "
            "or pass "
            "--trust-checkpoint if you trust this checkpoint (its weights become the model)"
        )
    return checkpoint


if __name__ == "__main__":
    raise SystemExit(main())
