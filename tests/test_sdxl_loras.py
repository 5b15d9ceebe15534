"""LoRAs on an SDXL model: the UNet and both text encoders switched per request.

The LoRAs are made with peft on the tiny SDXL model (model_tools/tiny_sdxl.py) and saved the
ways people share them: diffusers' format (``save_lora_weights``, as diffusers' SDXL training
scripts write it) over the UNet and both encoders, one over the second encoder alone, and
kohya's layout (``lora_te1_``/``lora_te2_``) over both encoders. tests/test_loras.py covers the
rest of the LoRA behaviour on the shipped SD model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import save_file

from sd_endpoint.loader import load_handler
from tests.conftest import decode_image

REQUEST = {"inputs": "a red circle on a white background", "seed": 11, "num_inference_steps": 3}
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def peft_states(folder: Path, components: dict[str, list[str]], seed: int) -> dict[str, dict]:
    """Rank-4 LoRA weights for ``components`` (name -> target layers) of the model in
    ``folder``, random (not the zero start peft trains from), as peft names them."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    torch.manual_seed(seed)
    states = {}
    for name, targets in components.items():
        config = LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False)
        module = inject_adapter_in_model(config, getattr(pipe, name))
        states[name] = {k: v * 0.5 for k, v in get_peft_model_state_dict(module).items()}
    return states


def save_diffusers_lora(states: dict[str, dict], path: Path) -> None:
    from diffusers.utils import convert_state_dict_to_diffusers

    StableDiffusionXLPipeline.save_lora_weights(
        path.parent,
        weight_name=path.name,
        **{
            f"{name}_lora_layers": convert_state_dict_to_diffusers(state)
            for name, state in states.items()
        },
    )


def save_kohya_lora(states: dict[str, dict], path: Path) -> None:
    """Text-encoder LoRA layers under kohya's SDXL names: lora_te1_ (CLIP-L), lora_te2_ (bigG)."""
    prefixes = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    tensors = {}
    for component, state in states.items():
        for key, tensor in state.items():
            module, _, part = key.partition(".lora_")
            if not module.startswith("text_model."):
                module = "text_model." + module  # transformers >= 5.6 names drop the prefix
            name = prefixes[component] + module.replace(".", "_")
            tensors[f"{name}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = tensor
            tensors[f"{name}.alpha"] = torch.tensor(4.0)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


@pytest.fixture(scope="module")
def lora_folder(sdxl_folder, tmp_path_factory) -> Path:
    """The tiny SDXL model, linked, with three LoRAs in its loras/."""
    folder = tmp_path_factory.mktemp("sdxl-loras") / "repo"
    folder.mkdir()
    for part in sdxl_folder.iterdir():
        (folder / part.name).symlink_to(part.resolve() if part.is_symlink() else part)
    loras = folder / "loras"
    loras.mkdir()
    everything = {"unet": UNET_TARGETS, "text_encoder": TEXT_TARGETS}
    everything["text_encoder_2"] = TEXT_TARGETS
    save_diffusers_lora(peft_states(sdxl_folder, everything, 1), loras / "whole.safetensors")
    bigg = {"text_encoder_2": TEXT_TARGETS}
    save_diffusers_lora(peft_states(sdxl_folder, bigg, 2), loras / "bigg.safetensors")
    texts = {"text_encoder": TEXT_TARGETS, "text_encoder_2": TEXT_TARGETS}
    save_kohya_lora(peft_states(sdxl_folder, texts, 3), loras / "kohya-text.safetensors")
    return folder


@pytest.fixture(scope="module")
def served(lora_folder):
    return load_handler(lora_folder)


def pixels(handler, body: dict) -> np.ndarray:
    return np.asarray(decode_image(handler(body)["image"]), dtype=np.int16)


def lora_layers(handler) -> dict[str, int]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = handler.engine.pipe
    return {
        name: sum(isinstance(m, BaseTunerLayer) for m in getattr(pipe, name).modules())
        for name in ("unet", "text_encoder", "text_encoder_2")
    }


def test_each_lora_loads_and_switches_its_layers_in_both_text_encoders(served, sdxl_handler):
    assert served.engine.adapters.names == ("bigg", "kohya-text", "whole")
    wrapped = {}
    for layer in served.engine.adapters._wrapped:  # what a request can switch in
        for name in ("unet", "text_encoder", "text_encoder_2"):
            if any(m is layer.parent for m in getattr(served.engine.pipe, name).modules()):
                wrapped[name] = wrapped.get(name, 0) + 1
    # The tiny UNet has 4 transformer blocks (down, mid, 2 up) of 2 attentions, 4 layers each;
    # the encoders 4 attention layers per encoder layer (3 in CLIP-L, 4 in bigG).
    assert wrapped == {"unet": 32, "text_encoder": 12, "text_encoder_2": 16}
    seen = []
    hook = served.engine.pipe.text_encoder_2.register_forward_hook(
        lambda *args: seen.append(lora_layers(served)["text_encoder_2"])
    )
    try:
        served({**REQUEST, "loras": {"bigg": 1}})
    finally:
        hook.remove()
    assert seen == [16]  # in while the encoder ran (once: the absent negative is zeros)
    assert lora_layers(served) == {"unet": 0, "text_encoder": 0, "text_encoder_2": 0}
    # A request without LoRAs makes the bytes of the model without any.
    assert served(REQUEST)["image"] == sdxl_handler(REQUEST)["image"]


@pytest.mark.parametrize("name", ["whole", "bigg", "kohya-text"])
def test_each_lora_changes_the_image_and_weight_0_does_not(served, name):
    base = pixels(served, REQUEST)
    assert not np.array_equal(pixels(served, {**REQUEST, "loras": {name: 1}}), base)
    assert np.array_equal(pixels(served, {**REQUEST, "loras": {name: 0}}), base)


def diffusers_pixels(folder: Path, name: str, weight: float, body: dict) -> np.ndarray:
    """The image diffusers' own SDXL pipeline makes with the LoRA ``name`` set to ``weight``."""
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(
        str(folder / "loras"), weight_name=f"{name}.safetensors", adapter_name=name
    )
    pipe.set_adapters([name], adapter_weights=[weight])
    with torch.inference_mode():
        out = pipe(
            body["inputs"],
            num_inference_steps=body["num_inference_steps"],
            guidance_scale=7.5,
            generator=[torch.Generator("cpu").manual_seed(body["seed"])],
            output_type="np",
        ).images[0]
    return (out * 255).round().astype(np.int16)


@pytest.mark.parametrize(("name", "weight"), [("whole", 0.7), ("bigg", -1.0)])
def test_a_lora_at_weight_w_gives_the_image_of_diffusers_own_pipeline(
    lora_folder, monkeypatch, name, weight
):
    monkeypatch.setenv("SD_CHANNELS_LAST", "0")  # diffusers' own memory layout: the same bytes
    monkeypatch.setenv("SD_WARMUP", "")
    contiguous = load_handler(lora_folder)
    expected = diffusers_pixels(lora_folder, name, weight, REQUEST)
    assert np.array_equal(pixels(contiguous, {**REQUEST, "loras": {name: weight}}), expected)
    assert not np.array_equal(pixels(contiguous, REQUEST), expected)


def test_a_lora_for_a_wider_second_text_encoder_is_refused_naming_both_widths(
    sdxl_folder, tmp_path
):
    folder = tmp_path / "repo"
    folder.mkdir()
    for part in sdxl_folder.iterdir():
        (folder / part.name).symlink_to(part.resolve() if part.is_symlink() else part)
    (folder / "loras").mkdir()
    layer = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"  # SDXL base's bigG: 1280
    tensors = {
        f"{layer}.lora_down.weight": torch.randn(4, 1280),
        f"{layer}.lora_up.weight": torch.randn(1280, 4),
        f"{layer}.alpha": torch.tensor(4.0),
    }
    save_file(tensors, str(folder / "loras" / "base-sized.safetensors"))
    with pytest.raises(RuntimeError) as caught:
        load_handler(folder)
    assert str(caught.value) == (
        "loras/base-sized.safetensors was made for another model: its second text encoder's "
        "layers are 1280 wide, and this model's are 64; it cannot be used with this model"
    )
