"""The samplers a request may name, declared once.

Each has the project's short name, AUTOMATIC1111's name (accepted in requests too, and written
into the image's metadata, since that is what people paste between tools) and the diffusers
scheduler that runs it, built from the model folder's own scheduler config (betas, offsets).
Class names are strings so that the request model, and the client that imports it, need no
diffusers.

Left out, because each needs a package the base image lacks: LMS (scipy) and DPM++ SDE
(torchsde, through DPMSolverSDEScheduler).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT = "default"  # the model folder's own scheduler


@dataclass(frozen=True)
class Sampler:
    name: str
    a1111: str
    scheduler: str  # a diffusers class name
    options: dict[str, Any] = field(default_factory=dict)


_DPM = "DPMSolverMultistepScheduler"
_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_2M_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}

SAMPLERS = (
    Sampler("dpm++2m", "DPM++ 2M", _DPM, {**_2M, "use_karras_sigmas": False}),
    Sampler("dpm++2m-karras", "DPM++ 2M Karras", _DPM, {**_2M, "use_karras_sigmas": True}),
    Sampler("dpm++2m-sde", "DPM++ 2M SDE", _DPM, {**_2M_SDE, "use_karras_sigmas": False}),
    Sampler(
        "dpm++2m-sde-karras", "DPM++ 2M SDE Karras", _DPM, {**_2M_SDE, "use_karras_sigmas": True}
    ),
    Sampler("euler", "Euler", "EulerDiscreteScheduler"),
    Sampler("euler-a", "Euler a", "EulerAncestralDiscreteScheduler"),
    Sampler("heun", "Heun", "HeunDiscreteScheduler"),
    Sampler("dpm2", "DPM2", "KDPM2DiscreteScheduler"),
    Sampler("dpm2-a", "DPM2 a", "KDPM2AncestralDiscreteScheduler"),
    Sampler("unipc", "UniPC", "UniPCMultistepScheduler"),
    Sampler("deis", "DEIS", "DEISMultistepScheduler"),
    Sampler("ddim", "DDIM", "DDIMScheduler"),
    Sampler("pndm", "PLMS", "PNDMScheduler", {"skip_prk_steps": True}),
)
BY_NAME = {s.name: s for s in SAMPLERS}
NAMES = (DEFAULT, *BY_NAME)  # what the echo and the engine use
A1111_NAMES = tuple(s.a1111 for s in SAMPLERS)
# Either spelling, in any case, to the project's name.
_LOOKUP = {n.lower(): n for n in NAMES} | {s.a1111.lower(): s.name for s in SAMPLERS}


def canonical(value: Any) -> Any:
    """The project's name for a sampler named either way; anything else is left for the
    request model to refuse."""
    return _LOOKUP.get(value.lower(), value) if isinstance(value, str) else value


def a1111_name(name: str, default: tuple[type, dict[str, Any]]) -> str:
    """AUTOMATIC1111's name for ``name``; for "default", the name of the folder's own scheduler
    (``default``: its class and config) where one matches, else its class name."""
    if name != DEFAULT:
        return BY_NAME[name].a1111
    cls, config = default
    for sampler in SAMPLERS:
        if sampler.scheduler == cls.__name__ and all(
            config.get(key, False) == value for key, value in sampler.options.items()
        ):
            return sampler.a1111
    return cls.__name__
