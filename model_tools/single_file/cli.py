"""Single-file Stable Diffusion checkpoints: which family a file is, and writing one.

python -m model_tools.single_file write FOLDER OUT.safetensors [--dtype float32] [--ema]
python -m model_tools.single_file random --family sd15 --out sd15.safetensors  # or sdxl-base
python -m model_tools.single_file detect FILE.safetensors
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from model_tools.families import FAMILIES

from .detect import detect_family, has_ema
from .fixtures import FIXTURES, random_checkpoint
from .layout import UNET, UnsupportedCheckpoint
from .write import add_ema, save_checkpoint, write_single_file


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m model_tools.single_file", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="a diffusers folder as one original-layout file")
    write.add_argument("folder", type=Path)
    write.add_argument("out", type=Path)
    random = commands.add_parser("random", help="a full-size SD checkpoint with random weights")
    random.add_argument("--family", choices=sorted(FIXTURES), required=True)
    random.add_argument("--out", type=Path, required=True)
    random.add_argument("--seed", type=int, default=0)
    for sub in (write, random):
        sub.add_argument("--dtype", choices=("float16", "float32"), default="float16")
        sub.add_argument("--ema", action="store_true", help="add model_ema.* copies of the UNet")
    detect = commands.add_parser("detect", help="say which family a checkpoint is")
    detect.add_argument("file", type=Path)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    if args.command == "detect":
        with safe_open(str(args.file), framework="pt") as f:
            keys = list(f.keys())
            shapes = {
                k: f.get_slice(k).get_shape()
                for k in keys
                if k.startswith(UNET + "input_blocks.0.")
            }
        try:
            family = detect_family(keys, shapes)
        except UnsupportedCheckpoint as exc:
            raise SystemExit(f"{args.file}: {exc}") from None
        print(
            f"{args.file}: {FAMILIES[family].name} ({family}), "
            f"EMA weights: {'yes' if has_ema(keys) else 'no'}"
        )
        return
    dtype = getattr(torch, args.dtype)
    if args.command == "write":
        out = write_single_file(args.folder, args.out, dtype=dtype, ema=args.ema)
    else:
        state = random_checkpoint(args.family, args.seed, dtype)
        if args.ema:
            add_ema(state)
        out = save_checkpoint(state, args.out)
    size = out.stat().st_size
    print(f"wrote {out} ({size / 2**30:.2f} GiB) in {time.perf_counter() - started:.1f} s")
