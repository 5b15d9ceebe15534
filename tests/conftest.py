"""Shared fixtures: the shipped model, loaded once per test session as the runtime loads it."""

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


def decode_image(payload: str) -> Image.Image:
    """The PNG (or other image) inside a response's base64 ``image`` field."""
    image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
    image.load()
    return image
