"""Images carry their generation parameters in AUTOMATIC1111's format, unless asked not to."""

from __future__ import annotations

import base64
import hashlib
import io

import pytest
from PIL import Image

from sd_endpoint.loader import REPO_ROOT

REQUEST = {
    "inputs": "a red circle",
    "negative_prompt": "blue",
    "scheduler": "dpm++2m-karras",
    "guidance_scale": 7.5,
    "inference_steps": 3,
    "seed": 42,
    "height": 64,
    "width": 72,
}
INFOTEXT = (
    "a red circle\nNegative prompt: blue\n"
    "Steps: 3, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 72x64"
)


def opened(payload: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(payload)))
    image.load()
    return image


def user_comment(image: Image.Image) -> str | None:
    """EXIF UserComment as A1111 reads it (piexif's "UNICODE" encoding: UTF-16 big-endian)."""
    raw = image.getexif().get_ifd(0x8769).get(0x9286)
    if raw is None:
        return None
    assert raw.startswith(b"UNICODE\0")
    return raw[8:].decode("utf-16-be")


def test_png_carries_a_parameters_text_chunk_in_a1111_format(family_handler):
    image = opened(family_handler(REQUEST)["image"])
    assert image.format == "PNG"
    assert image.info["parameters"] == INFOTEXT


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_jpeg_and_webp_carry_it_as_exif_user_comment(family_handler, fmt):
    image = opened(family_handler({**REQUEST, "output_format": fmt})["image"])
    assert image.format == fmt.upper()
    assert user_comment(image) == INFOTEXT


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_metadata_false_writes_none(family_handler, fmt):
    image = opened(family_handler({**REQUEST, "output_format": fmt, "metadata": False})["image"])
    assert "parameters" not in image.info
    assert user_comment(image) is None


def test_each_image_of_a_batch_names_its_own_seed(family_handler):
    response = family_handler({**REQUEST, "num_images_per_prompt": 3})
    seeds = [
        opened(p).info["parameters"].split("Seed: ")[1].split(",")[0] for p in response["images"]
    ]
    assert seeds == ["42", "43", "44"]


def test_default_sampler_is_named_as_a1111_names_the_model_folders_scheduler(handler):
    # The shipped scheduler is DPMSolverMultistepScheduler, dpmsolver++, order 2: "DPM++ 2M".
    image = opened(handler({"inputs": "a red circle", "inference_steps": 1, "seed": 1})["image"])
    assert "Sampler: DPM++ 2M," in image.info["parameters"]
    assert "Negative prompt" not in image.info["parameters"]


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_any_unicode_prompt_round_trips(handler, fmt):
    prompt = 'ein Kätzchen, 子猫, "quoted" \U0001f431'
    response = handler({"inputs": prompt, "inference_steps": 1, "seed": 1, "output_format": fmt})
    image = opened(response["image"])
    text = image.info.get("parameters") if fmt == "png" else user_comment(image)
    assert text.splitlines()[0] == prompt


def test_the_same_request_still_gives_the_same_bytes(handler):
    assert handler(REQUEST)["image"] == handler(dict(REQUEST))["image"]


def test_loras_are_written_as_a1111_does_each_once_with_their_hashes(handler):
    """The field and the prompt's tags, added up, as one `<lora:NAME:WEIGHT>` tag each after the
    prompt's text, and A1111's "Lora hashes" (kohya's hash of the file's tensor bytes)."""
    body = {
        **REQUEST,
        "inputs": "a red <lora:green-shapes:0.25> circle",
        "loras": {"green-shapes": 0.5},
    }
    text = opened(handler(body)["image"]).info["parameters"]
    data = (REPO_ROOT / "loras" / "green-shapes.safetensors").read_bytes()
    digest = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()[:12]
    assert text.splitlines()[0] == "a red  circle <lora:green-shapes:0.75>"
    assert text.splitlines()[-1].endswith(f', Lora hashes: "green-shapes: {digest}"')
    # Weight 0 is no LoRA: nothing to write.
    none = opened(handler({**REQUEST, "loras": {"green-shapes": 0}})["image"]).info["parameters"]
    assert none == INFOTEXT
