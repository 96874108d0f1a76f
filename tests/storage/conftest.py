"""The S3 API server of the storage tests (moto, tests/s3server.py), for the whole session.

Its endpoint and test credentials go into ``os.environ`` before anything resolves an
``s3://`` path: the driver reads them there, ``FORWARDED_ENV`` hands them to the workers and
Ray's Train controller gets a filesystem object that carries them (``mtl.storage``).
"""

from __future__ import annotations

import os

import pytest

from tests.s3server import S3Server


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    server = S3Server(bucket="mtl", log_path=log).start()
    before = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    server.stop()
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def prefix(s3, request):
    """A fresh ``s3://mtl/<test>`` prefix per test (the bucket is shared)."""
    return s3.url(request.node.name.replace("[", "-").rstrip("]"))
