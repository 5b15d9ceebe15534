"""Every setting of the endpoint, read once from environment variables.

Each field's name is its variable's name without the ``SD_`` prefix, upper-cased. A bad value
stops start-up with a message naming the variable, rather than surfacing on some request later.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. Defaults suit a 24 GB GPU serving SD 1.5."""

    min_side: int = field(default=64, metadata={"help": "Smallest height or width, in pixels."})
    max_side: int = field(default=1024, metadata={"help": "Largest height or width, in pixels."})
    max_pixels: int = field(
        default=1024 * 1024, metadata={"help": "Largest height × width of one image."}
    )
    max_steps: int = field(default=100, metadata={"help": "Most denoising steps per request."})
    max_work: int = field(
        default=1024 * 1024 * 50,
        metadata={
            "help": "Most height × width × steps × images per request (the total work asked for)."
        },
    )
    max_guidance: float = field(default=30.0, metadata={"help": "Largest guidance_scale."})
    max_prompt_chars: int = field(
        default=4000,
        metadata={
            "help": "Longest prompt or negative prompt, in characters: a bound checked before "
            "tokenizing. English prompts run about 4.4 characters per CLIP token, so the "
            "default leaves SD_MAX_PROMPT_CHUNKS the limit that counts."
        },
    )
    max_prompt_chunks: int = field(
        default=8,
        metadata={
            "help": "Most 75-token chunks a prompt or negative prompt may take (8: 600 tokens). "
            "Each chunk is one more text-encoder pass and 77 more positions for the UNet's "
            "cross-attention."
        },
    )
    max_images: int = field(
        default=4, metadata={"help": "Most images per request (`num_images_per_prompt`)."}
    )
    max_loras: int = field(
        default=4,
        metadata={
            "help": "Most LoRAs one request may use (the `loras` field and `<lora:...>` tags "
            "together). Each one adds its small matrices' work to the layers it adapts."
        },
    )
    max_lora_weight: float = field(
        default=2.0,
        metadata={
            "help": "Largest LoRA weight, either sign: a request's weights (added up per name) "
            "must be from minus this to this."
        },
    )

    def __post_init__(self) -> None:
        if not 8 <= self.min_side <= self.max_side:
            raise ValueError("SD_MIN_SIDE must be at least 8 and at most SD_MAX_SIDE")
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"{env_name(f.name)} must be positive")


SAFETY_MODES = ("block", "flag", "off")
# torch.compile's modes; "off" runs eagerly.
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
OPENVINO_MODES = ("auto", "off")


@dataclass(frozen=True)
class Settings:
    """How the endpoint loads and runs the model."""

    device: str = field(
        default="auto",
        metadata={"help": "`auto` (CUDA if present, else CPU), `cuda`, `cuda:N`, `cpu` or `mps`."},
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "`auto`, `float16`, `bfloat16` or `float32`. `auto` is float16 on CUDA; "
            "on a CPU with AMX or AVX-512 BF16 (such as `intel-spr` instances) bfloat16 for a "
            "full-size model (UNet of 100M+ parameters: 3.0-3.6x faster per step than float32 "
            "on an AMX Xeon, a third less memory); float32 otherwise."
        },
    )
    png_compress_level: int = field(
        default=1,
        metadata={
            "help": "zlib level for PNG output, 0-9. 1 encodes about 6x faster than Pillow's "
            "default 6 for ~17% more bytes."
        },
    )
    log_prompts: bool = field(
        default=False, metadata={"help": "Log prompt texts (debugging only; off by default)."}
    )
    safety_checker: str = field(
        default="block",
        metadata={
            "help": "When the model folder ships a `safety_checker/`: `block` replaces a flagged "
            "image with a black one and says so, `flag` returns it with the flag, `off` never "
            "loads the checker. Without one, nothing is checked."
        },
    )
    # Speed switches. Each one was measured by scripts/benchmark.py; see docs/performance.md.
    warmup: str = field(
        default="native",
        metadata={
            "help": "Sizes to generate once (3 steps) before the endpoint reports ready, so the "
            "first request pays no one-off costs: comma-separated WIDTHxHEIGHT such as "
            "`512x512,768x512`, `native` for the model's own size, or empty for none."
        },
    )
    compile: str = field(
        default="off",
        metadata={
            "help": "`off`, or a torch.compile mode (" + ", ".join(COMPILE_MODES[1:]) + ") "
            "for the UNet and the VAE decoder at the SD_WARMUP sizes, compiled during warm-up; "
            "other sizes run uncompiled, so they never wait for a compile. On a CPU it did not "
            "pay: on an AMX Xeon in bfloat16 a UNet call ran 6% faster and the VAE decode 13% "
            "slower, after 2 minutes of compiling at every start (SD_OPENVINO is the CPU's "
            "compiled path)."
        },
    )
    openvino: str = field(
        default="auto",
        metadata={
            "help": "`auto` or `off`. `auto` runs the UNet and the VAE decoder on OpenVINO at the "
            "SD_WARMUP sizes when the model folder carries an export of them (`openvino/`, "
            "written by `python -m model_tools.openvino_export`), the device is a CPU and the "
            "`openvino` package is installed; other sizes, batches and long prompts run on "
            "PyTorch. On an AMX Xeon a 512x512, 25-step SD 1.5 request took 68 s with the "
            "export's int8 UNet, 115 s on bfloat16 PyTorch and 350 s in the stock float32 "
            "pipeline (one thread, the base image's libraries): 5.1x, and 1.12x OpenVINO's own "
            "pipeline."
        },
    )
    channels_last: bool = field(
        default=True,
        metadata={
            "help": "Run the UNet and VAE in channels-last memory layout (on an AMX Xeon in "
            "bfloat16 the VAE decode 2.4x and a UNet call 1.07x faster; in float32 on an AVX2 "
            "EPYC a UNet step about 1.4x faster)."
        },
    )
    num_threads: int = field(
        default=0,
        metadata={
            "help": "PyTorch CPU threads; 0 keeps PyTorch's default (one per core). Use 1 where "
            "other busy processes share the cores: threads that wait on each other there run "
            "several times slower than one."
        },
    )
    vae_tile_above_pixels: int = field(
        default=1024 * 1024,
        metadata={
            "help": "Decode images of more than this many pixels (height × width) in overlapping "
            "tiles: bounded VAE memory, slightly different pixels near tile seams. The default "
            "tiles nothing within the default size limits."
        },
    )
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if not 0 <= self.png_compress_level <= 9:
            raise ValueError("SD_PNG_COMPRESS_LEVEL must be from 0 to 9")
        if self.safety_checker not in SAFETY_MODES:
            raise ValueError(
                f"SD_SAFETY_CHECKER={self.safety_checker!r} is not one of {', '.join(SAFETY_MODES)}"
            )
        if self.compile not in COMPILE_MODES:
            raise ValueError(
                f"SD_COMPILE={self.compile!r} is not one of {', '.join(COMPILE_MODES)}"
            )
        if self.openvino not in OPENVINO_MODES:
            raise ValueError(
                f"SD_OPENVINO={self.openvino!r} is not one of {', '.join(OPENVINO_MODES)}"
            )
        sizes = self.warmup_sizes()  # a malformed SD_WARMUP fails here, whatever SD_COMPILE is
        if self.compile != "off" and not sizes:
            raise ValueError("SD_COMPILE compiles for the SD_WARMUP sizes; set SD_WARMUP too")
        for name in ("num_threads", "vae_tile_above_pixels"):
            if getattr(self, name) < 0:
                raise ValueError(f"{env_name(name)} must be 0 or more")

    def warmup_sizes(self) -> list[tuple[int, int] | str]:
        """SD_WARMUP as (width, height) pairs, with "native" left for the engine to resolve."""
        sizes = []
        for item in self.warmup.replace(" ", "").lower().split(","):
            if item == "native":
                sizes.append(item)
            elif item:
                width, _, height = item.partition("x")
                if not (width.isdigit() and height.isdigit()):
                    raise ValueError(
                        f"SD_WARMUP item {item!r} is not WIDTHxHEIGHT (such as 512x512) or native"
                    )
                sizes.append((int(width), int(height)))
        return sizes

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        limit_defaults: Mapping[str, int | float] | None = None,
    ) -> Settings:
        """The settings the variables give; ``limit_defaults`` (a model family's) replace
        ``Limits``' own defaults, and the variables win over both."""
        environ = os.environ if environ is None else environ
        limits = Limits(**{**(limit_defaults or {}), **_read(Limits, environ)})
        return cls(**_read(cls, environ), limits=limits)


def env_name(field_name: str) -> str:
    return "SD_" + field_name.upper()


def _read(cls: type, environ: Mapping[str, str]) -> dict:
    values = {}
    for f in fields(cls):
        if f.name == "limits" or env_name(f.name) not in environ:
            continue
        raw = environ[env_name(f.name)].strip()
        kind = type(f.default)
        try:
            if kind is bool:
                if raw.lower() not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                    raise ValueError
                values[f.name] = raw.lower() in {"1", "true", "yes", "on"}
            else:
                values[f.name] = kind(raw)
        except ValueError:
            raise ValueError(
                f"environment variable {env_name(f.name)}={raw!r} is not a valid "
                f"{kind.__name__}: {f.metadata['help']}"
            ) from None
    return values


def documented_variables() -> list[tuple[str, object, str]]:
    """(variable, default, help) for every setting: docs/configuration.md's table comes from
    this."""
    rows = []
    for cls in (Settings, Limits):
        for f in fields(cls):
            if f.name != "limits":
                default = f.default
                rows.append((env_name(f.name), default, f.metadata["help"]))
    return rows
