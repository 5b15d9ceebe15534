"""The synthetic world the shipped model is trained on, and the measurements that check it.

One coloured shape on a plain background, captioned "a red circle on a white background".
The same palette serves both sides: ``render`` draws training pictures with it, and
``measure`` reads a picture back into (background, dominant colour, shape) with nothing but
numpy, so the evaluation needs no learned judge.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (225, 30, 30),
    "green": (30, 175, 55),
    "blue": (35, 70, 225),
    "yellow": (245, 215, 35),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}
SHAPES = ("circle", "square", "triangle")
PALETTE = {**COLOURS, **BACKGROUNDS}
NATIVE = 64

# A pixel counts as a palette colour only this close to it (RGB distance); edge blends and
# muddy pixels count as nothing, so they cannot tip the vote towards any colour.
MATCH_DISTANCE = 110.0
# Fewer shape pixels than this (as a share of the image) means no shape was drawn.
MIN_SHAPE_SHARE = 0.01


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    # Centre and size as fractions of the image side, so one scene renders at any size.
    cx: float
    cy: float
    size: float

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.background)


def caption(colour: str | None, shape: str | None, background: str | None) -> str:
    """The caption for the attributes given; a missing one is left unsaid."""
    noun = " ".join(part for part in (colour, shape or "shape") if part)
    text = f"a {noun}"
    if background:
        text += f" on a {background} background"
    return text


# Words of the long prompts people write. None names or hides a word of this world
# ("centered", "colored" and "rendered" hide "red"), so filler lengthens a caption without
# changing what it asks for.
FILLER = (
    "highly detailed",
    "sharp focus",
    "masterpiece",
    "best quality",
    "digital art",
    "studio lighting",
    "intricate",
    "cinematic",
    "award winning",
    "trending on artstation",
    "soft light",
    "clean lines",
    "flat design",
    "minimalist",
    "vector art",
    "smooth",
    "high resolution",
    "8k",
    "professional",
    "illustration",
    "geometric",
    "sharp edges",
    "plain",
    "crisp",
    "symmetrical",
    "bold",
    "matte",
)
WORLD_WORDS = (*COLOURS, *BACKGROUNDS, *SHAPES, "shape", "background")


def filler(rng: np.random.Generator, characters: int) -> str:
    """Comma-separated filler phrases, at least ``characters`` long."""
    phrases: list[str] = []
    while sum(len(p) + 2 for p in phrases) < characters:
        phrases.append(FILLER[rng.integers(len(FILLER))])
    return ", ".join(phrases)


def long_caption(text: str, rng: np.random.Generator, longest: int = 160) -> str:
    """``text`` with filler before it, after it or on both sides, up to about ``longest``
    characters of filler: one to three 75-token chunks, with the key words in any of them
    (the character-level tokenizer makes a token of every character but spaces)."""
    layout = rng.integers(3)
    before = filler(rng, int(rng.integers(20, longest))) if layout != 1 else ""
    after = filler(rng, int(rng.integers(20, longest // 2))) if layout != 0 else ""
    return ", ".join(part for part in (before, text, after) if part)


def random_scene(rng: np.random.Generator) -> Scene:
    size = rng.uniform(0.3, 0.65)
    margin = size / 2 + 0.04
    return Scene(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=list(COLOURS)[rng.integers(len(COLOURS))],
        background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
        cx=rng.uniform(margin, 1 - margin),
        cy=rng.uniform(margin, 1 - margin),
        size=size,
    )


def render(scene: Scene, side: int = NATIVE, supersample: int = 4) -> np.ndarray:
    """The scene as an RGB uint8 array, anti-aliased by drawing large and shrinking."""
    big = side * supersample
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    cx, cy, half = scene.cx * big, scene.cy * big, scene.size * big / 2
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif scene.shape == "square":
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    else:  # upright triangle as wide as it is tall, centred on its bounding box
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    return np.asarray(image.resize((side, side), Image.Resampling.BOX))


@dataclass(frozen=True)
class Measurement:
    background: str
    colour: str | None  # the dominant non-background palette colour; None when nothing is drawn
    shape: str | None  # None when no shape can be told
    colour_shares: dict[str, float]  # share of the image's pixels in each shape colour
    fill_ratio: float  # area of the largest blob of `colour` over its bounding box


def classify_pixels(image: np.ndarray) -> np.ndarray:
    """Index into ``PALETTE`` of each pixel's nearest colour, or -1 if none is close."""
    pixels = image[..., :3].astype(np.float32)
    palette = np.array(list(PALETTE.values()), dtype=np.float32)
    distance = np.linalg.norm(pixels[..., None, :] - palette, axis=-1)
    nearest = distance.argmin(axis=-1)
    return np.where(distance.min(axis=-1) <= MATCH_DISTANCE, nearest, -1)


def background_of(image: np.ndarray, labels: np.ndarray | None = None) -> str:
    """The palette colour most common along the image border (shapes keep off the border)."""
    labels = classify_pixels(image) if labels is None else labels
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    names = list(PALETTE)
    counts = {name: int((border == i).sum()) for i, name in enumerate(names)}
    return max(counts, key=counts.get)


def measure(image: np.ndarray | Image.Image) -> Measurement:
    image = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    labels = classify_pixels(image)
    background = background_of(image, labels)
    names = list(PALETTE)
    shares = {
        name: float((labels == names.index(name)).mean()) for name in COLOURS if name != background
    }
    colour = max(shares, key=shares.get) if shares else None
    if colour is None or shares[colour] < MIN_SHAPE_SHARE:
        return Measurement(background, None, None, shares, 0.0)
    blob = largest_component(labels == names.index(colour))
    return Measurement(background, colour, shape_of(blob), shares, fill_ratio(blob))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of ``mask``, so stray specks do not stretch the box."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, current = 0, 0, 0
    height, width = mask.shape
    for y, x in zip(*np.nonzero(mask), strict=True):
        if labels[y, x]:
            continue
        current += 1
        labels[y, x] = current
        stack, size = [(y, x)], 0
        while stack:
            cy, cx = stack.pop()
            size += 1
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask)


def fill_ratio(blob: np.ndarray) -> float:
    """Blob area over its bounding box: 1 for a square, pi/4 for a circle, 1/2 for a triangle."""
    ys, xs = np.nonzero(blob)
    if len(ys) == 0:
        return 0.0
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    return float(len(ys) / box)


def shape_of(blob: np.ndarray) -> str | None:
    """circle, square or triangle from two blur-tolerant features of the blob's bounding box.

    Taper: the mean width of the top quarter of rows over that of the bottom quarter (or the
    reverse), about 0.15 for a triangle and 1 for the others. Corners: how full the four
    corner cells of a 4x4 grid over the box are, about 1 for a square and 0.2 for a circle.
    Soft edges shave the corners off drawn triangles and squares, which moves the fill ratio
    alone across its cut points, but leaves both features far from theirs.
    """
    ys, xs = np.nonzero(blob)
    if len(ys) < 16:
        return None
    box = blob[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    height, width = box.shape
    if max(height, width) > 1.6 * min(height, width):
        return None  # every shape of this world is about as tall as it is wide
    widths = box.sum(axis=1)
    quarter = max(1, height // 4)
    top, bottom = widths[:quarter].mean(), widths[-quarter:].mean()
    if min(top, bottom) < 0.6 * max(top, bottom):
        return "triangle"
    cy, cx = max(1, height // 4), max(1, width // 4)
    corners = np.concatenate(
        [box[:cy, :cx], box[:cy, -cx:], box[-cy:, :cx], box[-cy:, -cx:]], axis=None
    )
    return "square" if corners.mean() >= 0.6 else "circle"
