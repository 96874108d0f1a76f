"""The config tree: strict loading, overrides, round trips, every shipped YAML."""

from pathlib import Path

import pytest

from mtl.config import Config, ConfigError, flatten, from_dict, load_config, to_dict

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_defaults_load_without_a_file():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.data.benchmark == "multimnist"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert from_dict(to_dict(cfg)) == cfg


def test_overrides_apply_with_types():
    cfg = load_config(None, ["train.epochs=3", "tasks.names=[left,right]", "tasks.weights.left=2"])
    assert cfg.train.epochs == 3
    assert cfg.tasks.names == ["left", "right"]
    assert cfg.tasks.weights == {"left": 2.0}


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epocs: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "train.epocs" in str(err.value) and str(bad) in str(err.value)


def test_unknown_override_key():
    with pytest.raises(ConfigError, match="model.widht"):
        load_config(None, ["model.widht=8"])


def test_wrong_type_names_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  micro_batch_size: lots\n")
    with pytest.raises(ConfigError, match="train.micro_batch_size"):
        load_config(bad)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("tasks.weights.left=-1", "weights must be >= 0"),
        ("train.lr=0", "train.lr"),
        ("deepspeed.zero_stage=4", "zero_stage"),
        ("deepspeed.precision=fp8", "precision"),
        ("train.num_workers=0", "num_workers"),
        ("tune.population=1", "population"),
        ("tune.initial=sobol", "tune.initial"),
        ("tune.spread_factor=1", "spread_factor"),
        ("tune.burn_in=-1", "tune.burn_in"),
        ("train.divergence_factor=0.5", "train.divergence_factor"),
        ("train.divergence_window=0", "train.divergence_window"),
    ],
)
def test_bad_values_rejected(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


def test_burn_in_with_pb2_rejected():  # Ray's PB2 takes no burn_in_period
    with pytest.raises(ConfigError, match="PB2 has no burn-in"):
        load_config(None, ["tune.scheduler=pb2", "tune.burn_in=1"])


def test_all_zero_weights_rejected():
    with pytest.raises(ConfigError, match="all zero"):
        load_config(None, ["tasks.weights={left: 0, right: 0}"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_flatten_gives_dotted_string_params():
    flat = flatten(to_dict(load_config(None, ["tasks.weights.left=1"])))
    assert flat["train.lr"] == "0.002"
    assert flat["tasks.weights.left"] == "1.0"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train:\n  epochs: [1,\n", "line 3"),
        ("- train\n- model\n", "line 1: the top level is a list"),
        ("\n\nhello\n", "line 3: the top level is a single value"),
        ("", "is empty"),
        ("train:\n  lr: 1\n  lr: 2\n", "duplicate key lr"),
    ],
    ids=["syntax", "list", "scalar", "empty", "duplicate"],
)
def test_yaml_errors_name_file_and_line(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and expected in str(err.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.lr=inf", "train.lr=inf"),
        ("train.lr=nan", "train.lr=nan"),
        ("train.weight_decay=-.inf", "train.weight_decay=-inf"),
        ("tasks.weights={left: .nan}", "tasks.weights.left=nan"),
        ("tune.grid_factors=[2.0,inf]", "tune.grid_factors[1]=inf"),
        ("tracking.register_if={mean_accuracy: inf}", "tracking.register_if.mean_accuracy=inf"),
    ],
)
def test_every_float_refuses_inf_and_nan(override, key):
    with pytest.raises(ConfigError, match="finite") as err:
        load_config(None, [override])
    assert key in str(err.value)


def test_malformed_override_value_is_a_config_error():
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(None, ["tasks.names=[left,"])
