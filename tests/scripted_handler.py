"""A handler.py whose behaviour the server tests choose, for what the real model cannot show.

The tests copy this file as ``handler.py`` into a folder of their own and serve that folder
with ``python -m sd_endpoint.server``: it is loaded the real way and answers real HTTP.
Files in that folder steer it: ``hold`` keeps ``__init__`` waiting until the file is removed,
``fail`` makes it raise. The request's ``inputs`` picks what ``__call__`` does.
"""

from __future__ import annotations

import base64
import threading
import time
from pathlib import Path

# A 1x1 PNG: enough for a response of the real handler's shape.
PIXEL = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de"
        "0000000c4944415408d763f8cfc000000301010018dd8db00000000049454e44ae426082"
    )
).decode()


class EndpointHandler:
    def __init__(self, path: str):
        self.folder = Path(path)
        if (self.folder / "fail").exists():
            raise RuntimeError("the scripted handler was told to fail at start")
        deadline = time.monotonic() + 120
        while (self.folder / "hold").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._lock = threading.Lock()
        self._running = 0
        self.calls = 0

    def __call__(self, data: dict) -> dict:
        with self._lock:
            self._running += 1
            self.calls += 1
            running = self._running
        try:
            command = str(data.get("inputs", ""))
            if command == "bad":
                raise ValueError("`inputs` said bad: the scripted handler refuses it")
            if command == "crash":
                raise RuntimeError("the scripted handler crashed on purpose")
            if command.startswith("sleep "):
                (self.folder / f"started-{data.get('seed', 0)}").touch()
                time.sleep(float(command.split()[1]))
            with self._lock:
                running = max(running, self._running)
            return {
                "image": PIXEL,
                "seed": data.get("seed", 0),
                "parameters": {"concurrent_calls": running, "calls": self.calls},
                "warnings": [],
            }
        finally:
            with self._lock:
                self._running -= 1
