"""Write a Stable-Diffusion-shaped model folder with random weights.

    python -m model_tools.build --arch tiny --out /tmp/tiny-random
    python -m model_tools.build --arch sd15 --out /tmp/sd15-random   # speed work only

The output depends only on the seed and the torch version. The model this repo ships is
trained from the same ``tiny`` architecture by ``model_tools.train``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .architecture import ARCHITECTURES, build, char_vocab, save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="tiny")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16"),
        default="float16",
        help="storage precision (float16 halves the files; loading upcasts)",
    )
    args = parser.parse_args()
    arch = ARCHITECTURES[args.arch](len(char_vocab()))
    save(build(arch, args.seed), arch, args.out, getattr(torch, args.dtype))
    print(f"wrote {args.arch} model to {args.out}")


if __name__ == "__main__":
    main()
