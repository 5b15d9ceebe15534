"""Prompts stay out of the hosted runtime's logs, checked with the runtime's own web service.

Inference Endpoints serves handler.py with huggingface-inference-toolkit's starlette app, which
logs the message of every exception the handler raises. This test runs that app the way the
container does (`uvicorn huggingface_inference_toolkit.webservice_starlette:app` with
HF_MODEL_DIR set to this repository), sends bad requests of every kind whose prompt and
negative prompt hold a marker, and checks that no part of the marker reaches its log.

The toolkit is not on the package index. To run this test, get its source (GitHub:
huggingface/huggingface-inference-toolkit) and point SD_TOOLKIT_SRC at its `src` folder; the
environment is the base image's libraries plus what the toolkit imports:
    scripts/setup_env.sh .venv-toolkit constraints/base-image.txt requirements-toolkit.txt
(or SD_TOOLKIT_PYTHON names another Python that has them). Without either it skips.

One leak is the toolkit's own, before the handler runs: a body with no `inputs` key is logged
whole ("Body needs to provide a inputs key, received: ..."). Clients that always send
`inputs` (this repo's client, the page, every documented example) never hit it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import requests
from servers import LocalServer

from sd_endpoint.loader import REPO_ROOT
from sd_endpoint.settings import Limits

TOOLKIT_SRC = Path(os.environ.get("SD_TOOLKIT_SRC", "/nonexistent"))
TOOLKIT_PYTHON = Path(
    os.environ.get("SD_TOOLKIT_PYTHON", REPO_ROOT / ".venv-toolkit" / "bin" / "python")
)
MARKER = "qxzjQXZJzqjx"
PART = 4  # no run of this many marker characters may be in the log
LONG = MARKER * (Limits().max_prompt_chars // len(MARKER) + 1)  # over the length limit


def _missing() -> str | None:
    if not (TOOLKIT_SRC / "huggingface_inference_toolkit" / "webservice_starlette.py").is_file():
        return (
            "set SD_TOOLKIT_SRC to the `src` folder of huggingface/huggingface-inference-toolkit "
            "(its source is not on the package index)"
        )
    if not TOOLKIT_PYTHON.exists():
        return (
            f"no {TOOLKIT_PYTHON}: make it with `scripts/setup_env.sh .venv-toolkit "
            "constraints/base-image.txt requirements-toolkit.txt`, or set SD_TOOLKIT_PYTHON"
        )
    probe = "import starlette, orjson, uvicorn, diffusers; print(starlette.__version__)"
    done = subprocess.run([str(TOOLKIT_PYTHON), "-c", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return f"{TOOLKIT_PYTHON} lacks what the toolkit imports: {done.stderr[-300:]}"
    if tuple(int(x) for x in done.stdout.split(".")[:2]) >= (0, 38):
        return f"{TOOLKIT_PYTHON} has starlette {done.stdout.strip()}; the toolkit needs < 0.38"
    return None


needs_toolkit = pytest.mark.skipif(bool(_missing()), reason=_missing() or "")

# Every kind of bad request, each with the prompt (and, where it fits, the negative prompt)
# holding the marker. All carry `inputs`, so that the toolkit hands them to the handler.
BAD_BODIES = {
    "prompt too long": {"inputs": LONG},
    "negative prompt too long": {"inputs": MARKER, "negative_prompt": LONG},
    "negative prompt too long, in parameters": {
        "inputs": MARKER,
        "parameters": {"negative_prompt": LONG},
    },
    "prompt not text": {"inputs": [MARKER, MARKER]},
    "prompt an object": {"inputs": {MARKER: MARKER}},
    "negative prompt not text": {"inputs": MARKER, "negative_prompt": {"text": MARKER}},
    "prompt only white space": {"inputs": " \n ", "negative_prompt": MARKER},
    "prompt in parameters": {"inputs": MARKER, "parameters": {"inputs": MARKER}},
    "parameters not an object": {"inputs": MARKER, "parameters": MARKER},
    "a field given twice": {"inputs": MARKER, "seed": 1, "parameters": {"seed": 1}},
    "unknown field": {"inputs": MARKER, "prompt": MARKER, "negative_prompt": MARKER},
    "bad height": {"inputs": MARKER, "negative_prompt": MARKER, "height": 65},
    "bad scheduler": {"inputs": MARKER, "scheduler": "k_lms"},
    "bad seed": {"inputs": MARKER, "seed": -1},
    "bad guidance": {"inputs": MARKER, "guidance_scale": "high"},
    "too many images": {"inputs": MARKER, "num_images_per_prompt": 99},
    "bad metadata": {"inputs": MARKER, "metadata": "no"},
    "over the pixel limit": {"inputs": MARKER, "height": 1024, "width": 1032},
    "over the work limit": {
        "inputs": MARKER,
        "height": 1024,
        "width": 1024,
        "num_inference_steps": 100,
    },
    "every field wrong": {
        "inputs": LONG,
        "negative_prompt": LONG,
        "height": "tall",
        "width": -8,
        "seed": 1.5,
        "output_format": "gif",
    },
}


@pytest.fixture(scope="module")
def toolkit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toolkit")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_MODEL_DIR", str(REPO_ROOT))
        env.setenv("PYTHONPATH", str(TOOLKIT_SRC))
        env.setenv("SD_WARMUP", "")
        server = LocalServer(
            None,
            folder / "toolkit.log",
            command=lambda port: [
                str(TOOLKIT_PYTHON),
                "-m",
                "uvicorn",
                "huggingface_inference_toolkit.webservice_starlette:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],  # fmt: skip
            cwd=folder,
        )
    try:
        server.wait_ready()  # the app loads the handler on start-up, before it answers
        yield server
    finally:
        server.stop()


def marker_parts_in(text: str) -> list[str]:
    return sorted({MARKER[i : i + PART] for i in range(len(MARKER) - PART + 1)} & _runs(text))


def _runs(text: str) -> set[str]:
    return {text[i : i + PART] for i in range(len(text) - PART + 1)}


@needs_toolkit
def test_no_prompt_reaches_the_toolkits_log_after_bad_requests_of_every_kind(toolkit):
    for kind, body in BAD_BODIES.items():
        response = requests.post(toolkit.url, json=body, timeout=120)
        assert response.status_code == 400, f"{kind}: {response.status_code} {response.text}"
        assert marker_parts_in(response.json()["error"]) == [], kind
    # A good request with a marked prompt, to show the handler's own log lines too.
    good = {"inputs": MARKER, "negative_prompt": MARKER, "height": 64, "width": 64}
    response = requests.post(toolkit.url, json={**good, "num_inference_steps": 1}, timeout=300)
    assert response.status_code == 200, response.text
    log = toolkit.wait_for_log(r"POST / \| Duration")
    # The errors were logged (the toolkit logs each), just without the prompts.
    assert log.count(" - ERROR - ") >= len(BAD_BODIES), log[-3000:]
    assert "`inputs`" in log and "`negative_prompt`" in log
    assert marker_parts_in(log) == [], log[-3000:]


def test_the_check_would_see_a_prompt_in_the_log():
    assert marker_parts_in(f"ERROR - `inputs` (got {MARKER[:6]}...)") == ["qxzj", "xzjQ", "zjQX"]
