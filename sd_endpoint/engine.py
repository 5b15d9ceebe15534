"""Loading the Stable Diffusion pipeline once, and generating one image per call."""

from __future__ import annotations

import gc
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)
from packaging.version import Version
from PIL import Image

from .schema import GenerationRequest
from .settings import Settings

log = logging.getLogger(__name__)

# The stock pipeline logs the cut-off part of a long prompt as a warning; prompts never go to
# the logs here, and the response reports the truncation instead.
logging.getLogger(StableDiffusionPipeline.__module__).setLevel(logging.ERROR)

# Request-selectable samplers, built from the model's own scheduler config (betas, offsets).
SCHEDULERS = {
    "dpm++2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                              "use_karras_sigmas": False}),
    "dpm++2m-karras": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++",
                                                     "solver_order": 2, "use_karras_sigmas": True}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder")


class InsufficientMemoryError(ValueError):
    """The device ran out of memory for this request; smaller requests still work."""


@dataclass
class Generated:
    image: Image.Image
    seed: int
    warnings: list[str]
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("SD_DEVICE asks for CUDA, but torch sees no CUDA device")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # Half precision halves memory and runs on tensor cores; CPUs lack fast fp16 kernels
        # (LayerNorm has none at all in older torch), so they stay in float32.
        return torch.float16 if device.type == "cuda" else torch.float32
    dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    if name not in dtypes:
        raise ValueError(f"SD_DTYPE={name!r} is not one of auto, {', '.join(dtypes)}")
    if dtypes[name] == torch.float16 and device.type == "cpu":
        raise ValueError("SD_DTYPE=float16 does not run on the CPU; use float32 or bfloat16")
    return dtypes[name]


def check_weights(path: Path) -> None:
    """Refuse a folder that is not a diffusers model, or whose weights are pickles.

    Unpickling runs arbitrary code, so weights are read only from safetensors files.
    """
    if not (path / "model_index.json").is_file():
        raise RuntimeError(
            f"{path} holds no model_index.json: it must be a diffusers model folder "
            "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
        )
    for name in WEIGHTED_COMPONENTS:
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
    """One loaded pipeline; ``generate`` may be called from any number of threads."""

    def __init__(self, path: str | Path, settings: Settings):
        path = Path(path)
        check_weights(path)
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        # Progress bars are for notebooks; in a server they only fill the logs.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        started = time.perf_counter()
        pipe = StableDiffusionPipeline.from_pretrained(
            path,
            use_safetensors=True,
            local_files_only=True,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **_dtype_argument(self.dtype),
        )
        loaded = time.perf_counter()
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.scheduler_config = pipe.scheduler.config
        self.native_size = (
            pipe.unet.config.sample_size * pipe.vae_scale_factor,
            pipe.unet.config.sample_size * pipe.vae_scale_factor,
        )
        # One request at a time uses the modules: diffusers schedulers keep per-call state and
        # fast tokenizers refuse concurrent use ("Already borrowed"), and a single device gains
        # nothing from interleaving two generations. Each call also gets a fresh scheduler, so
        # no state crosses from one request to the next.
        self._lock = threading.Lock()
        log.info(
            "model loaded from %s on %s (%s) in %.2f s, moved in %.2f s",
            path, self.device, str(self.dtype).removeprefix("torch."),
            loaded - started, time.perf_counter() - loaded,
        )

    def new_scheduler(self, name: str):
        if name == "default":
            return type(self.pipe.scheduler).from_config(self.scheduler_config)
        cls, overrides = SCHEDULERS[name]
        return cls.from_config(self.scheduler_config, **overrides)

    def generate(self, request: GenerationRequest) -> Generated:
        seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
        try:
            with self._lock, torch.inference_mode():
                return self._generate(request, seed)
        except torch.cuda.OutOfMemoryError as exc:
            raise self._out_of_memory(request) from exc
        except RuntimeError as exc:
            if "out of memory" not in str(exc).lower():
                raise
            raise self._out_of_memory(request) from exc

    def _generate(self, request: GenerationRequest, seed: int) -> Generated:
        pipe, timings = self.pipe, {}
        pipe.scheduler = self.new_scheduler(request.scheduler)
        guided = request.guidance_scale > 1
        warnings = self._warnings(request, guided)
        # Noise is drawn on the CPU so a seed gives the same image on every device.
        generator = torch.Generator("cpu").manual_seed(seed)

        clock = _Clock(self.device)
        prompt_embeds, negative_embeds = pipe.encode_prompt(
            request.prompt, self.device, 1, guided, request.negative_prompt
        )
        timings["text_encoding"] = clock.lap()
        latents = pipe(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds,
            height=request.height,
            width=request.width,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            generator=generator,
            output_type="latent",
        ).images
        timings["denoising"] = clock.lap()
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        # The same arithmetic as diffusers' VaeImageProcessor, done on the device so that
        # only uint8 pixels cross to the host.
        pixels = ((decoded / 2 + 0.5).clamp(0, 1).float() * 255).round().to(torch.uint8)
        pixels = pixels[0].permute(1, 2, 0).cpu().numpy()
        timings["decoding"] = clock.lap()
        return Generated(Image.fromarray(pixels), seed, warnings, timings)

    def _warnings(self, request: GenerationRequest, guided: bool) -> list[str]:
        warnings = []
        tokenizer = self.pipe.tokenizer
        limit = tokenizer.model_max_length
        for name, text in (("inputs", request.prompt), ("negative_prompt", request.negative_prompt)):
            # Cut at one token past the limit: enough to tell, and no over-length warning.
            ids = None if text is None else tokenizer(text, truncation=True, max_length=limit + 1)
            if ids is not None and len(ids.input_ids) > limit:
                warnings.append(
                    f"`{name}` is longer than the text encoder's {limit} tokens; "
                    "only its beginning was used"
                )
        if request.negative_prompt is not None and not guided:
            warnings.append("`negative_prompt` has no effect when guidance_scale is 1 or less")
        return warnings

    def _out_of_memory(self, request: GenerationRequest) -> InsufficientMemoryError:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return InsufficientMemoryError(
            f"the {self.device.type.upper()} ran out of memory generating a "
            f"{request.width}x{request.height} image with {request.num_inference_steps} steps; "
            "lower height and width (memory grows with their product) and try again"
        )


class _Clock:
    """Stage timer; waits for queued GPU work so each stage is charged its own time."""

    def __init__(self, device: torch.device):
        self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self._last = time.perf_counter()

    def lap(self) -> float:
        self._sync()
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        return elapsed
