"""Import a Stable Diffusion 1.x, 2.x or XL model into this repository, in one command.

    python -m model_tools.importer model.safetensors   # a single-file checkpoint (A1111 layout)
    python -m model_tools.importer path/to/folder      # a diffusers folder, e.g. a Hub repo clone
    python -m model_tools.importer owner/name          # a Hub repo (needs the network)

It writes a complete diffusers folder (default: this repo's own model folders, replacing the
shipped model) that the handler serves unchanged and that a plain
``StableDiffusionPipeline.from_pretrained(folder)`` (``StableDiffusionXLPipeline`` for SDXL)
loads in both supported library stacks,
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
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

from model_tools import families, single_file

from . import convert, edit, sources, write
from .plan import REPO_ROOT, ImportFailed, Lora, Plan

DTYPES = ("float16", "bfloat16", "float32")
PREDICTION_TYPES = ("epsilon", "v_prediction")


# ---------------------------------------------------------------------------------------------
# The command line


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        quiet_libraries()
        for line in act(args):
            print(line)
    except ImportFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(f"nothing was changed in {args.out.resolve()}", file=sys.stderr)
        return 1
    return 0


def act(args: argparse.Namespace) -> list[str]:
    """Do what the command line asks; returns the lines to print.

    Importing SOURCE is the one action today. Another, such as adding a LoRA file to the
    model's loras/, gets its option in build_parser() and its branch here, before the
    import's plan; it reports a problem by raising ImportFailed, as the import does.
    """
    return run(plan_import(args))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
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
        "epsilon for the 512x512 SD 2.x 'base' models; epsilon for SDXL unless the file "
        "has a v_pred key",
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="diffusers folder whose configs and tokenizers describe a single-file checkpoint "
        "(default: its family's configs, shipped in model_tools/configs/)",
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
        "--openvino",
        action="store_true",
        help="also prepare the model for CPU serving: its UNet (in int8) and VAE decoder "
        "exported for OpenVINO into openvino/, and openvino added to requirements.txt (SD "
        "1.x/2.x; needs requirements-cpu.txt; ~20 min for SD 1.5 on 2 vCPUs; leave it out for "
        "a GPU deployment)",
    )
    parser.add_argument(
        "--openvino-unet",
        choices=("int8", "float"),
        help="with --openvino: int8 (default), OpenVINO's hybrid int8, calibrated on the "
        "model's own pipeline; float, unquantized (~2 min): docs/performance.md has both",
    )
    parser.add_argument(
        "--skip-check",
        action="store_true",
        help="do not load the written model and make a test image before swapping it in",
    )
    return parser


# ---------------------------------------------------------------------------------------------
# Checking the input, before any work


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
        openvino=args.openvino,
        openvino_unet=args.openvino_unet or "int8",
    )
    check_out(out)
    check_openvino(plan, unet_said=args.openvino_unet is not None)
    plan.loras = [parse_lora(spec, args.allow_pickle) for spec in args.lora]
    if args.vae is not None:
        plan.vae = check_vae(args.vae.resolve(), args.allow_pickle)
    source = Path(args.source).expanduser()
    if source.is_file():
        plan.kind = "single-file"
        plan.source = str(source.resolve())
        keys = sources.read_checkpoint_keys(source.resolve(), args.allow_pickle)
        plan.family = sources.family_of(keys, source)
        refuse_openvino(plan)
        plan.config = (args.config or plan.family.config).resolve()
        what = "--config" if args.config else "shipped config"
        sources.check_config(plan.config, what, plan.family)
        shipped = families.of_config(plan.config)
        if not args.prediction_type and shipped:
            plan.prediction_type = shipped.default_prediction
            plan.prediction_said = shipped.prediction_note
        read_scheduler_markers(plan, keys, args.prediction_type)
        plan.has_ema = single_file.has_ema(keys)
        if plan.has_ema:
            plan.notes.append(
                "the checkpoint holds EMA weights too: "
                + ("used them (--ema)" if args.ema else "used the regular ones (--ema for EMA)")
            )
    elif source.is_dir():
        plan.kind = "folder"
        plan.source = str(source.resolve())
        plan.family, plan.standard_sizes = sources.check_folder(source.resolve(), args.allow_pickle)
        refuse_openvino(plan)
    elif sources.looks_like_a_path(args.source):
        raise ImportFailed(f"SOURCE {args.source}: no such file or folder")
    elif sources.HUB_ID.match(args.source):
        plan.kind = "hub"
        plan.base_model = plan.base_model or args.source
    else:
        raise ImportFailed(
            f"SOURCE {args.source!r} is neither a file, a folder nor a Hub repo id (owner/name)"
        )
    if args.config and plan.kind != "single-file":
        raise ImportFailed("--config describes a single-file checkpoint; SOURCE is not one")
    return plan


def read_scheduler_markers(plan: Plan, keys: list[str], asked: str | None) -> None:
    """What the file's marker keys (SDXL's ``v_pred``, ``ztsnr``) say about its scheduler;
    ``asked`` (--prediction-type) wins over a marker's prediction type."""
    for key, settings in plan.family.markers_in(keys).items():
        settings = dict(settings)
        prediction = settings.pop("prediction_type", None)
        if prediction and asked and asked != prediction:
            plan.notes.append(
                f"the file's {key} key means {prediction}; --prediction-type {asked} overrides it"
            )
        elif prediction:
            plan.prediction_type = prediction
            plan.prediction_said = f" (the file's {key} key)"
        if settings:
            plan.scheduler_options |= settings
            plan.notes.append(
                f"the file's {key} key: the scheduler set to "
                + ", ".join(f"{name} {value}" for name, value in settings.items())
            )


def check_openvino(plan: Plan, unet_said: bool) -> None:
    """--openvino can run here (the family is checked once known: refuse_openvino)."""
    if unet_said and not plan.openvino:
        raise ImportFailed("--openvino-unet chooses the OpenVINO export's UNet: add --openvino")
    if not plan.openvino:
        return
    needed = ["openvino", *(["nncf"] if plan.openvino_unet == "int8" else [])]
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportFailed(
            f"--openvino needs {' and '.join(missing)}: pip install -r requirements-cpu.txt"
            + (" (or --openvino-unet float, without nncf)" if missing == ["nncf"] else "")
        )


def refuse_openvino(plan: Plan) -> None:
    """Only SD 1.x/2.x UNets are exported; SDXL's takes more conditioning than its text."""
    if (
        plan.openvino
        and plan.family is not None
        and plan.family.pipeline_class != ("StableDiffusionPipeline")
    ):
        raise ImportFailed(
            f"--openvino: {plan.family.name} models are not exported for OpenVINO (SD 1.x and "
            "2.x are); leave it out, a CPU serves them with PyTorch"
        )


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
    sources.read_checkpoint_keys(lora.path, allow_pickle, what="--lora")
    return lora


def check_vae(path: Path, allow_pickle: bool) -> Path:
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ImportFailed(f"--vae {path} is a folder without a config.json")
        if not list(path.glob("*" + sources.SAFETENSORS)):
            raise ImportFailed(f"--vae {path} holds no .safetensors weights")
        return path
    if not path.is_file():
        raise ImportFailed(f"--vae {path}: no such file or folder")
    sources.read_checkpoint_keys(path, allow_pickle, what="--vae")
    return path


# ---------------------------------------------------------------------------------------------
# The import


def run(plan: Plan) -> list[str]:
    """Load, edit, write and check the model beside the target, then swap it in; returns the
    summary. On any error the target is as it was."""
    import torch

    started = time.perf_counter()
    log = []
    work = Path(tempfile.mkdtemp(prefix=f".{plan.out.name}.import-", dir=plan.out.parent))
    try:
        staging, staged = work / "staging", work / "model"
        staging.mkdir()
        pipe, tokenizers = convert.load_source(plan, staging)
        if plan.vae is not None:
            edit.replace_vae(pipe, plan.vae, staging, plan.allow_pickle)
            log.append(f"VAE replaced by {plan.vae.name}")
        for index, lora in enumerate(plan.loras):
            log.append("LoRA " + edit.fuse_lora(pipe, plan.family, lora, staging, index))
        counts = {
            n: sum(p.numel() for p in getattr(pipe, n).parameters()) for n in plan.family.components
        }
        itemsize = torch.empty((), dtype=getattr(torch, plan.dtype)).element_size()
        write.free_space_check(plan, sum(counts.values()) * itemsize)
        refuse_openvino(plan)  # a Hub repo's family is known once it is downloaded
        native = pipe.unet.config.sample_size * pipe.vae_scale_factor
        write.write_model(pipe, tokenizers, staged, plan)
        write.write_gitattributes(staged, plan.out)
        edit.write_card(staged, plan.out, plan)
        del pipe
        gc.collect()
        if plan.openvino:
            log.append(write.export_openvino(staged, plan.openvino_unet))
        converted = time.perf_counter()
        parameters = sum(counts.values())
        check = (
            "skipped (--skip-check)" if plan.skip_check else write.check_written(staged, parameters)
        )
        size = write.folder_size(staged)
        write.swap_in(staged, plan.out, work / "replaced")
        write.ask_for_openvino(plan.out, staged_with_openvino=plan.openvino)
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
        sources.forget_pickles()
    summary = [
        f"imported {plan.source}",
        f"  family           {plan.family_name}",
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
