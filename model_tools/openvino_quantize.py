"""Hybrid int8 for an exported UNet: OpenVINO's own recipe for Stable Diffusion on a CPU.

    python -m model_tools.openvino_export --model-dir DIR     # nncf: requirements-cpu.txt

What it does, as optimum-intel's "hybrid quantization" does: the weights of every linear layer
are stored in int8 (one scale and zero point per output channel) and expanded when they are
used, and every convolution computes in int8, weights and inputs, from input ranges measured
on real UNet calls; attention and normalisation stay in the float precision the engine picks.
On a CPU with AMX the int8 convolutions run on its int8 tiles. It is lossy: the UNet's output
moves by a few percent, measured with ``model_tools.precision --openvino`` and the evaluation
(docs/performance.md).

The input ranges come from the folder's own pipeline: a few prompts denoised with its own
scheduler in float32 PyTorch, every UNet call's inputs kept (``CALIBRATION_PROMPTS`` x
``CALIBRATION_STEPS``, batch 2 with guidance, as the endpoint calls it).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

# Varied subjects, styles and lengths; calibration needs typical activations, not pictures.
CALIBRATION_PROMPTS = (
    "a photograph of an astronaut riding a horse on the moon",
    "a watercolour painting of a lighthouse on a cliff at sunset, soft light",
    "portrait of an old fisherman, detailed face, studio lighting, 85mm",
    "a red circle on a blue background",
)
CALIBRATION_STEPS = 10
RECIPE = "hybrid int8: linear layers' weights in int8, convolutions in int8"
# Kept in float: the first and last convolutions, which read and write the latents themselves.
FLOAT_LAYERS = (r".*\.conv_in/.*", r".*\.conv_out/.*")


def nncf_missing() -> str | None:
    """Why an int8 UNet cannot be made here, or None."""
    if importlib.util.find_spec("nncf") is None:
        return (
            "an int8 UNet needs the nncf package: pip install -r requirements-cpu.txt "
            "(or export the UNet unquantized: --unet float)"
        )
    return None


def calibration_inputs(model_dir: Path, unet, vae) -> list[list[np.ndarray]]:
    """The UNet's inputs (sample, timestep, text states) at every call of a few requests."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        model_dir,
        unet=unet,
        vae=vae,
        safety_checker=None,
        requires_safety_checker=False,
        use_safetensors=True,
        local_files_only=True,
    )
    pipe.set_progress_bar_config(disable=True)
    calls: list[list[np.ndarray]] = []

    def keep(_module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        states = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        calls.append(
            [
                sample.detach().float().numpy().copy(),
                torch.as_tensor(timestep).reshape(1).float().numpy(),
                states.detach().float().numpy().copy(),
            ]
        )

    hook = unet.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.inference_mode():
            for seed, prompt in enumerate(CALIBRATION_PROMPTS):
                pipe(
                    prompt,
                    num_inference_steps=CALIBRATION_STEPS,
                    guidance_scale=7.5,
                    generator=torch.Generator().manual_seed(seed),
                    output_type="latent",
                )
    finally:
        hook.remove()
    return calls


def weighted_matmuls(model) -> list[str]:
    """The linear layers: MatMuls whose second input is a constant (possibly converted)."""
    names = []
    for op in model.get_ops():
        if op.get_type_name() != "MatMul":
            continue
        weight = op.input_value(1).get_node()
        while weight.get_type_name() in ("Convert", "Multiply", "Subtract", "Reshape"):
            weight = weight.input_value(0).get_node()
        if weight.get_type_name() == "Constant":
            names.append(op.get_friendly_name())
    return names


def quantize_unet(model, calls: list[list[np.ndarray]]):
    """``model`` (an OpenVINO UNet) with int8 linear weights and int8 convolutions."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    linear = weighted_matmuls(model)
    compressed = nncf.compress_weights(
        model,
        mode=nncf.CompressWeightsMode.INT8_ASYM,
        ignored_scope=nncf.IgnoredScope(types=["Convolution"]),
    )
    return nncf.quantize(
        compressed,
        nncf.Dataset(calls),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(calls),
        # Linear layers keep float inputs (their weights are already int8 above); attention's
        # matrix products have no weights and are left alone too.
        ignored_scope=nncf.IgnoredScope(names=linear, patterns=list(FLOAT_LAYERS), validate=False),
        advanced_parameters=AdvancedQuantizationParameters(smooth_quant_alpha=-1),
    )
