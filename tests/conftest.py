"""Shared fixtures: the shipped model, a tiny SDXL one and the trained SDXL toy, each loaded once
per test session as the runtime loads it; ``family_handler`` runs a test once with each of the
first two."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image
from servers import repo_server  # noqa: F401  (the local server, for its tests)

from sd_endpoint.loader import REPO_ROOT, load_handler


@pytest.fixture(scope="session")
def repo_root():
    return REPO_ROOT


@pytest.fixture(scope="session")
def handler():
    """The repo's own EndpointHandler, built from handler.py by file path."""
    return load_handler(REPO_ROOT)


@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory):
    """A tiny SDXL model (random weights, 128x128 native) with the repo's handler.py beside it,
    as a repository serving SDXL holds it."""
    from model_tools.tiny_sdxl import tiny_sdxl_folder  # imports diffusers: only when used

    folder = tiny_sdxl_folder(tmp_path_factory.mktemp("tiny-sdxl") / "model")
    (folder / "handler.py").symlink_to(REPO_ROOT / "handler.py")
    return folder


@pytest.fixture(scope="session")
def sdxl_handler(sdxl_folder):
    return load_handler(sdxl_folder)


@pytest.fixture(scope="session")
def sdxl_toy_handler():
    """The trained SDXL toy (tests/models/sdxl) behind the repo's handler.py."""
    from model_tools.evaluate import build_handler
    from model_tools.toys import TOYS

    return build_handler(TOYS["sdxl"].folder)


@pytest.fixture(params=["sd", "sdxl"])
def family_handler(request):
    """The shipped SD model's handler, then the tiny SDXL model's: the same test for each."""
    return request.getfixturevalue("handler" if request.param == "sd" else "sdxl_handler")


def decode_image(payload: str) -> Image.Image:
    """The PNG (or other image) inside a response's base64 ``image`` field."""
    image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
    image.load()
    return image
