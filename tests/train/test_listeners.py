"""Every socket a training job listens on binds one address, never every interface.

Rank 0's torch.distributed store used to listen on ``::`` (all interfaces, no authentication);
``mtl.train.rendezvous`` binds it, and gloo's sockets, to loopback on a single node.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest

from mtl.train import rendezvous

REPO = Path(__file__).resolve().parents[2]


def _listening(pid: int) -> set[tuple[str, int]]:
    return {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process(pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is loopback too
    return (mapped or addr).is_loopback


def _is_wildcard(ip: str) -> bool:
    return ipaddress.ip_address(ip.split("%")[0]).is_unspecified  # 0.0.0.0 or ::


def test_bind_host_is_loopback_on_one_node_and_rank0s_address_across_nodes():
    assert rendezvous.bind_host(["10.0.0.2", "10.0.0.2"]) == "127.0.0.1"
    assert rendezvous.bind_host(["10.0.0.2", "10.0.0.3", "10.0.0.2"]) == "10.0.0.2"
    with pytest.raises(ValueError, match="no workers"):
        rendezvous.bind_host([])
    assert rendezvous.interface_of("127.0.0.1") is not None  # lo, for GLOO_SOCKET_IFNAME


def _store_roundtrip(host: str) -> set[tuple[str, int]]:
    """A real TCPStore server on ``host`` and a client of it; returns what this process
    listens on while the server is up."""
    before = _listening(psutil.Process().pid)
    port = rendezvous.open_listener(host)
    # world_size=1: the server does not wait for the client to join before returning
    server = rendezvous.open_store(host, port, 0, 1, timeout_s=30)
    client = rendezvous.open_store(host, port, 1, 1, timeout_s=30)
    client.set("k", "v")
    assert server.get("k") == b"v"
    new = _listening(psutil.Process().pid) - before
    assert any(p == port for _, p in new), (port, new)
    del client, server
    return {(ip, p) for ip, p in new if p == port}


def test_store_binds_loopback_only():
    (bound,) = _store_roundtrip("127.0.0.1")
    assert bound == ("127.0.0.1", bound[1])


def test_store_across_nodes_binds_the_node_address_not_every_interface():
    own = [
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback
    ]
    if not own:
        pytest.skip("this machine has no non-loopback IPv4 address to bind")
    (bound,) = _store_roundtrip(own[0])
    assert bound[0] == own[0]


def test_torchs_own_store_binds_every_interface():
    """Why rendezvous.py exists: torch's TCPStore server, given only a host name (what the
    env:// rendezvous does), binds :: or 0.0.0.0 whatever the name."""
    from torch.distributed import TCPStore

    before = _listening(psutil.Process().pid)
    store = TCPStore("127.0.0.1", 0, 1, is_master=True, use_libuv=True)
    new = _listening(psutil.Process().pid) - before
    assert (store.port, True) in {(p, _is_wildcard(ip)) for ip, p in new}, new


def test_rank0_store_refuses_a_second_open_without_its_socket():
    with pytest.raises(RuntimeError, match="open_listener"):
        rendezvous.open_store("127.0.0.1", 1, 0, 2, timeout_s=1)


class ListenerSampler:
    """Polls the LISTEN sockets of this process and its descendants (the session's Ray:
    GCS, raylet, workers) until stopped."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, int], set[str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            for proc in [me, *me.children(recursive=True)]:
                try:
                    title = (proc.cmdline() or [proc.name()])[0]
                    for addr in _listening(proc.pid):
                        self.seen.setdefault(addr, set()).add(Path(title).name)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass
            time.sleep(0.25)

    def __enter__(self) -> ListenerSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.slow
def test_training_job_listens_on_loopback_only(tmp_path, cache_dir, ray_session):
    from mtl.config import load_config
    from mtl.train.launch import fit

    cfg = load_config(
        str(REPO / "configs" / "tiny.yaml"),
        [
            "train.num_workers=2",
            f"train.storage_path={tmp_path / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"data.cache_dir={cache_dir}",
            "tasks.baseline=",
            "tracking.register=false",
        ],
    )
    with ListenerSampler() as sampler:
        fit(cfg, run_name="listeners")
    for (ip, port), procs in sorted(sampler.seen.items()):
        print(f"listening {ip}:{port} {sorted(procs)}")  # -s shows what listens where
    workers = {a for a, procs in sampler.seen.items() if any("RayTrainWorker" in p for p in procs)}
    # Each worker: Ray's own gRPC server, gloo's socket; rank 0 also the rendezvous store.
    assert len(workers) >= 5, sampler.seen
    assert not [a for a in workers if _is_wildcard(a[0])], sampler.seen
    assert all(_is_loopback(ip) for ip, _ in workers), sampler.seen
