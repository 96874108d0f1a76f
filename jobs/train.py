"""Entry point for ``ray job submit``: train one model on the cluster the job runs in.

ray job submit --working-dir . -- python jobs/train.py configs/multimnist.yaml train.num_workers=4

Errors read as ``mtl train``'s: bad input is one line and exit 2, a failure one line and
exit 1 (``--verbose`` adds the traceback).
"""

import json
import sys

from mtl.cli import OneLineParser, global_flags, guarded
from mtl.log import configure, configure_from_env


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="jobs/train.py", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML file in configs/")
    parser.add_argument("overrides", nargs="*", help="key=value")
    parser.add_argument("--resume", metavar="RUN")
    parser.add_argument("--name", metavar="RUN")
    global_flags(parser)
    args = parser.parse_intermixed_args(argv)
    # --quiet / --verbose, else the submitter's MTL_VERBOSITY (a job's runtime env), else 0.
    if args.quiet or args.verbose:
        configure(-1 if args.quiet else 1)
    else:
        configure_from_env()
    return guarded("train", lambda: _train(args), verbose=args.verbose)


def _train(args) -> int:
    from mtl.config import load_config

    cfg = load_config(args.config, args.overrides)  # fails here, before any worker starts
    from mtl.train.launch import fit  # torch, Ray: only for a config that loads

    result = fit(cfg, resume=args.resume, run_name=args.name)
    shown = {"run": result.run_name, "mlflow_run_id": result.mlflow_run_id, **result.metrics}
    print(json.dumps(shown, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
