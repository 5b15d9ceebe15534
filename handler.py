"""Hugging Face Inference Endpoints entry point: Stable Diffusion text-to-image.

The runtime imports this file from the repository folder and builds
``EndpointHandler("/repository")`` once; each request's JSON body then arrives as a dict at
``__call__``. A ``ValueError`` raised here becomes HTTP 400 ``{"error": message}``.
The parts behind it live in ``sd_endpoint/``.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

# The hosted runtime puts this folder first on sys.path. Hugging Face's hf-endpoints-emulator
# adds it as a Path object, which imports skip, so `sd_endpoint` would not be found there.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from sd_endpoint.engine import Engine  # noqa: E402
from sd_endpoint.imaging import encode, to_base64  # noqa: E402
from sd_endpoint.schema import parse_request  # noqa: E402
from sd_endpoint.settings import Settings  # noqa: E402

log = logging.getLogger("sd_endpoint.handler")


class EndpointHandler:
    def __init__(self, path: str = "", settings: Settings | None = None):
        self.settings = settings or Settings.from_env()
        self.engine = Engine(path or Path(__file__).parent, self.settings)

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        request = parse_request(data, self.settings.limits, self.engine.native_size)
        validated = time.perf_counter()

        result = self.engine.generate(request)

        encoded_at = time.perf_counter()
        image = encode(result.image, request.output_format, self.settings.png_compress_level)
        encoded = time.perf_counter()
        payload = to_base64(image)
        done = time.perf_counter()

        timings = {
            "validation": validated - started,
            **result.timings,
            "image_encoding": encoded - encoded_at,
            "base64": done - encoded,
            "total": done - started,
        }
        log.info(
            "generated %dx%d steps=%d guidance=%g scheduler=%s seed=%d %s=%d bytes | %s%s",
            request.width,
            request.height,
            request.num_inference_steps,
            request.guidance_scale,
            request.scheduler,
            result.seed,
            request.output_format,
            len(image),
            " ".join(f"{stage}={seconds * 1000:.1f}ms" for stage, seconds in timings.items()),
            f" | prompt={request.prompt!r}" if self.settings.log_prompts else "",
        )
        self.last_timings = timings
        return {
            "image": payload,
            "seed": result.seed,
            "parameters": {
                "height": request.height,
                "width": request.width,
                "num_inference_steps": request.num_inference_steps,
                "guidance_scale": request.guidance_scale,
                "seed": result.seed,
                "scheduler": request.scheduler,
                "output_format": request.output_format,
            },
            "warnings": result.warnings,
        }
