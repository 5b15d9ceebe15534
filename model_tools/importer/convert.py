"""Loading the source into one diffusers pipeline: a single file converted by diffusers with its
family's configs, a folder read from its safetensors; then the prediction type and native size
settled.

The pipeline is loaded in the dtype it is written in (``--dtype``), not in float32 first: an
fp16 source written as fp16 keeps its exact bits either way, and its tensors then stay the
memory-mapped ones of the source file instead of a float32 copy twice its size (an SDXL file
is 6.9 GB in fp16; in float32 its pipeline alone would take 14 GB).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from model_tools import families
from model_tools.families import Family

from .edit import card_base_model
from .plan import ImportFailed, Plan, first_line
from .sources import (
    PICKLE_SUFFIXES,
    SAFETENSORS,
    check_folder,
    download,
    to_safetensors,
    weights_in,
)
from .write import write_tokenizer_files


def load_source(plan: Plan, staging: Path):
    """The pipeline, and a folder holding each of its tokenizers' files (by tokenizer name)."""
    if plan.kind == "hub":
        plan.source = str(download(plan.source, staging / "download"))
        plan.family, plan.standard_sizes = check_folder(Path(plan.source), plan.allow_pickle)
        plan.kind = "folder"
    if plan.kind == "single-file":
        pipe, tokenizers = load_single_file(plan, staging)
    else:
        pipe, tokenizers = load_folder(Path(plan.source), staging, plan)
        plan.base_model = plan.base_model or card_base_model(Path(plan.source))
    settle_prediction_type(pipe, plan)
    return pipe, tokenizers


def load_single_file(plan: Plan, staging: Path):
    import diffusers
    import torch
    from transformers import CLIPTokenizer

    family = plan.family
    path = Path(plan.source)
    if path.suffix.lower() in PICKLE_SUFFIXES or plan.has_ema:
        # One safetensors file with the UNet weights chosen (regular or EMA) and no
        # model_ema.* copies, so the conversion cannot pick the other set.
        path = to_safetensors(path, staging / "source.safetensors", ema=plan.ema)
    tokenizers = staging / "config-tokenizers"
    for encoder in family.text_encoders:
        write_tokenizer_files(plan.config / encoder.tokenizer, tokenizers / encoder.tokenizer)
    try:
        pipe = getattr(diffusers, family.pipeline_class).from_single_file(
            str(path),
            config=str(plan.config),
            local_files_only=True,
            torch_dtype=getattr(torch, plan.dtype),
            **{
                encoder.tokenizer: CLIPTokenizer.from_pretrained(tokenizers / encoder.tokenizer)
                for encoder in family.text_encoders
            },
            **dict.fromkeys(family.unused_components),
            **family.pipeline_options,
        )
    except (ValueError, RuntimeError, KeyError, OSError) as exc:
        raise ImportFailed(
            f"SOURCE {path.name} could not be converted with the "
            f"{plan.family_name} configs in {plan.config}: {first_line(exc)}"
        ) from None
    # The single file's keys were checked complete; the conversion must have used them.
    verify_source_components(pipe, family)
    return pipe, tokenizers


def load_folder(folder: Path, staging: Path, plan: Plan):
    """A diffusers folder's components, read from safetensors (the fp16 variant where present)."""
    import diffusers
    import torch
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers import schedulers as diffusers_schedulers
    from transformers import CLIPTokenizer

    family = plan.family
    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}
    for encoder in family.text_encoders:
        classes[encoder.component] = getattr(transformers, encoder.model_class)
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
                    stem = "model" if name in family.text_components else "diffusion_pytorch_model"
                    to_safetensors(pickle, part / f"{stem}{SAFETENSORS}")
                    break
            files, variant = weights_in(part)
        kwargs = {"variant": variant} if variant else {}
        try:
            modules[name] = cls.from_pretrained(
                part,
                use_safetensors=True,
                local_files_only=True,
                torch_dtype=getattr(torch, plan.dtype),
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
    tokenizers = staging / "source-tokenizers"
    for encoder in family.text_encoders:
        write_tokenizer_files(folder / encoder.tokenizer, tokenizers / encoder.tokenizer)
    pipe = getattr(diffusers, family.pipeline_class)(
        **modules,
        **{
            encoder.tokenizer: CLIPTokenizer.from_pretrained(tokenizers / encoder.tokenizer)
            for encoder in family.text_encoders
        },
        scheduler=scheduler_cls.from_config(scheduler_config),
        **dict.fromkeys(family.unused_components),
        **family.pipeline_options,
    )
    return pipe, tokenizers


def check_module(name: str, module, files: list[Path]) -> None:
    from sd_endpoint.weights import WeightsNotLoadedError, check_component

    try:
        check_component(name, module, files[0].parent, files)
    except WeightsNotLoadedError as exc:
        raise ImportFailed(f"SOURCE: {exc}") from None


def verify_source_components(pipe, family: Family) -> None:
    """A conversion that left a component's parameters uninitialised shows as NaN or meta."""
    for name in family.components:
        for param_name, param in getattr(pipe, name).named_parameters():
            if param.is_meta:
                raise ImportFailed(f"SOURCE: the `{name}` parameter {param_name} was not converted")


def settle_prediction_type(pipe, plan: Plan) -> None:
    """The scheduler set to predict what the plan says (the source's own if it says nothing),
    with the plan's other scheduler settings, and a single file's native size the one its
    family's models have for that prediction."""
    scheduler_type = pipe.scheduler.config.get("prediction_type", "epsilon")
    if plan.prediction_type is None:
        plan.prediction_type = scheduler_type
        plan.prediction_said = plan.prediction_said or (
            " (the source's own)" if plan.kind == "folder" else f" (from {plan.config})"
        )
    scheduler_cls = type(pipe.scheduler)
    unknown = set(plan.scheduler_options) - set(scheduler_cls._get_init_keys(scheduler_cls))
    if unknown:
        raise ImportFailed(
            f"the scheduler {scheduler_cls.__name__} of {plan.config} has no "
            f"{', '.join(sorted(unknown))}, which the file's marker keys ask for; give a "
            "--config whose scheduler has (EulerDiscreteScheduler, as SDXL's, does)"
        )
    if plan.prediction_type != scheduler_type or plan.scheduler_options:
        pipe.scheduler = scheduler_cls.from_config(
            pipe.scheduler.config, prediction_type=plan.prediction_type, **plan.scheduler_options
        )
    shipped = families.of_config(plan.config) if plan.kind == "single-file" else None
    pixels = shipped.native_sizes.get(plan.prediction_type) if shipped else None
    if pixels:  # a user's --config says its own size
        size = pixels // pipe.vae_scale_factor
        pipe.unet.register_to_config(sample_size=size)
        pipe.vae.register_to_config(sample_size=size * pipe.vae_scale_factor)
