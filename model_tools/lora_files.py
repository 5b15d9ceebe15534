"""Add a LoRA to a repository's ``loras/`` folder, checked against the model it serves.

    python -m model_tools.lora_files --add-lora style.safetensors            # as loras/style
    python -m model_tools.lora_files --add-lora x.safetensors --name ink     # as loras/ink
    python -m model_tools.lora_files --add-lora old.ckpt --allow-pickle      # converted

(``scripts/import_model.sh --add-lora ...`` runs this.) The file is read and checked before
anything is written: a pickle is refused unless ``--allow-pickle`` (then torch's weights-only
unpickler converts it to safetensors), and the LoRA is loaded into the repository's model the
way the endpoint loads it at start-up, so one made for another model family, or naming layers
the model lacks, is refused here with the endpoint's own message. Only then does the file
appear in ``loras/``, in one rename; nothing else in the repository is touched.

The module also writes LoRAs in kohya's layout (what AUTOMATIC1111, ComfyUI and diffusers all
read): ``model_tools.train_lora`` saves the shipped one with it, and the tests and benchmarks
make random ones of the layout kohya's trainer targets by default.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from model_tools.importer.plan import ImportFailed
from model_tools.importer.sources import load_pickle, read_checkpoint_keys
from sd_endpoint import loras

REPO_ROOT = Path(__file__).resolve().parent.parent
# The modules kohya's sd-scripts adapts by default (networks/lora.py): every linear and 1x1
# convolution inside the UNet's transformer blocks, and inside the text encoder's attention
# and MLP blocks.
UNET_BLOCKS = ("Transformer2DModel",)
TEXT_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m model_tools.lora_files",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:2]),
    )
    parser.add_argument(
        "--add-lora",
        type=Path,
        required=True,
        metavar="FILE",
        help="the LoRA to add: .safetensors in kohya/A1111 or diffusers layout",
    )
    parser.add_argument(
        "--name",
        help="the name requests will use (default: FILE's name without its suffix); the file "
        f"becomes loras/NAME.safetensors. {loras.NAME_RULE[0].upper()}{loras.NAME_RULE[1:]}",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept a pickle (.ckpt, .pt, .bin) and convert it with torch's weights-only "
        "loader, which refuses anything but tensors",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT,
        help="the repository to add it to (default: this one)",
    )
    return parser.parse_args(argv)


def add_lora(source: Path, name: str | None, allow_pickle: bool, repo: Path) -> list[str]:
    """Check ``source`` against ``repo``'s model and copy it to ``repo/loras/NAME.safetensors``;
    returns the summary lines. Raises ``ImportFailed`` with ``repo`` unchanged."""
    source = source.expanduser().resolve()
    if not source.is_file():
        raise ImportFailed(f"--add-lora {source}: no such file")
    name = name if name is not None else source.stem
    if not loras.is_name(name):
        raise ImportFailed(
            f"the name {name!r} cannot be written in a request; pass --name NAME "
            f"({loras.NAME_RULE})"
        )
    target = loras.folder(repo) / f"{name}{loras.SUFFIX}"
    if target.exists():
        raise ImportFailed(f"{target} already exists; remove it first, or pass another --name")
    if not (repo / "model_index.json").is_file():
        raise ImportFailed(f"{repo} holds no model (model_index.json) to check the LoRA against")
    read_checkpoint_keys(source, allow_pickle, what="--add-lora")
    # Staged beside the repository's folders (the same file system, so the final rename is
    # atomic), in a hidden folder nothing reads.
    staging = Path(tempfile.mkdtemp(prefix=".add-lora-", dir=repo))
    try:
        staged = loras.folder(staging) / target.name  # named in messages as it will be
        staged.parent.mkdir()
        if source.suffix.lower() == loras.SUFFIX:
            shutil.copyfile(source, staged)
        else:
            save_file(load_pickle(source, "--add-lora"), staged)
        info, layers, size = check_against_model(staged, repo)
        target.parent.mkdir(exist_ok=True)
        if target.exists():  # appeared while checking
            raise ImportFailed(f"{target} already exists; remove it first")
        staged.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [
        f"added {target}",
        f"  made for         {info.family or 'this model (non-standard size)'}",
        f"  layers           {layers} ({size / 2**20:,.2f} MiB on the device in float32)",
        f"  A1111 hash       {info.short_hash}",
        "",
        "use it in a request:",
        f'  {{"inputs": "...", "parameters": {{"loras": {{"{name}": 0.8}}}}}}',
        f'  {{"inputs": "... <lora:{name}:0.8>"}}',
    ]


def check_against_model(path: Path, repo: Path):
    """Load the LoRA at ``path`` into ``repo``'s model as the endpoint does at start-up;
    returns its description, layer count and size, or raises ``ImportFailed``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from sd_endpoint import adapters, families

    try:
        info = loras.inspect(path)
        family = families.detect(repo)
        pipe = family.pipeline_class.from_pretrained(
            repo, use_safetensors=True, local_files_only=True, **family.load_options
        )
        adapters.check_family(pipe, info)
        layers = adapters.load(pipe, path, "added", BaseTunerLayer)
        adapters.check_layers(path, layers, info)
    except (loras.LoraFileError, families.UnsupportedModelError) as exc:
        raise ImportFailed(f"--add-lora: {exc}") from None
    return info, layers, adapters.adapter_bytes(pipe, "added", BaseTunerLayer)


# ---------------------------------------------------------------------------------------------
# Writing LoRAs in kohya's layout


def kohya_key(component: str, path: str, two_text_encoders: bool = False) -> str:
    """kohya's name for the LoRA of the layer at ``path`` (a module path) in ``component``."""
    if component == "unet":
        return "lora_unet_" + path.replace(".", "_")
    # Text encoders are named with transformers' `text_model.` level, which transformers 5.6
    # dropped from CLIPTextModel's modules; every reader expects it.
    path = path if path.startswith("text_model.") else f"text_model.{path}"
    prefix = {"text_encoder": "lora_te", "text_encoder_2": "lora_te2"}[component]
    if component == "text_encoder" and two_text_encoders:
        prefix = "lora_te1"
    return f"{prefix}_{path.replace('.', '_')}"


def typical_layers(pipe) -> list[tuple[str, str, object]]:
    """(component, module path, module) of each layer kohya's trainer adapts by default."""
    import torch

    found = []
    for component, blocks in (("unet", UNET_BLOCKS), ("text_encoder", TEXT_BLOCKS)):
        model = getattr(pipe, component)
        for block_path, block in model.named_modules():
            if type(block).__name__ not in blocks:
                continue
            for path, module in block.named_modules():
                linear = isinstance(module, torch.nn.Linear)
                pointwise = isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1)
                if path and (linear or pointwise):
                    found.append((component, f"{block_path}.{path}", module))
    return found


def random_lora(pipe, rank: int, seed: int = 0, strength: float = 1.0) -> dict:
    """A LoRA of random weights on ``typical_layers``, in kohya's layout, float16 as kohya saves
    them. ``strength`` scales how far each layer's output moves (1: by about its own size)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for component, path, module in typical_layers(pipe):
        weight = module.weight
        outputs, inputs = weight.shape[0], weight.shape[1]
        extra = (1, 1) if weight.dim() == 4 else ()
        down = torch.randn(rank, inputs, *extra, generator=generator) / inputs**0.5
        up = torch.randn(outputs, rank, *extra, generator=generator) * strength / rank**0.5
        key = kohya_key(component, path)
        tensors[f"{key}.lora_down.weight"] = down.half()
        tensors[f"{key}.lora_up.weight"] = up.half()
        tensors[f"{key}.alpha"] = torch.tensor(float(rank)).half()
    return tensors


def save_file(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file as save

    save({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def main(argv: list[str] | None = None) -> int:
    import diffusers
    import transformers

    args = parse_args(argv)
    repo = args.out.resolve()
    for library in (diffusers, transformers):  # notebook progress bars would bury the summary
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    try:
        for line in add_lora(args.add_lora, args.name, args.allow_pickle, repo):
            print(line)
    except ImportFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(f"nothing was changed in {repo}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
