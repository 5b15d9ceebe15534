"""The model's own safety checker, when its folder ships one (SD 1.5's does).

The stock pipeline blacks out a flagged image and says nothing, so users get black squares and
no reason. Here the response always says which images were flagged (``nsfw_content_detected``
and a warning), and ``SD_SAFETY_CHECKER`` picks what happens to them: ``block`` (the default)
returns a black image as the stock pipeline does, ``flag`` returns the image as made, ``off``
never loads the checker. Like every other component, it is read from safetensors only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .weights import check_component

log = logging.getLogger(__name__)

FOLDER = "safety_checker"
PROCESSOR_FOLDER = "feature_extractor"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


@dataclass
class Screened:
    images: list[Image.Image]
    flags: list[bool] | None  # per image; None when no checker ran
    warnings: list[str]


class Unchecked:
    """Stands in when the folder ships no checker, or SD_SAFETY_CHECKER=off."""

    mode = "off"

    def screen(self, images: list[Image.Image]) -> Screened:
        return Screened(images, None, [])


class SafetyChecker:
    def __init__(self, path: Path, mode: str, device: torch.device, dtype: torch.dtype):
        # Imported here: an endpoint without a checker never pays for these imports.
        from diffusers.pipelines.stable_diffusion.safety_checker import (
            StableDiffusionSafetyChecker,
        )
        from transformers import CLIPImageProcessor

        self.mode = mode
        self.device, self.dtype = device, dtype
        checker = StableDiffusionSafetyChecker.from_pretrained(
            path / FOLDER, use_safetensors=True, local_files_only=True
        )
        check_component(FOLDER, checker, path / FOLDER)  # as the engine checks its components
        self.checker = checker.to(device=device, dtype=dtype)
        self.checker.eval()
        self.processor = CLIPImageProcessor.from_pretrained(path / PROCESSOR_FOLDER)
        # Its own warning names no image; the response does.
        logging.getLogger(StableDiffusionSafetyChecker.__module__).setLevel(logging.ERROR)

    def flags(self, images: list[Image.Image]) -> list[bool]:
        pixels = self.processor(images, return_tensors="pt").pixel_values
        with torch.inference_mode():
            # It blacks out flagged entries of `images` itself; a throwaway list takes that.
            _, flagged = self.checker(
                images=[np.zeros(1) for _ in images],
                clip_input=pixels.to(device=self.device, dtype=self.dtype),
            )
        return [bool(f) for f in flagged]

    def screen(self, images: list[Image.Image]) -> Screened:
        flags = self.flags(images)
        warnings = []
        for i, flagged in enumerate(flags):
            if not flagged:
                continue
            if self.mode == "block":
                images = [*images[:i], Image.new("RGB", images[i].size), *images[i + 1 :]]
                what = "replaced by a black image (SD_SAFETY_CHECKER=block)"
            else:
                what = "returned as made (SD_SAFETY_CHECKER=flag)"
            warnings.append(f"image {i + 1} was flagged by the model's safety checker and {what}")
        return Screened(images, flags, warnings)


def load(
    path: str | Path, mode: str, device: torch.device, dtype: torch.dtype
) -> SafetyChecker | Unchecked:
    """The folder's checker in ``mode`` (block, flag or off); ``Unchecked`` when it ships
    none or ``mode`` is off."""
    path = Path(path)
    if mode == "off" or not (path / FOLDER).is_dir():
        return Unchecked()
    check_safetensors(path)
    checker = SafetyChecker(path, mode, device, dtype)
    log.info("safety checker loaded (SD_SAFETY_CHECKER=%s)", mode)
    return checker


def check_safetensors(path: Path) -> None:
    files = [p.name for p in (path / FOLDER).glob("*") if p.is_file()]
    if any(f.endswith(".safetensors") for f in files):
        if not (path / PROCESSOR_FOLDER).is_dir():
            raise RuntimeError(
                f"{path / FOLDER} needs {path / PROCESSOR_FOLDER} (its CLIPImageProcessor "
                "config) beside it; add it, or set SD_SAFETY_CHECKER=off"
            )
        return
    pickles = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
    detail = f"only pickle weights ({', '.join(pickles)})" if pickles else "no weights"
    raise RuntimeError(
        f"{path / FOLDER} holds {detail}; this endpoint loads safetensors only, since "
        "unpickling can run arbitrary code. Convert them to .safetensors, or set "
        "SD_SAFETY_CHECKER=off to run without the checker."
    )
