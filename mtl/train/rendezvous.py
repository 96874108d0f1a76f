"""Where the workers' process group listens: loopback on one node, the node's address across nodes.

Ray Train's ``TorchConfig`` hands rank 0's node address to torch.distributed's ``env://``
rendezvous, whose ``TCPStore`` server on rank 0 binds every interface (``::``) and serves
anyone who connects, unauthenticated. ``BoundTorchConfig`` does the rendezvous itself:

- all workers on one node (how Ray runs on a single machine): the store and gloo's (or
  NCCL's) sockets bind ``127.0.0.1``;
- workers on several nodes: the store binds rank 0's cluster address (Ray's node IP) and each
  worker's gloo/NCCL sockets the interface that carries its own node IP; never ``0.0.0.0``.

Rank 0 binds the listening socket itself and hands it to ``TCPStore`` (``master_listen_fd``),
because torch's own server has no bind-address option; the other ranks connect to it as
clients. Everything else (the process group's shutdown, the ``RANK``/``LOCAL_RANK`` variables)
is Ray's ``TorchConfig`` unchanged.

Relies on Ray Train's private ``ray.train.torch.config._TorchBackend``,
``_set_torch_distributed_env_vars`` and ``ray.train._internal.worker_group.WorkerGroup``
(checked against ray 2.60); tests/train/test_listeners.py
trains through them and fails if a Ray upgrade changes them.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

LOOPBACK = "127.0.0.1"

# Rank 0's bound, listening socket, between binding it and handing it to the TCPStore (both
# run in rank 0's worker process, in two calls from Ray's controller).
_listener: socket.socket | None = None


def bind_host(node_ips: list[str]) -> str:
    """The address the rendezvous store binds: loopback when every worker is on one node,
    else rank 0's (``node_ips[0]``) cluster address."""
    if not node_ips:
        raise ValueError("no workers to rendezvous")
    return LOOPBACK if len(set(node_ips)) == 1 else node_ips[0]


def interface_of(address: str) -> str | None:
    """The network interface that carries ``address`` on this machine (``lo`` for loopback)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == address for a in addrs):
            return name
    return None


def open_listener(host: str) -> int:
    """Bind and listen on ``host`` at a free port (in rank 0's process); returns the port."""
    global _listener
    if _listener is not None:
        _listener.close()
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    _listener = socket.create_server((host, 0), family=family, backlog=1024)
    return _listener.getsockname()[1]


def open_store(host: str, port: int, rank: int, world_size: int, timeout_s: float) -> Any:
    """Rank 0: the TCPStore server on the socket ``open_listener`` bound; other ranks: a
    client of it."""
    global _listener
    from torch.distributed import TCPStore

    timeout = timedelta(seconds=timeout_s)
    if rank != 0:
        return TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    if _listener is None:
        raise RuntimeError("rank 0's rendezvous socket was not opened (open_listener)")
    fd, _listener = _listener.detach(), None  # the store owns the socket from here on
    # libuv is the server implementation that serves a socket handed to it.
    return TCPStore(
        host, port, world_size, is_master=True, timeout=timeout, master_listen_fd=fd, use_libuv=True
    )


def _bind_sockets(node_ip: str, single_node: bool) -> None:
    """gloo's and NCCL's own sockets on the interface of the store's side of the network
    (an interface the user chose in the environment is kept)."""
    iface = interface_of(LOOPBACK if single_node else node_ip)
    if iface is None:  # the node IP is not on a local interface (NAT): torch's default
        return
    os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
    os.environ.setdefault("NCCL_SOCKET_IFNAME", iface)


def _setup(
    backend: str,
    host: str,
    port: int,
    world_rank: int,
    world_size: int,
    single_node: bool,
    timeout_s: float,
) -> None:
    """One worker joins the process group (runs in every worker, concurrently)."""
    import ray
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = host, str(port)
    _bind_sockets(ray.util.get_node_ip_address(), single_node)
    store = open_store(host, port, world_rank, world_size, timeout_s)
    dist.init_process_group(
        backend=backend,
        store=store,
        rank=world_rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


class _BoundTorchBackend(_TorchBackend):
    def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
        import ray

        backend = backend_config.backend or "gloo"
        node_ips = worker_group.execute(_node_ip)
        host = bind_host(node_ips)
        port = worker_group.execute_single(0, open_listener, host)
        if not isinstance(worker_group, V1WorkerGroup):
            # Ray Train V2 (the default) sets the torch variables before the group exists;
            # V1 sets them in on_training_start.
            worker_group.execute(_set_torch_distributed_env_vars)
        ray.get(
            [
                worker_group.execute_single_async(
                    rank,
                    _setup,
                    backend=backend,
                    host=host,
                    port=port,
                    world_rank=rank,
                    world_size=len(node_ips),
                    single_node=len(set(node_ips)) == 1,
                    timeout_s=backend_config.timeout_s,
                )
                for rank in range(len(node_ips))
            ]
        )


@dataclass
class BoundTorchConfig(TorchConfig):
    """``TorchConfig`` whose rendezvous store and collectives' sockets never bind every
    interface (see the module docstring)."""

    @property
    def backend_cls(self) -> type:
        return _BoundTorchBackend
