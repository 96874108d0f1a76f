"""The test S3 server (tests/s3server.py): a real S3 API on loopback that can be restarted."""

from __future__ import annotations

import pytest

from tests.s3server import S3Server


@pytest.fixture
def server():
    with S3Server(bucket="probe") as s3:
        yield s3


def test_serves_s3_and_survives_a_restart(server):
    client = server.client()
    client.put_object(Bucket="probe", Key="runs/a/metrics.json", Body=b'{"step": 4}')
    assert server.keys("runs/") == ["runs/a/metrics.json"]
    assert server.url("runs") == "s3://probe/runs"
    assert server.env()["AWS_ENDPOINT_URL"] == server.endpoint

    port = server.port
    server.down()
    with pytest.raises(Exception, match="(?i)connect"):
        server.client().list_buckets()  # the endpoint is really gone
    server.up()
    assert server.port == port and server.read("runs/a/metrics.json") == b'{"step": 4}'

    server.restart(keep_objects=False)  # a crash: moto keeps objects in memory only
    assert server.keys() == [] and "probe" in {
        b["Name"] for b in server.client().list_buckets()["Buckets"]
    }
