"""A folder exported for OpenVINO (model_tools.openvino_export): its UNet and VAE decoder run on
OpenVINO at the warm-up sizes, everything else on PyTorch, with the same images.

The tests that run OpenVINO need the ``openvino`` package, which the endpoint installs only
for a folder prepared for CPU serving: they are skipped where it is missing. The others run
everywhere."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys

import numpy as np
import pytest

from sd_endpoint.settings import Settings
from tests.conftest import decode_image

REQUEST = {"inputs": "a red circle", "seed": 7, "num_inference_steps": 25}


def build(folder, **overrides):
    from handler import EndpointHandler

    return EndpointHandler(str(folder), dataclasses.replace(Settings(), **overrides))


def pixels(response) -> np.ndarray:
    return np.asarray(decode_image(response["image"]), dtype=np.int16)


def copy_model(repo_root, folder):
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        shutil.copytree(repo_root / part, folder / part)
    shutil.copy(repo_root / "model_index.json", folder)
    return folder


@pytest.fixture(scope="module")
def exported(repo_root, tmp_path_factory):
    """The shipped model with its OpenVINO export (float UNet) beside it, and a
    requirements.txt."""
    pytest.importorskip("openvino")
    from model_tools.openvino_export import export

    folder = copy_model(repo_root, tmp_path_factory.mktemp("exported"))
    (folder / "requirements.txt").write_text("diffusers>=0.33.1\n")
    export(folder, unet="float")
    return folder


@pytest.fixture(scope="module")
def both(exported):
    """The exported folder served with OpenVINO and with PyTorch alone."""
    return build(exported), build(exported, openvino="off")


def test_the_export_is_compiled_for_the_warm_up_shapes_only(both):
    served, plain = both
    assert plain.engine.openvino is None
    models = served.engine.openvino
    assert models is not None and models.precision == "f32", "float32, as SD_DTYPE chose"
    # The native 64x64 warm-up: a guided UNet call (batch 2) and the decode of one image.
    assert sorted(models._compiled) == [
        ("unet", (2, 4, 8, 8), (1,), (2, 77, 64)),
        ("vae_decoder", (1, 4, 8, 8)),
    ]


def test_a_warm_size_gives_the_pytorch_image_and_the_same_again(both):
    served, plain = both
    first, again = pixels(served(REQUEST)), pixels(served(REQUEST))
    assert np.array_equal(first, again), "a seed gives the same image every time"
    difference = np.abs(first - pixels(plain(REQUEST)))
    assert difference.mean() < 0.5, f"mean difference {difference.mean():.2f} of 255"


@pytest.mark.parametrize(
    "change",
    [
        {"width": 96},  # another size
        {"num_images_per_prompt": 2},  # a batch
        {"inputs": "a red circle " * 30},  # two chunks of 75 tokens: a longer text context
        {"negative_prompt": "blue", "clip_skip": 2, "scheduler": "Euler a"},
    ],
)
def test_other_shapes_run_on_pytorch_and_every_field_still_works(both, change):
    served, plain = both
    compiled = set(served.engine.openvino._compiled)
    request = {**REQUEST, **change}
    here, there = served(request), plain(request)
    if set(change) & {"width", "num_images_per_prompt", "inputs"}:
        assert np.array_equal(pixels(here), pixels(there)), "PyTorch's own image"
    else:  # same shapes as the warm-up: OpenVINO, within float rounding
        assert np.abs(pixels(here) - pixels(there)).mean() < 0.5
    assert here["seed"] == there["seed"] == 7
    assert set(served.engine.openvino._compiled) == compiled, "nothing compiled after warm-up"


def test_a_request_with_a_lora_runs_on_pytorch_and_one_without_on_openvino_again(
    repo_root, exported, tmp_path
):
    """The export holds the base weights: a LoRA, patched into PyTorch's, must not reach it."""
    folder = tmp_path / "with-loras"
    shutil.copytree(exported, folder)
    (folder / "loras").mkdir()
    shutil.copy(repo_root / "loras" / "green-shapes.safetensors", folder / "loras")
    served, plain = build(folder), build(folder, openvino="off")
    request = {**REQUEST, "loras": {"green-shapes": 1.0}}
    with_lora = pixels(served(request))
    assert np.array_equal(with_lora, pixels(plain(request))), "PyTorch's own image"
    base = pixels(served(REQUEST))
    assert np.abs(base - with_lora).mean() > 5, "the LoRA changed the picture"
    assert np.abs(base - pixels(plain(REQUEST))).mean() < 0.5


def test_unguided_requests_decode_on_openvino_and_denoise_on_pytorch(both):
    served, plain = both
    request = {**REQUEST, "guidance_scale": 1}
    difference = np.abs(pixels(served(request)) - pixels(plain(request)))
    assert difference.mean() < 0.5


def test_export_asks_for_the_runtime_in_requirements_once(exported):
    import openvino

    from model_tools.openvino_export import add_requirement

    version = openvino.__version__.split("-")[0]
    lines = (exported / "requirements.txt").read_text().splitlines()
    assert lines[0] == "diffusers>=0.33.1" and lines[-1] == f"openvino=={version}"
    add_requirement(exported, f"openvino=={version}")
    assert (exported / "requirements.txt").read_text().count("openvino==") == 1


def test_an_export_of_other_weights_is_not_served(exported, tmp_path, caplog):
    folder = tmp_path / "stale"
    shutil.copytree(exported, folder)
    record = json.loads((folder / "openvino" / "export.json").read_text())
    record["weights"]["unet/diffusion_pytorch_model.safetensors"] = "0" * 64
    (folder / "openvino" / "export.json").write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="sd_endpoint.openvino_engine"):
        handler = build(folder)
    assert handler.engine.openvino is None
    assert "made from other weights" in caplog.text


def test_an_export_without_the_runtime_installed_serves_with_pytorch(
    repo_root, tmp_path, monkeypatch, caplog
):
    folder = copy_model(repo_root, tmp_path)
    (folder / "openvino").mkdir()
    (folder / "openvino" / "export.json").write_text('{"openvino": "2026.4.1", "weights": {}}')
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` fails
    with caplog.at_level(logging.WARNING, logger="sd_endpoint.openvino_engine"):
        handler = build(folder)
    assert handler.engine.openvino is None
    assert "openvino package is not installed" in caplog.text
    assert "openvino==2026.4.1" in caplog.text
    assert pixels(handler(REQUEST)).shape == (64, 64, 3)


def test_a_bad_openvino_setting_stops_start_up_naming_the_variable():
    with pytest.raises(ValueError, match="SD_OPENVINO='on' is not one of auto, off"):
        Settings.from_env({"SD_OPENVINO": "on"})


# --- int8 -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_exported(repo_root, tmp_path_factory):
    """The shipped model with the default export: a hybrid int8 UNet."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from model_tools.openvino_export import export

    folder = copy_model(repo_root, tmp_path_factory.mktemp("int8"))
    export(folder)
    return folder


def openvino_model(folder):
    import openvino

    return openvino.Core().read_model(folder / "openvino" / "unet" / "openvino_model.xml")


def op_types(folder) -> dict[str, int]:
    import openvino

    types: dict[str, int] = {}
    for op in openvino_model(folder).get_ops():
        name = op.get_type_name()
        if name == "Constant" and op.get_element_type() in (openvino.Type.u8, openvino.Type.i8):
            name = "int8 constant"
        types[name] = types.get(name, 0) + 1
    return types


def test_the_int8_export_computes_its_convolutions_in_int8(int8_exported, exported):
    quantized, plain = op_types(int8_exported), op_types(exported)
    # Inputs of the convolutions quantized (FakeQuantize), weights stored in 8 bits.
    assert quantized.get("FakeQuantize", 0) >= quantized["Convolution"] // 2, quantized
    assert quantized.get("int8 constant", 0) >= quantized["Convolution"], quantized
    assert "FakeQuantize" not in plain and "int8 constant" not in plain
    # The first and last convolutions read and write the latents: they stay in float.
    model = openvino_model(int8_exported)
    for op in model.get_ops():
        if op.get_type_name() == "Convolution" and (".conv_in/" in op.get_friendly_name()):
            assert op.input_value(0).get_node().get_type_name() != "FakeQuantize"
        if op.get_type_name() == "Convolution" and ".down_blocks.0.resnets.0.conv1/" in (
            op.get_friendly_name()
        ):
            assert op.input_value(0).get_node().get_type_name() == "FakeQuantize"
    record = json.loads((int8_exported / "openvino" / "export.json").read_text())
    assert record["unet"].startswith("hybrid int8")


def test_the_int8_export_is_served_close_to_the_float_one(int8_exported, both):
    served, plain = both
    int8 = build(int8_exported)
    assert "int8" in int8.engine.openvino.unet_weights
    image, reference = pixels(int8(REQUEST)), pixels(plain(REQUEST))
    difference = np.abs(image - reference).mean()
    # Lossy, unlike the float export (< 0.5 above): 1.6 / 255 on average over 52 requests.
    assert 0 < difference < 8, f"mean difference {difference:.2f} of 255"
    assert np.array_equal(image, pixels(int8(REQUEST))), "still the same image for a seed"


# --- the importer's --openvino ------------------------------------------------------------


def test_import_with_openvino_prepares_the_repository_and_a_plain_one_undoes_it(
    repo_root, tmp_path, capsys
):
    pytest.importorskip("openvino")
    from model_tools import importer

    out = tmp_path / "repo"
    out.mkdir()
    (out / "requirements.txt").write_text("diffusers>=0.33.1\n")
    assert importer.main([str(repo_root), "--out", str(out), "--openvino"]) == 0
    stdout = capsys.readouterr().out
    assert "OpenVINO export (hybrid int8 UNet and VAE decoder) written" in stdout
    assert (out / "openvino" / "export.json").is_file()
    assert (out / "requirements.txt").read_text().splitlines()[-1].startswith("openvino==")
    handler = build(out)
    assert handler.engine.openvino is not None and handler.engine.openvino._compiled

    assert importer.main([str(repo_root), "--out", str(out)]) == 0
    assert not (out / "openvino").exists(), "an export of the replaced weights is not kept"
    assert (out / "requirements.txt").read_text() == "diffusers>=0.33.1\n"


@pytest.mark.parametrize(
    ("source", "options", "message"),
    [
        (
            "tests/models/sdxl",
            ["--openvino"],
            "--openvino: Stable Diffusion XL models are not exported for OpenVINO",
        ),
        (
            ".",
            ["--openvino-unet", "float"],
            "--openvino-unet chooses the OpenVINO export's UNet: add --openvino",
        ),
    ],
)
def test_import_refuses_what_cannot_be_exported_before_any_work(
    repo_root, tmp_path, capsys, source, options, message
):
    from model_tools import importer

    out = tmp_path / "repo"
    out.mkdir()
    assert importer.main([str(repo_root / source), "--out", str(out), *options]) == 1
    assert capsys.readouterr().err.startswith(f"error: {message}")
    assert list(out.iterdir()) == []
