"""Changing the model on its way: another VAE, LoRAs fused into the weights, and the model
card's front matter (kept, and completed for the Hub)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from model_tools.families import Family

from .plan import ImportFailed, Lora, Plan, first_line
from .sources import PICKLE_SUFFIXES, to_safetensors

# Key prefixes only the original (CompVis) VAE layout has; diffusers says down_blocks/up_blocks.
ORIGINAL_VAE_MARKERS = ("first_stage_model.", "encoder.down.", "decoder.up.", "encoder.mid.")


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


def fuse_lora(pipe, family: Family, lora: Lora, staging: Path, index: int) -> str:
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
    trained = ("unet", *family.text_components)  # what LoRAs adapt
    before = {
        (name, key): param.detach().flatten()[:16].clone()
        for name in trained
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
    for name in trained:
        for key, param in getattr(pipe, name).named_parameters():
            old = before.get((name, key))
            if old is not None and not torch.equal(old, param.detach().flatten()[:16]):
                changed[name] = changed.get(name, 0) + 1
    if not changed:
        raise ImportFailed(
            f"--lora {lora.path.name} matched none of this model's layers (its keys fit "
            f"neither the UNet nor the text encoders; is it for a model family other than "
            f"{family.name}?)"
        )
    parts = ", ".join(f"{n} {name}" for name, n in changed.items())
    return f"{lora.path.name} at scale {lora.scale:g}: {parts} weights changed"


# ---------------------------------------------------------------------------------------------
# The model card


def write_card(target: Path, out: Path, plan: Plan) -> None:
    """The model card: ``out``'s own, its front matter completed for the Hub."""
    readme = out / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    meta, body = split_front_matter(text)
    meta.setdefault("license", plan.family.license)
    tags = list(meta.get("tags") or [])
    for tag in plan.family.card_tags:
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


def card_base_model(folder: Path) -> str | None:
    readme = folder / "README.md"
    if readme.is_file():
        meta, _ = split_front_matter(readme.read_text(encoding="utf-8"))
        base = meta.get("base_model")
        if isinstance(base, str):
            return base
    return None
