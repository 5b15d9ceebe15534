"""Import a Stable Diffusion 1.x / 2.x model into this repository, in one command.

    python -m model_tools.importer model.safetensors   # a single-file checkpoint (A1111 layout)
    python -m model_tools.importer path/to/folder      # a diffusers folder, e.g. a Hub repo clone
    python -m model_tools.importer owner/name          # a Hub repo (needs the network)

It writes a complete diffusers folder (default: this repo's own model folders, replacing the
shipped model) that the handler serves unchanged and that a plain
``StableDiffusionPipeline.from_pretrained(folder)`` loads in both supported library stacks,
then loads it the way the endpoint does and makes one small image. Everything is checked
before any work starts, written beside the target and swapped in only once complete and
verified: on any error the target folder is left exactly as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import urllib.parse
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from model_tools import single_file

REPO_ROOT = Path(__file__).resolve().parent.parent
SAFETENSORS = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
DTYPES = ("float16", "bfloat16", "float32")
PREDICTION_TYPES = ("epsilon", "v_prediction")
WEIGHTED = ("unet", "vae", "text_encoder")
# What a model import owns in the target folder; nothing else there is touched.
MODEL_ENTRIES = (
    "model_index.json",
    "unet",
    "vae",
    "text_encoder",
    "tokenizer",
    "scheduler",
    "safety_checker",
    "feature_extractor",
)
LFS_RULES = ("*.safetensors", "*.bin", "*.ckpt", "*.pt", "*.pth")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")
# Key prefixes only the original (CompVis) VAE layout has; diffusers says down_blocks/up_blocks.
ORIGINAL_VAE_MARKERS = ("first_stage_model.", "encoder.down.", "decoder.up.", "encoder.mid.")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
# From a Hub repo: configs, tokenizer files, the card, and the three components' safetensors
# (not the multi-GB single files many SD repos also keep at their root, nor pickles).
HUB_PATTERNS = ["*.json", "*/*.json", "tokenizer/*.txt", "README.md"]
HUB_CONNECT_TIMEOUT = 10  # seconds
HUB_WEIGHTS = [f"{c}/*.safetensors" for c in WEIGHTED]
CHECK_SIZE = 64  # side of the verification image: cheap at any model size


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
    family: str | None = None
    prediction_type: str | None = None
    prediction_said: str = ""
    ema: bool = False
    has_ema: bool = False
    loras: list[Lora] = field(default_factory=list)
    vae: Path | None = None
    base_model: str | None = None
    allow_pickle: bool = False
    skip_check: bool = False
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Checking the input, before any work


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m model_tools.importer",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument(
        "source",
        help="a single-file checkpoint (.safetensors), a diffusers folder, or a Hub repo id",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT,
        help="folder to write the model into; its model folders are replaced, nothing else "
        "(default: this repository, replacing the shipped model)",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float16",
        help="precision of the written weights (default float16: half the size of float32, "
        "and what a GPU runs; the endpoint upcasts on a CPU)",
    )
    parser.add_argument(
        "--prediction-type",
        choices=PREDICTION_TYPES,
        help="what the UNet predicts; it is not stored in the weights. Default: the scheduler "
        "config's (of the folder, or of the single file's configs): epsilon for SD 1.x, "
        "v_prediction at 768x768 for SD 2.x, as SD 2.0/2.1-768 and their fine-tunes; give "
        "epsilon for the 512x512 SD 2.x 'base' models",
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="diffusers folder whose configs and tokenizer describe a single-file checkpoint "
        "(default: the SD 1.x / 2.x configs shipped in model_tools/configs/)",
    )
    parser.add_argument(
        "--ema",
        action="store_true",
        help="take a single file's EMA weights (model_ema.*) where it has them; the default "
        "takes the regular ones, as A1111 does",
    )
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="fuse a LoRA into the weights (kohya/A1111 or diffusers format; scale default "
        "1.0); repeatable, applied in order",
    )
    parser.add_argument(
        "--vae",
        type=Path,
        help="replace the VAE: a single file (diffusers or original layout) or a diffusers "
        "VAE folder",
    )
    parser.add_argument(
        "--base-model",
        help="Hub id of the model this one derives from, for the model card's base_model "
        "(default: the Hub id when importing from the Hub, else the source folder's own card)",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pickle weights (.ckpt, .bin, .pt) and convert them with torch's "
        "weights-only loader, which refuses anything but tensors",
    )
    parser.add_argument(
        "--skip-check",
        action="store_true",
        help="do not load the written model and make a test image before swapping it in",
    )
    return parser.parse_args(argv)


def plan_import(args: argparse.Namespace) -> Plan:
    out = args.out.resolve()
    plan = Plan(
        kind="",
        source=args.source,
        out=out,
        dtype=args.dtype,
        ema=args.ema,
        base_model=args.base_model,
        allow_pickle=args.allow_pickle,
        skip_check=args.skip_check,
        prediction_type=args.prediction_type,
    )
    check_out(out)
    plan.loras = [parse_lora(spec, args.allow_pickle) for spec in args.lora]
    if args.vae is not None:
        plan.vae = check_vae(args.vae.resolve(), args.allow_pickle)
    source = Path(args.source).expanduser()
    if source.is_file():
        plan.kind = "single-file"
        plan.source = str(source.resolve())
        keys = read_checkpoint_keys(source.resolve(), args.allow_pickle)
        plan.family = family_of(keys, source)
        plan.config = (args.config or single_file.CONFIGS[plan.family]).resolve()
        check_config(plan.config, "--config" if args.config else "shipped config")
        if not args.prediction_type and plan.config == single_file.CONFIGS["sd2"]:
            plan.prediction_said = (
                " (the SD 2.x default, for the 768x768 models; --prediction-type epsilon for "
                "the 512x512 'base' models)"
            )
        elif not args.prediction_type and plan.config == single_file.CONFIGS["sd1"]:
            plan.prediction_said = " (the SD 1.x default)"
        plan.has_ema = single_file.has_ema(keys)
        if plan.has_ema:
            plan.notes.append(
                "the checkpoint holds EMA weights too: "
                + ("used them (--ema)" if args.ema else "used the regular ones (--ema for EMA)")
            )
    elif source.is_dir():
        plan.kind = "folder"
        plan.source = str(source.resolve())
        check_folder(source.resolve(), args.allow_pickle)
    elif looks_like_a_path(args.source):
        raise ImportFailed(f"SOURCE {args.source}: no such file or folder")
    elif HUB_ID.match(args.source):
        plan.kind = "hub"
        plan.base_model = plan.base_model or args.source
    else:
        raise ImportFailed(
            f"SOURCE {args.source!r} is neither a file, a folder nor a Hub repo id (owner/name)"
        )
    if args.config and plan.kind != "single-file":
        raise ImportFailed("--config describes a single-file checkpoint; SOURCE is not one")
    return plan


def looks_like_a_path(source: str) -> bool:
    suffix = Path(source).suffix.lower()
    return source.startswith((".", "/", "~")) or suffix in (SAFETENSORS, *PICKLE_SUFFIXES)


def check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ImportFailed(f"--out {out} exists and is not a folder")
    if not out.parent.is_dir():
        raise ImportFailed(f"--out {out}: its parent folder {out.parent} does not exist")
    where = out if out.exists() else out.parent
    if not os.access(where, os.W_OK) or not os.access(out.parent, os.W_OK):
        raise ImportFailed(f"--out {out}: no permission to write there")


def parse_lora(spec: str, allow_pickle: bool) -> Lora:
    path, scale = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        with contextlib.suppress(ValueError):  # else the ':' is part of the path
            path, scale = head, float(tail)
    lora = Lora(Path(path).expanduser().resolve(), scale)
    if not lora.path.is_file():
        raise ImportFailed(f"--lora {spec!r}: no such file {lora.path}")
    read_checkpoint_keys(lora.path, allow_pickle, what="--lora")
    return lora


def check_vae(path: Path, allow_pickle: bool) -> Path:
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ImportFailed(f"--vae {path} is a folder without a config.json")
        if not list(path.glob("*" + SAFETENSORS)):
            raise ImportFailed(f"--vae {path} holds no .safetensors weights")
        return path
    if not path.is_file():
        raise ImportFailed(f"--vae {path}: no such file or folder")
    read_checkpoint_keys(path, allow_pickle, what="--vae")
    return path


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


def family_of(keys: list[str], path: Path) -> str:
    """The family ("sd1" or "sd2") from the key names; the error names what else the file is,
    or what it lacks."""
    from safetensors import safe_open

    conv_in = single_file.UNET + "input_blocks.0.0.weight"
    shapes = {}
    if path.suffix.lower() == SAFETENSORS and conv_in in keys:
        with safe_open(str(path), framework="pt") as handle:
            shapes[conv_in] = handle.get_slice(conv_in).get_shape()
    elif conv_in in keys:
        shapes[conv_in] = list(load_pickle(path)[conv_in].shape)
    try:
        return single_file.detect_family(keys, shapes)
    except ValueError as exc:
        raise ImportFailed(f"SOURCE {path.name}: {exc}") from None


def check_config(config: Path, what: str) -> None:
    needed = ["model_index.json", *(f"{c}/config.json" for c in ("unet", "vae", "text_encoder"))]
    needed.append("scheduler/scheduler_config.json")
    missing = [n for n in needed if not (config / n).is_file()]
    if missing:
        raise ImportFailed(
            f"{what} {config} is not a diffusers folder: it lacks {', '.join(missing)}"
        )
    if not tokenizer_source_ok(config / "tokenizer"):
        raise ImportFailed(
            f"{what} {config} has no usable tokenizer/ (vocab.json and merges.txt, or "
            "tokenizer.json)"
        )


def tokenizer_source_ok(folder: Path) -> bool:
    return (
        all((folder / n).is_file() for n in ("vocab.json", "merges.txt"))
        or (folder / "tokenizer.json").is_file()
    )


def check_folder(folder: Path, allow_pickle: bool) -> None:
    if not (folder / "model_index.json").is_file():
        raise ImportFailed(
            f"SOURCE {folder} is a folder without model_index.json: not a diffusers model "
            "(for a single-file checkpoint, give the file itself)"
        )
    index = json.loads((folder / "model_index.json").read_text())
    if index.get("_class_name") not in ("StableDiffusionPipeline", None):
        raise ImportFailed(
            f"SOURCE {folder} holds a {index.get('_class_name')}; this endpoint serves "
            "StableDiffusionPipeline models (SD 1.x and 2.x)"
        )
    for name in WEIGHTED:
        part = folder / name
        if not part.is_dir():
            raise ImportFailed(f"SOURCE {folder} has no {name}/ folder")
        if weights_in(part):
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
    if not tokenizer_source_ok(folder / "tokenizer"):
        raise ImportFailed(
            f"SOURCE {folder}/tokenizer has no vocab.json/merges.txt nor tokenizer.json"
        )


def weights_in(part: Path) -> tuple[list[Path], str | None]:
    """A component folder's safetensors files, preferring the fp16 variant, and the variant."""
    fp16 = sorted(part.glob("*.fp16" + SAFETENSORS))
    if fp16:
        return fp16, "fp16"
    plain = [p for p in sorted(part.glob("*" + SAFETENSORS)) if p.name.count(".") == 1]
    return plain, None


# ---------------------------------------------------------------------------------------------
# Loading the source into one float32 pipeline


def load_source(plan: Plan, staging: Path):
    import torch
    from diffusers import StableDiffusionPipeline

    if plan.kind == "hub":
        plan.source = str(download(plan.source, staging / "download"))
        check_folder(Path(plan.source), plan.allow_pickle)
        plan.kind = "folder"
    if plan.kind == "single-file":
        path = Path(plan.source)
        if path.suffix.lower() in PICKLE_SUFFIXES or plan.has_ema:
            # One safetensors file with the UNet weights chosen (regular or EMA) and no
            # model_ema.* copies, so the conversion cannot pick the other set.
            path = to_safetensors(path, staging / "source.safetensors", ema=plan.ema)
        tokenizer_dir = staging / "config-tokenizer"
        write_tokenizer_files(plan.config / "tokenizer", tokenizer_dir)
        from transformers import CLIPTokenizer

        try:
            pipe = StableDiffusionPipeline.from_single_file(
                str(path),
                config=str(plan.config),
                local_files_only=True,
                torch_dtype=torch.float32,
                tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
                safety_checker=None,
                requires_safety_checker=False,
            )
        except (ValueError, RuntimeError, KeyError, OSError) as exc:
            raise ImportFailed(
                f"SOURCE {path.name} could not be converted with the "
                f"{family_name(plan.family)} configs in {plan.config}: {first_line(exc)}"
            ) from None
        tokenizer_src = tokenizer_dir
        # The single file's keys were checked complete; the conversion must have used them.
        verify_source_components(pipe)
    else:
        pipe, tokenizer_src = load_folder(Path(plan.source), staging, plan.allow_pickle)
        plan.base_model = plan.base_model or card_base_model(Path(plan.source))
        # CLIP ViT-L/14 (SD 1.x) is 768 wide, OpenCLIP ViT-H (SD 2.x) 1024.
        plan.family = {768: "sd1", 1024: "sd2"}.get(pipe.text_encoder.config.hidden_size)
    scheduler_type = pipe.scheduler.config.get("prediction_type", "epsilon")
    if plan.prediction_type is None:
        plan.prediction_type = scheduler_type
        plan.prediction_said = plan.prediction_said or (
            " (the source's own)" if plan.kind == "folder" else f" (from {plan.config})"
        )
    if plan.prediction_type != scheduler_type:
        pipe.scheduler = type(pipe.scheduler).from_config(
            pipe.scheduler.config, prediction_type=plan.prediction_type
        )
    if plan.kind == "single-file" and plan.config == single_file.CONFIGS["sd2"]:
        # SD 2.x comes as 768x768 v-prediction models and 512x512 epsilon "base" models.
        size = single_file.PREDICTION_SAMPLE_SIZES[plan.prediction_type]
        pipe.unet.register_to_config(sample_size=size)
        pipe.vae.register_to_config(sample_size=size * pipe.vae_scale_factor)
    return pipe, tokenizer_src


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
            for c, pattern in zip(WEIGHTED, HUB_WEIGHTS, strict=True)
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


def load_folder(folder: Path, staging: Path, allow_pickle: bool):
    """A diffusers folder's components, read from safetensors (the fp16 variant where present)."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers import schedulers as diffusers_schedulers
    from transformers import CLIPTextModel, CLIPTokenizer

    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
    modules = {}
    for name, cls in classes.items():
        part = folder / name
        files, variant = weights_in(part)
        if not files:  # only pickles, and --allow-pickle was given (checked in the plan)
            part = staging / "converted" / name
            part.mkdir(parents=True)
            shutil.copy(folder / name / "config.json", part / "config.json")
            for pickle in sorted((folder / name).iterdir()):
                if pickle.suffix in PICKLE_SUFFIXES:
                    stem = "model" if name == "text_encoder" else "diffusion_pytorch_model"
                    to_safetensors(pickle, part / f"{stem}{SAFETENSORS}")
                    break
            files, variant = weights_in(part)
        kwargs = {"variant": variant} if variant else {}
        try:
            modules[name] = cls.from_pretrained(
                part,
                use_safetensors=True,
                local_files_only=True,
                torch_dtype=torch.float32,
                **kwargs,
            )
        except (ValueError, RuntimeError, OSError, KeyError) as exc:
            raise ImportFailed(f"SOURCE {part} could not be loaded: {first_line(exc)}") from None
        check_module(name, modules[name], files)
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    scheduler_cls = getattr(diffusers_schedulers, scheduler_config.get("_class_name", ""), None)
    if scheduler_cls is None:
        raise ImportFailed(
            f"SOURCE {folder}/scheduler names an unknown scheduler "
            f"{scheduler_config.get('_class_name')!r}"
        )
    tokenizer_dir = staging / "source-tokenizer"
    write_tokenizer_files(folder / "tokenizer", tokenizer_dir)
    pipe = StableDiffusionPipeline(
        **modules,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        scheduler=scheduler_cls.from_config(scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe, tokenizer_dir


def check_module(name: str, module, files: list[Path]) -> None:
    from sd_endpoint.weights import WeightsNotLoadedError, check_component

    try:
        check_component(name, module, files[0].parent, files)
    except WeightsNotLoadedError as exc:
        raise ImportFailed(f"SOURCE: {exc}") from None


def verify_source_components(pipe) -> None:
    """A conversion that left a component's parameters uninitialised shows as NaN or meta."""
    for name in WEIGHTED:
        for param_name, param in getattr(pipe, name).named_parameters():
            if param.is_meta:
                raise ImportFailed(f"SOURCE: the `{name}` parameter {param_name} was not converted")


def card_base_model(folder: Path) -> str | None:
    readme = folder / "README.md"
    if readme.is_file():
        meta, _ = split_front_matter(readme.read_text(encoding="utf-8"))
        base = meta.get("base_model")
        if isinstance(base, str):
            return base
    return None


# ---------------------------------------------------------------------------------------------
# Changing the weights: another VAE, LoRAs


def replace_vae(pipe, path: Path, staging: Path, allow_pickle: bool) -> None:
    import torch
    from diffusers import AutoencoderKL

    if path.is_dir():
        vae = AutoencoderKL.from_pretrained(path, use_safetensors=True, torch_dtype=torch.float32)
    else:
        if path.suffix.lower() in PICKLE_SUFFIXES:
            path = to_safetensors(path, staging / "vae.safetensors")
        from safetensors.torch import load_file

        state = load_file(str(path))
        vae = AutoencoderKL.from_config(pipe.vae.config).to(torch.float32)
        expected = set(vae.state_dict())
        original = any(k.startswith(ORIGINAL_VAE_MARKERS) for k in state)
        if original:  # let diffusers map the keys
            config_dir = staging / "vae-config"
            config_dir.mkdir(exist_ok=True)
            pipe.vae.save_config(config_dir)
            try:
                vae = AutoencoderKL.from_single_file(
                    str(path),
                    config=str(config_dir),
                    local_files_only=True,
                    torch_dtype=torch.float32,
                )
            except (ValueError, RuntimeError, KeyError, OSError) as exc:
                raise ImportFailed(
                    f"--vae {path.name} is not a VAE of this model's shape: {first_line(exc)}"
                ) from None
        else:
            missing = sorted(expected - set(state))
            if missing:
                raise ImportFailed(
                    f"--vae {path.name} lacks {len(missing)} VAE keys, "
                    f"e.g. {', '.join(missing[:5])}"
                )
            try:
                vae.load_state_dict({k: state[k] for k in expected}, strict=True)
            except RuntimeError as exc:
                raise ImportFailed(
                    f"--vae {path.name} does not fit this model's VAE: {first_line(exc)}"
                ) from None
    if vae.config.latent_channels != pipe.vae.config.latent_channels:
        raise ImportFailed(
            f"--vae {path.name} has {vae.config.latent_channels} latent channels; this model's "
            f"UNet works with {pipe.vae.config.latent_channels}"
        )
    # The model's latent scale stays: it belongs to the UNet's training, not to the VAE file.
    vae.register_to_config(scaling_factor=pipe.vae.config.scaling_factor)
    pipe.vae = vae.eval()
    pipe.register_modules(vae=pipe.vae)


def fuse_lora(pipe, lora: Lora, staging: Path, index: int) -> str:
    """Fuse one LoRA into the weights; returns what it changed, for the summary."""
    import torch

    if importlib.util.find_spec("peft") is None:
        raise ImportFailed(
            "--lora needs the peft package at import time: pip install -r requirements-import.txt "
            "(scripts/import_model.sh sets that up)"
        )
    path = lora.path
    if path.suffix.lower() in PICKLE_SUFFIXES:
        path = to_safetensors(path, staging / f"lora{index}.safetensors")
    before = {
        (name, key): param.detach().flatten()[:16].clone()
        for name in ("unet", "text_encoder")
        for key, param in getattr(pipe, name).named_parameters()
    }
    adapter = f"import_{index}"
    try:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter)
        pipe.fuse_lora(lora_scale=lora.scale, adapter_names=[adapter])
        pipe.unload_lora_weights()
    except (ValueError, RuntimeError, KeyError, AttributeError) as exc:
        raise ImportFailed(
            f"--lora {lora.path.name} could not be applied: {first_line(exc)}"
        ) from None
    changed: dict[str, int] = {}
    for name in ("unet", "text_encoder"):
        for key, param in getattr(pipe, name).named_parameters():
            old = before.get((name, key))
            if old is not None and not torch.equal(old, param.detach().flatten()[:16]):
                changed[name] = changed.get(name, 0) + 1
    if not changed:
        raise ImportFailed(
            f"--lora {lora.path.name} matched none of this model's layers (its keys fit "
            "neither the UNet nor the text encoder; is it for another model family, such as SDXL?)"
        )
    parts = ", ".join(f"{n} {name}" for name, n in changed.items())
    return f"{lora.path.name} at scale {lora.scale:g}: {parts} weights changed"


# ---------------------------------------------------------------------------------------------
# Writing the folder


def write_model(pipe, tokenizer_src: Path, target: Path, plan: Plan) -> None:
    import diffusers
    import torch

    from model_tools.architecture import write_text_encoder

    dtype = getattr(torch, plan.dtype)
    for name in ("unet", "vae"):
        module = getattr(pipe, name)
        module.to(dtype).save_pretrained(target / name, safe_serialization=True)
        module.to(torch.float32)
    write_text_encoder(pipe.text_encoder, target / "text_encoder", dtype)
    write_tokenizer_files(tokenizer_src, target / "tokenizer")
    pipe.scheduler.save_pretrained(target / "scheduler")
    write_json(
        target / "model_index.json",
        {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", type(pipe.scheduler).__name__],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )


def write_tokenizer_files(source: Path, target: Path) -> None:
    """vocab.json, merges.txt and the two small configs that transformers 4.51 and 5.x both read.

    transformers 5 saves a tokenizer only as tokenizer.json, which 4.51's CLIPTokenizer cannot
    use; the BPE vocabulary and merges inside it are what the two files hold.
    """
    target.mkdir(parents=True, exist_ok=True)
    if all((source / n).is_file() for n in ("vocab.json", "merges.txt")):
        shutil.copyfile(source / "vocab.json", target / "vocab.json")
        shutil.copyfile(source / "merges.txt", target / "merges.txt")
    else:
        model = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))["model"]
        write_json(target / "vocab.json", model["vocab"])
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        (target / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    config = {}
    if (source / "tokenizer_config.json").is_file():
        config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    specials = {}
    if (source / "special_tokens_map.json").is_file():
        specials = json.loads((source / "special_tokens_map.json").read_text(encoding="utf-8"))
    tokens = {}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = specials.get(name, config.get(name, "<|endoftext|>"))
        tokens[name] = value["content"] if isinstance(value, dict) else value
    max_length = config.get("model_max_length", 77)
    write_json(target / "special_tokens_map.json", tokens)
    write_json(
        target / "tokenizer_config.json",
        {
            **tokens,
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": max_length
            if isinstance(max_length, int) and max_length < 10**6
            else 77,
            "do_lower_case": True,
            "add_prefix_space": False,
            "errors": "replace",
            "clean_up_tokenization_spaces": False,
        },
    )


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_repo_files(target: Path, out: Path, plan: Plan) -> None:
    """.gitattributes with LFS rules for the weights, and the model card's front matter."""
    old = (out / ".gitattributes").read_text() if (out / ".gitattributes").is_file() else ""
    lines = old.splitlines()
    for rule in LFS_RULES:
        if not any(line.split()[:1] == [rule] for line in lines if line.strip()):
            lines.append(f"{rule} filter=lfs diff=lfs merge=lfs -text")
    (target / ".gitattributes").write_text("\n".join(lines) + "\n")

    readme = out / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    meta, body = split_front_matter(text)
    meta.setdefault("license", "creativeml-openrail-m" if plan.family != "sd2" else "openrail++")
    tags = list(meta.get("tags") or [])
    for tag in ("stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "diffusers"):
        if tag not in tags:
            tags.append(tag)
    meta["tags"] = tags
    meta.setdefault("pipeline_tag", "text-to-image")
    meta.setdefault("inference", True)
    if plan.base_model:
        meta["base_model"] = plan.base_model
        if plan.loras:
            meta["base_model_relation"] = "merge"
    if not body.strip():
        body = (
            f"\n# {out.name}\n\nStable Diffusion model imported with "
            f"`python -m model_tools.importer` from `{Path(plan.source).name}`.\n"
        )
    (target / "README.md").write_text(join_front_matter(meta, body), encoding="utf-8")


def split_front_matter(text: str) -> tuple[dict, str]:
    import yaml

    match = re.match(r"^---\n(.*?)\n---\n?", text, flags=re.DOTALL)
    if not match:
        return {}, text
    meta = yaml.safe_load(match.group(1)) or {}
    return (meta if isinstance(meta, dict) else {}), text[match.end() :]


def join_front_matter(meta: dict, body: str) -> str:
    import yaml

    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False)
    return f"---\n{front}---\n{body}"


# ---------------------------------------------------------------------------------------------
# Checking the written folder the way the endpoint loads it, then swapping it in


def check_written(folder: Path) -> str:
    """Load ``folder`` through the repo's handler.py as the runtime does, make one image."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    from sd_endpoint.settings import Settings

    spec = importlib.util.spec_from_file_location("_imported_handler", REPO_ROOT / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    settings = Settings.from_env({**os.environ, "SD_WARMUP": "", "SD_COMPILE": "off"})
    started = time.perf_counter()
    try:
        handler = module.EndpointHandler(str(folder), settings)
    except Exception as exc:
        raise ImportFailed(f"the written model did not load: {first_line(exc)}") from None
    loaded = time.perf_counter()
    request = {"inputs": "a photograph of an astronaut riding a horse", "seed": 0}
    request.update(height=CHECK_SIZE, width=CHECK_SIZE, inference_steps=2)
    response = handler(request)
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(response["image"]))))
    if pixels.min() == pixels.max():
        raise ImportFailed(
            "the written model loads but draws a uniform image (all pixels "
            f"{pixels.flat[0]}): its weights overflow or are broken"
        )
    return (
        f"loaded as the endpoint does in {loaded - started:.1f} s; a {CHECK_SIZE}x{CHECK_SIZE}, "
        f"2-step image in {time.perf_counter() - loaded:.1f} s"
    )


def swap_in(staged: Path, out: Path, backup: Path) -> None:
    """Move the staged entries into ``out``, the replaced ones into ``backup``; all or none."""
    out.mkdir(exist_ok=True)
    backup.mkdir()
    moved: list[tuple[Path, Path]] = []
    try:
        for name in (*MODEL_ENTRIES, ".gitattributes", "README.md"):
            new, old = staged / name, out / name
            if old.exists() or old.is_symlink():
                if not new.exists() and name not in MODEL_ENTRIES:
                    continue
                os.rename(old, backup / name)
                moved.append((backup / name, old))
            if new.exists():
                os.rename(new, old)
                moved.append((old, new))
    except OSError:
        for src, dst in reversed(moved):
            os.rename(src, dst)
        raise


def free_space_check(plan: Plan, n_bytes: int) -> None:
    free = shutil.disk_usage(plan.out.parent).free
    if free < n_bytes:
        raise ImportFailed(
            f"not enough disk space at {plan.out.parent}: the model needs about "
            f"{n_bytes / 2**20:,.0f} MiB, {free / 2**20:,.0f} MiB are free"
        )


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def family_name(family: str | None) -> str:
    return single_file.FAMILY_NAMES.get(family or "", "Stable-Diffusion-shaped, non-standard size")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:400]


# ---------------------------------------------------------------------------------------------


def run(plan: Plan) -> list[str]:
    import torch

    started = time.perf_counter()
    log = []
    work = Path(tempfile.mkdtemp(prefix=f".{plan.out.name}.import-", dir=plan.out.parent))
    try:
        staging, staged = work / "staging", work / "model"
        staging.mkdir()
        pipe, tokenizer_src = load_source(plan, staging)
        if plan.vae is not None:
            replace_vae(pipe, plan.vae, staging, plan.allow_pickle)
            log.append(f"VAE replaced by {plan.vae.name}")
        for index, lora in enumerate(plan.loras):
            log.append("LoRA " + fuse_lora(pipe, lora, staging, index))
        counts = {n: sum(p.numel() for p in getattr(pipe, n).parameters()) for n in WEIGHTED}
        itemsize = torch.empty((), dtype=getattr(torch, plan.dtype)).element_size()
        free_space_check(plan, sum(counts.values()) * itemsize)
        native = pipe.unet.config.sample_size * pipe.vae_scale_factor
        write_model(pipe, tokenizer_src, staged, plan)
        write_repo_files(staged, plan.out, plan)
        del pipe
        gc.collect()
        converted = time.perf_counter()
        check = "skipped (--skip-check)" if plan.skip_check else check_written(staged)
        size = folder_size(staged)
        swap_in(staged, plan.out, work / "replaced")
    except Exception as exc:  # safetensors reports a full disk as its own SafetensorError
        if getattr(exc, "errno", None) == errno.ENOSPC or "os error 28" in str(exc):
            raise ImportFailed(
                f"the disk filled up while writing the model beside {plan.out}; free some "
                "space and run again"
            ) from None
        if isinstance(exc, OSError):
            raise ImportFailed(f"writing the model failed: {exc}") from None
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
        _PICKLES.clear()
    summary = [
        f"imported {plan.source}",
        f"  family           {family_name(plan.family)}",
        "  parameters       "
        + ", ".join(f"{n} {c / 1e6:,.1f} M" for n, c in counts.items())
        + f" (total {sum(counts.values()) / 1e6:,.1f} M)",
        f"  native size      {native}x{native}",
        f"  prediction type  {plan.prediction_type}{plan.prediction_said}",
        f"  dtype            {plan.dtype}",
        f"  size on disk     {size / 2**20:,.1f} MiB in {plan.out}",
        f"  import time      {converted - started:.1f} s",
        f"  check            {check}",
        *(f"  note             {line}" for line in [*log, *plan.notes]),
    ]
    summary += push_instructions(plan.out)
    return summary


def push_instructions(out: Path) -> list[str]:
    lines = ["", "push it to the Hub (needs `git lfs` or the hf CLI, and a write token):"]
    if not (out / "handler.py").is_file():
        lines.append(
            f"  cp -r {REPO_ROOT}/handler.py {REPO_ROOT}/sd_endpoint "
            f"{REPO_ROOT}/requirements.txt {out}/"
        )
    lines.append(f"  hf upload <your-name>/<model-name> {out} . --repo-type model")
    return lines


def quiet_libraries() -> None:
    """Progress bars and advice meant for notebooks would bury the summary."""
    import diffusers
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch_dtype renamed to dtype
    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    # It logs the error it then raises, which the one message here already carries.
    logging.getLogger("diffusers.loaders.peft").setLevel(logging.CRITICAL)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        quiet_libraries()
        plan = plan_import(args)
        for line in run(plan):
            print(line)
    except ImportFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(f"nothing was changed in {args.out.resolve()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
