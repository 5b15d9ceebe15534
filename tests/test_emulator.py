"""The repo served by Hugging Face's own `hf-endpoints-emulator`, in its own environment.

The emulator needs starlette<0.38, which the local server's FastAPI cannot share, so it lives
in `.venv-emulator` (made by `scripts/test.sh` from `requirements-emulator.txt`). Its
`emulate()` binds every interface; the test runs the same app on loopback only. It starts
from a folder outside the repo, so `sd_endpoint` is found only the way the runtime finds it.
"""

from __future__ import annotations

import base64
import io

import pytest
import requests
from PIL import Image
from servers import LocalServer

from sd_endpoint.loader import REPO_ROOT

EMULATOR_PYTHON = REPO_ROOT / ".venv-emulator" / "bin" / "python"

# What `hf_endpoints_emulator.emulator.emulate(handler, port)` does, bound to 127.0.0.1.
EMULATE = """
import os, sys, uvicorn
os.environ["HANDLER_PATH"] = sys.argv[1]
from hf_endpoints_emulator.emulator import app
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="info")
"""

pytestmark = pytest.mark.skipif(
    not EMULATOR_PYTHON.exists(),
    reason="no .venv-emulator: make it with "
    "`scripts/setup_env.sh .venv-emulator '' requirements-emulator.txt` (scripts/test.sh does)",
)


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    folder = tmp_path_factory.mktemp("emulator")
    server = LocalServer(
        None,
        folder / "emulator.log",
        command=lambda port: [
            str(EMULATOR_PYTHON),
            "-c",
            EMULATE,
            str(REPO_ROOT / "handler.py"),
            str(port),
        ],  # fmt: skip
        cwd=folder,
    )
    try:
        server.wait_ready()  # the emulator loads the handler before it opens its socket
        yield server
    finally:
        server.stop()


def test_the_emulator_serves_the_seeds_python_example(emulator):
    # The seed README's example body (flat form, `inference_steps`), at 64x64 and 2 steps.
    payload = {
        "inputs": "a red circle on a white background",
        "negative_prompt": "blurry",
        "height": 64,
        "width": 64,
        "guidance_scale": 7.5,
        "inference_steps": 2,
    }
    response = requests.post(
        emulator.url, headers={"Content-Type": "application/json"}, json=payload, timeout=300
    )
    assert response.status_code == 200, response.text
    body = response.json()
    image = Image.open(io.BytesIO(base64.b64decode(body["image"])))
    assert (image.format, image.size) == ("PNG", (64, 64))
    assert isinstance(body["seed"], int)


def test_the_emulator_turns_a_bad_request_into_400_naming_the_field(emulator):
    response = requests.post(
        emulator.url + "/predict", json={"inputs": "x", "height": 65}, timeout=60
    )
    assert response.status_code == 400
    assert "`height`" in response.json()["error"]
