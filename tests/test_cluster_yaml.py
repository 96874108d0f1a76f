"""cluster.yaml is a valid Ray cluster launcher config (Ray's own schema and defaults), and a
safe one: token auth on every ``ray start``, MLflow behind its basic-auth app on the head's
private address with its stores on local disk, checkpoints and MLflow artifacts on storage
every node sees (s3:// as the multinode tests run it, or the shared mount), the store's
endpoint and keys loaded from a file on each node, no secret in the file, the tested versions.
The MLflow recipe runs for real on loopback against a real S3 API server (moto)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster.yaml"
COMMAND_LISTS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)
SHELL_OPERATORS = {";", "&&", "||", "&", "|", "\n"}
SHARED = "/shared"  # the alternative: a network filesystem every node mounts at this path
S3_ENV = "~/.mtl/s3.env"  # the store's endpoint and keys, copied to each node, never committed


def _config() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def _commands(config: dict) -> list[tuple[str, str]]:
    return [(key, cmd) for key in COMMAND_LISTS for cmd in config.get(key) or []]


def _simple_commands(command: str) -> list[tuple[dict[str, str], list[str]]]:
    """``command`` split like a shell would at ``;``/``&&``/``&``/``|``: for each simple
    command, its leading ``VAR=value`` assignments and its arguments (``nohup`` dropped)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    parts, current = [], []
    for token in lexer:
        if token in SHELL_OPERATORS:
            parts.append(current)
            current = []
        else:
            current.append(token)
    parts.append(current)
    out = []
    for tokens in filter(None, parts):
        env = {}
        while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0], re.S):
            name, _, value = tokens.pop(0).partition("=")
            env[name] = value
        if tokens[:1] == ["nohup"]:
            tokens = tokens[1:]
        out.append((env, tokens))
    return out


def _invocations(config: dict, *program: str) -> list[tuple[str, dict[str, str], list[str]]]:
    """Every simple command that runs ``program`` (e.g. ``("ray", "start")``)."""
    n = len(program)
    return [
        (key, env, argv)
        for key, cmd in _commands(config)
        for env, argv in _simple_commands(cmd)
        if tuple(argv[:n]) == program
    ]


def _options(argv: list[str]) -> dict[str, str]:
    """``--name value`` and ``--name=value`` options of one command line."""
    opts, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            opts[name] = value
        i += 1
    return opts


def _sqlite_path(uri: str) -> str:
    assert uri.startswith("sqlite:///"), uri
    return uri[len("sqlite:///") :]


def test_cluster_yaml_passes_ray_schema():
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    validate_config(prepare_config(_config()))  # fills Ray's defaults, then checks the schema


def test_schema_check_is_real():
    import jsonschema
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    config = _config()
    config["setup_commandz"] = ["typo"]
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


def test_every_ray_start_uses_token_auth():
    starts = _invocations(_config(), "ray", "start")
    heads = [argv for _, _, argv in starts if "--head" in argv]
    assert len(heads) == 1 and len(starts) >= 2, starts  # the head and the workers
    for key, env, argv in starts:
        assert env.get("RAY_AUTH_MODE") == "token", f"{key}: {shlex.join(argv)}"
    # ray status / ray job submit on a node authenticate too
    assert any("export RAY_AUTH_MODE=token" in cmd for _, cmd in _commands(_config()))


def test_ray_dashboard_is_loopback_only():
    (head,) = [argv for _, _, argv in _invocations(_config(), "ray", "start") if "--head" in argv]
    assert _options(head).get("--dashboard-host") == "127.0.0.1", head


def test_nothing_listens_on_every_interface():
    for key, cmd in _commands(_config()):
        assert not re.search(r"0\.0\.0\.0|(?<![\w:])::(?![\w:])", cmd), f"{key}: {cmd}"
        for _, argv in _simple_commands(cmd):
            host = _options(argv).get("--host") or _options(argv).get("--dashboard-host")
            assert host not in ("0.0.0.0", "::", ""), f"{key}: {shlex.join(argv)}"


def _mlflow_server(config: dict) -> tuple[dict[str, str], dict[str, str]]:
    (server,) = _invocations(config, "mlflow", "server")
    _, env, argv = server
    return env, _options(argv)


def test_mlflow_server_runs_basic_auth_on_the_heads_private_address():
    config = _config()
    env, opts = _mlflow_server(config)
    assert opts.get("--app-name") == "basic-auth", opts
    assert opts.get("--host") == config["provider"]["head_ip"], opts  # not 0.0.0.0
    # the admin user comes from the credentials file on the node, not from this file
    for var in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        assert env.get(var, "").startswith("$(") and "~/.mlflow/credentials" in env[var], env
    assert "MLFLOW_AUTH_CONFIG_PATH" in env, env


def test_mlflow_stores_are_on_the_heads_local_disk():
    config = _config()
    _, opts = _mlflow_server(config)
    backend = _sqlite_path(opts["--backend-store-uri"])
    assert not backend.startswith(SHARED), backend  # SQLite's locking is unsafe over NFS
    auth_ini = " ".join(cmd for _, cmd in _commands(config) if "auth.ini" in cmd)
    (auth_db,) = re.findall(r"database_uri = (\S+?)(?:\\n|')", auth_ini)
    assert not _sqlite_path(auth_db).startswith(SHARED), auth_db
    assert "default_permission = NO_PERMISSIONS" in auth_ini


def _shared(uri: str) -> bool:
    """Storage every node sees: an s3:// bucket/prefix or a path on the shared mount."""
    return bool(re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/\S+", uri)) or (
        uri.startswith(SHARED + "/")
    )


def test_checkpoints_and_mlflow_artifacts_go_to_shared_storage():
    # the job the header tells users to submit: its train.storage_path
    paths = re.findall(r"train\.storage_path=(\S+)", CLUSTER.read_text())
    assert paths, "the example job names no train.storage_path"
    assert all(_shared(p) for p in paths), paths
    assert any(p.startswith("s3://") for p in paths), paths  # the tested path
    _, opts = _mlflow_server(_config())
    assert _shared(opts.get("--artifacts-destination", "")), opts
    assert "--no-serve-artifacts" not in opts, opts  # the nodes' clients go through the server


def _loads_s3_env_first(command: str, program: tuple[str, ...]) -> bool:
    """Within one command string, ``set -a`` then ``. ~/.mtl/s3.env`` before ``program``."""
    steps = [argv for _, argv in _simple_commands(command)]
    at = next(i for i, argv in enumerate(steps) if tuple(argv[: len(program)]) == program)
    before = steps[:at]
    sourced = [i for i, a in enumerate(before) if a in ([".", S3_ENV], ["source", S3_ENV])]
    return bool(sourced) and ["set", "-a"] in before[: sourced[0]]


def test_every_ray_start_and_the_mlflow_server_get_the_store_from_the_node_file():
    """The driver inherits the head's `ray start` environment (and forwards AWS_* to the
    workers); the MLflow server writes the artifacts itself: both need the endpoint and keys."""
    config = _config()
    found = 0
    for key, cmd in _commands(config):
        for program in (("ray", "start"), ("mlflow", "server")):
            if any(tuple(a[: len(program)]) == program for _, a in _simple_commands(cmd)):
                assert _loads_s3_env_first(cmd, program), f"{key}: {cmd}"
                found += 1
    assert found == 3, found  # the head's and the workers' ray start, the MLflow server
    assert config["file_mounts"].get("/home/ubuntu/.mtl/s3.env") == S3_ENV
    # a shell on a node (mtl register, a resume) reaches the store too
    assert any(f". {S3_ENV}" in c and ".bashrc" in c for _, c in _commands(config))


def test_linux_needs_no_ray_cluster_switch():
    """cluster.yaml leaves RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER alone because Ray enables
    multi-node clusters on Linux when it is unset (only an explicit 0, as the test suite's own
    single-node Ray sets, makes `ray start --address` refuse to join)."""
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=" not in CLUSTER.read_text()
    if not sys.platform.startswith("linux"):
        pytest.skip("the default checked is Linux's")
    probe = "from ray._private import ray_constants as c; print(c.ENABLE_RAY_CLUSTER)"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    unset = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120
    )
    assert unset.stdout.strip() == "True", unset.stderr[-2000:]
    off = subprocess.run(
        [sys.executable, "-c", probe],
        env={**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert off.stdout.strip() == "False", off.stderr[-2000:]


def test_no_secret_is_committed():
    config = _config()
    text = CLUSTER.read_text()
    # the three secrets are copied from the launching machine's home, not from the repository
    mounts = config["file_mounts"]
    secrets = (".ray/auth_token", ".mlflow/credentials", ".mtl/s3.env")
    for name in secrets:
        assert mounts.get(f"/home/ubuntu/{name}", "") == f"~/{name}", mounts
    chmods = [argv for _, _, argv in _invocations(config, "chmod", "600")]
    assert chmods and all(f"~/{n}" in chmods[0] for n in secrets), chmods
    # no literal token, password or key anywhere: every value comes from a file or a command
    pattern = r"(TOKEN|PASSWORD|SECRET_KEY|SECRET_ACCESS_KEY|ACCESS_KEY_ID)\s*[=:]\s*(\S+)"
    for match in re.finditer(pattern, text, re.I):
        assert match.group(2).startswith(('"$(', "$(", "%s", "~/")), match.group(0)
    assert not re.search(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b", text)  # an AWS access key id
    assert not re.search(r"https?://[^/\s:@]+:[^/\s@]+@", text)  # a URL carrying a password
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    named = [p for p in tracked if Path(p).name in ("auth_token", "credentials", "s3.env")]
    assert not named, named


def test_nodes_install_the_tested_versions_with_the_cluster_extra():
    installs = _invocations(_config(), "~/mtl-venv/bin/pip", "install")
    assert installs, "no pip install in cluster.yaml"
    for _, _, argv in installs:
        assert "-c" in argv and argv[argv.index("-c") + 1] == "~/mtl/constraints.txt", argv
        assert any(a.endswith("/mtl[cluster]") for a in argv), argv
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert any(dep.replace(" ", "").startswith("mlflow[auth]") for dep in extras["cluster"])


# --- the MLflow recipe, run for real on loopback ------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(url: str, user: str | None = None, password: str | None = None) -> int:
    request = urllib.request.Request(url)
    if user is not None:
        token = b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.slow
def test_mlflow_basic_auth_recipe_refuses_anonymous_and_stores_artifacts_in_the_bucket(
    tmp_path, monkeypatch
):
    """cluster.yaml's own head commands (the auth.ini line and the server line, which loads
    ~/.mtl/s3.env), run with HOME moved to tmp_path, the head address moved to 127.0.0.1 and
    the store a real S3 API server (moto) on loopback whose endpoint and keys are in s3.env."""
    pytest.importorskip(
        "flask_wtf", reason="MLflow's basic-auth app needs Flask-WTF: pip install -e '.[cluster]'"
    )
    pytest.importorskip("moto", reason="the S3 API server: pip install -e '.[dev]'")
    from tests.s3server import S3Server

    config = _config()
    _, opts = _mlflow_server(config)
    bucket, prefix = opts["--artifacts-destination"].split("://", 1)[1].split("/", 1)
    home, port = tmp_path / "home", _free_port()
    (home / ".mlflow").mkdir(parents=True)
    (home / ".mtl").mkdir()
    # the credentials file, in the form the header's recipe writes
    user, password = "mtl", "s3cret-" + os.urandom(6).hex()
    (home / ".mlflow" / "credentials").write_text(
        f"[mlflow]\nmlflow_tracking_username = {user}\nmlflow_tracking_password = {password}\n"
    )

    def local(cmd: str) -> str:
        return (
            cmd.replace("/home/ubuntu", str(home))
            .replace(config["provider"]["head_ip"], "127.0.0.1")
            .replace("--port 5000", f"--port {port} --workers 1")  # 1: a busy test machine
        )

    script = [local(c) for c in config["head_setup_commands"]]
    script += [local(c) for c in config["head_start_ray_commands"] if "mlflow" in c]
    script.append("wait")  # keep the server in this shell's process group
    # the server gets the store only from s3.env: none of this process's AWS_* or proxies
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "MLFLOW_")) and "proxy" not in k.lower()
    }
    env.update(HOME=str(home), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    with S3Server(host="127.0.0.1", bucket=bucket) as s3:
        # the form the header's recipe writes
        (home / ".mtl" / "s3.env").write_text("".join(f"{k}={v}\n" for k, v in s3.env().items()))
        shell = subprocess.Popen(
            ["bash", "-ec", "\n".join(script)], env=env, start_new_session=True, cwd=tmp_path
        )
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    anonymous = _status(url)
                    break
                except (ConnectionError, urllib.error.URLError):
                    log = home / "mlflow" / "server.log"
                    assert shell.poll() is None, log.read_text() if log.exists() else "no log"
                    assert time.monotonic() < deadline, "mlflow server did not start in 120 s"
                    time.sleep(1)
            assert anonymous == 401
            assert _status(url, user, "wrong") == 401
            assert _status(url, user, password) == 200
            # the MLflow client on a node reads the same ~/.mlflow/credentials and holds no
            # S3 keys: the server proxies the artifacts into the bucket
            monkeypatch.setenv("HOME", str(home))
            for var in [v for v in os.environ if v.startswith("AWS_")]:
                monkeypatch.delenv(var)
            from mlflow.tracking import MlflowClient

            client = MlflowClient(f"http://127.0.0.1:{port}")
            run = client.create_run(client.create_experiment("cluster-recipe"))
            client.log_text(run.info.run_id, "shared", "note.txt")
            keys = s3.keys(prefix + "/")
            assert any(run.info.run_id in k and k.endswith("/note.txt") for k in keys), keys
            assert (home / "mlflow" / "mlflow.db").is_file()  # the store on the head's disk
        finally:
            os.killpg(shell.pid, signal.SIGTERM)
            shell.wait(timeout=30)
