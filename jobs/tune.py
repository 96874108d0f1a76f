"""Entry point for ``ray job submit``: a PBT/PB2 sweep over the loss weights on the cluster.

ray job submit --working-dir . -- python jobs/tune.py configs/pbt_multimnist.yaml tune.population=8

Errors read as ``mtl tune``'s: bad input is one line and exit 2, a failure one line and
exit 1 (``--verbose`` adds the traceback).
"""

import json
import sys

from mtl.cli import OneLineParser, global_flags, guarded
from mtl.log import configure, configure_from_env


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="jobs/tune.py", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML file in configs/")
    parser.add_argument("overrides", nargs="*", help="key=value")
    parser.add_argument("--replay", metavar="POLICY_FILE")
    global_flags(parser)
    args = parser.parse_intermixed_args(argv)
    # --quiet / --verbose, else the submitter's MTL_VERBOSITY (a job's runtime env), else 0.
    if args.quiet or args.verbose:
        configure(-1 if args.quiet else 1)
    else:
        configure_from_env()
    return guarded("tune", lambda: _tune(args), verbose=args.verbose)


def _tune(args) -> int:
    from mtl.config import load_config

    cfg = load_config(args.config, args.overrides)  # fails here, before any trial starts
    from mtl.tune.driver import tune_weights  # torch, Ray: only for a config that loads

    sweep = tune_weights(cfg, replay=args.replay)
    fields = ("name", "best_trial", "fitness", "weights", "parent_run_id", "model_version")
    keys = ("sweep", "best_trial", "fitness", "weights", "mlflow_parent_run", "model_version")
    print(json.dumps({k: getattr(sweep, f) for k, f in zip(keys, fields, strict=True)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
