"""cluster.yaml is a valid Ray cluster launcher config (Ray's own schema and defaults)."""

from pathlib import Path

import yaml

CLUSTER = Path(__file__).resolve().parent.parent / "cluster.yaml"


def test_cluster_yaml_passes_ray_schema():
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load(CLUSTER.read_text())
    validate_config(prepare_config(config))  # fills Ray's defaults, then checks the schema


def test_schema_check_is_real():
    import jsonschema
    import pytest
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load(CLUSTER.read_text())
    config["setup_commandz"] = ["typo"]
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))
