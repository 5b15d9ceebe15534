"""Derive the CLIP BPE tokenizer files shipped in ``model_tools/configs/`` from a pip package.

    pip download --no-deps clip-anytorch==2.6.0 -d /tmp/clip   # or: pip install --no-deps
    python -m model_tools.clip_bpe --source /tmp/clip/clip_anytorch-2.6.0-py3-none-any.whl

The source is OpenAI's ``bpe_simple_vocab_16e6.txt.gz``, the merge list every Stable
Diffusion 1.x / 2.x / XL tokenizer is built from (CLIP ViT-L/14, OpenCLIP ViT-H and ViT-bigG
share it), read from the ``clip-anytorch`` wheel, its installed package, or the ``.gz`` itself.
The vocabulary is rebuilt exactly as CLIP's own ``SimpleTokenizer`` builds it: the 256 byte
symbols, the same with ``</w>``, one token per merge, then the two specials.

Every family's tokenizer folders (``model_tools.families``) get the same ``vocab.json`` and
``merges.txt`` (the others link to SD 1.x's) and their own special tokens: CLIP ViT-L's
tokenizers (SD 1.x, SDXL's ``tokenizer``) pad with ``<|endoftext|>`` (id 49407), OpenCLIP's
(SD 2.x, SDXL's ``tokenizer_2``) with ``!`` (id 0), as the checkpoints were trained. Output
is byte-for-byte reproducible.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import zipfile
from pathlib import Path

from .architecture import byte_alphabet
from .families import EOS, FAMILIES, SD1

BOS = "<|startoftext|>"
GZ_NAME = "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps the first 49152 - 256 - 2 merges of the file: with the 512 byte tokens and
# the two specials that makes its 49408-token vocabulary.
N_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 49408
MAX_TOKENS = 77
CONFIGS = Path(__file__).parent / "configs"
SHARED_FILES = ("vocab.json", "merges.txt")


def read_merges(source: str | Path | None = None) -> list[tuple[str, str]]:
    """The merge rules from a wheel, a ``.gz`` file, or the installed ``clip`` package."""
    if source is None:
        # Only the package's location: its __init__ imports torch and torchvision.
        spec = importlib.util.find_spec("clip")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(
                "no source: pass --source (the clip-anytorch wheel or its "
                f"{GZ_NAME}), e.g. after `pip download --no-deps clip-anytorch==2.6.0`"
            )
        source = Path(next(iter(spec.submodule_search_locations))) / GZ_NAME
    source = Path(source)
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as wheel:
            data = wheel.read(f"clip/{GZ_NAME}")
    else:
        data = source.read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    # The first line is a version header, as in CLIP's own reader.
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise SystemExit(f"{source}: not CLIP's merge list ({len(merges)} merges)")
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    alphabet = byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens += [BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    return vocab


def special_tokens(pad_token: str) -> dict[str, str]:
    return {"bos_token": BOS, "eos_token": EOS, "pad_token": pad_token, "unk_token": EOS}


def tokenizer_config(pad_token: str) -> dict:
    return {
        **special_tokens(pad_token),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": MAX_TOKENS,
        "tokenizer_class": "CLIPTokenizer",
    }


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        path.unlink()
    path.write_text(text, encoding="utf-8", newline="\n")


def _json(data: dict, indent: int | None = 2) -> str:
    return json.dumps(data, indent=indent, ensure_ascii=False, sort_keys=indent is not None) + "\n"


def write_tokenizers(merges: list[tuple[str, str]], configs: Path = CONFIGS) -> None:
    """Write every family's tokenizer folders, ``configs/<family>/<tokenizer>``; the first
    (``sd1/tokenizer``) holds the vocabulary files, the others link to them."""
    vocab = build_vocab(merges)
    first = configs / SD1.key / SD1.text_encoders[0].tokenizer
    # One entry per line, in id order: compact, and diffs read well.
    lines = ",\n".join(f"{json.dumps(t, ensure_ascii=False)}: {i}" for t, i in vocab.items())
    _write(first / "vocab.json", "{\n" + lines + "\n}\n")
    _write(first / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    for family in FAMILIES.values():
        for encoder in family.text_encoders:
            folder = configs / family.key / encoder.tokenizer
            pad = encoder.pad_token
            _write(folder / "special_tokens_map.json", _json(special_tokens(pad)))
            _write(folder / "tokenizer_config.json", _json(tokenizer_config(pad)))
            if folder == first:
                continue
            for name in SHARED_FILES:
                link = folder / name
                if link.exists() or link.is_symlink():
                    link.unlink()
                link.symlink_to(os.path.relpath(first / name, folder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source",
        type=Path,
        help=f"clip-anytorch wheel or {GZ_NAME} (default: the installed clip package)",
    )
    parser.add_argument("--configs", type=Path, default=CONFIGS)
    args = parser.parse_args()
    write_tokenizers(read_merges(args.source), args.configs)
    names = [family.short for family in FAMILIES.values()]
    names = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
    print(f"wrote the {names} tokenizer files under {args.configs}")


if __name__ == "__main__":
    main()
