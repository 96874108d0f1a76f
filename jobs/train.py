"""Entry point for ``ray job submit``: train one model on the cluster the job runs in.

ray job submit --working-dir . -- python jobs/train.py configs/multimnist.yaml train.num_workers=4
"""

import argparse
import json

from mtl.config import load_config
from mtl.train.launch import fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML file in configs/")
    parser.add_argument("overrides", nargs="*", help="key=value")
    parser.add_argument("--resume", metavar="RUN")
    parser.add_argument("--name", metavar="RUN")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)  # fails here, before any worker starts
    result = fit(cfg, resume=args.resume, run_name=args.name)
    print(
        json.dumps(
            {"run": result.run_name, "mlflow_run_id": result.mlflow_run_id, **result.metrics},
            default=str,
        )
    )


if __name__ == "__main__":
    main()
