"""What an import is: the plan decided and checked before any work, and its one kind of error."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from model_tools.families import Family

REPO_ROOT = Path(__file__).resolve().parents[2]


class ImportFailed(Exception):
    """One message for the user; the target folder is unchanged."""


@dataclass
class Lora:
    path: Path
    scale: float


@dataclass
class Plan:
    """Everything decided and checked before any work starts."""

    kind: str  # "single-file", "folder" or "hub"
    source: str
    out: Path
    dtype: str
    config: Path | None = None
    # Known once the source is read (a Hub repo's once downloaded).
    family: Family | None = None
    # False for a diffusers folder whose text encoder sizes are no family's: it is loaded and
    # written as the first family of its pipeline class, and named for what it is.
    standard_sizes: bool = True
    prediction_type: str | None = None
    prediction_said: str = ""
    # Scheduler settings besides the prediction type (from a single file's marker keys).
    scheduler_options: dict[str, object] = field(default_factory=dict)
    ema: bool = False
    has_ema: bool = False
    loras: list[Lora] = field(default_factory=list)
    vae: Path | None = None
    base_model: str | None = None
    allow_pickle: bool = False
    skip_check: bool = False
    # Prepare for CPU serving: the UNet and VAE decoder exported for OpenVINO, the UNet in
    # openvino_unet ("int8": hybrid int8, or "float").
    openvino: bool = False
    openvino_unet: str = "int8"
    notes: list[str] = field(default_factory=list)

    @property
    def family_name(self) -> str:
        if self.family is None or not self.standard_sizes:
            return "Stable-Diffusion-shaped, non-standard size"
        return self.family.name


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:400]
