"""A browser's view of a registered model: the MLflow UI's page, screenshot and checked.

Starts ``mlflow server`` on the store (loopback, a free port), opens
``#/models/<name>`` in headless Chromium (Debian's ``chromium`` package, run with
``--headless --no-sandbox``), saves a screenshot and checks the rendered page (Chromium's
``--dump-dom`` after the same virtual-time budget) for the model's description, every identity
tag (key and value) and every alias. Exit status 1 names what the page lacks.

    .venv/bin/python benchmarks/registry_screenshot.py                  # ./mlflow.db (make run)
    .venv/bin/python benchmarks/registry_screenshot.py --tracking-uri sqlite:///runs/mlflow.db \\
        --name multimnist-hard_sharing --out benchmarks/results/registry_page.png
    .venv/bin/python benchmarks/registry_screenshot.py --demo           # a store made here

``--demo`` registers an untrained tiny MultiMNIST hard-sharing model through
``mtl.tracking.registry`` (the same path as a run's registration, without training) in a
temporary store and promotes it, so the page has both aliases.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
VIRTUAL_TIME_MS = 20000  # the UI fetches the model, its versions and aliases after load


def chromium() -> str | None:
    """The first headless-capable browser on PATH, or None."""
    return next((path for name in CHROMIUM if (path := shutil.which(name))), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UiServer:
    """``mlflow server`` on ``uri``'s store, on a free loopback port, for one ``with``."""

    def __init__(self, uri: str, folder: Path) -> None:
        self.uri, self.folder, self.port = uri, folder, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> UiServer:
        mlflow = str(Path(sys.executable).with_name("mlflow"))
        cmd = [mlflow, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers",
               "1", "--backend-store-uri", self.uri,
               "--default-artifact-root", str(self.folder / "artifacts")]  # fmt: skip
        self.log = self.folder / "ui_server.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=out, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.3)
        self.__exit__()
        raise RuntimeError(f"mlflow server did not start; its log:\n{self.log.read_text()}")

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _browser(browser: str, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile}", "--window-size=1400,1800",
               f"--virtual-time-budget={VIRTUAL_TIME_MS}", *args, url]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)


# Where on the page each thing must show: the section of the rendered DOM it is looked for in,
# from the ``data-testid`` that opens the section to the one that opens the next.
SECTIONS = {
    "description": ("note-editor-preview-content", "tags-section"),
    "tags": ("tags-section", "model-version-table"),
    "aliases": ("model-version-table", "model-view-pagination-section"),
}


def expected_text(uri: str, name: str) -> dict[str, tuple[str, str]]:
    """{what: (section, text the page must show there)}: the description's title, each
    identity tag's key and value, each alias as the versions table renders it (``@ alias``)."""
    from mlflow.tracking import MlflowClient

    from mtl.tracking.policy import IDENTITY

    model = MlflowClient(tracking_uri=uri, registry_uri=uri).get_registered_model(name)
    title = (model.description or "").splitlines()[0].lstrip("# ").strip()
    want = {"description title": ("description", title.replace("`", ""))}
    for key in IDENTITY:
        if key in model.tags:
            want[f"tag {key}"] = ("tags", f"{key} {model.tags[key]}")
    for alias in model.aliases:
        want[f"alias {alias}"] = ("aliases", f"@ {alias}")
    return want


def sections(dom: str) -> dict[str, str]:
    """The visible text of each of ``SECTIONS`` (tags stripped, spaces collapsed)."""
    out = {}
    for section, (start, end) in SECTIONS.items():
        i = dom.find(f'data-testid="{start}"')
        j = dom.find(f'data-testid="{end}"', i + 1)
        if i < 0:
            out[section] = ""
            continue
        begin = dom.find(">", i) + 1  # past the opening tag that carries the marker
        stop = dom.rfind("<", begin, j) if j > i else len(dom)  # before the next one's tag
        text = re.sub(r"<[^>]+>", " ", dom[begin:stop])
        out[section] = re.sub(r"\s+", " ", html.unescape(text)).replace(" : ", ": ")
    return out


def check_page(uri: str, name: str, out: Path, browser: str) -> dict[str, object]:
    """Screenshot the model's page to ``out``; returns what was looked for and missed."""
    want = expected_text(uri, name)
    with tempfile.TemporaryDirectory() as tmp, UiServer(uri, Path(tmp)) as server:
        url = f"{server.url}/#/models/{name}"
        out.parent.mkdir(parents=True, exist_ok=True)
        shot = _browser(browser, url, f"--screenshot={out.resolve()}")
        dom = _browser(browser, url, "--dump-dom")
    found = sections(dom.stdout)
    missing = {what: text for what, (where, text) in want.items() if text not in found[where]}
    return {
        "url": url,
        "screenshot": str(out),
        "screenshot_bytes": out.stat().st_size if out.is_file() else 0,
        "section_characters": {k: len(v) for k, v in found.items()},
        "looked_for": {what: f"{where}: {text}" for what, (where, text) in want.items()},
        "missing": missing,
        "browser_exit_codes": [shot.returncode, dom.returncode],
    }


def demo_store(folder: Path) -> tuple[str, str]:
    """A store with one registered tiny MultiMNIST model (untrained), candidate and champion."""
    import torch
    from mlflow.tracking import MlflowClient

    from mtl.config import Config
    from mtl.data import benchmark_taskset
    from mtl.models import build_model
    from mtl.tracking.policy import eval_data, promote_best
    from mtl.tracking.registry import register_fixed_model
    from mtl.train.register import identity, model_name

    cfg = Config()
    cfg.model.width, cfg.model.depth = 8, 2
    taskset = benchmark_taskset(cfg.data)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("mtl", artifact_location=str(folder / "artifacts"))
    run_id = client.create_run(experiment, run_name="registry-demo").info.run_id
    client.log_metric(run_id, "val/mean_accuracy", 0.1)
    torch.manual_seed(0)
    model = build_model(cfg.model, taskset).eval()
    height, width = taskset.image_size
    name = model_name(cfg)
    register_fixed_model(
        uri, run_id, model, torch.rand(2, taskset.in_channels, height, width), taskset,
        name=name, tags={"eval_data": eval_data(cfg.data), "model": cfg.model.name},
        identity=identity(cfg),
    )  # fmt: skip
    promote_best(uri, name, "mean_accuracy")
    client.set_terminated(run_id)
    return uri, name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--name", default="multimnist-hard_sharing")
    parser.add_argument("--out", type=Path, default=Path("registry_page.png"))
    parser.add_argument("--demo", action="store_true", help="register a demo model first")
    args = parser.parse_args(argv)
    browser = chromium()
    if browser is None:
        print("no Chromium on PATH: apt-get install chromium", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        uri, name = demo_store(Path(tmp)) if args.demo else (args.tracking_uri, args.name)
        result = check_page(uri, name, args.out, browser)
    print(json.dumps(result, indent=2))
    if result["missing"]:
        print(f"the page lacks: {sorted(result['missing'])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
