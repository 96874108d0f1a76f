"""MLflow tracking: the only module that imports ``mlflow``.

The driver creates one MLflow run per training job (``start_run``) and passes its id to the
workers; only rank 0 logs into it (``RunLogger``), so there is exactly one run per job however
many workers train, and a job resumed after a failure keeps logging into the same run. A
population-based sweep is one parent run with one child run per Tune trial
(``start_child_run``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mtl.config import Config, flatten, to_dict

DEFAULT_DB = "mlflow.db"
RUN_DIR_TAG = "mtl.run_dir"  # the storage folder of the job that owns the run
FAILURE_TAG = "mtl.failure"  # one line: why a run ended FAILED or KILLED
DROPPED_TAG = "mtl.tracking.dropped_metrics"  # metric values rank 0 could not deliver


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be used; the message says how to fix it."""


def resolve_tracking_uri(configured: str = "") -> str:
    """Config value, else ``$MLFLOW_TRACKING_URI``, else ``./mlflow.db``; SQLite made absolute.

    Workers run in other directories than the driver, so a relative SQLite path must be
    pinned to the driver's working directory before it travels.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "") or f"sqlite:///{DEFAULT_DB}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    return uri


def ui_command(uri: str) -> str:
    """The command that opens this store in the MLflow UI."""
    return f"mlflow ui --backend-store-uri {uri}"


def check_reachable(uri: str, timeout_s: float = 5) -> None:
    """Fail fast (before Ray starts) when the store cannot be written or reached.

    A SQLite store is also created (or its schema upgraded) here, once, under a file lock:
    MLflow migrates a fresh file on first open, and several runs doing that at once race
    (``no such column: spans.dimension_attributes``). A server is asked once, with a short
    timeout; MLflow's retry settings of this process are left as they are, so the workers
    it starts keep their retries.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        ensure_store(uri)
        return
    if parsed.scheme in ("http", "https"):
        _ping(uri, timeout_s)
        return
    if parsed.scheme not in ("", "file", "databricks", "postgresql", "mysql", "mssql"):
        raise TrackingError(f"MLflow tracking URI {uri!r} has an unknown scheme {parsed.scheme!r}")


def ensure_store(uri: str) -> None:
    """Create or upgrade the SQLite store at ``uri`` once, under ``<db>.lock``."""
    import fcntl

    path = Path(uri[len("sqlite:///") :])
    if not path.parent.is_dir():
        raise TrackingError(f"MLflow store {uri}: directory {path.parent} does not exist")
    try:
        sqlite3.connect(path).close()
    except sqlite3.Error as err:
        raise TrackingError(f"MLflow store {uri} cannot be opened: {err}") from None
    with open(f"{path}.lock", "a") as lock, _quiet_migrations():
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        try:
            from mlflow.tracking import MlflowClient

            MlflowClient(uri).search_experiments(max_results=1)
        except Exception as err:  # noqa: BLE001 - any failure means unusable; say which
            raise TrackingError(
                f"MLflow store {uri} cannot be used ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:200] if str(err) else ''}); is {path} an MLflow "
                "database? Point tracking.tracking_uri at another file or delete this one"
            ) from None


@contextlib.contextmanager
def _quiet_migrations() -> Iterator[None]:
    """Hide MLflow's and Alembic's INFO lines about creating tables: a fresh store is routine,
    and they would come before a run's own first line (or its one-line error)."""
    loggers = [logging.getLogger(n) for n in ("mlflow.store.db.utils", "alembic")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _ping(uri: str, timeout_s: float) -> None:
    """One GET of the server's ``/health``, no retries."""
    import base64
    import urllib.error
    import urllib.request

    request = urllib.request.Request(uri.rstrip("/") + "/health")
    user, password = (os.environ.get(f"MLFLOW_TRACKING_{k}") for k in ("USERNAME", "PASSWORD"))
    if user and password:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):  # noqa: S310 - http(s) only
            return
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            raise TrackingError(
                f"MLflow server {uri} refused access (HTTP {err.code}): set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
            ) from None
        raise TrackingError(
            f"MLflow server {uri} answered HTTP {err.code} on /health: is it an MLflow server? "
            "Fix tracking.tracking_uri / $MLFLOW_TRACKING_URI"
        ) from None
    except (OSError, ValueError) as err:
        raise TrackingError(
            f"MLflow server {uri} is unreachable ({type(err).__name__}). Start it "
            f"(`mlflow server`), fix tracking.tracking_uri / $MLFLOW_TRACKING_URI, or "
            f"leave both empty for a local SQLite file."
        ) from None


def start_run(
    cfg: Config, uri: str, run_id: str | None = None, run_dir: str = "", run_name: str = ""
) -> str:
    """Create the job's MLflow run (or reopen ``run_id`` on resume); returns its id.

    The run is named ``tracking.run_name``, else ``run_name`` (the name ``mtl`` gives the
    job and prints, so the MLflow UI shows the same name).

    ``run_dir`` (the job's storage folder) is tagged ``mtl.run_dir``: a resume reopens a run
    only when that tag names its own folder (``owner_mismatch``).
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if run_id is None:
        tags = {RUN_DIR_TAG: run_dir} if run_dir else None
        run = client.create_run(
            _experiment_id(client, cfg.tracking.experiment),
            run_name=cfg.tracking.run_name or run_name or None,
            tags=tags,
        )
        run_id = run.info.run_id
        params = flatten(to_dict(cfg))
        # MLflow caps param values at 6000 characters; the full config goes in as an artifact.
        client.log_batch(run_id, params=[_param(k, v[:6000]) for k, v in params.items()])
        log_dict(uri, run_id, to_dict(cfg), "config.json")
    else:
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, FAILURE_TAG, "")  # a resumed run is no longer failed
        log_dict(uri, run_id, to_dict(cfg), "config_resume.json")
    return run_id


def _experiment_id(client: Any, name: str) -> str:
    """The id of experiment ``name``, created if missing, through ``client`` only: the
    fluent ``mlflow.set_experiment`` would also point the whole process's tracking (and so
    registry) URI at this store."""
    from mlflow.exceptions import MlflowException

    for _ in range(2):
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return client.create_experiment(name)
        except MlflowException:  # another run created it in between: read it again
            continue
    raise TrackingError(f"MLflow experiment {name!r} can be neither read nor created")


def owner_mismatch(uri: str, run_id: str, run_dir: str) -> str:
    """Why run ``run_id`` of ``uri`` is not the MLflow record of ``run_dir`` ("" if it is).

    A run folder copied from elsewhere names its original's MLflow run; reopening that would
    overwrite another job's record.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(uri).get_run(run_id)
    except MlflowException:
        return f"MLflow run {run_id} is not in {uri}"
    owner = run.data.tags.get(RUN_DIR_TAG, "")
    if owner != run_dir:
        return f"MLflow run {run_id} belongs to run folder {owner or '(untagged)'}, not {run_dir}"
    return ""


def run_status(uri: str, run_id: str) -> str:
    """The MLflow status of a run (RUNNING, FINISHED, FAILED, KILLED), "" if unknown."""
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(uri).get_run(run_id).info.status
    except Exception:  # noqa: BLE001 - missing run or unreachable store: unknown
        return ""


def start_child_run(uri: str, parent_run_id: str, cfg: Config, trial_id: str, name: str) -> str:
    """The run of one Tune trial under the sweep's run; reopened when the trial restarts.

    PBT restarts a trial's function after every exploit, so the run is found again by its
    ``mtl.trial_id`` tag instead of being created twice. ``tasks.weights`` is left out of
    the params because PBT changes it (MLflow refuses a param whose value changes); the
    training loop logs the weights as metrics, ``weight/<key>``, at every logged step.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    existing = child_runs(uri, parent_run_id).get(trial_id)
    if existing is not None:
        client.update_run(existing, status="RUNNING")
        return existing
    parent = client.get_run(parent_run_id)
    tags = {"mlflow.parentRunId": parent_run_id, "mtl.trial_id": trial_id}
    run = client.create_run(parent.info.experiment_id, run_name=name, tags=tags)
    params = {k: v for k, v in flatten(to_dict(cfg)).items() if not k.startswith("tasks.weights")}
    client.log_batch(run.info.run_id, params=[_param(k, v[:6000]) for k, v in params.items()])
    return run.info.run_id


def child_runs(uri: str, parent_run_id: str) -> dict[str, str]:
    """Trial id -> run id of the sweep's child runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
    )
    return {
        r.data.tags["mtl.trial_id"]: r.info.run_id for r in runs if "mtl.trial_id" in r.data.tags
    }


def _param(key: str, value: str) -> Any:
    from mlflow.entities import Param

    return Param(key, value)


def log_dict(uri: str, run_id: str, data: dict[str, Any], name: str) -> None:
    """Store ``data`` as a JSON artifact of the run (``name`` may include folders)."""
    from mlflow.tracking import MlflowClient

    folder = str(Path(name).parent)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(name).name
        path.write_text(json.dumps(data, indent=2, default=str))
        MlflowClient(uri).log_artifact(run_id, str(path), None if folder == "." else folder)


def finish_run(uri: str, run_id: str, ok: bool, reason: str = "", status: str = "") -> None:
    """End the run FINISHED (``ok``) or FAILED; ``status`` overrides (e.g. KILLED), and a
    ``reason`` is tagged ``mtl.failure`` (one line)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if reason:
        client.set_tag(run_id, FAILURE_TAG, reason.splitlines()[0][:4000] if reason else "")
    client.set_terminated(run_id, status=status or ("FINISHED" if ok else "FAILED"))


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    """Tag a run now; raises when the store fails (the driver's tags, never buffered)."""
    from mlflow.entities import RunTag
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


class RunLogger:
    """Logs metrics and tags into one existing run; used by rank 0 (and by a sweep).

    A tracking server that goes away must not stop training: a batch that fails is kept and
    sent, in order, by a later call once a backoff has passed (1 s, doubling to
    ``max_backoff_s``); each call spends at most about ``timeout_s`` on the network. At most
    ``max_pending`` metric values wait; older ones beyond that are dropped and counted, and
    the count is logged (tag ``mtl.tracking.dropped_metrics``, metric
    ``tracking/dropped_metrics``) once the server answers again. ``flush`` (called at exit too)
    retries for a bounded time and says what was lost.
    """

    def __init__(
        self,
        uri: str,
        run_id: str,
        *,
        timeout_s: float = 3.0,
        max_backoff_s: float = 8.0,
        max_pending: int = 200_000,
    ) -> None:
        import atexit
        import collections
        import weakref

        self.uri, self.run_id = uri, run_id
        self.timeout_s, self.max_backoff_s, self.max_pending = timeout_s, max_backoff_s, max_pending
        self.pending: collections.deque[tuple[list, list]] = collections.deque()
        self.dropped = 0  # metric values given up
        self.reported_dropped = 0  # the count the server last got
        self.failures = 0  # consecutive failed sends
        self.retry_at = 0.0  # monotonic time before which no send is tried
        self.last_error = ""
        self._send = _rest_sender(uri, timeout_s) or _client_sender(uri)
        atexit.register(_flush_at_exit, weakref.ref(self))  # a weak one: loggers come and go

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._queue([Metric(_metric_key(k), float(v), now, step) for k, v in metrics.items()], [])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._queue([], [RunTag(k, str(v)) for k, v in tags.items()])

    def _queue(self, metrics: list, tags: list) -> None:
        self.pending.append((metrics, tags))
        waiting = sum(len(m) for m, _ in self.pending)
        while waiting > self.max_pending and len(self.pending) > 1:
            lost, _ = self.pending.popleft()  # oldest first: the newest values matter most
            self.dropped += len(lost)
            waiting -= len(lost)
        self._drain(deadline_s=self.timeout_s)

    def _drain(self, deadline_s: float) -> bool:
        """Send what waits, oldest first, within about ``deadline_s``; True if all went."""
        import time

        start = time.monotonic()
        while self.pending or self.dropped != self.reported_dropped:
            if time.monotonic() < self.retry_at or time.monotonic() - start > deadline_s:
                return False
            count = 0
            if self.pending:
                metrics, tags, count = self._coalesce()
            else:
                metrics, tags = self._dropped_batch()
            try:
                self._send(self.run_id, metrics, tags)
            except Exception as err:  # noqa: BLE001 - any failure: keep the batch, back off
                if _refused(err) and self.pending:  # the server will never take this batch
                    print(f"[mtl] tracking: a batch was refused ({_one_line(err)})", flush=True)
                    for _ in range(count):
                        self.dropped += len(self.pending.popleft()[0])
                    continue
                self.failures += 1
                self.retry_at = time.monotonic() + min(
                    2.0 ** (self.failures - 1), self.max_backoff_s
                )
                if self.failures == 1:
                    print(f"[mtl] tracking: {self.uri} failed ({_one_line(err)}); buffering "
                          "metrics and retrying", flush=True)  # fmt: skip
                self.last_error = _one_line(err)
                return False
            if self.failures:
                print(f"[mtl] tracking: {self.uri} is back after {self.failures} failed "
                      "attempts; sending the buffered metrics", flush=True)  # fmt: skip
            self.failures = 0
            if count:
                for _ in range(count):
                    self.pending.popleft()
            else:
                self.reported_dropped = int(tags[0].value)
        return True

    def _coalesce(self) -> tuple[list, list, int]:
        """The oldest waiting batches as one request, within MLflow's ``log-batch`` limits
        (1000 metrics, 100 tags): a backlog goes in few round trips."""
        metrics, tags, count = [], [], 0
        for m, t in self.pending:
            if count and (len(metrics) + len(m) > 1000 or len(tags) + len(t) > 100):
                break
            metrics, tags, count = metrics + m, tags + t, count + 1
        return metrics, tags, count

    def _dropped_batch(self) -> tuple[list, list]:
        import time

        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        metric = Metric("tracking/dropped_metrics", float(self.dropped), now, 0)
        return [metric], [RunTag(DROPPED_TAG, str(self.dropped))]

    def __del__(self) -> None:
        # The worker's logger goes when its training function returns: the last batches,
        # buffered through an outage, still get their bounded chance (as at exit).
        try:
            _flush_at_exit(lambda: self)
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass

    def flush(self, timeout_s: float = 30.0) -> int:
        """Send everything that waits, retrying for up to ``timeout_s``; returns the number of
        metric values lost (dropped before, or still unsent now), and prints it if any."""
        import time

        deadline = time.monotonic() + timeout_s
        while not self._drain(deadline_s=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                break
            time.sleep(max(0.0, min(self.retry_at, deadline) - time.monotonic()))
        unsent = sum(len(m) for m, _ in self.pending)
        lost = self.dropped + unsent
        if lost:
            print(
                f"[mtl] tracking: {lost} metric values not logged to {self.uri} "
                f"({self.dropped} dropped, {unsent} unsent: {self.last_error})",
                flush=True,
            )
        return lost


def _flush_at_exit(ref: Any) -> None:
    logger = ref()
    if logger is not None and (logger.pending or logger.dropped != logger.reported_dropped):
        logger.flush(timeout_s=30.0)


def _refused(err: BaseException) -> bool:
    """A client error (bad value, missing run): retrying sends the same refusal."""
    from mlflow.exceptions import MlflowException

    if not isinstance(err, MlflowException):
        return False
    code = err.get_http_status_code()
    return 400 <= code < 500 and code != 429


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def _client_sender(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return lambda run_id, metrics, tags: client.log_batch(run_id, metrics=metrics, tags=tags)


def _rest_sender(uri: str, timeout_s: float) -> Any:
    """A ``log-batch`` POST to an MLflow server with its own timeout and no retries (the
    client's follow MLflow's process-wide settings: minutes of retries by default)."""
    if urlparse(uri).scheme not in ("http", "https"):
        return None
    from mlflow.protos.service_pb2 import LogBatch
    from mlflow.store.tracking.rest_store import RestStore
    from mlflow.tracking._tracking_service.utils import _get_store
    from mlflow.utils.proto_json_utils import message_to_json
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    store = _get_store(uri)
    if not isinstance(store, RestStore):
        return None

    def send(run_id: str, metrics: list, tags: list) -> None:
        body = message_to_json(
            LogBatch(
                run_id=run_id,
                metrics=[m.to_proto() for m in metrics],
                tags=[t.to_proto() for t in tags],
            )
        )
        endpoint = "/api/2.0/mlflow/runs/log-batch"
        response = http_request(
            store.get_host_creds(), endpoint, "POST", max_retries=0, timeout=timeout_s,
            json=json.loads(body),
        )  # fmt: skip
        verify_rest_response(response, endpoint)

    return send


def metric_rows(uri: str, run_id: str, keys: list[str]) -> list[dict[str, float]]:
    """Metrics logged together (one ``log_metrics`` call each) as rows in logging order:
    the ``step`` and the value of every key; rows missing a key are left out."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    order = lambda m: (m.timestamp, m.step)  # noqa: E731
    histories = {
        k: sorted(client.get_metric_history(run_id, _metric_key(k)), key=order) for k in keys
    }
    count = min((len(h) for h in histories.values()), default=0)
    rows = []
    for i in range(count):
        row = {"step": histories[keys[0]][i].step}
        row.update({k: h[i].value for k, h in histories.items()})
        rows.append(row)
    return rows


def _metric_key(key: str) -> str:
    # MLflow keys allow "/" but not every character a task name might hold.
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def log_figure(uri: str, run_id: str, figure: Any, name: str) -> None:
    """Store a matplotlib figure as a PNG artifact of the run."""
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).log_figure(run_id, figure, name)


def log_artifact(uri: str, run_id: str, path: str | os.PathLike, folder: str = "") -> None:
    """Store the file at ``path`` as an artifact of the run, under ``folder``."""
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).log_artifact(run_id, str(path), folder or None)


def log_text(uri: str, run_id: str, text: str, name: str) -> None:
    """Store ``text`` as an artifact file of the run."""
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).log_text(run_id, text, name)
