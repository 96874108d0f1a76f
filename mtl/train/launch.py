"""The driver side of a training job: checks, Ray start-up, the ``TorchTrainer``, MLflow.

Everything that can be wrong with the input (config values, task names, weights, the dataset,
the tracking store, a checkpoint to resume) is checked here before any Ray process starts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtl import log as mtl_log
from mtl import storage
from mtl.baselines import baseline_values, check_baseline, load_baseline
from mtl.config import Config, to_dict
from mtl.data import prepare, train_size
from mtl.losses import normalize_weights
from mtl.models import build_model
from mtl.tracking import (
    check_reachable,
    finish_run,
    owner_mismatch,
    resolve_tracking_uri,
    run_status,
    set_tags,
    start_run,
    ui_command,
)
from mtl.train.engine import CheckpointError, read_state
from mtl.train.guards import RunFailed, check_result
from mtl.train.loop import active_taskset, train_worker
from mtl.train.register import check_model_name, check_register_floors

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """What a finished training job leaves behind."""

    run_name: str
    metrics: dict[str, Any]  # the last report of rank 0
    checkpoint: str | None  # path of the latest checkpoint
    mlflow_run_id: str
    tracking_uri: str
    model_version: str | None = None  # registered version of the fixed model, if any


def _absolute(path: str) -> str:
    return path if not path or "://" in path else str(Path(path).expanduser().resolve())


def pin_paths(cfg: Config) -> Config:
    """Relative paths made absolute on the driver: workers run in other directories."""
    data = dataclasses.replace(
        cfg.data,
        root=_absolute(cfg.data.root or os.environ.get("MTL_DATA_DIR", "") or "data"),
        cache_dir=_absolute(cfg.data.cache_dir),
        local=dataclasses.replace(cfg.data.local, path=_absolute(cfg.data.local.path)),
    )
    train = dataclasses.replace(cfg.train, storage_path=_absolute(cfg.train.storage_path))
    interrogate = dataclasses.replace(
        cfg.model.interrogate, init_from=_absolute(cfg.model.interrogate.init_from)
    )
    model = dataclasses.replace(
        cfg.model, interrogate=interrogate, pretrained=_absolute(cfg.model.pretrained)
    )
    return dataclasses.replace(cfg, model=model, data=data, train=train)


def _checkpoints(run_dir: str | Path) -> list[str]:
    return storage.checkpoints(str(run_dir))


def verified_state(checkpoint: str | Path) -> dict[str, Any]:
    """A checkpoint's saved state after verifying every byte of it; one in S3 is downloaded
    to a temporary folder and verified there (errors name the S3 path, not that folder).

    Raises:
        CheckpointError: A file missing, a changed byte, anything but tensors.
    """
    checkpoint = str(checkpoint)
    with storage.local_copy(checkpoint) as local:
        try:
            return read_state(local)
        except CheckpointError as err:
            if not storage.is_remote(checkpoint):
                raise
            raise CheckpointError(str(err).replace(str(local), checkpoint)) from None


def latest_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    """The saved state of a run's newest checkpoint, after verifying every byte of it.

    Raises:
        CheckpointError: No checkpoint, or the newest one is incomplete or corrupt.
    """
    candidates = _checkpoints(run_dir)
    if not candidates:
        raise CheckpointError(
            f"no checkpoint to resume under {run_dir}; check the run name and train.storage_path"
        )
    latest = candidates[-1]
    try:
        return verified_state(latest)
    except CheckpointError as err:
        raise CheckpointError(
            f"refusing to resume: {err}. Nothing was loaded. Delete {latest} to resume from the "
            f"previous checkpoint, or start a new run."
        ) from None


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of the run's checkpoints


def resume_point(run_dir: str | Path) -> tuple[dict[str, Any], str]:
    """The verified newest checkpoint of ``run_dir`` (its state and path), made the one Ray
    resumes from.

    Ray Train restores a run from its own snapshot of the checkpoints it reported; once a
    corrupt newest checkpoint has been deleted (as ``latest_checkpoint`` advises) that
    snapshot names a folder that is gone and Ray refuses the whole run folder. The snapshot is
    then set aside (``.stale``), Ray starts the run's bookkeeping afresh, and the driver hands
    the workers this checkpoint itself (``initial_checkpoint``).
    """
    run_dir = str(run_dir)
    state = latest_checkpoint(run_dir)
    path = _checkpoints(run_dir)[-1]
    snapshot = storage.join(run_dir, RAY_SNAPSHOT)
    if storage.is_file(snapshot):
        named = sorted(set(re.findall(r"checkpoint_[0-9]+", storage.read_text(snapshot))))
        there = {n for n, folder in storage.children(run_dir) if folder}
        gone = [n for n in named if n not in there]
        if gone or (named and named[-1] != storage.name(path)):
            storage.move(snapshot, snapshot + ".stale")
            log.warning(
                "Ray's run snapshot names %s, not %s; set it aside as %s.stale and resuming "
                "from %s",
                gone or named[-1:],
                storage.name(path),
                RAY_SNAPSHOT,
                path,
            )
    return state, path


def preflight(cfg: Config) -> dict[str, Any]:
    """All input checks; returns what the workers need besides the config."""
    taskset = active_taskset(cfg)
    # An s3:// storage path whose bucket cannot be reached fails here, naming the endpoint.
    storage.check_reachable(cfg.train.storage_path)
    normalize_weights(cfg.tasks.weights, taskset.loss_keys)
    if cfg.tasks.weighting == "sampling" and not taskset.multi_domain:
        raise ValueError(
            "tasks.weighting=sampling needs a multi-domain benchmark (data.benchmark=digits)"
        )
    build_model(cfg.model, taskset)  # unknown backbone or model name fails here, not in a worker
    check_register_floors(cfg)  # a tracking.register_if metric the run never reports
    if cfg.model.interrogate.init_from:
        if cfg.model.name != "interrogate":
            raise ValueError(
                f"model.interrogate.init_from is set but model.name={cfg.model.name!r}: "
                "single-task initialisation is for model.name=interrogate"
            )
        from mtl.train.warm_start import single_task_checkpoints

        single_task_checkpoints(cfg, taskset)  # every checkpoint exists, verifies and fits
    extras: dict[str, Any] = {"baseline": None}
    if cfg.tasks.baseline:
        values = baseline_values(checked_baseline(cfg, taskset))
        extras["baseline"] = {k: values[k] for k in taskset.loss_keys}
    extras["tracking_uri"] = resolve_tracking_uri(cfg.tracking.tracking_uri)
    check_reachable(extras["tracking_uri"])
    # The registered name stands for another data source, task set or input: say so now.
    check_model_name(cfg, extras["tracking_uri"])
    prepare(cfg.data)  # builds the dataset cache once, here, instead of racing in workers
    samples, t = train_size(cfg.data, taskset), cfg.train
    if samples // t.num_workers < t.micro_batch_size:
        raise ValueError(
            f"{samples} training samples over train.num_workers={t.num_workers} is less than "
            f"one micro-batch of train.micro_batch_size={t.micro_batch_size} per worker; use "
            "a smaller batch, fewer workers or more data"
        )
    return extras


# Settings a baseline table is comparable under; another value is warned about, not refused
# (a smaller backbone's baseline is still a reference, but a weaker one).
BASELINE_SETTINGS = ("model.backbone", "data.image_size")


def checked_baseline(cfg: Config, taskset: Any) -> dict[str, Any]:
    """The table named by ``tasks.baseline`` once it fits this run: same benchmark, every
    task with the same primary metric and direction (else ``ValueError``); one built with
    another backbone or input size is warned about."""
    path = cfg.tasks.baseline
    table = load_baseline(path)
    try:
        check_baseline(table, taskset)
    except ValueError as err:
        raise ValueError(
            f"baseline table {path} does not fit this run: {err}; build one for it with "
            "`mtl baseline CONFIG --out FILE` or leave tasks.baseline empty"
        ) from None
    ours = to_dict(cfg)
    for key in BASELINE_SETTINGS:
        section, field = key.split(".")
        theirs = table["config"].get(section, {}).get(field)
        if theirs is not None and theirs != ours[section][field]:
            log.warning(
                "baseline table %s was built with %s=%r, this run uses %r; Δ_MTL compares "
                "unlike models",
                path,
                key,
                theirs,
                ours[section][field],
            )
    return table


def init_ray() -> None:
    """Join the cluster in ``$RAY_ADDRESS`` (or a running local one), else start one on loopback."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if not ray.is_initialized():
        # Output knobs (colour codes, Ray Train's preemption watcher on a local cluster) are
        # read by the processes ray.init starts: set them first (mtl.log says what each hides).
        for key, value in mtl_log.ray_env(local=not os.environ.get("RAY_ADDRESS")).items():
            os.environ.setdefault(key, value)
        ray.init(log_to_driver=True, configure_logging=False)


def fit(cfg: Config, *, resume: str | None = None, run_name: str | None = None) -> FitResult:
    """Train ``cfg`` on Ray Train x DeepSpeed; ``resume`` names an earlier run to continue.

    Raises:
        RunFailed: Anything failed once the MLflow run was started (workers beyond
            ``train.max_failures``, a guard, registration, export, MLflow); the run is
            FAILED in MLflow with the reason tagged ``mtl.failure``.
        KeyboardInterrupt: Interrupted (SIGINT, or SIGTERM); the run is KILLED in MLflow.
    """
    cfg = pin_paths(cfg)
    extras = preflight(cfg)
    storage_path, uri = cfg.train.storage_path, extras["tracking_uri"]
    name = (
        resume
        or run_name
        or f"{cfg.data.benchmark}-{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    run_dir = storage.join(storage_path, name)
    with claim_run(run_dir, uri, resume=bool(resume)) as claim:
        previous_run_id = None
        if resume:
            state, checkpoint = resume_point(run_dir)
            previous_run_id = _own_run(uri, state.get("mlflow_run_id"), run_dir)
            extras["initial_checkpoint"] = checkpoint
        init_ray()
        extras["use_gpu"] = _use_gpu(cfg)
        if "initial_checkpoint" in extras:
            from ray.train import Checkpoint

            # A checkpoint in S3 stays there: each worker downloads it (and verifies it again).
            where, filesystem = storage.ray_storage(extras["initial_checkpoint"])
            extras["initial_checkpoint"] = Checkpoint(where, filesystem)
        run_id = start_run(cfg, uri, previous_run_id, run_dir, run_name=name)
        claim.record(run_id)
        log.info("run %s: storage %s, MLflow run %s", name, run_dir, run_id)
        with ends_run(uri, run_id, name, cfg):
            return _train_and_register(cfg, extras, name, run_id)


def _train_and_register(cfg: Config, extras: dict[str, Any], name: str, run_id: str) -> FitResult:
    uri, storage_path = extras["tracking_uri"], cfg.train.storage_path
    trainer = _trainer(
        cfg, {**extras, "config": to_dict(cfg), "mlflow_run_id": run_id}, name, storage_path
    )
    result = trainer.fit()
    check_result(result)  # a guard stopped the workers: FAILED, never registered
    saved = result.checkpoint
    checkpoint = storage.uri_of(saved.filesystem, saved.path) if saved else None
    out = FitResult(name, dict(result.metrics or {}), checkpoint, run_id, uri)
    set_tags(uri, run_id, {"mtl.checkpoint": str(checkpoint), "mtl.run_name": name})
    from mtl.train.register import registration_refusal

    refusal = registration_refusal(cfg)  # token-routed MoE: no fixed model to register
    if cfg.tracking.register and checkpoint and refusal:
        log.warning("NOT registered: %s", refusal)
        set_tags(uri, run_id, {"mtl.registration": f"skipped: {refusal}"})
    elif cfg.tracking.register and checkpoint:
        out.model_version = register(out, cfg.tracking.model_name)
        if out.model_version and cfg.tracking.auto_promote:
            auto_promote(cfg, uri, run_id)
    finish_run(uri, run_id, ok=True)
    log.info("done: checkpoint %s", checkpoint)
    log.info("browse it: %s", ui_command(uri))
    return out


def auto_promote(cfg: Config, uri: str, run_id: str) -> None:
    """``tracking.auto_promote``: champion to the best comparable version on that metric."""
    from mtl.tracking.policy import promote_best
    from mtl.train.register import model_name

    name = model_name(cfg)
    try:
        decision = promote_best(uri, name, cfg.tracking.auto_promote)
    except ValueError as err:  # the new version is registered; only the choice is left open
        log.warning("champion of %s left where it was: %s", name, err)
        return
    for line in decision.lines(name):
        log.info("%s", line)
    set_tags(uri, run_id, {"mtl.champion": f"{name} version {decision.version}"})


def resume_hint(name: str) -> str:
    return (
        f"continue it with `mtl train CONFIG --resume {name}` "
        f"(or `python jobs/train.py CONFIG --resume {name}`)"
    )


@contextmanager
def ends_run(uri: str, run_id: str, name: str, cfg: Config) -> Iterator[None]:
    """No run is left RUNNING: a failure ends it FAILED with its reason tagged and raises
    ``RunFailed``; SIGINT or SIGTERM ends it KILLED and the interrupt goes on."""
    previous = _raise_on_sigterm()
    try:
        yield
    except KeyboardInterrupt as err:
        reason = str(err) or "interrupted (SIGINT)"
        _close(uri, run_id, "KILLED", f"{reason}; {resume_hint(name)}")
        raise
    except Exception as err:  # noqa: BLE001 - every failure ends the run, then says why
        reason = _failure_reason(err, name, cfg)
        _close(uri, run_id, "FAILED", reason)
        raise RunFailed(f"run {name} (MLflow run {run_id}) failed: {reason}") from err
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _failure_reason(err: BaseException, name: str, cfg: Config) -> str:
    from mtl.train.guards import TrainingStopped

    first = (str(err).strip().splitlines() or [""])[0][:300]
    if isinstance(err, TrainingStopped):
        return f"training stopped: {first}"
    controller = getattr(err, "controller_failure", None)
    if _is_training_failure(err) and controller is not None:
        # Ray Train's controller itself failed (e.g. writing its checkpoint list to a storage
        # that went away): not retried by train.max_failures, which counts worker failures.
        cause = (str(controller).strip().splitlines() or [""])[0][:300]
        return (
            f"Ray Train's controller failed ({type(controller).__name__}: {cause}); "
            f"{resume_hint(name)} from its latest checkpoint"
        )
    if _is_training_failure(err):
        cause = _worker_cause(err) or first
        return (
            f"the workers failed beyond train.max_failures={cfg.train.max_failures} ({cause}); "
            f"{resume_hint(name)} from its latest checkpoint"
        )
    return f"{type(err).__name__}: {first}"


def _is_training_failure(err: BaseException) -> bool:
    try:
        from ray.train import TrainingFailedError
    except ImportError:  # pragma: no cover - Ray Train V1
        return False
    return isinstance(err, TrainingFailedError)


def _worker_cause(err: BaseException) -> str:
    """The first worker's own error, in one line (Ray's message holds whole tracebacks)."""
    failures = getattr(err, "worker_failures", None) or {}
    for _, failure in sorted(failures.items()):
        lines = [line for line in str(failure).strip().splitlines() if line.strip()]
        return f"rank {_}: {type(failure).__name__}: {(lines[-1] if lines else '')[:200]}"
    return ""


def _close(uri: str, run_id: str, status: str, reason: str) -> None:
    """End the run; an unreachable store is reported, not raised over the real failure."""
    try:
        finish_run(uri, run_id, ok=False, reason=reason, status=status)
    except Exception as err:  # noqa: BLE001 - the failure being reported matters more
        log.error("could not mark MLflow run %s %s (%s)", run_id, status, err)


def _raise_on_sigterm() -> Any:
    """SIGTERM (``kill``, a scheduler's stop) unwinds like Ctrl-C, so the run is ended."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt("terminated (SIGTERM)")

    return signal.signal(signal.SIGTERM, stop)


def _own_run(uri: str, run_id: str | None, run_dir: str) -> str | None:
    """``run_id`` if it is this run folder's MLflow run in ``uri``; else None (a new run)."""
    if not run_id:
        return None
    mismatch = owner_mismatch(uri, run_id, str(run_dir))
    if mismatch:
        log.warning("%s: logging this resume into a new MLflow run", mismatch)
        return None
    return run_id


CLAIM_FILE = ".mtl-driver.lock"  # held (flock) by the driver training the run; JSON inside


class RunClaim:
    """This process's exclusive hold on a run folder (``claim_run``)."""

    def __init__(self, handle: Any, run_dir: str) -> None:
        self.handle, self.run_dir = handle, run_dir

    def record(self, mlflow_run_id: str) -> None:
        """Note the MLflow run, so a later start can end it if this driver is killed."""
        info = {"pid": os.getpid(), "host": socket.gethostname(), "mlflow_run_id": mlflow_run_id}
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(json.dumps(info))
        self.handle.flush()


def claim_file(run_dir: str) -> Path:
    """The local file a driver holds for ``run_dir``: inside a local run folder, or (S3 has no
    locks) under ``$TMPDIR/mtl-claims``, named by the run's URI, on the driver's machine."""
    if not storage.is_remote(run_dir):
        return Path(run_dir) / CLAIM_FILE
    import hashlib
    import tempfile

    digest = hashlib.sha256(run_dir.rstrip("/").encode()).hexdigest()[:24]
    return Path(tempfile.gettempdir()) / "mtl-claims" / f"{storage.name(run_dir)}-{digest}.lock"


@contextmanager
def claim_run(run_dir: str | Path, uri: str, *, resume: bool) -> Iterator[RunClaim]:
    """Hold ``run_dir`` for this process while the job runs: two drivers with one run name
    cannot both start, whether new or resumed.

    The hold is an exclusive ``flock`` on ``claim_file`` (released by the kernel when the
    process ends, even by SIGKILL). The file names the last holder's MLflow run: a holder
    that died with it RUNNING has it ended KILLED here, by the next start or resume. For a
    run in S3 the file is on the driver's machine, so it keeps out drivers on that machine
    only (one driver per cluster, the head, is the intended use).
    """
    import fcntl

    run_dir = str(run_dir)
    if not resume:
        _refuse_taken(run_dir)  # before the claim file is added to someone else's folder
    held = claim_file(run_dir)
    held.parent.mkdir(parents=True, exist_ok=True)
    handle = open(held, "a+")  # noqa: SIM115 - held for the whole job
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _claim_info(handle.read()).get("pid", "?")
            raise ValueError(
                f"run {storage.name(run_dir)!r} is being trained right now by another driver (pid "
                f"{holder}) in {run_dir}: wait for it, or choose another `--name`"
            ) from None
        handle.seek(0)
        _close_orphan(uri, _claim_info(handle.read()), storage.name(run_dir))
        if not resume:
            _refuse_taken(run_dir)  # again, now that no other driver can be starting it
        yield RunClaim(handle, run_dir)
    finally:
        handle.close()


def _refuse_taken(run_dir: str) -> None:
    # Ray Train would silently continue that run from its checkpoint instead.
    if any(n != CLAIM_FILE for n, _ in storage.children(run_dir)):
        run = storage.name(run_dir)
        raise ValueError(
            f"a run named {run!r} already exists in {run_dir}: continue it with "
            f"`--resume {run}`, choose another `--name`, or delete that folder"
        )


def _claim_info(text: str) -> dict[str, Any]:
    try:
        info = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        return {}
    return info if isinstance(info, dict) else {}


def _close_orphan(uri: str, info: dict[str, Any], name: str) -> None:
    """A killed driver's MLflow run, still RUNNING: end it KILLED, with the reason."""
    run_id = info.get("mlflow_run_id")
    if run_id and run_status(uri, run_id) == "RUNNING":
        reason = (
            f"its driver (pid {info.get('pid')} on {info.get('host')}) died without ending "
            f"the run; found by the next start of {name}"
        )
        log.warning("MLflow run %s was left RUNNING: %s; marked KILLED", run_id, reason)
        _close(uri, run_id, "KILLED", reason)


def register(result: FitResult, name: str = "") -> str | None:
    """Register the fixed model of a finished run; a failed verification refuses, loudly."""
    from mtl.prune import PruneVerificationError
    from mtl.tracking.policy import NameTaken
    from mtl.train.register import register_checkpoint

    try:
        # DeepSpeed's zero_to_fp32 prints each step of merging the ZeRO shards ("Processing
        # zero checkpoint ...", "Reconstructed fp32 state dict ..."): DEBUG unless --verbose.
        with mtl_log.prints_to_debug(log, "DeepSpeed"):
            version = register_checkpoint(
                result.checkpoint, result.tracking_uri, result.mlflow_run_id, result.metrics, name
            )
    except (PruneVerificationError, NameTaken) as err:
        # The run and its checkpoint stand; `mtl register CHECKPOINT` registers it later.
        log.warning("NOT registered: %s", str(err).replace("CHECKPOINT", str(result.checkpoint)))
        set_tags(result.tracking_uri, result.mlflow_run_id, {"mtl.registration": f"refused: {err}"})
        return None
    except Exception as err:  # noqa: BLE001 - named here; the caller ends the run FAILED
        raise RuntimeError(f"registration failed: {type(err).__name__}: {err}") from err
    # A program result (stdout), like `mtl register`'s line: --quiet keeps it.
    print(f"registered models:/{version.name}/{version.version} (alias candidate)", flush=True)
    return str(version.version)


def _use_gpu(cfg: Config) -> bool:
    """``train.device=auto`` trains on GPUs when the cluster has one per worker."""
    if cfg.train.device != "auto":
        return cfg.train.device == "gpu"
    import ray

    return ray.cluster_resources().get("GPU", 0) >= cfg.train.num_workers


# Environment the workers inherit from the process that builds the trainer (test hooks too).
FORWARDED_ENV = (
    "MTL_DATA_DIR",
    "MTL_CACHE_DIR",
    "MTL_FAIL_AT_STEP",
    "MTL_FAIL_MARKER",
    "MTL_FAIL_TRIAL",
    "MTL_TEST_FAULTS",  # the test-only switch that lets workers read the MTL_FAIL_* hooks
    mtl_log.ENV,  # --quiet / --verbose: the workers log at the driver's verbosity
    # An S3-compatible train.storage_path: the endpoint and the keys (mtl.storage).
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_EC2_METADATA_DISABLED",
)


def _trainer(
    cfg: Config,
    loop_config: dict[str, Any],
    name: str,
    where: str,
    *,
    env: dict[str, str] | None = None,
) -> Any:
    """The job's ``TorchTrainer``; ``env`` adds to the workers' environment (a Tune trial
    passes on the driver's, which its own process does not have)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mtl.train.rendezvous import BoundTorchConfig

    t, use_gpu = cfg.train, loop_config["use_gpu"]
    env = {**{k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}, **(env or {})}
    # Ray Train re-routes print() through logging, which prints our progress lines twice.
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    # An s3:// path goes to Ray as bucket/prefix on a filesystem that carries the endpoint and
    # keys: Ray's Train controller does not inherit the workers' environment.
    storage_path, filesystem = storage.ray_storage(where)
    return TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker},
        ),
        # The rank-0 store and the collectives listen on loopback on one node (not on ::).
        torch_config=BoundTorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            worker_runtime_env={"env_vars": env},
            # Ray Train's own INFO lines (each report's metrics dict, "Checkpoint successfully
            # created", the worker group's start) only with --verbose; its warnings always.
            logging_config=LoggingConfig(log_level=mtl_log.ray_train_log_level()),
        ),
    )
