"""Section 3: image encoding. PNG levels 0-9, optimize, JPEG and WebP, by time and size, on a
picture that compresses like a photo; and the PNG level that minimises encode plus transfer."""

from __future__ import annotations

import io
import statistics

from benchmarks.common import heading, ms, table, timed


def natural_image(size: int, seed: int = 0):
    """A landscape-like RGB picture: smooth sky, sun, ridged hills, textured ground, a shaded
    ball and a sensor-like grain. Compresses like a photo or a generated image, unlike noise
    (incompressible) or flat shapes (compresses to nothing)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size

    def fractal(octaves: int, first: int = 4, falloff: float = 1.8) -> np.ndarray:
        total = np.zeros((size, size))
        for o in range(octaves):
            cells = min(first * 2**o, size)
            grid = Image.fromarray(rng.standard_normal((cells, cells)).astype(np.float32))
            total += np.asarray(grid.resize((size, size), Image.BICUBIC)) / falloff**o
        return total / 2

    sky = np.stack([0.35 + 0.4 * y, 0.55 + 0.3 * y, 0.95 - 0.1 * y], -1)
    sky += 0.06 * np.clip(fractal(4), 0, None)[..., None]  # clouds
    sun = np.exp(-(((x - 0.75) ** 2 + (y - 0.2) ** 2) / 0.004))[..., None]
    image = sky + sun * np.array([0.6, 0.5, 0.2])
    ridge = 0.45 + 0.08 * np.sin(x * 9) + 0.03 * np.sin(x * 23 + 1) + 0.02 * fractal(5)[0]
    hills = (y > ridge)[..., None]
    rock = np.array([0.35, 0.38, 0.42]) * (1 - 0.6 * (y - ridge)[..., None])
    rock = rock + 0.05 * fractal(8, falloff=1.4)[..., None]
    image = np.where(hills, rock, image)
    ground = (y > 0.7 + 0.03 * np.sin(x * 5))[..., None]
    texture = fractal(8, 8, falloff=1.4)[..., None]
    grass = np.array([0.25, 0.5, 0.18]) + 0.08 * texture * np.array([1, 1.4, 0.6])
    image = np.where(ground, grass, image)
    dx, dy = x - 0.35, y - 0.72
    ball = dx**2 + dy**2 < 0.012
    shade = np.clip(1 - 3 * ((dx + 0.03) ** 2 + (dy + 0.03) ** 2) / 0.012, 0.2, 1)
    image = np.where(ball[..., None], np.array([0.85, 0.12, 0.1]) * shade[..., None], image)
    image = image + rng.normal(0, 0.006, image.shape)  # grain
    return Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))


def encoders(quick: bool):
    from sd_endpoint.imaging import LOSSY_QUALITY, encode

    options = {
        f"png level {level}": (lambda im, lv=level: encode(im, "png", lv)) for level in range(10)
    }

    def png_optimize(im):
        buffer = io.BytesIO()
        im.save(buffer, format="PNG", optimize=True)
        return buffer.getvalue()

    if not quick:
        options["png optimize=True"] = png_optimize
    options[f"jpeg quality {LOSSY_QUALITY}"] = lambda im: encode(im, "jpeg")
    options[f"webp quality {LOSSY_QUALITY}"] = lambda im: encode(im, "webp")
    return options


def section_encoding(args, results: dict) -> None:
    from sd_endpoint.imaging import to_base64
    from sd_endpoint.settings import Settings

    sizes = (256,) if args.quick else (512, 1024)
    repeats = 2 if args.quick else 5
    heading(
        "3. image encoding on a natural-looking picture (median of "
        f"{repeats}; ratios against Pillow's default, PNG level 6)"
    )
    default_level = Settings().png_compress_level
    measured = {}
    for size in sizes:
        image = natural_image(size)
        for name, encode in encoders(args.quick).items():
            data = encode(image)
            seconds = statistics.median(
                timed(lambda e=encode, im=image: e(im)) for _ in range(repeats)
            )
            measured[(name, size)] = (seconds, len(data))
            if name == "png level 6":
                png = data
        base64_s = statistics.median(timed(lambda d=png: to_base64(d)) for _ in range(repeats))
        measured[("base64 of the level-6 PNG", size)] = (base64_s, len(to_base64(png)))
    names = list(dict.fromkeys(name for name, _ in measured))
    rows = []
    for name in names:
        row = [name + (" (SD_PNG_COMPRESS_LEVEL)" if name == f"png level {default_level}" else "")]
        for size in sizes:
            seconds, size_bytes = measured[(name, size)]
            ref_s, ref_b = measured[("png level 6", size)]
            row += [
                ms(seconds),
                f"{seconds / ref_s:.2f}x",
                f"{size_bytes / 1024:,.0f} KB",
                f"{size_bytes / ref_b:.2f}x",
            ]
        rows.append(row)
    header = ["option"]
    for size in sizes:
        header += [f"time {size}", "vs 6", f"size {size}", "vs 6"]
    table(rows, header)
    # The level worth choosing is the one that minimises encode time plus transfer time of
    # the base64 text (4/3 of the bytes); print it for a few client bandwidths.
    size = sizes[-1]
    print(f"  fastest PNG level by encode + transfer of a {size}x{size} image:")
    for mbit in (10, 100, 1000):
        cost = {
            level: measured[(f"png level {level}", size)][0]
            + measured[(f"png level {level}", size)][1] * 4 / 3 * 8 / (mbit * 1e6)
            for level in range(10)
        }
        best = min(cost, key=cost.get)
        print(
            f"    at {mbit:>4} Mbit/s: level {best} ({ms(cost[best])}); level "
            f"{default_level}: {ms(cost[default_level])}; level 6: {ms(cost[6])}"
        )
    results["encoding"] = {
        f"{n} @{s}": {"seconds": t, "bytes": b} for (n, s), (t, b) in measured.items()
    }
