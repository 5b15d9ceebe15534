"""Writing a diffusers folder as one original-layout ``.safetensors`` file, which diffusers
does not ship; read back by ``from_single_file`` it gives tensors equal to the source."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model_tools.families import FAMILIES, SD2, TextEncoder, best_match

from .key_maps import to_original
from .layout import EMA, UNET, UnsupportedCheckpoint, ema_key


def read_weights(component: str | Path) -> dict[str, torch.Tensor]:
    """One diffusers component folder's safetensors weights (plain, fp16 variant or sharded)."""
    component = Path(component)
    for stem in ("diffusion_pytorch_model", "model"):
        for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
            if (component / name).is_file():
                return _read_files([component / name])
        for name in (f"{stem}.safetensors.index.json", f"{stem}.safetensors.index.fp16.json"):
            if (component / name).is_file():
                index = json.loads((component / name).read_text())
                files = sorted(set(index["weight_map"].values()))
                return _read_files([component / f for f in files])
    raise FileNotFoundError(f"{component} holds no safetensors weights")


def _read_files(files: Iterable[Path]) -> dict[str, torch.Tensor]:
    state = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                state[key] = f.get_tensor(key)
    return state


def family_of_folder(folder: str | Path) -> str:
    """The family whose text encoders the folder has, told by their activation (OpenCLIP's
    GELU, OpenAI CLIP's quick GELU), which miniature models keep whatever their sizes."""
    folder = Path(folder)

    def fits(encoder: TextEncoder) -> bool:
        path = folder / encoder.component / "config.json"
        if not path.is_file():
            return False
        # Quick GELU is transformers' default for a CLIP text model.
        return json.loads(path.read_text()).get("hidden_act", "quick_gelu") == encoder.hidden_act

    family = best_match(FAMILIES.values(), fits)
    if family is None:
        raise UnsupportedCheckpoint(
            f"{folder}: its text encoders are those of none of "
            f"{', '.join(f.name for f in FAMILIES.values())}"
        )
    return family.key


def add_ema(state: dict[str, torch.Tensor]) -> None:
    """Add ``model_ema.*`` copies of the UNet, as a training checkpoint has them."""
    for key in [k for k in state if k.startswith(UNET)]:
        state[ema_key(key)] = state[key].clone()
    state[EMA + "decay"] = torch.tensor(0.9999)
    state[EMA + "num_updates"] = torch.tensor(0, dtype=torch.int32)


def cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def save_checkpoint(state: Mapping[str, torch.Tensor], out: str | Path) -> Path:
    """Write ``state`` to ``out`` through a temporary file, so no half-written file is left."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    try:
        save_file(dict(state), str(partial), metadata={"format": "pt"})
        # safetensors creates its files owner-only (0600); a model file is meant to be shared.
        partial.chmod(0o644)
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def write_single_file(
    folder: str | Path,
    out: str | Path,
    *,
    family: str | None = None,
    dtype: torch.dtype = torch.float16,
    ema: bool = False,
) -> Path:
    """Write the diffusers folder ``folder`` as one original-layout ``.safetensors``.

    ``family`` defaults to what the text encoders' configs say; ``ema`` adds ``model_ema.*``
    copies of the UNet (equal to it), as training checkpoints carry them.
    """
    folder = Path(folder)
    family = family or family_of_folder(folder)
    state = to_original(
        family,
        read_weights(folder / "unet"),
        json.loads((folder / "unet" / "config.json").read_text()),
        read_weights(folder / "vae"),
        json.loads((folder / "vae" / "config.json").read_text()),
        *(read_weights(folder / name) for name in FAMILIES[family].text_components),
    )
    state = cast(state, dtype)
    if ema:
        add_ema(state)
    return save_checkpoint(state, out)


def apply_prediction_type(folder: str | Path, prediction_type: str) -> None:
    """Set an SD 2.x folder's scheduler prediction type and the matching native size."""
    if prediction_type not in SD2.native_sizes:
        raise ValueError(
            f"prediction type {prediction_type!r} is not one of {', '.join(SD2.native_sizes)}"
        )
    folder = Path(folder)
    pixels = SD2.native_sizes[prediction_type]
    for path, key, value in (
        (folder / "scheduler" / "scheduler_config.json", "prediction_type", prediction_type),
        (folder / "unet" / "config.json", "sample_size", pixels // 8),
        (folder / "vae" / "config.json", "sample_size", pixels),
    ):
        config = json.loads(path.read_text())
        config[key] = value
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
