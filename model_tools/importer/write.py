"""Writing the imported model: the diffusers folder (weights, configs, tokenizer files both
library stacks read), then loading it as the endpoint does, then swapping it into the target
all at once."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

from model_tools.families import FAMILIES, Family

from .plan import REPO_ROOT, ImportFailed, Plan, first_line

# What a model import owns in the target folder, for every family, so that an entry the new
# model lacks (an old safety_checker/, say) goes with the rest; nothing else there is touched.
MODEL_ENTRIES = tuple(
    dict.fromkeys(
        [
            "model_index.json",
            "unet",
            "vae",
            *(
                name
                for family in FAMILIES.values()
                for encoder in family.text_encoders
                for name in (encoder.component, encoder.tokenizer)
            ),
            "scheduler",
            *(name for family in FAMILIES.values() for name in family.unused_components),
            "openvino",  # an export of the weights replaced would only be ignored
        ]
    )
)
LFS_RULES = ("*.safetensors", "*.bin", "*.ckpt", "*.pt", "*.pth")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")
CHECK_SIZE = 64  # side of the verification image: cheap at any model size


def write_model(pipe, tokenizers: Path, target: Path, plan: Plan) -> None:
    """The pipeline as a diffusers folder in ``plan.dtype``; ``tokenizers`` holds each
    tokenizer's files under its name."""
    import torch

    from model_tools.architecture import write_text_encoder

    family = plan.family
    dtype = getattr(torch, plan.dtype)
    for name in ("unet", "vae"):
        # Already in `dtype` but for a replaced VAE; a no-op `to` keeps the tensors shared.
        getattr(pipe, name).to(dtype).save_pretrained(target / name, safe_serialization=True)
    for encoder in family.text_encoders:
        write_text_encoder(getattr(pipe, encoder.component), target / encoder.component, dtype)
        write_tokenizer_files(tokenizers / encoder.tokenizer, target / encoder.tokenizer)
    pipe.scheduler.save_pretrained(target / "scheduler")
    write_json(target / "model_index.json", model_index(pipe, family))


def model_index(pipe, family: Family) -> dict:
    import diffusers

    index = {
        "_class_name": family.pipeline_class,
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", type(pipe.scheduler).__name__],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        **family.pipeline_options,
    }
    for encoder in family.text_encoders:
        index[encoder.component] = ["transformers", encoder.model_class]
        index[encoder.tokenizer] = ["transformers", "CLIPTokenizer"]
    for name in family.unused_components:
        index[name] = [None, None]
    return index


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


def write_gitattributes(target: Path, out: Path) -> None:
    """``out``'s .gitattributes with Git LFS rules for the weights (the Hub needs LFS above
    10 MB)."""
    old = (out / ".gitattributes").read_text() if (out / ".gitattributes").is_file() else ""
    lines = old.splitlines()
    for rule in LFS_RULES:
        if not any(line.split()[:1] == [rule] for line in lines if line.strip()):
            lines.append(f"{rule} filter=lfs diff=lfs merge=lfs -text")
    (target / ".gitattributes").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# Checking the written folder the way the endpoint loads it, then swapping it in


def check_written(folder: Path, parameters: int) -> str:
    """Load ``folder`` through the repo's handler.py as the runtime does, make one image.

    ``parameters`` (the model's) decide one thing: on a CPU, where the float32 copy that the
    endpoint takes on a CPU without fast bfloat16 would not fit in the memory available (SDXL
    needs 14 GB), the check loads bfloat16 instead (half that, and slower there, but it checks
    the same weights), unless SD_DTYPE says otherwise.
    """
    import base64
    import io

    import numpy as np
    from PIL import Image

    from sd_endpoint.settings import Settings

    spec = importlib.util.spec_from_file_location("_imported_handler", REPO_ROOT / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    environ = {**os.environ, "SD_WARMUP": "", "SD_COMPILE": "off"}
    if (folder / "openvino").is_dir():  # the check image then runs through the export too
        environ["SD_WARMUP"] = f"{CHECK_SIZE}x{CHECK_SIZE}"
    in_bfloat16 = "SD_DTYPE" not in environ and float32_does_not_fit(parameters, environ)
    if in_bfloat16:
        environ["SD_DTYPE"] = "bfloat16"
    settings = Settings.from_env(environ)
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
    how = " (in bfloat16: float32 would not fit in memory)" if in_bfloat16 else ""
    return (
        f"loaded as the endpoint does{how} in {loaded - started:.1f} s; a "
        f"{CHECK_SIZE}x{CHECK_SIZE}, 2-step image in {time.perf_counter() - loaded:.1f} s"
    )


def float32_does_not_fit(parameters: int, environ) -> bool:
    """Whether the check would run on a CPU, and ``parameters`` in float32 would take more
    than the memory the system has available now (unknown outside Linux: assumed to fit)."""
    import torch

    device = environ.get("SD_DEVICE", "auto")
    if device.startswith(("cuda", "mps")) or (device == "auto" and torch.cuda.is_available()):
        return False
    available = available_memory()
    return available is not None and 4 * parameters > available


def available_memory() -> int | None:
    """MemAvailable, in bytes, from /proc/meminfo."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


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


def export_openvino(staged: Path, unet: str) -> str:
    """The staged model prepared for CPU serving (model_tools.openvino_export); its summary."""
    from model_tools.openvino_export import export

    result = export(staged, unet=unet)
    what = "hybrid int8 UNet" if unet == "int8" else "float UNet"
    return f"OpenVINO export ({what} and VAE decoder) written in {result['seconds']:.0f} s"


def ask_for_openvino(out: Path, staged_with_openvino: bool) -> None:
    """``out``'s requirements.txt asks for OpenVINO's runtime where the model now carries an
    export, and no longer where the model replaced carried one and this one does not."""
    from model_tools.openvino_export import add_requirement, drop_requirement

    if staged_with_openvino:
        import openvino

        add_requirement(out, f"openvino=={openvino.__version__.split('-')[0]}")
    else:
        drop_requirement(out)


def free_space_check(plan: Plan, n_bytes: int) -> None:
    free = shutil.disk_usage(plan.out.parent).free
    if free < n_bytes:
        raise ImportFailed(
            f"not enough disk space at {plan.out.parent}: the model needs about "
            f"{n_bytes / 2**20:,.0f} MiB, {free / 2**20:,.0f} MiB are free"
        )


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
