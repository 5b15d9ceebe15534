"""The UNet and the VAE decoder on OpenVINO's CPU runtime, at the warm-up sizes.

On an AMX Xeon OpenVINO ran SD 1.5's UNet step 1.22x and its VAE decode 1.35x faster than
PyTorch's best path there (bfloat16, channels-last; torch 2.13), and 1.55x / 1.83x faster than
the base image's torch 2.5.1 (docs/performance.md). A model folder carries an export of the two
(``openvino/``, written by ``python -m model_tools.openvino_export``); where it does, the
``openvino`` package is installed and the engine runs on a CPU, this serves them:

* each is compiled for static shapes, the only ones it meets during warm-up (SD_WARMUP), as
  OpenVINO is fastest with static shapes and a compile takes seconds, not minutes;
* a call with any other shape (another size, a batch, a prompt longer than one chunk, guidance
  off) goes to the PyTorch module instead, as do calls with extra conditioning: every request
  field keeps working, and none waits for a compile;
* the rest of a request (prompt encoding, the sampler, seeds, metadata) never leaves PyTorch.

``SD_OPENVINO=off`` ignores an export. An export made from other weights than the folder's
(``export.json`` records their SHA-256) is ignored with a warning rather than served.
"""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

EXPORT_DIR = "openvino"
EXPORTED = ("unet", "vae_decoder")  # the networks in it
WEIGHTED = ("unet", "vae")  # the folders whose weights they are made from


def load(model_dir: Path, setting: str, device: torch.device, dtype: torch.dtype, threads: int):
    """The folder's OpenVINO export, ready to compile in the engine's precision (bfloat16 or
    float32, as SD_DTYPE chose), or None where it is not to be used."""
    export = model_dir / EXPORT_DIR
    if setting == "off" or device.type != "cpu" or not (export / "export.json").is_file():
        return None
    record = json.loads((export / "export.json").read_text())
    try:
        import openvino
    except ImportError:
        log.warning(
            "%s carries an OpenVINO export, but the openvino package is not installed: serving "
            "with PyTorch (add openvino==%s to requirements.txt to use it)",
            model_dir,
            record.get("openvino", "<version>"),
        )
        return None
    if weights_digest(model_dir) != record.get("weights"):
        log.warning(
            "%s: the OpenVINO export was made from other weights than the folder's; serving "
            "with PyTorch (python -m model_tools.openvino_export writes it again)",
            model_dir,
        )
        return None
    models = OpenVINOModels(openvino, export, dtype, threads)
    models.unet_weights = record.get("unet", "float")
    log.info(
        "serving the UNet (%s) and the VAE decoder with OpenVINO %s (%s) at the SD_WARMUP sizes",
        models.unet_weights,
        record.get("openvino"),
        models.precision,
    )
    return models


def weight_files(model_dir: Path, component: str) -> list[Path]:
    """The safetensors files the engine loads for ``component`` (not an fp16 variant)."""
    files = sorted((model_dir / component).glob("*.safetensors"))
    return [f for f in files if ".fp16." not in f.name] or files


def weights_digest(model_dir: Path) -> dict[str, str]:
    """SHA-256 of every weights file of the UNet and the VAE, by path in the folder."""
    digests = {}
    for component in WEIGHTED:
        for file in weight_files(model_dir, component):
            sha = hashlib.sha256()
            with file.open("rb") as handle:
                while chunk := handle.read(1 << 24):
                    sha.update(chunk)
            digests[file.relative_to(model_dir).as_posix()] = sha.hexdigest()
    return digests


class OpenVINOModels:
    """The exported UNet and decoder, compiled per input shape while compiling is allowed."""

    def __init__(self, openvino, export: Path, dtype: torch.dtype, threads: int):
        self.core = openvino.Core()
        self.precision = "bf16" if dtype == torch.bfloat16 else "f32"
        self.unet_weights = "float"  # or the int8 recipe the export used (export.json)
        self.config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": self.precision}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = threads
        self._networks = {
            name: self.core.read_model(export / name / "openvino_model.xml") for name in EXPORTED
        }
        self._compiled: dict[tuple, object] = {}
        self._compiling = False

    @contextmanager
    def compiling(self):
        """Within the block (the warm-up), a shape met for the first time is compiled; after
        it, the exported networks are let go (their memory with them): no more compiling."""
        self._compiling = True
        try:
            yield
        finally:
            self._compiling = False
            self._networks = {}

    def run(self, name: str, inputs: list[np.ndarray]) -> np.ndarray | None:
        """The network's output for ``inputs``, or None where no compiled model fits them."""
        key = (name, *(array.shape for array in inputs))
        compiled = self._compiled.get(key)
        if compiled is None:
            if not self._compiling:
                return None
            network = self._networks[name].clone()
            network.reshape({i: list(array.shape) for i, array in enumerate(inputs)})
            compiled = self._compiled[key] = self.core.compile_model(network, "CPU", self.config)
        return compiled(inputs)[0]

    def unet(self, eager) -> StaticShapeUNet:
        return StaticShapeUNet(self, eager)

    def vae(self, eager) -> StaticShapeVAE:
        return StaticShapeVAE(self, eager)


class _Delegating:
    """Everything but the call is the PyTorch module's (config, dtype, device...)."""

    def __init__(self, models: OpenVINOModels, eager):
        self._models = models
        self._eager = eager

    def __getattr__(self, name):
        return getattr(self._eager, name)


class StaticShapeUNet(_Delegating):
    def __call__(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        return_dict = kwargs.get("return_dict", True)
        extra = args or any(v is not None for k, v in kwargs.items() if k != "return_dict")
        step = torch.as_tensor(timestep)
        output = None
        if not extra and step.numel() == 1:
            output = self._models.run(
                "unet",
                [
                    _numpy(sample),
                    step.reshape(1).to(torch.float32).numpy(),
                    _numpy(encoder_hidden_states),
                ],
            )
        if output is None:
            return self._eager(sample, timestep, encoder_hidden_states, *args, **kwargs)
        result = torch.from_numpy(output).to(sample.device, sample.dtype)
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=result)
        return (result,)


class StaticShapeVAE(_Delegating):
    def decode(self, latents, return_dict=True, **kwargs):
        output = None if kwargs else self._models.run("vae_decoder", [_numpy(latents)])
        if output is None:
            return self._eager.decode(latents, return_dict=return_dict, **kwargs)
        decoded = torch.from_numpy(output).to(latents.device, latents.dtype)
        if return_dict:
            from diffusers.models.autoencoders.vae import DecoderOutput

            return DecoderOutput(sample=decoded)
        return (decoded,)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32).contiguous().numpy()
