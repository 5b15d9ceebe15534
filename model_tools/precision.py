"""What serving in bfloat16 changes: the same requests through a float32 and a bfloat16 handler.

    python -m model_tools.precision                  # the repo's model, 24 native-size prompts
    python -m model_tools.precision --large 4        # and 4 at 512x512
    python -m model_tools.precision --compile default  # bfloat16 compiled, as SD_COMPILE=auto

Prints the mean absolute pixel difference (0-255 scale) between the two images of each
request, the largest one, and how often each precision draws the asked colour, shape and
background (model_tools.synthetic's measurements, as model_tools.evaluate judges them). The
full evaluation in bfloat16 is `SD_DTYPE=bfloat16 python -m model_tools.evaluate`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sd_endpoint.loader import REPO_ROOT
from sd_endpoint.settings import Settings

from .evaluate import GUIDED, STEPS, prompts
from .synthetic import measure


def handler_in(model_dir: Path, dtype: str, compile_mode: str = "off"):
    """A handler in ``dtype``; with a compile mode, compiled at the model's native size (on a
    CPU with frozen weights: the path SD_COMPILE=auto takes for a full-size model)."""
    sys.path.insert(0, str(REPO_ROOT))
    from handler import EndpointHandler

    warmup = "" if compile_mode == "off" else "native"
    settings = dataclasses.replace(
        Settings.from_env(), dtype=dtype, compile=compile_mode, warmup=warmup
    )
    return EndpointHandler(str(model_dir), settings)


def compare(model_dir: Path, native: int, large: int, compile_mode: str = "off") -> dict:
    handlers = {
        "float32": handler_in(model_dir, "float32"),
        "bfloat16": handler_in(model_dir, "bfloat16", compile_mode),
    }
    cases = [(p, None) for p in prompts(native)] + [(p, 512) for p in prompts(large, native)]
    differences, right = [], {dtype: 0 for dtype in handlers}
    for prompt, side in cases:
        request = {"inputs": prompt.text, "seed": prompt.seed, "guidance_scale": GUIDED}
        request["num_inference_steps"] = STEPS
        if side:
            request.update(width=side, height=side)
        images = {}
        for dtype, handler in handlers.items():
            image = handler.engine.generate(handler_request(handler, request)).images[0]
            images[dtype] = np.asarray(image.convert("RGB"), dtype=np.int16)
            m = measure(image)
            right[dtype] += (m.colour, m.shape, m.background) == (
                prompt.colour,
                prompt.shape,
                prompt.background,
            )
        differences.append(np.abs(images["float32"] - images["bfloat16"]).mean())
    return {
        "requests": len(cases),
        "mean_abs_pixel_difference": float(np.mean(differences)),
        "largest_mean_abs_pixel_difference": float(np.max(differences)),
        "all_right": {dtype: count / len(cases) for dtype, count in right.items()},
    }


def handler_request(handler, body: dict):
    from sd_endpoint.schema import parse_request

    engine = handler.engine
    return parse_request(body, engine.settings.limits, engine.native_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT)
    parser.add_argument("--native", type=int, default=24, help="prompts at the native size")
    parser.add_argument("--large", type=int, default=0, help="prompts at 512x512")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    parser.add_argument(
        "--compile",
        default="off",
        help="compile the bfloat16 handler in this torch.compile mode at the native size",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result = compare(args.model_dir, args.native, args.large, args.compile)
    compiled = "" if args.compile == "off" else f" (compiled, {args.compile}, at native size)"
    print(
        f"{result['requests']} requests, {STEPS} steps, float32 vs bfloat16{compiled}: mean "
        f"absolute pixel difference {result['mean_abs_pixel_difference']:.2f} / 255 (largest "
        f"{result['largest_mean_abs_pixel_difference']:.2f}); colour, shape and background "
        f"all right: float32 {result['all_right']['float32']:.0%}, "
        f"bfloat16 {result['all_right']['bfloat16']:.0%} "
        f"({time.perf_counter() - started:.0f} s)"
    )


if __name__ == "__main__":
    main()
