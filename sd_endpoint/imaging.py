"""Image bytes for the response: the encoder settings were chosen by `scripts/benchmark.py`."""

from __future__ import annotations

import base64
import io

from PIL import Image

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
LOSSY_QUALITY = 90


def encode(image: Image.Image, fmt: str = "png", png_compress_level: int = 1) -> bytes:
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG", compress_level=png_compress_level)
    elif fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=LOSSY_QUALITY)
    elif fmt == "webp":
        image.save(buffer, format="WEBP", quality=LOSSY_QUALITY, method=4)
    else:
        raise ValueError(f"unknown image format {fmt!r}; use one of {', '.join(MEDIA_TYPES)}")
    return buffer.getvalue()


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
