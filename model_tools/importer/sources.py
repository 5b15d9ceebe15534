"""Reading what the user points at: single files (safetensors, or pickles read without running
code), diffusers folders, and Hub repos (downloaded); each checked before any work."""

from __future__ import annotations

import json
import re
import socket
import urllib.parse
from pathlib import Path

from model_tools import single_file
from model_tools.families import FAMILIES, SUPPORTED_SHORT, Family, TextEncoder, best_match
from model_tools.single_file.layout import CONV_IN

from .plan import ImportFailed, first_line

SAFETENSORS = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
# Every family's parts that hold weights, and tokenizers: a Hub repo's family shows only once
# it is downloaded.
COMPONENTS = tuple(dict.fromkeys(c for f in FAMILIES.values() for c in f.components))
TOKENIZERS = tuple(dict.fromkeys(e.tokenizer for f in FAMILIES.values() for e in f.text_encoders))
# From a Hub repo: configs, tokenizer files, the card, and the components' safetensors (not the
# multi-GB single files many SD repos also keep at their root, nor pickles).
HUB_PATTERNS = ["*.json", "*/*.json", *(f"{t}/*.txt" for t in TOKENIZERS), "README.md"]
HUB_CONNECT_TIMEOUT = 10  # seconds
HUB_WEIGHTS = [f"{c}/*.safetensors" for c in COMPONENTS]


def looks_like_a_path(source: str) -> bool:
    suffix = Path(source).suffix.lower()
    return source.startswith((".", "/", "~")) or suffix in (SAFETENSORS, *PICKLE_SUFFIXES)


# ---------------------------------------------------------------------------------------------
# Single files


def read_checkpoint_keys(path: Path, allow_pickle: bool, what: str = "SOURCE") -> list[str]:
    """The tensor names of a weights file, refusing what is not safe to read."""
    from safetensors import SafetensorError, safe_open

    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ImportFailed(
                f"{what} {path.name} is a pickle file ({path.suffix}): loading one can run "
                "arbitrary code, so it is refused. Use a .safetensors file, or pass "
                "--allow-pickle to convert it with torch's weights-only loader"
            )
        return list(load_pickle(path, what))
    if path.suffix.lower() != SAFETENSORS:
        raise ImportFailed(
            f"{what} {path.name} is not a .safetensors file (allowed: .safetensors, or "
            f"{', '.join(PICKLE_SUFFIXES)} with --allow-pickle)"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except (SafetensorError, OSError) as exc:
        raise ImportFailed(
            f"{what} {path.name} is not a readable safetensors file (truncated or corrupt?): {exc}"
        ) from None
    if not keys:
        raise ImportFailed(f"{what} {path.name} holds no tensors")
    return keys


# A pickle is read once per import (its keys are checked first, its tensors converted later).
_PICKLES: dict[Path, dict] = {}


def load_pickle(path: Path, what: str = "SOURCE") -> dict:
    """A pickle's tensors, read by torch's weights-only unpickler (no code can run)."""
    if path not in _PICKLES:
        import torch

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError for anything but tensors, or a bad file
            raise ImportFailed(
                f"{what} {path.name} could not be read as a weights-only pickle (it holds "
                f"more than tensors, or is corrupt): {str(exc).splitlines()[0][:300]}"
            ) from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ImportFailed(f"{what} {path.name} does not hold a dictionary of tensors")
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        if not tensors:
            raise ImportFailed(f"{what} {path.name} holds no tensors")
        _PICKLES[path] = tensors
    return _PICKLES[path]


def forget_pickles() -> None:
    _PICKLES.clear()


def to_safetensors(path: Path, target: Path, ema: bool | None = None) -> Path:
    """A weights file as safetensors; with ``ema`` set, a single file's UNet chosen too."""
    from safetensors.torch import load_file, save_file

    pickled = path.suffix.lower() in PICKLE_SUFFIXES
    tensors = load_pickle(path) if pickled else load_file(str(path))
    if ema is not None:
        try:
            tensors = single_file.select_unet_weights(tensors, use_ema=ema)
        except ValueError as exc:
            raise ImportFailed(f"SOURCE {path.name}: {exc}") from None
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(target))
    return target


def family_of(keys: list[str], path: Path) -> Family:
    """The family from the key names; the error names what else the file is, or what it lacks."""
    from safetensors import safe_open

    conv_in = CONV_IN
    shapes = {}
    if path.suffix.lower() == SAFETENSORS and conv_in in keys:
        with safe_open(str(path), framework="pt") as handle:
            shapes[conv_in] = handle.get_slice(conv_in).get_shape()
    elif conv_in in keys:
        shapes[conv_in] = list(load_pickle(path)[conv_in].shape)
    try:
        return FAMILIES[single_file.detect_family(keys, shapes)]
    except ValueError as exc:
        raise ImportFailed(f"SOURCE {path.name}: {exc}") from None


def check_config(config: Path, what: str, family: Family) -> None:
    """A folder of configs and tokenizers that describes a single file of ``family``."""
    needed = ["model_index.json", *(f"{c}/config.json" for c in family.components)]
    needed.append("scheduler/scheduler_config.json")
    missing = [n for n in needed if not (config / n).is_file()]
    if missing:
        raise ImportFailed(
            f"{what} {config} is not a diffusers folder: it lacks {', '.join(missing)}"
        )
    for encoder in family.text_encoders:
        if not tokenizer_source_ok(config / encoder.tokenizer):
            raise ImportFailed(
                f"{what} {config} has no usable {encoder.tokenizer}/ (vocab.json and "
                "merges.txt, or tokenizer.json)"
            )


def tokenizer_source_ok(folder: Path) -> bool:
    return (
        all((folder / n).is_file() for n in ("vocab.json", "merges.txt"))
        or (folder / "tokenizer.json").is_file()
    )


# ---------------------------------------------------------------------------------------------
# Diffusers folders and Hub repos


def check_folder(folder: Path, allow_pickle: bool) -> tuple[Family, bool]:
    """The folder's family, and whether its text encoders have that family's sizes; refuses a
    folder that is not a complete model of a known pipeline class."""
    if not (folder / "model_index.json").is_file():
        raise ImportFailed(
            f"SOURCE {folder} is a folder without model_index.json: not a diffusers model "
            "(for a single-file checkpoint, give the file itself)"
        )
    index = json.loads((folder / "model_index.json").read_text())
    class_name = index.get("_class_name")
    candidates = [f for f in FAMILIES.values() if class_name in (None, f.pipeline_class)]
    if not candidates:
        classes = " or ".join(dict.fromkeys(f.pipeline_class for f in FAMILIES.values()))
        raise ImportFailed(
            f"SOURCE {folder} holds a {class_name}; this endpoint serves {classes} models "
            f"({SUPPORTED_SHORT})"
        )

    def fits(encoder: TextEncoder) -> bool:
        try:
            config = json.loads((folder / encoder.component / "config.json").read_text())
        except (OSError, ValueError):  # missing or unreadable: the checks below say which
            return False
        return config.get("hidden_size") == encoder.width

    family = best_match(candidates, fits)
    standard = family is not None
    # Sizes no family has (a miniature model, say): its pipeline class's first family says
    # which parts it has (SD 1.x and 2.x have the same).
    family = family or candidates[0]
    for name in family.components:
        part = folder / name
        if not part.is_dir():
            raise ImportFailed(f"SOURCE {folder} has no {name}/ folder")
        if weights_in(part)[0]:
            continue
        pickles = sorted(p.name for p in part.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if not pickles:
            raise ImportFailed(f"SOURCE {part} holds no weights")
        if not allow_pickle:
            raise ImportFailed(
                f"SOURCE {part} holds only pickle weights ({', '.join(pickles)}), which can "
                "run code when loaded; pass --allow-pickle to convert them with torch's "
                "weights-only loader"
            )
    for encoder in family.text_encoders:
        if not tokenizer_source_ok(folder / encoder.tokenizer):
            raise ImportFailed(
                f"SOURCE {folder}/{encoder.tokenizer} has no vocab.json/merges.txt nor "
                "tokenizer.json"
            )
    return family, standard


def weights_in(part: Path) -> tuple[list[Path], str | None]:
    """A component folder's safetensors files, preferring the fp16 variant, and the variant."""
    fp16 = sorted(part.glob("*.fp16" + SAFETENSORS))
    if fp16:
        return fp16, "fp16"
    plain = [p for p in sorted(part.glob("*" + SAFETENSORS)) if p.name.count(".") == 1]
    return plain, None


def download(repo_id: str, target: Path) -> Path:
    from huggingface_hub import HfApi, constants, snapshot_download

    try:
        if constants.HF_HUB_OFFLINE:
            raise ConnectionError("HF_HUB_OFFLINE is set")
        # One quick connection first: the Hub client retries an unreachable host for ~30 s.
        address = urllib.parse.urlsplit(constants.ENDPOINT)
        socket.create_connection(
            (address.hostname, address.port or 443), timeout=HUB_CONNECT_TIMEOUT
        ).close()
        files = HfApi().list_repo_files(repo_id)
        # Only the fp16 variant of a component that has one: half the download.
        weights = [
            f"{c}/*.fp16.safetensors"
            if any(f.startswith(f"{c}/") and f.endswith(".fp16.safetensors") for f in files)
            else pattern
            for c, pattern in zip(COMPONENTS, HUB_WEIGHTS, strict=True)
        ]
        folder = snapshot_download(
            repo_id, allow_patterns=HUB_PATTERNS + weights, local_dir=str(target)
        )
        return Path(folder)
    except Exception as exc:
        name = type(exc).__name__
        offline = any(
            word in f"{name} {exc}".lower()
            for word in (
                "connect",
                "offline",
                "resolve",
                "timeout",
                "network",
                "localentry",
                "errno",
            )
        )
        if offline:
            raise ImportFailed(
                f"cannot reach the Hugging Face Hub to download {repo_id} ({name}). On a "
                f"machine that can, download it with `hf download {repo_id} --include "
                + " ".join(f"'{p}'" for p in HUB_PATTERNS + HUB_WEIGHTS)
                + " --local-dir DIR` (or `git clone` it with `git lfs`), copy DIR here and run "
                "this command with DIR as SOURCE"
            ) from None
        raise ImportFailed(
            f"downloading {repo_id} from the Hub failed: {first_line(exc)}"
        ) from None
