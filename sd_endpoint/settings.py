"""Every setting of the endpoint, read once from environment variables.

Each field's name is its variable's name without the ``SD_`` prefix, upper-cased. A bad value
stops start-up with a message naming the variable, rather than surfacing on some request later.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Mapping


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
        metadata={"help": "Most height × width × steps per request (the total work asked for)."},
    )
    max_guidance: float = field(default=30.0, metadata={"help": "Largest guidance_scale."})
    max_prompt_chars: int = field(
        default=2000, metadata={"help": "Longest prompt or negative prompt, in characters."}
    )

    def __post_init__(self) -> None:
        if not 8 <= self.min_side <= self.max_side:
            raise ValueError("SD_MIN_SIDE must be at least 8 and at most SD_MAX_SIDE")
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"{env_name(f.name)} must be positive")


@dataclass(frozen=True)
class Settings:
    """How the endpoint loads and runs the model."""

    device: str = field(
        default="auto",
        metadata={"help": "`auto` (CUDA if present, else CPU), `cuda`, `cuda:N`, `cpu` or `mps`."},
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "`auto` (float16 on CUDA, float32 elsewhere), `float16`, `bfloat16`, `float32`."},
    )
    png_compress_level: int = field(
        default=1,
        metadata={"help": "zlib level for PNG output, 0-9. 1 is several times faster than 6 for ~15% more bytes."},
    )
    log_prompts: bool = field(
        default=False, metadata={"help": "Log prompt texts (debugging only; off by default)."}
    )
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        environ = os.environ if environ is None else environ
        limits = Limits(**_read(Limits, environ))
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
    """(variable, default, help) for every setting: the README's table is made from this."""
    rows = []
    for cls in (Settings, Limits):
        for f in fields(cls):
            if f.name != "limits":
                default = f.default
                rows.append((env_name(f.name), default, f.metadata["help"]))
    return rows
