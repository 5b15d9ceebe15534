"""Image bytes for the response: the encoder settings were chosen by `scripts/benchmark.py`.

Images carry their generation parameters the way AUTOMATIC1111 writes them, so that the tools
people use (A1111's "PNG Info", ComfyUI, image sites) show the settings: a PNG `parameters`
text chunk, and in JPEG and WebP the EXIF UserComment (UTF-16, as A1111 writes it via piexif).
"""

from __future__ import annotations

import base64
import io

from PIL import Image, PngImagePlugin

from . import loras

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
LOSSY_QUALITY = 90
EXIF_IFD = 0x8769
USER_COMMENT = 0x9286
UNICODE_PREFIX = b"UNICODE\0"  # EXIF's character-code header for UTF-16 text


def encode(
    image: Image.Image,
    fmt: str = "png",
    png_compress_level: int = 1,
    parameters: str | None = None,
) -> bytes:
    """``image`` as ``fmt`` bytes, with ``parameters`` (A1111's text) written in if given."""
    buffer = io.BytesIO()
    if fmt == "png":
        info = None
        if parameters is not None:
            info = PngImagePlugin.PngInfo()
            # iTXt holds any Unicode; tEXt (Latin-1) is what A1111 writes when it can.
            info.add_text("parameters", parameters, zip=False)
        image.save(buffer, format="PNG", compress_level=png_compress_level, pnginfo=info)
    elif fmt in ("jpeg", "webp"):
        extra = {} if parameters is None else {"exif": _exif(parameters)}
        if fmt == "jpeg":
            image.save(buffer, format="JPEG", quality=LOSSY_QUALITY, **extra)
        else:
            image.save(buffer, format="WEBP", quality=LOSSY_QUALITY, method=4, **extra)
    else:
        raise ValueError(f"unknown image format {fmt!r}; use one of {', '.join(MEDIA_TYPES)}")
    return buffer.getvalue()


def _exif(parameters: str) -> Image.Exif:
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = UNICODE_PREFIX + parameters.encode("utf-16-be")
    return exif


def read_parameters(data: bytes) -> str | None:
    """The A1111 parameters text that ``encode`` wrote into ``data``, or None."""
    image = Image.open(io.BytesIO(data))
    if "parameters" in image.info:
        return image.info["parameters"]
    comment = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    if isinstance(comment, bytes) and comment.startswith(UNICODE_PREFIX):
        return comment[len(UNICODE_PREFIX) :].decode("utf-16-be")
    return None


def a1111_parameters(
    request, seed: int, sampler: str, lora_hashes: dict[str, str] | None = None
) -> str:
    """AUTOMATIC1111's "infotext" for one image of ``request`` (a validated request): the
    prompt, the negative prompt, then ``Key: value`` pairs, quoted where a value holds a comma
    or colon, as A1111 does. ``sampler`` is A1111's name for the sampler. Each LoRA in effect
    is one ``<lora:NAME:WEIGHT>`` tag of the prompt, with its short hash from ``lora_hashes``
    in "Lora hashes", as A1111 writes them."""
    weights = getattr(request, "lora_weights", {})
    lines = [loras.with_tags(request.inputs, weights)]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    settings = {
        "Steps": request.num_inference_steps,
        "Sampler": sampler,
        "CFG scale": request.guidance_scale,
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
    }
    clip_skip = getattr(request, "clip_skip", None)
    if clip_skip and clip_skip > 1:  # A1111 leaves out its default of 1
        settings["Clip skip"] = clip_skip
    lora_hashes = lora_hashes or {}
    hashes = [f"{name}: {lora_hashes[name]}" for name in weights if name in lora_hashes]
    if hashes:
        settings["Lora hashes"] = ", ".join(hashes)
    lines.append(", ".join(f"{key}: {_quoted(value)}" for key, value in settings.items()))
    return "\n".join(lines)


def _quoted(value: object) -> str:
    text = str(value)
    if any(c in text for c in ',:"\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
