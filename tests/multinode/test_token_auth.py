"""Token auth on a Ray cluster of separate network hosts: the head's job API refuses a
client without the cluster's token (an authentication error, not a connection error), and a
job submitted with it runs and sees every node."""

from __future__ import annotations

import secrets
import urllib.error
import urllib.request

import pytest

from tests.multinode.harness import VENV_BIN

pytestmark = [pytest.mark.multinode, pytest.mark.slow]


def test_the_cluster_is_three_hosts_with_their_own_addresses(cluster):
    ips = sorted(n["node_ip"] for n in cluster.list_nodes())
    assert ips == sorted(n.ip for n in cluster.nodes)
    assert len(set(ips)) == 3 and "127.0.0.1" not in ips


def test_the_job_api_refuses_a_request_without_the_token(cluster):
    request = urllib.request.Request(f"{cluster.dashboard}/api/jobs/")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.HTTPError) as refused:
        opener.open(request, timeout=30)
    body = refused.value.read().decode(errors="replace")
    print(f"no token: HTTP {refused.value.code}: {body[:200]}")
    assert refused.value.code in (401, 403), body
    # The same request with the token is served: the refusal was about the token alone.
    request.add_header("Authorization", f"Bearer {cluster.token()}")
    with opener.open(request, timeout=30) as served:
        assert served.status == 200


def _submit(cluster, env) -> tuple[int, str]:
    script = "import ray; ray.init(); print('NODES', len([n for n in ray.nodes() if n['Alive']]))"
    done = cluster.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--",
         str(VENV_BIN / "python"), "-c", script],
        env=env,
        timeout=180,
    )  # fmt: skip
    return done.returncode, done.stdout + done.stderr


def test_ray_job_submit_with_a_wrong_token_is_an_authentication_error(cluster):
    env = {**cluster.env(), "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_AUTH_TOKEN_PATH")
    code, out = _submit(cluster, env)
    print(f"wrong token: exit {code}: {out[-400:]}")
    assert code != 0
    lowered = out.lower()
    assert "auth" in lowered or "unauthorized" in lowered, out[-2000:]
    assert "connection refused" not in lowered


def test_ray_job_submit_with_the_token_runs_on_the_cluster(cluster):
    code, out = _submit(cluster, cluster.env())
    assert code == 0, out[-3000:]
    assert "NODES 3" in out, out[-3000:]
