"""A Ray cluster of separate network hosts on one machine, for the multinode tests.

One Linux bridge in the root namespace and one network namespace per node, each joined to
the bridge by a veth pair, with its own address and only the bridge's subnet routed (no
default route: nothing leaves the machine). Every node runs ``ray start --block`` inside its
namespace with token auth on; the head namespace also runs an ``mlflow server``, and an S3
API server (tests/s3server.py, moto) listens on the bridge's own address when available.

Every name carries the test process's pid, so two sessions never share a bridge or a
namespace. Teardown kills every process inside each namespace (``ip netns pids``: only what
this harness started, never another session's Ray, which ``ray stop`` would kill), then
deletes the namespaces, the veths and the bridge; it runs even when start-up failed.

Jobs go in through the head's job API (``submit``, ``wait_job``, ``job_logs``), and
``actor_nodes`` says which node each actor ran on. The faults: ``kill_node`` (SIGKILL to
every process of a node's namespace, a lost host), ``restart_node`` (``ray start`` there
again), ``restart_mlflow``; the S3 server's own ``down()``/``up()``/``restart()``.

Caveat: network namespaces share the filesystem, so a local path is visible to every "node";
only an ``s3://`` storage path proves that checkpoints travel over the network.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
START_TIMEOUT_S = 90.0
TORCH_EXTENSIONS = Path(tempfile.gettempdir()) / "mtl-multinode-torch-extensions"


class HarnessError(RuntimeError):
    """The cluster could not be built or did not come up in time."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def can_build() -> str | None:
    """Why this machine cannot build the cluster (None when it can)."""
    if os.geteuid() != 0:
        return "multinode tests need root (ip netns, veth, a bridge)"
    if shutil.which("ip") is None:
        return "multinode tests need iproute2's `ip`"
    probe = f"mtlprobe{os.getpid()}"
    try:
        done = _ip("netns", "add", probe, check=False)
        if done.returncode != 0:
            return f"`ip netns add` failed: {done.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def wait_port(host: str, port: int, timeout_s: float, what: str, proc=None) -> None:
    """Until ``host:port`` accepts a TCP connection (from the root namespace, over the bridge)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise HarnessError(f"{what} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise HarnessError(f"{what} not listening on {host}:{port} after {timeout_s:.0f}s")


@dataclass
class Node:
    name: str  # role: head, w1, w2
    ns: str
    ip: str
    num_cpus: int
    resource: str  # a custom resource only this node has (placement checks)
    temp_dir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)
    ray: subprocess.Popen | None = None  # its latest `ray start --block` (procs has MLflow too)


@dataclass
class Cluster:
    """Bridge + namespaces + Ray nodes (+ MLflow server, + S3 server); ``start()``/``stop()``."""

    workdir: Path
    num_workers: int = 2
    worker_cpus: int = 2
    tag: str = field(default_factory=lambda: str(os.getpid() % 100000))
    nodes: list[Node] = field(default_factory=list)
    s3: object | None = None
    log_dir: Path | None = None

    def __post_init__(self) -> None:
        self.subnet = f"10.201.{os.getpid() % 200 + 1}"
        self.bridge = f"mtlbr{self.tag}"
        self.bridge_ip = f"{self.subnet}.1"
        self.token_path = self.workdir / "auth_token"
        self.log_dir = self.workdir / "logs"
        self._extra: list[subprocess.Popen] = []
        workers = [(f"w{i}", self.worker_cpus) for i in range(1, self.num_workers + 1)]
        roles = [("head", 0), *workers]
        for k, (role, cpus) in enumerate(roles):
            self.nodes.append(
                Node(
                    name=role,
                    ns=f"mtl{self.tag}{role}",
                    ip=f"{self.subnet}.{10 + k}",
                    num_cpus=cpus,
                    resource=f"node_{role}",
                    # short: Ray's Unix sockets live under it (108-byte path limit)
                    temp_dir=Path(f"/tmp/mtr{self.tag}{role}"),
                )
            )

    @property
    def head(self) -> Node:
        return self.nodes[0]

    @property
    def workers(self) -> list[Node]:
        return self.nodes[1:]

    @property
    def dashboard(self) -> str:
        return f"http://{self.head.ip}:8265"

    @property
    def mlflow_uri(self) -> str:
        return f"http://{self.head.ip}:5000"

    def token(self) -> str:
        return self.token_path.read_text().strip()

    # -- environment --------------------------------------------------------------------
    def env(self, with_token: bool = True) -> dict[str, str]:
        """What a process on (or a client of) the cluster runs with."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RAY_", "MLFLOW_", "AWS_")) and k not in ("PYTHONPATH",)
        }
        env.update(
            PATH=f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}",
            # Ray 2.60's `ray start --address` refuses to join a cluster unless this is 1, on
            # Linux too (the tests' own single-node Ray keeps it at 0).
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1",
            DS_ACCELERATOR="cpu",
            MTL_DATA_DIR=os.environ.get("MTL_DATA_DIR", ""),
            RAY_USAGE_STATS_ENABLED="0",
            # Ray's processes that look for "their" cluster without an address (Train's
            # PlacementGroupCleaner asks the state API) find every cluster's GCS on this
            # machine (the namespaces share the process table) and give up on two or more.
            RAY_ADDRESS=f"{self.head.ip}:6379",
            RAY_API_SERVER_ADDRESS=self.dashboard,
            # Every node's memory monitor sees the whole machine's memory (one kernel), so it
            # would kill this cluster's workers for what other nodes and processes use.
            RAY_memory_monitor_refresh_ms="0",
            # DeepSpeed JIT-builds its shm comm op in every fresh worker, under a file lock in
            # the torch extensions folder; in ~/.cache that lock is shared with every other
            # session on the machine (a worker waited minutes for it). The cluster's own.
            TORCH_EXTENSIONS_DIR=str(TORCH_EXTENSIONS),
            NO_PROXY="*",
            no_proxy="*",
        )
        for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
            env.pop(proxy, None)
        if with_token:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path))
        else:
            # A client with no token: token mode on its side, but nothing to send.
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.workdir / "no_token"))
        if self.s3 is not None:
            env.update(self.s3.env())
        return env

    def in_ns(self, node: Node, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", node.ns, *argv]

    def run(self, argv: list[str], node: Node | None = None, timeout: float = 120, **kw):
        """Run ``argv`` (inside ``node``'s namespace when given) and capture its output."""
        cmd = self.in_ns(node, argv) if node is not None else argv
        env = kw.pop("env", None) or self.env()
        return subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO, **kw
        )

    def _spawn(self, node: Node | None, argv: list[str], log: str, env=None) -> subprocess.Popen:
        cmd = self.in_ns(node, argv) if node is not None else argv
        out = open(self.log_dir / log, "w")  # noqa: SIM115 (kept open for the process's life)
        proc = subprocess.Popen(
            cmd,
            env=env or self.env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
        (node.procs if node is not None else self._extra).append(proc)
        return proc

    # -- network ------------------------------------------------------------------------
    def _network(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.bridge_ip}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for node in self.nodes:
            host_end, ns_end = f"mv{self.tag}{node.name}", f"mn{self.tag}{node.name}"
            _ip("netns", "add", node.ns)
            _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            _ip("link", "set", ns_end, "netns", node.ns)
            _ip("link", "set", host_end, "master", self.bridge)
            _ip("link", "set", host_end, "up")
            _ip("netns", "exec", node.ns, "ip", "link", "set", "lo", "up")
            _ip("netns", "exec", node.ns, "ip", "addr", "add", f"{node.ip}/24", "dev", ns_end)
            _ip("netns", "exec", node.ns, "ip", "link", "set", ns_end, "up")
        # Bridged traffic must not be dropped by a host firewall that filters bridges.
        Path("/proc/sys/net/bridge/bridge-nf-call-iptables").exists() and subprocess.run(
            ["sysctl", "-q", "-w", "net.bridge.bridge-nf-call-iptables=0"], check=False
        )

    # -- services -----------------------------------------------------------------------
    def _start_s3(self) -> None:
        try:
            from tests import s3server  # Helper S's moto server helper
        except ImportError:
            return
        self.s3 = s3server.S3Server(host=self.bridge_ip, port=9000 + os.getpid() % 1000)
        self.s3.start()

    def _start_mlflow(self, fresh: bool = True) -> None:
        store = self.workdir / "mlflow"
        store.mkdir(exist_ok=not fresh)
        if self.s3 is not None:
            artifacts = f"{self.s3.url('mlartifacts')}"
        else:
            artifacts = str(store / "artifacts")
        proc = self._spawn(
            self.head,
            [
                str(VENV_BIN / "mlflow"),
                "server",
                "--host",
                self.head.ip,
                "--port",
                "5000",
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{store / 'mlflow.db'}",
                "--artifacts-destination",
                artifacts,
            ],
            "mlflow.log" if fresh else "mlflow_restarted.log",
            # No job runner (MLflow 3's huey consumers: eight processes, ~2 GB, unused here).
            env={**self.env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        self._mlflow = proc
        wait_port(self.head.ip, 5000, START_TIMEOUT_S, "mlflow server", proc)

    def _ray_start(self, node: Node, head: bool) -> subprocess.Popen:
        if node.temp_dir.exists():
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        argv = [
            str(VENV_BIN / "ray"),
            "start",
            "--block",
            "--disable-usage-stats",
            f"--node-ip-address={node.ip}",
            f"--num-cpus={node.num_cpus}",
            "--num-gpus=0",
            f"--resources={json.dumps({node.resource: 1})}",
            f"--temp-dir={node.temp_dir}",
        ]
        if head:
            argv += ["--head", "--port=6379", f"--dashboard-host={node.ip}"]
            argv += ["--include-dashboard=true"]
        else:
            argv += [f"--address={self.head.ip}:6379"]
        node.ray = self._spawn(node, argv, f"ray_{node.name}.log")
        return node.ray

    def _wait_nodes(self, timeout_s: float) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.ray is not None and node.ray.poll() is not None:
                    raise HarnessError(
                        f"ray on {node.name} exited with {node.ray.returncode}; "
                        f"see {self.log_dir / ('ray_' + node.name + '.log')}"
                    )
            nodes = self.list_nodes(check=False)
            alive = [n for n in nodes if n.get("state") == "ALIVE"]
            if len(alive) == len(self.nodes):
                return alive
            last = f"{len(alive)} of {len(self.nodes)} nodes alive"
            time.sleep(1)
        raise HarnessError(f"Ray cluster not up after {timeout_s:.0f}s: {last}")

    def list_nodes(self, check: bool = True) -> list[dict]:
        """Ray's state API (over the bridge, with the token): the cluster's nodes."""
        done = self.run(
            [
                str(VENV_BIN / "ray"),
                "list",
                "nodes",
                "--address",
                self.dashboard,
                "--format",
                "json",
                "--detail",
            ],
            timeout=60,
        )
        if done.returncode != 0:
            if check:
                raise HarnessError(f"ray list nodes failed: {done.stderr[-2000:]}")
            return []
        try:
            return json.loads(done.stdout)
        except json.JSONDecodeError:
            if check:
                raise
            return []

    def start(self) -> Cluster:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # Ray's own token format, as `ray get-auth-token --generate` writes it: 32 bytes, hex.
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        try:
            self._network()
            self._start_s3()
            self._start_mlflow()
            self._ray_start(self.head, head=True)
            wait_port(self.head.ip, 8265, START_TIMEOUT_S, "ray dashboard", self.head.ray)
            for node in self.workers:
                self._ray_start(node, head=False)
            self._wait_nodes(START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        return self

    # -- jobs and the state API ---------------------------------------------------------
    def ray_cli(self, *args: str, timeout: float = 60, env=None) -> subprocess.CompletedProcess:
        """``ray <args> --address <dashboard>`` from the root namespace, with the token (the
        address goes before a ``--`` that starts a job's entrypoint)."""
        args = list(args)
        cut = args.index("--") if "--" in args else len(args)
        argv = [str(VENV_BIN / "ray"), *args[:cut], "--address", self.dashboard, *args[cut:]]
        return self.run(argv, timeout=timeout, env=env)

    def submit(
        self, argv: list[str], submission_id: str, timeout: float, no_wait: bool = False
    ) -> subprocess.CompletedProcess:
        """``ray job submit`` of ``argv`` (run by the head's job supervisor, in the repository
        folder: the namespaces share the filesystem, so no ``--working-dir`` upload)."""
        cmd = ["job", "submit", "--submission-id", submission_id]
        if no_wait:
            cmd.append("--no-wait")
        return self.ray_cli(*cmd, "--", *argv, timeout=timeout)

    def job_status(self, submission_id: str) -> str:
        """PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED ("" when the API did not answer)."""
        done = self.ray_cli("list", "jobs", "--format", "json", "--detail", timeout=60)
        if done.returncode != 0:
            return ""
        for job in json.loads(done.stdout or "[]"):
            if job.get("submission_id") == submission_id:
                return job.get("status", "")
        return ""

    def job_logs(self, submission_id: str) -> str:
        """The job driver's output so far: its log file on the head (the namespaces share the
        filesystem, and polling it costs no CLI start), else ``ray job logs``."""
        log = self.head.temp_dir / "session_latest" / "logs" / f"job-driver-{submission_id}.log"
        if log.is_file():
            return log.read_text(errors="replace")
        done = self.ray_cli("job", "logs", submission_id, timeout=60)
        return done.stdout + done.stderr

    def wait_job(self, submission_id: str, timeout_s: float) -> str:
        """Until the job ends; its final status (or the last one seen at the deadline)."""
        deadline, status = time.monotonic() + timeout_s, ""
        while time.monotonic() < deadline:
            status = self.job_status(submission_id) or status
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status
            time.sleep(2)
        return status

    def actor_nodes(self, class_name: str, job_id: str | None = None) -> list[str]:
        """The node (role: w1, w2, head) each actor of ``class_name`` ran on, from Ray's state
        API (dead actors included), for placement checks."""
        by_id = {n["node_id"]: n["node_ip"] for n in self.list_nodes()}
        by_ip = {n.ip: n.name for n in self.nodes}
        done = self.ray_cli(
            "list", "actors", "--format", "json", "--detail", "--limit", "10000",
            "--filter", f"class_name={class_name}", timeout=60,
        )  # fmt: skip
        if done.returncode != 0:
            raise HarnessError(f"ray list actors failed: {done.stderr[-2000:]}")
        roles = []
        for actor in json.loads(done.stdout or "[]"):
            if job_id is not None and actor.get("job_id") != job_id:
                continue
            ip = actor.get("address", {}).get("ip_address") or by_id.get(actor.get("node_id"))
            roles.append(by_ip.get(ip, ip or "?"))
        return roles

    # -- faults -------------------------------------------------------------------------
    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def kill_node(self, name: str) -> None:
        """A lost host: every process in ``name``'s namespace killed at once (SIGKILL)."""
        node = self.node(name)
        for pid in (int(p) for p in _ip("netns", "pids", node.ns, check=False).stdout.split()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._kill_ns(node)
        for proc in node.procs:
            proc.wait(timeout=10)
        node.procs.clear()

    def restart_node(self, name: str, timeout_s: float = START_TIMEOUT_S) -> None:
        """``ray start`` again on a worker node killed by ``kill_node``; waits until the
        cluster counts it alive again."""
        node = self.node(name)
        if node is self.head:
            raise HarnessError("restart_node restarts worker nodes only")
        self._ray_start(node, head=False)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            alive = [n for n in self.list_nodes(check=False) if n.get("state") == "ALIVE"]
            if node.ip in {n["node_ip"] for n in alive}:
                return
            if node.ray.poll() is not None:
                raise HarnessError(f"ray on {name} exited with {node.ray.returncode}")
            time.sleep(1)
        raise HarnessError(f"{name} not alive again after {timeout_s:.0f}s")

    def restart_mlflow(self, down_s: float = 0.0) -> None:
        """Stop the MLflow server (SIGKILL, as a crash), wait ``down_s``, start it again on the
        same address and store."""
        proc = self._mlflow
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        self.head.procs.remove(proc)
        time.sleep(down_s)
        self._start_mlflow(fresh=False)

    # -- teardown -----------------------------------------------------------------------
    def _kill_ns(self, node: Node) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            done = _ip("netns", "pids", node.ns, check=False)
            pids = [int(p) for p in done.stdout.split()]
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if not _ip("netns", "pids", node.ns, check=False).stdout.strip():
                    break
                time.sleep(0.2)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            self._kill_ns(node)
            for proc in node.procs:
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        if self.s3 is not None:
            try:
                self.s3.stop()
            except Exception:  # noqa: BLE001 (teardown goes on)
                pass
        for proc in self._extra:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        for node in self.nodes:
            _ip("link", "del", f"mv{self.tag}{node.name}", check=False)
            _ip("netns", "del", node.ns, check=False)
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        _ip("link", "del", self.bridge, check=False)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
