"""What serving in bfloat16 changes: the same requests through a float32 and a bfloat16 handler.

    python -m model_tools.precision                  # the repo's model, 24 native-size prompts
    python -m model_tools.precision --large 4        # and 4 at 512x512
    python -m model_tools.precision --openvino --model-dir DIR  # bfloat16 on DIR's OpenVINO export

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


def handler_in(model_dir: Path, dtype: str, openvino: bool = False):
    """A handler in ``dtype`` on PyTorch alone, or with the folder's OpenVINO export compiled at
    the native size (model_tools.openvino_export; the path a folder prepared for CPU takes)."""
    sys.path.insert(0, str(REPO_ROOT))
    from handler import EndpointHandler

    settings = dataclasses.replace(
        Settings.from_env(),
        dtype=dtype,
        warmup="native" if openvino else "",
        openvino="auto" if openvino else "off",
    )
    handler = EndpointHandler(str(model_dir), settings)
    if openvino and handler.engine.openvino is None:
        raise SystemExit(f"{model_dir} is not served with OpenVINO here (see the log above)")
    return handler


def compare(
    model_dir: Path, native: int, large: int, openvino: bool = False, dtype: str = "bfloat16"
) -> dict:
    """The same requests from float32 PyTorch (``reference``) and ``dtype`` (``served``),
    on the folder's OpenVINO export where ``openvino``."""
    handlers = {
        "reference": handler_in(model_dir, "float32"),
        "served": handler_in(model_dir, dtype, openvino),
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
        differences.append(np.abs(images["reference"] - images["served"]).mean())
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
        "--openvino",
        action="store_true",
        help="serve the compared side with the folder's OpenVINO export (float32 stays PyTorch)",
    )
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="precision of the compared side (float32 with --openvino: OpenVINO's float32)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result = compare(args.model_dir, args.native, args.large, args.openvino, args.dtype)
    served = f"{args.dtype} on OpenVINO" if args.openvino else args.dtype
    print(
        f"{result['requests']} requests, {STEPS} steps, float32 vs {served}: mean absolute "
        f"pixel difference {result['mean_abs_pixel_difference']:.2f} / 255 (largest "
        f"{result['largest_mean_abs_pixel_difference']:.2f}); colour, shape and background "
        f"all right: float32 {result['all_right']['reference']:.0%}, "
        f"{served} {result['all_right']['served']:.0%} "
        f"({time.perf_counter() - started:.0f} s)"
    )


if __name__ == "__main__":
    main()
