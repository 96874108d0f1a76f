"""Entry point for ``ray job submit``: a PBT/PB2 sweep over the loss weights on the cluster.

ray job submit --working-dir . -- python jobs/tune.py configs/pbt_multimnist.yaml tune.population=8
"""

import argparse
import json

from mtl.config import load_config
from mtl.tune.driver import tune_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML file in configs/")
    parser.add_argument("overrides", nargs="*", help="key=value")
    parser.add_argument("--replay", metavar="POLICY_FILE")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)  # fails here, before any trial starts
    sweep = tune_weights(cfg, replay=args.replay)
    print(
        json.dumps(
            {
                "sweep": sweep.name,
                "best_trial": sweep.best_trial,
                "fitness": sweep.fitness,
                "weights": sweep.weights,
                "mlflow_parent_run": sweep.parent_run_id,
                "model_version": sweep.model_version,
            }
        )
    )


if __name__ == "__main__":
    main()
