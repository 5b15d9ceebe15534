"""Loading the model's pipeline once, and generating one image per call.

What differs between model families (the pipeline class, its text inputs, its native size) is
read from the folder's family (``families``); nothing here branches on it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers
from packaging.version import Version
from PIL import Image

from . import families, openvino_engine, samplers
from .acceleration import auto_cpu_dtype, warn_if_slow_bfloat16
from .adapters import Adapters
from .families import Family
from .schema import GenerationRequest, parse_request
from .settings import Settings
from .weights import check_loaded

log = logging.getLogger(__name__)

# The stock pipelines log the cut-off part of a long prompt as a warning, and prompts never
# go to the logs here. This endpoint encodes prompts itself (prompts.py) and cuts nothing, but
# the pipelines stay quiet should any path reach their own encoding.
for _family in families.FAMILIES:
    logging.getLogger(_family.pipeline_class.__module__).setLevel(logging.ERROR)

# Request-selectable samplers (declared in samplers.py), built from the model's own scheduler
# config (betas, offsets).
SCHEDULERS = {s.name: (getattr(diffusers, s.scheduler), s.options) for s in samplers.SAMPLERS}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
# Steps of each warm-up generation: a multistep sampler's first and later steps, and enough
# UNet calls for torch.compile (and CUDA graphs, which record on a later call) to settle.
WARMUP_STEPS = 3


class InsufficientMemoryError(ValueError):
    """The device ran out of memory for this request; smaller requests still work."""


@dataclass
class Generated:
    images: list[Image.Image]
    seeds: list[int]  # image i's
    warnings: list[str]
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage

    @property
    def seed(self) -> int:
        return self.seeds[0]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("SD_DEVICE asks for CUDA, but torch sees no CUDA device")
    return device


def resolve_dtype(name: str, device: torch.device, model_dir: Path | None = None) -> torch.dtype:
    if name == "auto":
        # Half precision halves memory and runs on tensor cores. CPUs lack fast fp16 kernels
        # (LayerNorm has none at all in older torch); bfloat16 pays only on CPUs that multiply
        # it in hardware, and only for a full-size model (acceleration.auto_cpu_dtype).
        if device.type == "cuda":
            return torch.float16
        return auto_cpu_dtype(model_dir) if device.type == "cpu" else torch.float32
    dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    if name not in dtypes:
        raise ValueError(f"SD_DTYPE={name!r} is not one of auto, {', '.join(dtypes)}")
    if dtypes[name] == torch.float16 and device.type == "cpu":
        raise ValueError("SD_DTYPE=float16 does not run on the CPU; use float32 or bfloat16")
    return dtypes[name]


def check_weights(path: Path, components: tuple[str, ...]) -> None:
    """Refuse a folder whose weighted ``components`` hold pickles rather than safetensors.

    Unpickling runs arbitrary code, so weights are read only from safetensors files.
    """
    for name in components:
        files = [p.name for p in (path / name).glob("*") if p.is_file()]
        if any(f.endswith(".safetensors") for f in files):
            continue
        pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
        detail = f"only pickle weights ({', '.join(sorted(pickles))})" if pickles else "no weights"
        raise RuntimeError(
            f"{path / name} holds {detail}; this endpoint loads safetensors only, since "
            "unpickling can run arbitrary code. Convert the weights to .safetensors first."
        )


def _dtype_argument(dtype: torch.dtype) -> dict:
    # diffusers 0.40 renamed `torch_dtype` to `dtype`; the base image's 0.33 knows only the old.
    if Version(diffusers.__version__).release >= (0, 40):
        return {"dtype": dtype}
    return {"torch_dtype": dtype}


class Engine:
    """One loaded pipeline; ``generate`` may be called from any number of threads.

    ``family`` is the folder's own (``families.detect``) unless given.
    """

    def __init__(self, path: str | Path, settings: Settings, family: Family | None = None):
        path = Path(path)
        self.family = family or families.detect(path)
        check_weights(path, self.family.weighted_components)
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device, path)
        warn_if_slow_bfloat16(self.dtype, self.device)
        self.settings = settings
        if settings.num_threads:
            torch.set_num_threads(settings.num_threads)
        # Progress bars are for notebooks; in a server they only fill the logs.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        started = time.perf_counter()
        pipe = self.family.pipeline_class.from_pretrained(
            path,
            use_safetensors=True,
            local_files_only=True,
            **self.family.load_options,
            **_dtype_argument(self.dtype),
        )
        check_loaded(pipe, path)  # transformers random-inits unmatched weights, warning only
        loaded = time.perf_counter()
        pipe.to(self.device)
        if settings.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        # A VAE that overflows float16 says so in its config (SDXL's does); the family says
        # whether its pipeline heeds that, as diffusers' own pipeline for it does.
        if (
            self.family.honours_force_upcast
            and pipe.vae.dtype == torch.float16
            and pipe.vae.config.force_upcast
        ):
            pipe.vae.float()  # its latents are cast at each decode
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.adapters = Adapters(pipe, path)  # the LoRAs of loras/, each request its own
        # Prompts of any length, AUTOMATIC1111's emphasis and clip skip, instead of the
        # pipeline's own encode_prompt (77 tokens at most).
        self.prompts = self.family.prompt_encoder(pipe)
        # Requests swap in their own scheduler; keep the folder's own to build "default" from.
        self.default_scheduler = (type(pipe.scheduler), pipe.scheduler.config)
        self.native_size = self.family.native_size(pipe)
        # One request at a time uses the modules: diffusers schedulers keep per-call state and
        # fast tokenizers refuse concurrent use ("Already borrowed"), and a single device gains
        # nothing from interleaving two generations. Each call also gets a fresh scheduler, so
        # no state crosses from one request to the next.
        self._lock = threading.Lock()
        moved = time.perf_counter()
        log.info(
            "model loaded from %s on %s (%s) in %.2f s, moved in %.2f s",
            path,
            self.device,
            str(self.dtype).removeprefix("torch."),
            loaded - started,
            moved - loaded,
        )
        self._eager_unet = pipe.unet
        # Compiled code is used only at the warm-up sizes, where it was compiled before the
        # endpoint took requests: any other size runs eagerly instead of stalling on a compile.
        self._compiled_sizes: set[tuple[int, int]] = set()
        # Or OpenVINO, where the folder carries an export: compiled at the warm-up sizes too.
        self.openvino = openvino_engine.load(
            path, settings.openvino, self.device, self.dtype, settings.num_threads
        )
        if self.openvino is not None:
            self._compiled_unet = self.openvino.unet(pipe.unet)
            vae = self.openvino.vae(pipe.vae)
            self._compiled_pixels = lambda _, latents, tiled: decode_latents(vae, latents, tiled)
        elif settings.compile != "off":
            self._compiled_unet = torch.compile(pipe.unet, mode=settings.compile, dynamic=False)
            self._compiled_pixels = torch.compile(
                decode_latents, mode=settings.compile, dynamic=False
            )
        with self.openvino.compiling() if self.openvino is not None else contextlib.nullcontext():
            self._warm_up(settings)
        self.startup_timings = {
            "loading": loaded - started,
            "moving": moved - loaded,
            "warmup": time.perf_counter() - moved,
        }

    def _warm_up(self, settings: Settings) -> None:
        for size in settings.warmup_sizes():
            width, height = (self.native_size[1], self.native_size[0]) if size == "native" else size
            started = time.perf_counter()
            steps = min(WARMUP_STEPS, settings.limits.max_steps)
            body = {
                "inputs": "warm-up",
                "width": width,
                "height": height,
                "seed": 0,
                "num_inference_steps": steps,
            }
            try:
                request = parse_request(body, settings.limits, self.native_size)
            except ValueError as exc:
                raise ValueError(f"SD_WARMUP size {width}x{height}: {exc}") from None
            if settings.compile != "off" or self.openvino is not None:
                self._compiled_sizes.add((height, width))
            self.generate(request)
            log.info("warmed up at %dx%d in %.2f s", width, height, time.perf_counter() - started)

    def new_scheduler(self, name: str):
        cls, config = self.default_scheduler
        if name == "default":
            return cls.from_config(config)
        cls, overrides = SCHEDULERS[name]
        return cls.from_config(config, **overrides)

    def generate(self, request: GenerationRequest) -> Generated:
        if request.seed is None:
            request = request.model_copy(update={"seed": secrets.randbelow(2**32)})
        try:
            with self._lock, torch.inference_mode(), self.adapters.active(request.lora_weights):
                return self._generate(request)
        except RuntimeError as exc:  # torch.OutOfMemoryError is one
            if not _is_out_of_memory(exc):
                raise
            log.warning("out of memory: %s", str(exc).splitlines()[0][:300])
        # Out here the failed call's frames, and the tensors they held, are gone (an error
        # chained to the one raised below would keep them), so the cache can be emptied.
        raise self._out_of_memory(request)

    def _generate(self, request: GenerationRequest) -> Generated:
        pipe = self.pipe
        pipe.scheduler = self.new_scheduler(request.scheduler)
        guided = request.guidance_scale > 1
        warnings = self._warnings(request, guided)
        # Noise is drawn on the CPU so a seed gives the same image on every device; one
        # generator per image (seed + i), so each image of a batch can be made again alone.
        seeds = request.seeds
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        latents = starting_noise(
            self._eager_unet.config, request, pipe.vae_scale_factor, generators
        )

        # Compiled code was traced at batch 1: a batch runs eagerly rather than recompiling.
        compiled = (request.height, request.width) in self._compiled_sizes and len(seeds) == 1
        compiled = compiled and not request.lora_weights  # LoRA layers are not in its graph
        unet = self._compiled_unet if compiled else self._eager_unet
        if pipe.unet is not unet:
            pipe.unet = unet
        to_pixels = self._compiled_pixels if compiled else decode_latents
        tiled = request.height * request.width > self.settings.vae_tile_above_pixels

        clock = _Clock(self.device)
        # Checks the prompts' length (PromptTooLongError) before any forward pass.
        conditioning = self.prompts.encode(
            request.prompt,
            request.negative_prompt,
            guided=guided,
            clip_skip=request.clip_skip,
            max_chunks=self.settings.limits.max_prompt_chunks,
        )
        clock.lap("text_encoding")
        latents = pipe(
            **conditioning.kwargs(),
            height=request.height,
            width=request.width,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            num_images_per_prompt=len(seeds),
            generator=generators,  # for samplers that add noise at every step
            latents=latents.to(self.device, self.dtype),
            output_type="latent",
        ).images
        clock.lap("denoising")
        pixels = self._decode(to_pixels, latents, tiled)
        clock.lap("decoding")
        images = [Image.fromarray(p) for p in pixels]
        return Generated(images, seeds, warnings, clock.timings())

    def _decode(self, to_pixels, latents: torch.Tensor, tiled: bool) -> np.ndarray:
        """The latents as uint8 pixels on the host.

        A float16 VAE that overflows (NaNs, which come out as a black image) decodes the
        latents again in float32 and stays in float32 from then on, as the web UI's automatic
        VAE precision does: a model whose config does not warn of it still never gives a
        black image. Checking costs a reduction over the decoded tensor, read with the pixels.
        """
        vae = self.pipe.vae
        pixels, finite = to_pixels(vae, latents, tiled)
        pixels = pixels.cpu().numpy()
        if finite.item() or vae.dtype != torch.float16 or not torch.isfinite(latents).all():
            return pixels  # (non-finite latents come from the UNet: no decode mends them)
        log.warning("the VAE overflowed float16; it decodes in float32 from now on")
        vae.float()
        return decode_latents(vae, latents, tiled)[0].cpu().numpy()

    def _warnings(self, request: GenerationRequest, guided: bool) -> list[str]:
        warnings = []
        if request.negative_prompt is not None and not guided:
            warnings.append("`negative_prompt` has no effect when guidance_scale is 1 or less")
        return warnings

    def _out_of_memory(self, request: GenerationRequest) -> InsufficientMemoryError:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return InsufficientMemoryError(
            f"the {self.device.type.upper()} ran out of memory generating "
            f"{request.num_images_per_prompt} {request.width}x{request.height} image(s) with "
            f"{request.num_inference_steps} steps; lower height and width (memory grows with "
            "their product) or num_images_per_prompt and try again"
        )


def _is_out_of_memory(exc: RuntimeError) -> bool:
    # CUDA and MPS say "out of memory"; the CPU allocator says "not enough memory".
    text = str(exc).lower()
    return isinstance(exc, torch.cuda.OutOfMemoryError) or any(
        words in text for words in ("out of memory", "not enough memory")
    )


def starting_noise(unet_config, request: GenerationRequest, vae_scale_factor: int, generators):
    """Each image's starting latents, drawn as diffusers draws them, but always in float32.

    torch 2.5 (the base image's) draws other numbers for a seed in bfloat16 or float16 than in
    float32, so the same seed would give another image in another dtype; newer torch draws the
    same numbers, and there this changes nothing.
    """
    shape = (
        1,
        unet_config.in_channels,
        request.height // vae_scale_factor,
        request.width // vae_scale_factor,
    )
    return torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])


def decode_latents(
    vae, latents: torch.Tensor, tiled: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The images as batch × height × width × 3 uint8, still on the device, and whether the
    VAE gave only finite values (a bool tensor, also on the device). The latents are decoded
    in the VAE's dtype, which may be wider than theirs."""
    decode = vae.tiled_decode if tiled else vae.decode
    decoded = decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    # The same arithmetic as diffusers' VaeImageProcessor, done on the device so that only
    # uint8 pixels cross to the host.
    pixels = ((decoded / 2 + 0.5).clamp(0, 1).float() * 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1), torch.isfinite(decoded).all()


def latents_to_pixels(vae, latents: torch.Tensor, tiled: bool = False) -> torch.Tensor:
    """``decode_latents``' images alone."""
    return decode_latents(vae, latents, tiled)[0]


class _Clock:
    """Stage timer. On CUDA it records events rather than waiting for the GPU at each stage,
    so timing adds no host-device synchronisation: the times are read once the image is on
    the host, which waited for the GPU anyway."""

    def __init__(self, device: torch.device):
        self._device = device
        self._cuda = device.type == "cuda"
        self._marks = [("start", self._now())]

    def _now(self):
        if not self._cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self._device))
        return event

    def lap(self, stage: str) -> None:
        self._marks.append((stage, self._now()))

    def timings(self) -> dict[str, float]:
        """Seconds per stage, in the order they ran."""
        if self._cuda:
            self._marks[-1][1].synchronize()
        return {
            stage: (begin.elapsed_time(end) / 1000 if self._cuda else end - begin)
            for (_, begin), (stage, end) in pairwise(self._marks)
        }
