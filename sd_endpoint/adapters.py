"""LoRA adapters: every file of ``loras/`` loaded once at start-up, chosen per request.

Each file is loaded with diffusers' adapter API (``load_lora_weights``, over peft), which wraps
every layer the LoRA adapts (in the UNet and the text encoders) in a peft ``LoraLayer`` that
holds the base layer and each adapter's two small matrices. A wrapper costs Python time on
every call even with no adapter active, so between requests the base layers go back where the
wrappers were: a request without LoRAs runs exactly the modules, and makes exactly the bytes,
that it did on a model that never had a LoRA. A request with LoRAs puts back the wrappers of
the layers its LoRAs adapt, activates its adapters at its weights (what diffusers'
``set_adapters`` does, layer by layer) and takes the wrappers out again when it is done. The
engine does this inside its generation lock, so concurrent requests each get their own.

A file is checked at start-up as the model's own weights are (``sd_endpoint.weights``): one
made for another model family, or with layers this model does not have, stops start-up with
a message naming it, rather than serving images that silently lack part of the LoRA.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch

from . import loras
from .loras import LoraFileError

log = logging.getLogger(__name__)

# The pipeline components that diffusers loads LoRA layers into.
ADAPTED = ("unet", "text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class _Wrapped:
    """One adapted layer: where it sits, its peft wrapper, and the adapters it holds."""

    parent: torch.nn.Module
    attribute: str
    wrapper: torch.nn.Module
    base: torch.nn.Module
    adapters: frozenset[str]


class Adapters:
    """The LoRAs of a model folder, loaded into ``pipe``; none active between requests."""

    def __init__(self, pipe, model_dir: str | Path):
        files = loras.find(model_dir)
        self.names: tuple[str, ...] = tuple(files)
        self.hashes: dict[str, str] = {}  # name -> A1111's short hash, for the image metadata
        self.sizes: dict[str, int] = {}  # name -> bytes of its matrices on the device
        self.load_seconds: dict[str, float] = {}  # name -> start-up time it took
        self._adapter = {name: f"lora_{i}" for i, name in enumerate(files)}  # peft's names
        self._wrapped: list[_Wrapped] = []
        if not files:
            return
        try:
            from peft.tuners.tuners_utils import BaseTunerLayer
        except ImportError:
            raise LoraFileError(
                f"{loras.FOLDER}/ holds {len(files)} LoRA file(s), which need the peft package "
                "(requirements.txt: peft>=0.15.1, which the endpoint's base image ships)"
            ) from None
        if not diffusers.utils.USE_PEFT_BACKEND:  # peft or transformers too old for diffusers
            raise LoraFileError(
                f"{loras.FOLDER}/ holds {len(files)} LoRA file(s), and diffusers "
                f"{diffusers.__version__} loads LoRAs only with a newer peft than the one "
                "installed (0.42 needs 0.17 or later): pip install --upgrade peft"
            )
        for name, path in files.items():
            started = time.perf_counter()
            info = loras.inspect(path)
            check_family(pipe, info)
            layers = load(pipe, path, self._adapter[name], BaseTunerLayer)
            check_layers(path, layers, info)
            self.hashes[name] = info.short_hash
            self.sizes[name] = adapter_bytes(pipe, self._adapter[name], BaseTunerLayer)
            self.load_seconds[name] = time.perf_counter() - started
            log.info(
                "LoRA %s: %d layers, %.2f MiB, loaded in %.2f s",
                name,
                layers,
                self.sizes[name] / 2**20,
                self.load_seconds[name],
            )
        self._wrapped = wrapped_layers(pipe, BaseTunerLayer)
        for layer in self._wrapped:
            setattr(layer.parent, layer.attribute, layer.base)

    @contextlib.contextmanager
    def active(self, weights: Mapping[str, float]) -> Iterator[None]:
        """Within the block, the LoRAs ``weights`` names (name -> weight) act on the model; a
        weight of 0 acts as if the LoRA were not named. Call with the generation lock held."""
        weights = {name: weight for name, weight in sorted(weights.items()) if weight != 0}
        unknown = [name for name in weights if name not in self._adapter]
        if unknown:
            raise ValueError(f"no such LoRA: {', '.join(unknown)}")
        adapters = {self._adapter[name]: weight for name, weight in weights.items()}
        chosen = [layer for layer in self._wrapped if layer.adapters & adapters.keys()]
        try:
            for layer in chosen:
                held = [adapter for adapter in adapters if adapter in layer.adapters]
                layer.wrapper.set_adapter(held)
                for adapter in held:
                    layer.wrapper.set_scale(adapter, adapters[adapter])
                setattr(layer.parent, layer.attribute, layer.wrapper)
            yield
        finally:
            for layer in chosen:
                setattr(layer.parent, layer.attribute, layer.base)


def check_family(pipe, info: loras.LoraFile) -> None:
    """Raise unless the file's layer widths fit this model's (SD 1.x, SD 2.x, SDXL differ)."""
    shown = f"{loras.FOLDER}/{info.path.name}"
    if info.second_text_encoder and getattr(pipe, "text_encoder_2", None) is None:
        raise LoraFileError(
            f"{shown} was made for SDXL (it adapts a second text encoder, which this model does "
            "not have); it cannot be used with this model"
        )
    cross = pipe.unet.config.cross_attention_dim
    if info.cross_width is not None and info.cross_width != cross:
        raise LoraFileError(
            f"{shown} was made for {loras.family_name(info.cross_width)}: its UNet attends to "
            f"{info.cross_width}-wide text embeddings, and this model's ({loras.family_name(cross)}"
            f") to {cross}-wide ones; it cannot be used with this model"
        )
    text = pipe.text_encoder.config.hidden_size
    if info.text_width is not None and info.text_width != text:
        raise LoraFileError(
            f"{shown} was made for another model: its text-encoder layers are {info.text_width} "
            f"wide, and this model's are {text}; it cannot be used with this model"
        )
    second = getattr(pipe, "text_encoder_2", None)
    width = second.config.hidden_size if second is not None else None
    if info.second_text_width is not None and info.second_text_width != width:
        raise LoraFileError(
            f"{shown} was made for another model: its second text encoder's layers are "
            f"{info.second_text_width} wide, and this model's are {width}; it cannot be used "
            "with this model"
        )


def load(pipe, path: Path, adapter: str, tuner_layer: type) -> int:
    """Load one LoRA file as ``adapter``; returns how many layers it adapts."""
    try:
        with _quiet():
            # weight_name explicitly: diffusers 0.33 looks the folder up on the Hub without it.
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter)
    except (ValueError, RuntimeError, KeyError, IndexError, AttributeError, OSError) as exc:
        raise LoraFileError(
            f"{loras.FOLDER}/{path.name} could not be loaded into this model: {_first_line(exc)}"
        ) from None
    return sum(
        1
        for module in _adapted_modules(pipe)
        for layer in module.modules()
        if isinstance(layer, tuner_layer) and adapter in _held(layer)
    )


def check_layers(path: Path, layers: int, info: loras.LoraFile) -> None:
    """Raise unless every LoRA layer of the file found its layer (diffusers skips, with a
    warning at most, those naming a layer the model lacks)."""
    if layers < info.layers:
        raise LoraFileError(
            f"{loras.FOLDER}/{path.name}: only {layers} of its {info.layers} LoRA layers match a "
            "layer of this model; the others name layers it does not have (is it made for "
            "another model?)"
        )


def adapter_bytes(pipe, adapter: str, tuner_layer: type) -> int:
    total = 0
    for module in _adapted_modules(pipe):
        for layer in module.modules():
            if isinstance(layer, tuner_layer) and adapter in _held(layer):
                for name, param in layer.named_parameters():
                    if f".{adapter}." in f".{name}.":
                        total += param.numel() * param.element_size()
    return total


def wrapped_layers(pipe, tuner_layer: type) -> list[_Wrapped]:
    found = []
    for module in _adapted_modules(pipe):
        for name, layer in module.named_modules():
            if isinstance(layer, tuner_layer):
                parent, _, attribute = name.rpartition(".")
                found.append(
                    _Wrapped(
                        module.get_submodule(parent),
                        attribute,
                        layer,
                        layer.get_base_layer(),
                        frozenset(_held(layer)),
                    )
                )
    return found


def _adapted_modules(pipe) -> list[torch.nn.Module]:
    return [m for m in (getattr(pipe, name, None) for name in ADAPTED) if m is not None]


def _held(layer) -> set[str]:
    return set(getattr(layer, "lora_A", {})) | set(getattr(layer, "lora_embedding_A", {}))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """diffusers' loaders warn of components a LoRA leaves alone ("No LoRA keys associated to
    CLIPTextModel ... safe to ignore") and peft of loading a second adapter: both expected
    here, where the checks above say what matters."""
    loader_log = logging.getLogger("diffusers.loaders")
    level = loader_log.level
    loader_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        loader_log.setLevel(level)


def _first_line(exc: BaseException) -> str:
    # torch's "Error(s) in loading state_dict for ...:" says what is wrong on the next line.
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = " ".join(lines[:2]) if lines and lines[0].endswith(":") else "".join(lines[:1])
    return (text or type(exc).__name__)[:400]
