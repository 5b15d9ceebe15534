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

from sd_endpoint import families, safety, samplers  # noqa: E402
from sd_endpoint.engine import Engine  # noqa: E402
from sd_endpoint.imaging import a1111_parameters, encode, to_base64  # noqa: E402
from sd_endpoint.schema import parse_request  # noqa: E402
from sd_endpoint.settings import Settings  # noqa: E402

log = logging.getLogger("sd_endpoint.handler")


class EndpointHandler:
    def __init__(self, path: str = "", settings: Settings | None = None):
        path = path or Path(__file__).parent
        # Which model family the folder holds (SD 1.x/2.x...) is read from it, never configured.
        family = families.detect(path)
        self.settings = settings or Settings.from_env(limit_defaults=family.limits)
        self.engine = Engine(path, self.settings, family)
        self.safety = safety.load(
            path, self.settings.safety_checker, self.engine.device, self.engine.dtype
        )

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        request = parse_request(
            data, self.settings.limits, self.engine.native_size, self.engine.adapters.names
        )
        validated = time.perf_counter()

        result = self.engine.generate(request)

        screened_at = time.perf_counter()
        screened = self.safety.screen(result.images)
        screened_done = time.perf_counter()
        sampler = samplers.a1111_name(request.scheduler, self.engine.default_scheduler)
        images = [
            encode(
                image,
                request.output_format,
                self.settings.png_compress_level,
                a1111_parameters(request, seed, sampler, self.engine.adapters.hashes)
                if request.metadata
                else None,
            )
            for image, seed in zip(screened.images, result.seeds, strict=True)
        ]
        encoded = time.perf_counter()
        payloads = [to_base64(image) for image in images]
        done = time.perf_counter()

        timings = {
            "validation": validated - started,
            **result.timings,
            **({"safety_check": screened_done - screened_at} if screened.flags else {}),
            "image_encoding": encoded - screened_done,
            "base64": done - encoded,
            "total": done - started,
        }
        log.info(
            "generated %dx%d images=%d steps=%d guidance=%g scheduler=%s seed=%d %s=%d bytes"
            " | %s%s",
            request.width,
            request.height,
            len(images),
            request.num_inference_steps,
            request.guidance_scale,
            request.scheduler,
            result.seed,
            request.output_format,
            sum(map(len, images)),
            " ".join(f"{stage}={seconds * 1000:.1f}ms" for stage, seconds in timings.items()),
            f" | prompt={request.prompt!r}" if self.settings.log_prompts else "",
        )
        self.last_timings = timings
        return {
            "image": payloads[0],
            "images": payloads,
            "seed": result.seed,
            "seeds": result.seeds,
            "parameters": request.used(result.seed),
            "warnings": result.warnings + screened.warnings,
            "nsfw_content_detected": screened.flags,
        }
