"""Proof that a loaded pipeline holds the weights of its folder, every one of them.

transformers initialises any parameter it finds no key for at random and only logs a
warning: the base image's transformers 4.51 does this to a whole text encoder saved by
transformers >= 5.6, whose keys lack the ``text_model.`` prefix, and the endpoint then serves
plausible but wrong images. So after loading, every parameter of every component is paired
with a key of the component's safetensors files and a few of its values are compared with the
file's: a randomly initialised weight never matches. Reading a handful of values per tensor
from memory-mapped files keeps this to milliseconds, even at full Stable Diffusion size.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from pathlib import Path

import torch

# Module levels one transformers version has and another not (5.6 dropped CLIPTextModel's
# `text_model`), so one saver writes them in key names and another does not.
OPTIONAL_LEVELS = {"text_model", "vision_model"}
# Old diffusers attention names, renamed at load time (diffusers converts them itself).
RENAMED = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
VALUES = 16  # per tensor at most: random initialisation never reproduces trained values
SHOWN_KEYS = 5


class WeightsNotLoadedError(RuntimeError):
    """A component's parameters do not all come from its folder's safetensors files."""


def canonical(key: str) -> str:
    key = ".".join(part for part in key.split(".") if part not in OPTIONAL_LEVELS)
    for old, new in RENAMED.items():
        key = key.replace(old, new)
    return key


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files that ``from_pretrained`` reads without a variant."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    plain = [i for i in indexes if i.name.count(".") == 3]  # no ``.fp16`` variant part
    if plain:
        shards = set(json.loads(plain[0].read_text())["weight_map"].values())
        return [folder / name for name in sorted(shards)]
    files = sorted(folder.glob("*.safetensors"))
    return [f for f in files if f.name.count(".") == 1] or files


# safetensors dtype names; a tensor of any other dtype is checked for its key only.
FILE_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
}


class _File:
    """A safetensors file's header, and the first values of any tensor, read straight from a
    memory map: a handful of bytes per tensor, without building tensor views."""

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            self.header = json.loads(f.read(size))
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.header.pop("__metadata__", None)
        self._base = 8 + size
        self.path = path

    def first_values(self, key: str, count: int) -> torch.Tensor | None:
        entry = self.header[key]
        dtype = FILE_DTYPES.get(entry["dtype"])
        if dtype is None:
            return None
        start = self._base + entry["data_offsets"][0]
        length = count * torch.empty((), dtype=dtype).element_size()
        return torch.frombuffer(bytearray(self._map[start : start + length]), dtype=dtype)

    def numel(self, key: str) -> int:
        return math.prod(self.header[key]["shape"])


def check_component(
    name: str, module: torch.nn.Module, folder: Path, files: list[Path] | None = None
) -> None:
    """Raise unless every parameter of ``module`` holds the value stored for it in ``files``
    (default: the files ``from_pretrained`` reads from ``folder``)."""
    files = weight_files(folder) if files is None else files
    if not files:
        raise WeightsNotLoadedError(f"{folder} holds no .safetensors weights for `{name}`")
    opened = [_File(f) for f in files]
    where = {canonical(key): (file, key) for file in opened for key in file.header}
    missing, different = [], []
    for param_name, param in module.named_parameters():
        found = where.get(canonical(param_name))
        if found is None:
            missing.append(param_name)
            continue
        file, key = found
        if param.is_meta or file.numel(key) != param.numel():
            different.append(param_name)
            continue
        # The first values of the first row: the file's first values too, read without a copy
        # whatever the tensor's memory format (channels_last included).
        row = param.detach()[(0,) * (param.dim() - 1)] if param.dim() else param.detach()[None]
        loaded = row[:VALUES]
        stored = file.first_values(key, loaded.numel())
        if stored is not None and not torch.equal(stored.to(loaded.dtype), loaded.cpu()):
            different.append(param_name)
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} parameters have no key in {_names(files)}: " + _few(missing)
        )
    if different:
        problems.append(
            f"{len(different)} parameters do not hold the values stored for them in "
            f"{_names(files)} (initialised at random instead, e.g. because the file's key "
            "names do not match this library version's): " + _few(different)
        )
    if problems:
        raise WeightsNotLoadedError(
            f"the `{name}` weights were not loaded from {folder}: "
            + "; ".join(problems)
            + ". Re-save the model with the keys this library expects "
            "(python -m model_tools.importer rewrites a folder so both version sets load it)."
        )


def check_loaded(pipe, path: str | Path) -> None:
    """Raise ``WeightsNotLoadedError`` unless every loaded component matches its files."""
    path = Path(path)
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module) and (path / name).is_dir():
            check_component(name, module, path / name)


def _names(files: list[Path]) -> str:
    return ", ".join(f.name for f in files)


def _few(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return shown + (f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else "")
