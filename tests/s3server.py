"""A real S3 API server for tests: moto's server mode, in a child process, on a given host.

    server = S3Server(host="127.0.0.1").start()   # a free port unless one is given
    os.environ.update(server.env())               # AWS_ENDPOINT_URL and test credentials
    ... train.storage_path=s3://{server.bucket}/runs ...
    server.restart()                              # same host and port, same objects
    server.stop()

moto keeps its objects in memory (moto 5.2.5's server has no persistence option: its flags are
host, port, reload and TLS only), so a killed server loses everything. ``restart()`` therefore
means what a real object store's restart means to its clients: the endpoint goes away (requests
fail with connection errors) and comes back on the same address with the objects it held. The
objects are copied out through the S3 API before the process is stopped and written back
through the S3 API once the new process answers; ``restart(keep_objects=False)`` is a crash that
loses them. ``down()`` / ``up()`` split a restart in two for a test that needs the endpoint gone
for a while (``up()`` puts back what ``down()`` copied out).

Only loopback or a test namespace's own address is ever bound; nothing leaves the machine.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never ask a cloud metadata service for credentials
}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class S3Server:
    """moto's S3 API server as a subprocess (``python -m moto.server -H host -p port``).

    ``command_prefix`` runs it elsewhere, e.g. ``["ip", "netns", "exec", "head"]`` to start it
    inside a network namespace (then pass that namespace's address as ``host``).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        bucket: str = "mtl",
        *,
        command_prefix: list[str] | None = None,
        log_path: Path | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self.host, self.bucket = host, bucket
        self.port = port or free_port(host if not command_prefix else "127.0.0.1")
        self.command_prefix = list(command_prefix or [])
        self.log_path, self.timeout_s = log_path, timeout_s
        self._proc: subprocess.Popen | None = None
        self._log: Any = None
        self._saved: dict[str, dict[str, bytes]] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, prefix: str = "") -> str:
        """``s3://bucket/prefix`` on this server (a ``train.storage_path``, an artifact root)."""
        return f"s3://{self.bucket}/{prefix.strip('/')}".rstrip("/")

    def env(self) -> dict[str, str]:
        """What a client (driver, worker, boto3, pyarrow) needs to reach this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, **CREDENTIALS}

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
            config=Config(retries={"max_attempts": 1}, connect_timeout=5, read_timeout=30),
        )

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> S3Server:
        """Start the process, wait until it answers, create the bucket (if missing)."""
        self._spawn()
        client = self.client()
        if self.bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=self.bucket)
        return self

    def stop(self) -> None:
        """Stop the process (its objects are gone with it)."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def down(self, *, keep_objects: bool = True) -> None:
        """The endpoint goes away; with ``keep_objects`` its objects are copied out first."""
        self._saved = self.snapshot() if keep_objects else None
        self.stop()

    def up(self) -> None:
        """The endpoint comes back on the same address, with what ``down()`` copied out."""
        self._spawn()
        client, saved = self.client(), self._saved or {self.bucket: {}}
        for bucket, objects in saved.items():
            client.create_bucket(Bucket=bucket)
            for key, body in objects.items():
                client.put_object(Bucket=bucket, Key=key, Body=body)
        self._saved = None

    def restart(self, *, keep_objects: bool = True) -> None:
        """Stop and start again on the same host and port (see the module docstring)."""
        self.down(keep_objects=keep_objects)
        self.up()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers ----------------------------------------------------------------------------
    def snapshot(self) -> dict[str, dict[str, bytes]]:
        """Every object of every bucket, read through the S3 API."""
        client, out = self.client(), {}
        for bucket in (b["Name"] for b in client.list_buckets().get("Buckets", [])):
            out[bucket] = {key: self.read(key, bucket) for key in self.keys("", bucket)}
        return out

    def keys(self, prefix: str = "", bucket: str | None = None) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2")
        return sorted(
            obj["Key"]
            for page in pages.paginate(Bucket=bucket or self.bucket, Prefix=prefix)
            for obj in page.get("Contents", [])
        )

    def read(self, key: str, bucket: str | None = None) -> bytes:
        return self.client().get_object(Bucket=bucket or self.bucket, Key=key)["Body"].read()

    def _spawn(self) -> None:
        if self.running:
            raise RuntimeError(f"the S3 server at {self.endpoint} is already running")
        command = [
            *self.command_prefix,
            sys.executable,
            "-m",
            "moto.server",
            "-H",
            self.host,
            "-p",
            str(self.port),
        ]
        if self.log_path is not None:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        sink = self._log or subprocess.DEVNULL
        env = {**os.environ, **CREDENTIALS}
        self._proc = subprocess.Popen(command, stdout=sink, stderr=sink, env=env)
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"moto's S3 server exited with {self._proc.returncode} before answering "
                    f"on {self.endpoint} (port taken? see {self.log_path or 'its output'})"
                )
            if self._answers():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto's S3 server did not answer on {self.endpoint} in time")

    def _answers(self) -> bool:
        # moto's own health endpoint; a plain GET / would be an S3 ListBuckets call.
        try:
            with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False
