"""Output: the ``[mtl]`` format, --quiet / --verbose levels, MTL_VERBOSITY, the ETA arithmetic,
and (slow) a real tiny Ray Train run whose default output has progress lines with an ETA and
none of Ray's per-report metrics dicts."""

from __future__ import annotations

import logging
import re
import time
import warnings

import pytest

from mtl import log as mtl_log


@pytest.fixture
def restored(monkeypatch):
    """Each test configures logging; put the ``mtl`` logger, the filters and the env back."""
    for key in (mtl_log.ENV, *mtl_log.QUIET_ENV):
        monkeypatch.delenv(key, raising=False)  # restored to the outer value afterwards
    logger = logging.getLogger("mtl")
    state = logger.level, list(logger.handlers), logger.propagate
    root = logging.getLogger().level
    filters = {n: list(logging.getLogger(n).filters) for n, _ in mtl_log.HARMLESS_LOGS}
    with warnings.catch_warnings():
        yield
    logger.setLevel(state[0])
    logger.handlers[:] = state[1]
    logger.propagate = state[2]
    logging.getLogger().setLevel(root)
    for name, kept in filters.items():
        logging.getLogger(name).filters[:] = kept
    mtl_log._SET_BY_US.clear()


def _emit(capsys) -> list[str]:
    child = logging.getLogger("mtl.train.example")
    child.debug("a debug line")
    child.info("an info line")
    child.warning("a warning line")
    return capsys.readouterr().err.splitlines()


def test_default_format_is_mtl_prefix_on_stderr_info_and_up(restored, capsys):
    mtl_log.configure(0)
    lines = _emit(capsys)
    assert lines == ["[mtl] an info line", "[mtl] a warning line"]
    assert capsys.readouterr().out == ""  # progress never goes to stdout


def test_quiet_shows_warnings_only(restored, capsys):
    mtl_log.configure(-1)
    assert _emit(capsys) == ["[mtl] a warning line"]


def test_verbose_shows_debug_with_level_and_logger(restored, capsys):
    mtl_log.configure(1)
    assert _emit(capsys) == [
        "[mtl] DEBUG mtl.train.example: a debug line",
        "[mtl] INFO mtl.train.example: an info line",
        "[mtl] WARNING mtl.train.example: a warning line",
    ]


def test_configure_twice_keeps_one_handler(restored, capsys):
    mtl_log.configure(0)
    mtl_log.configure(0)
    assert _emit(capsys) == ["[mtl] an info line", "[mtl] a warning line"]


def test_other_ranks_show_warnings_only_unless_verbose(restored, capsys):
    mtl_log.configure(0, rank=1)
    assert _emit(capsys) == ["[mtl] a warning line"]
    mtl_log.configure(1, rank=1)
    assert len(_emit(capsys)) == 3


@pytest.mark.parametrize("level", [-1, 0, 1])
def test_env_round_trip(restored, monkeypatch, capsys, level):
    import os

    mtl_log.configure(level)
    assert os.environ[mtl_log.ENV] == str(level)
    logging.getLogger("mtl").handlers.clear()  # as a fresh worker process would start
    assert mtl_log.configure_from_env() == level
    assert mtl_log.verbosity() == level
    assert len(_emit(capsys)) == {-1: 1, 0: 2, 1: 3}[level]


def test_unset_env_is_default_and_a_bad_value_names_the_fix(restored, monkeypatch):
    assert mtl_log.verbosity() == 0
    monkeypatch.setenv(mtl_log.ENV, "loud")
    with pytest.raises(ValueError, match=r"MTL_VERBOSITY='loud': use -1 \(quiet\)"):
        mtl_log.configure_from_env()
    with pytest.raises(ValueError, match="verbosity 2"):
        mtl_log.configure(2)


def test_harmless_lines_hidden_by_default_and_back_with_verbose(restored, capfd):
    # The third-party loggers keep their own handlers; a plain one stands in for them here.
    name, _ = mtl_log.HARMLESS_LOGS[0]
    target = logging.getLogger(name)
    handler = logging.StreamHandler()
    target.addHandler(handler)
    try:
        mtl_log.configure(0)
        target.warning("Attempting to get learning rate from scheduler before it has started")
        target.warning("a real DeepSpeed warning")
        err = capfd.readouterr().err
        assert "a real DeepSpeed warning" in err and "Attempting" not in err
        mtl_log.configure(1)
        target.warning("Attempting to get learning rate from scheduler before it has started")
        assert "Attempting" in capfd.readouterr().err
    finally:
        target.removeHandler(handler)


def test_harmless_warnings_ignored_by_default(restored):
    mtl_log.configure(0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated.", FutureWarning, 2)
        warnings.warn("something else is deprecated", FutureWarning, 2)
    assert [str(w.message) for w in seen] == ["something else is deprecated"]


def test_ray_knobs_follow_the_verbosity(restored, monkeypatch):
    mtl_log.configure(0)
    assert mtl_log.ray_train_log_level() == "WARNING"
    assert mtl_log.ray_env(local=True)["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in mtl_log.ray_env(local=False)
    import os

    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"
    mtl_log.configure(1)
    assert mtl_log.ray_train_log_level() == "INFO"
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in mtl_log.ray_env(local=True)
    assert "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ  # MLflow's default again


def test_eta_on_a_fake_clock():
    eta = mtl_log.Eta(total=100)
    eta.begin(step=0, now=1000.0)
    assert eta.tick(0, 1000.0) == float("inf")  # no progress yet: no estimate
    assert eta.tick(10, 1020.0) == pytest.approx(90 * 2.0)  # 2 s per step so far
    assert eta.tick(50, 1060.0) == pytest.approx(50 * 1.2)  # mean since the start
    resumed = mtl_log.Eta(total=100)
    resumed.begin(step=80, now=0.0)  # a resume counts only the steps this process took
    assert resumed.tick(90, 5.0) == pytest.approx(10 * 0.5)


@pytest.mark.parametrize(
    "seconds, shown",
    [(0, "0s"), (59.4, "59s"), (65, "1m05s"), (3725, "1h02m05s"), (float("inf"), "?")],
)
def test_duration(seconds, shown):
    assert mtl_log.duration(seconds) == shown


def test_progress_line_has_step_throughput_data_wait_eta_and_loss():
    from mtl.train.loop import progress_line

    stats = {"train/loss": 0.5, "train/samples_per_s": 250.4, "train/data_wait_fraction": 0.125}
    line = progress_line(25, 100, 1, stats, "left=0.4000", left_s=150.0)
    assert line == (
        "step 25/100 (25%) epoch 1 loss=0.5000 (left=0.4000) | 250 samples/s | "
        "data wait 12.5% | ETA 2m30s"
    )


METRICS_DICT = re.compile(r"TrainingReport\(|metrics=\{|Checkpoint successfully created")
PROGRESS = re.compile(
    r"\[mtl\] step (\d+)/24 \(\d+%\) epoch \d+ loss=\S+ .* samples/s \| data wait \S+% \| ETA \S+"
)


@pytest.mark.slow
def test_default_run_output_has_progress_with_eta_and_no_ray_metrics_dicts(
    restored, tmp_path, cache_dir, ray_session, capfd
):
    from mtl.config import load_config
    from mtl.train.launch import fit

    mtl_log.configure(0)
    cfg = load_config(
        "configs/tiny.yaml",
        [
            f"data.cache_dir={cache_dir}",
            f"train.storage_path={tmp_path / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.register=false",
        ],
    )
    fit(cfg, run_name="tiny-output")
    # The workers' lines reach the driver through Ray's log monitor, a little later.
    out = ""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        got = capfd.readouterr()
        out += got.out + got.err
        if "[mtl] checkpoint @ step 24" in out:
            break
        time.sleep(0.5)
    time.sleep(3)  # and anything Ray would print after rank 0's last line
    got = capfd.readouterr()
    out += got.out + got.err
    lines = out.splitlines()
    assert not [line for line in lines if METRICS_DICT.search(line)], out
    steps = [int(m.group(1)) for m in map(PROGRESS.search, lines) if m]
    assert steps == [4, 8, 12, 16, 20, 24], out
    validation = [line for line in lines if "[mtl] validation @ step" in line]
    assert len(validation) == 2 and all(len(line) < 300 for line in validation), validation
    assert sum("[mtl] checkpoint @ step" in line for line in lines) == 2, out
    assert "[mtl] run tiny-output: storage" in out and "[mtl] done: checkpoint" in out


def test_a_librarys_prints_go_to_debug_unless_verbose(restored, capsys):
    child = logging.getLogger("mtl.train.example")
    mtl_log.configure(0)
    with mtl_log.prints_to_debug(child, "DeepSpeed"):
        print("Processing zero checkpoint 'x'")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    mtl_log.configure(1)
    with mtl_log.prints_to_debug(child, "DeepSpeed"):
        print("Processing zero checkpoint 'x'")
    assert capsys.readouterr().out == "Processing zero checkpoint 'x'\n"
