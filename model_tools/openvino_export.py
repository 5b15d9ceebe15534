"""Prepare a model folder for CPU serving: its UNet and VAE decoder as OpenVINO models.

    pip install -r requirements-cpu.txt                    # beside torch and diffusers
    python -m model_tools.openvino_export --model-dir DIR  # DIR/openvino/: int8 UNet
    python -m model_tools.openvino_export --model-dir DIR --unet float  # the UNet unquantized

The importer does the same after an import with ``--openvino`` (``--openvino-unet float``).

The handler serves the UNet and the VAE decoder of a folder that carries ``openvino/`` with
OpenVINO's CPU runtime at the SD_WARMUP sizes (sd_endpoint/openvino_engine.py), where the
``openvino`` package is installed; everything else about a request stays as it is. This
writes, from the folder's own safetensors weights (in float32: OpenVINO picks the precision
when it compiles, bfloat16 on CPUs with AMX or AVX-512 BF16):

* ``openvino/unet/openvino_model.xml`` (+ ``.bin``): inputs sample, timestep (float, one
  value) and encoder_hidden_states, any batch, size and length; by default in OpenVINO's
  hybrid int8 (model_tools.openvino_quantize: int8 convolutions and linear weights, 1.17x
  faster than the float UNet on a CPU with AMX, half its size, calibrated on the folder's own
  pipeline: ~20 min for SD 1.5 on 2 vCPUs), or with ``--unet float`` unquantized (weights
  stored as float16, ~2 min);
* ``openvino/vae_decoder/openvino_model.xml``: latents (already divided by the VAE's scaling
  factor) to the decoded image in [-1, 1];
* ``openvino/export.json``: the OpenVINO version, the UNet's quantization, and the SHA-256 of
  every weights file the export was made from, so that the handler never serves an export of
  other weights;
* one line, ``openvino==<version>``, added to the folder's ``requirements.txt`` if it has one:
  the endpoint then installs the runtime at start-up. A GPU deployment of a folder without
  the export installs nothing more.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sd_endpoint.engine import _dtype_argument
from sd_endpoint.openvino_engine import EXPORT_DIR, weights_digest

UNET_WEIGHTS = ("int8", "float")
REQUIREMENT_COMMENT = (
    "# OpenVINO's CPU runtime for the export in openvino/ (model_tools.openvino_export)"
)


class UNetForExport(torch.nn.Module):
    """The UNet as a function of its three tensors, the only inputs an SD 1.x/2.x pipeline
    gives it; a model with more conditioning is refused before converting."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class DecoderForExport(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


def export(model_dir: Path, unet: str = "int8") -> dict:
    """Write ``model_dir/openvino/`` with the UNet in ``unet`` (one of UNET_WEIGHTS); returns
    what was written and how long it took."""
    import openvino

    from model_tools import openvino_quantize

    if unet not in UNET_WEIGHTS:
        raise ValueError(f"unet={unet!r} is not one of {', '.join(UNET_WEIGHTS)}")
    int8 = unet == "int8"
    if int8 and (missing := openvino_quantize.nncf_missing()):
        raise SystemExit(missing)
    from diffusers import AutoencoderKL, UNet2DConditionModel

    started = time.perf_counter()
    load = {"use_safetensors": True, "local_files_only": True, **_dtype_argument(torch.float32)}
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", **load).eval()
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", **load).eval()
    config = unet.config
    if config.addition_embed_type or config.class_embed_type or config.time_cond_proj_dim:
        raise SystemExit(
            f"{model_dir}: this UNet takes more conditioning than sample, timestep and text "
            "(an SDXL-style model?); only SD 1.x/2.x UNets are exported"
        )
    out = model_dir / EXPORT_DIR
    calls = openvino_quantize.calibration_inputs(model_dir, unet, vae) if int8 else None
    side = config.sample_size
    examples = {
        "unet": (
            UNetForExport(unet),
            (
                torch.randn(2, config.in_channels, side, side),
                torch.tensor([999.0]),
                torch.randn(2, 77, config.cross_attention_dim),
            ),
            [
                openvino.PartialShape([-1, config.in_channels, -1, -1]),
                openvino.PartialShape([1]),
                openvino.PartialShape([-1, -1, config.cross_attention_dim]),
            ],
        ),
        "vae_decoder": (
            DecoderForExport(vae),
            (torch.randn(1, vae.config.latent_channels, side, side),),
            [openvino.PartialShape([-1, vae.config.latent_channels, -1, -1])],
        ),
    }
    for name, (module, example, shapes) in examples.items():
        with torch.no_grad():
            converted = openvino.convert_model(module, example_input=example, input=shapes)
        if name == "unet" and calls:
            converted = openvino_quantize.quantize_unet(converted, calls)
        (out / name).mkdir(parents=True, exist_ok=True)
        openvino.save_model(converted, out / name / "openvino_model.xml")
        del converted
    version = openvino.__version__.split("-")[0]
    record = {
        "openvino": version,
        "unet": openvino_quantize.RECIPE if int8 else "float",
        "weights": weights_digest(model_dir),
    }
    (out / "export.json").write_text(json.dumps(record, indent=2) + "\n")
    requirement = add_requirement(model_dir, f"openvino=={version}")
    return {
        "folder": out,
        "seconds": time.perf_counter() - started,
        "requirement": requirement,
        "version": version,
    }


def add_requirement(model_dir: Path, line: str) -> Path | None:
    """``line`` added to the folder's requirements.txt (once); None where it has none."""
    requirements = model_dir / "requirements.txt"
    if not requirements.is_file():
        return None
    text = requirements.read_text()
    if any(row.split("=")[0].strip() == "openvino" for row in text.splitlines()):
        return requirements
    requirements.write_text(text.rstrip("\n") + f"\n{REQUIREMENT_COMMENT}\n{line}\n")
    return requirements


def drop_requirement(model_dir: Path) -> None:
    """The lines add_requirement wrote, taken out of the folder's requirements.txt again."""
    requirements = model_dir / "requirements.txt"
    if not requirements.is_file():
        return
    lines = requirements.read_text().splitlines()
    kept = [
        line
        for line in lines
        if line != REQUIREMENT_COMMENT and line.split("=")[0].strip() != "openvino"
    ]
    if kept != lines:
        requirements.write_text("\n".join(kept) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path("."))
    parser.add_argument(
        "--unet",
        choices=UNET_WEIGHTS,
        default="int8",
        help="int8 (default): OpenVINO's hybrid int8, calibrated on the folder's own pipeline "
        "(needs nncf); float: unquantized, the float export's images within rounding of "
        "PyTorch's (docs/performance.md has both measured)",
    )
    args = parser.parse_args(argv)
    result = export(args.model_dir.resolve(), unet=args.unet)
    print(f"wrote {result['folder']} in {result['seconds']:.0f} s")
    if result["requirement"]:
        print(f"{result['requirement']} asks for OpenVINO's runtime")
    else:
        print("no requirements.txt here: the endpoint's repository must ask for openvino")


if __name__ == "__main__":
    main()
