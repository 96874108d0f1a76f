"""The ``mtl`` command line: ``mtl train | baseline``.

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
    base = sub.add_parser(
        "baseline", help="train every task alone; write the single-task baseline table"
    )
    base.add_argument("args", nargs="*", metavar="[CONFIG] [key=value]")
    base.add_argument("--out", required=True, help="where to write the baseline table (JSON)")
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
    except (OSError, ValueError, RuntimeError) as err:
        # Input problems found before Ray starts (missing dataset, bad weights, unreachable
        # tracking store, corrupt checkpoint) are reported in one line, not a traceback.
        if not _is_input_error(err):
            raise
        print(f"mtl: {type(err).__name__}: {err}", file=sys.stderr)
    return 2


def _is_input_error(err: BaseException) -> bool:
    from mtl.data import DatasetCorruptError, DatasetMissingError
    from mtl.tracking import TrackingError
    from mtl.train.engine import CheckpointError

    known = (DatasetMissingError, DatasetCorruptError, TrackingError, CheckpointError)
    return isinstance(err, known) or type(err) is ValueError


def _run(ns: argparse.Namespace) -> int:
    path, overrides = _split(ns.args)
    cfg = load_config(path, overrides)
    if ns.command == "train":
        from mtl.train.launch import fit

        result = fit(cfg, resume=ns.resume, run_name=ns.name)
        shown = {k: v for k, v in result.metrics.items() if k.startswith("val/") or k == "step"}
        print(json.dumps(shown, indent=2, sort_keys=True))
        return 0
    if ns.command == "baseline":
        from mtl.train.baseline import run_baselines

        table = run_baselines(cfg, Path(ns.out))
        print(json.dumps(table["tasks"], indent=2))
        return 0
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
