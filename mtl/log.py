"""Output of every ``mtl`` process: the ``mtl`` logger tree, ``--quiet`` / ``--verbose``.

Every module logs through ``logging.getLogger(__name__)`` (names under ``mtl.``); program
results (the final JSON of a run, "registered models:/...") are the CLI's prints on stdout,
everything else goes to stderr as ``[mtl] message``.

``configure(verbosity)`` sets it up in the driver and exports ``MTL_VERBOSITY``, so Ray's
workers (and ``ray job submit`` entry points) set up the same with ``configure_from_env()``:

- ``-1`` quiet: warnings and errors only;
- ``0`` default: progress lines; Ray's per-report and checkpoint lines and the known-harmless
  warnings below are off;
- ``1`` verbose: DEBUG for ``mtl`` (lines name their level and logger) and every line of Ray,
  DeepSpeed, MLflow and torch back as they would print it.

Each filter below says what it hides and why that is harmless; ``--verbose`` shows them all.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

ENV = "MTL_VERBOSITY"
QUIET, DEFAULT, VERBOSE = -1, 0, 1
LEVELS = {QUIET: logging.WARNING, DEFAULT: logging.INFO, VERBOSE: logging.DEBUG}
FORMAT = "[mtl] %(message)s"
VERBOSE_FORMAT = "[mtl] %(levelname)s %(name)s: %(message)s"

# Known-harmless lines of other libraries, hidden unless --verbose: (logger, message pattern).
HARMLESS_LOGS = (
    # DeepSpeed's WarmupLR is asked for its rate while the engine is built, before step 0;
    # it answers 0.0 for that call only and the first step uses the configured schedule.
    ("DeepSpeed", r"Attempting to get learning rate from scheduler before it has started"),
    # torch looks for a CUDA toolkit while DeepSpeed builds its CPU ops on a machine that has
    # one installed but no GPU: the CPU ops do not need it.
    ("torch.utils.cpp_extension", r"No CUDA runtime is found"),
    # MLflow notes that a python_model object is cloudpickled: registration does this on
    # purpose (README, security notes: load only models you trust).
    ("mlflow.pyfunc", r"Passing a Python object as `python_model`"),
)
# Known-harmless Python warnings, hidden unless --verbose: (category, message pattern).
HARMLESS_WARNINGS = (
    # DeepSpeed's ZeRO calls torch's older collective name, still supported by the pinned torch.
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),
    (FutureWarning, r"`torch\.distributed\.reduce_scatter_tensor` is deprecated"),
)
# Environment defaults for quiet third parties; a value the user set is never changed.
QUIET_ENV = {
    # MLflow's artifact download bars (one per registration and load): the bar, not a result.
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # MLflow's INFO lines ("Validating input example against model signature"); its warnings stay.
    "MLFLOW_LOGGING_LEVEL": "WARNING",
}


def verbosity() -> int:
    """The verbosity this process was configured with (``MTL_VERBOSITY``; 0 if unset)."""
    return _parse(os.environ.get(ENV, ""))


def _parse(text: str) -> int:
    text = text.strip()
    if not text:
        return DEFAULT
    try:
        value = int(text)
    except ValueError:
        value = None
    if value not in LEVELS:
        raise ValueError(f"{ENV}={text!r}: use -1 (quiet), 0 (default) or 1 (verbose)")
    return value


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (pytest's capture, a redirect)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # the base class assigns it; sys.stderr wins
        pass


class _Harmless(logging.Filter):
    """Drops records whose message matches ``pattern`` (one known-harmless line)."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


_HANDLER_TAG = "_mtl_handler"
_SET_BY_US: set[str] = set()  # QUIET_ENV keys this process set (verbose takes them back)


def configure(level: int, *, rank: int = 0) -> None:
    """Set up this process's output at ``level`` (-1, 0, 1) and export ``MTL_VERBOSITY``.

    ``rank`` > 0 (a Ray Train worker other than rank 0) logs warnings only unless verbose:
    rank 0 speaks for the group.
    """
    if level not in LEVELS:
        raise ValueError(f"verbosity {level!r}: use -1 (quiet), 0 (default) or 1 (verbose)")
    os.environ[ENV] = str(level)
    logger = logging.getLogger("mtl")
    for handler in [h for h in logger.handlers if getattr(h, _HANDLER_TAG, False)]:
        logger.removeHandler(handler)
    handler = _Stderr()
    setattr(handler, _HANDLER_TAG, True)
    handler.setFormatter(logging.Formatter(VERBOSE_FORMAT if level == VERBOSE else FORMAT))
    logger.addHandler(handler)
    logger.propagate = False  # Ray's workers also print the root logger's records
    shown = LEVELS[level] if rank == 0 or level == VERBOSE else logging.WARNING
    logger.setLevel(shown)
    # The root logger: Ray sets it to INFO in its workers, where it prints other libraries'
    # INFO lines, among them Ray Train's "Reporting training result N: TrainingReport(...
    # metrics={...})" (logged under a file path, so outside LoggingConfig's ray.train). Their
    # warnings stay; --verbose brings Ray's INFO back. (A plain Python process has WARNING.)
    logging.getLogger().setLevel(logging.INFO if level == VERBOSE else logging.WARNING)
    _third_parties(level)


def configure_from_env(*, rank: int = 0) -> int:
    """``configure`` at the driver's ``MTL_VERBOSITY`` (Ray workers, ``jobs/*.py``)."""
    level = verbosity()
    configure(level, rank=rank)
    return level


def _third_parties(level: int) -> None:
    for name, pattern in HARMLESS_LOGS:
        target = logging.getLogger(name)
        for old in [f for f in target.filters if isinstance(f, _Harmless)]:
            target.removeFilter(old)
        if level < VERBOSE:
            target.addFilter(_Harmless(pattern))
    for category, pattern in HARMLESS_WARNINGS:
        action = "default" if level == VERBOSE else "ignore"
        warnings.filterwarnings(action, message=pattern, category=category)
    for key, value in QUIET_ENV.items():
        if level < VERBOSE and key not in os.environ:
            os.environ[key] = value
            _SET_BY_US.add(key)
        elif level == VERBOSE and key in _SET_BY_US:  # back to the library's own default
            os.environ.pop(key, None)
            _SET_BY_US.discard(key)


def ray_train_log_level() -> str:
    """``ray.train.LoggingConfig``'s level: Ray Train's own lines ("Reporting training result
    N: TrainingReport(... metrics={...})", "Checkpoint successfully created at ...", the
    worker group's start) are INFO, shown only with --verbose; its warnings always are."""
    return "INFO" if verbosity() == VERBOSE else "WARNING"


def ray_env(local: bool) -> dict[str, str]:
    """Environment defaults for a Ray cluster this process starts (set before ``ray.init``)."""
    env = {}
    if not sys.stderr.isatty():
        env["RAY_COLOR_PREFIX"] = "0"  # no colour codes in a log file or a pipe
    if local and verbosity() < VERBOSE:
        # Ray Train's PreemptionWatcher actor makes its controller log a core_worker error
        # ("constructor arguments in the object store and max_restarts > 0") at every start.
        # A one-machine cluster this process started has no node to be preempted, so the
        # watcher has nothing to watch; on a cluster (RAY_ADDRESS) it stays on.
        env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    return env


@contextlib.contextmanager
def prints_to_debug(logger: logging.Logger, what: str) -> Iterator[None]:
    """A library's ``print`` progress (no knob turns it off) goes to ``logger.debug`` unless
    --verbose; ``what`` says whose lines they are, for the comment at the call site."""
    if verbosity() == VERBOSE:
        yield
        return
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            yield
    finally:
        for line in out.getvalue().splitlines():
            logger.debug("%s: %s", what, line)


@dataclass
class Eta:
    """Throughput and time left from a clock: ``tick(step, samples)`` once per log line.

    The rate is over the window since the previous tick; the ETA divides the steps left by the
    mean rate since the first tick (a steadier estimate than one window).
    """

    total: int
    start_step: int = 0
    start_s: float = 0.0
    last_step: int = 0
    last_s: float = 0.0

    def begin(self, step: int, now: float) -> None:
        self.start_step = self.last_step = step
        self.start_s = self.last_s = now

    def tick(self, step: int, now: float) -> float:
        """Seconds left after ``step`` (``inf`` before any progress)."""
        self.last_step, self.last_s = step, now
        done, spent = step - self.start_step, now - self.start_s
        if done <= 0 or spent <= 0:
            return float("inf")
        return (self.total - step) * spent / done


def duration(seconds: float) -> str:
    """``3725`` -> ``1h02m05s``; ``65`` -> ``1m05s``; ``inf`` -> ``?``."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"
