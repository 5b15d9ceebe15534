"""Real servers on loopback for the tests: `python -m sd_endpoint.server` in a subprocess.

``repo_server`` (this repo's handler, with a bearer token) is shared by the whole session;
``scripted_dir`` makes a model folder whose handler.py is ``tests/scripted_handler.py``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from sd_endpoint.loader import REPO_ROOT

TOKEN = "test-token-7f3a9c"  # never a real credential; the tests check it stays out of logs
STARTUP_TIMEOUT = 300  # seconds: importing torch and loading on a busy 2-core machine


def clean_environ() -> dict[str, str]:
    """This process's environment without the variables the server and client read."""
    ignored = ("SD_API_TOKEN", "HF_TOKEN", "SD_MODEL_DIR", "SD_ENDPOINT_URL")
    return {k: v for k, v in os.environ.items() if k not in ignored}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """One server process on a free loopback port, with its log in a file.

    By default `python -m sd_endpoint.server` for ``model_dir``; ``command(port)`` runs
    another server instead, from the folder ``cwd``.
    """

    def __init__(
        self,
        model_dir: Path | None,
        log_path: Path,
        *args: str,
        token: str | None = None,
        command: Callable[[int], list[str]] | None = None,
        cwd: Path = REPO_ROOT,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = token
        self.log_path = log_path
        env = clean_environ()
        if token is not None:
            env["SD_API_TOKEN"] = token
        if command is None:
            argv = [sys.executable, "-m", "sd_endpoint.server", "--model-dir", str(model_dir),
                    "--port", str(self.port), *args]  # fmt: skip
        else:
            argv = command(self.port)
        self._log = open(log_path, "wb")  # noqa: SIM115  closed by stop()
        self.process = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = 30) -> str:
        """The log once ``pattern`` (a regex) shows in it: log lines follow the responses."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.log()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.log()

    def wait_listening(self, timeout: float = STARTUP_TIMEOUT) -> None:
        self._wait(lambda r: True, timeout)

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> None:
        self._wait(lambda r: r.status_code == 200, timeout)

    def _wait(self, done, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if done(requests.get(self.url + "/health", timeout=5)):
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def scripted_folder(folder: Path, *steering_files: str) -> Path:
    """A model folder whose handler.py is the scripted test handler."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(__file__).with_name("scripted_handler.py"), folder / "handler.py")
    for name in steering_files:
        (folder / name).touch()
    return folder


@pytest.fixture(scope="session")
def repo_server(tmp_path_factory):
    """This repo served as the endpoint would be, requiring ``TOKEN``."""
    server = LocalServer(
        REPO_ROOT, tmp_path_factory.mktemp("repo-server") / "server.log", token=TOKEN
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
