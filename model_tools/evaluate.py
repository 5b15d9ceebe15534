"""Check that a toy model draws what it is told, through the endpoint's own handler.

    python -m model_tools.evaluate                         # the repo's model; ~5 min on 2 cores
    python -m model_tools.evaluate --grid docs/samples.png # also redraw the README's grid
    python -m model_tools.evaluate --family sdxl           # the SDXL toy, tests/models/sdxl
    python -m model_tools.evaluate --lora green-shapes:green  # a LoRA that sets one colour

Every image comes from ``EndpointHandler.__call__`` as a client would get it, and is judged
by the numpy measurements of ``model_tools.synthetic`` (border colour, nearest palette
colour per pixel, the outline of the largest blob), never by a learned model. Prints a
Markdown table and exits with status 1 if any threshold is missed.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import io
import itertools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from sd_endpoint.loader import REPO_ROOT, load_handler

from .synthetic import BACKGROUNDS, COLOURS, SHAPES, Measurement, caption, measure
from .toys import TOYS

STEPS = 25
GUIDED, UNGUIDED = 7.5, 1.0
# Every combination of the world, in a fixed order; prompt i uses seed SEED_BASE + i.
COMBINATIONS = list(itertools.product(COLOURS, SHAPES, BACKGROUNDS))
SEED_BASE = 1000


@dataclass(frozen=True)
class Prompt:
    colour: str | None
    shape: str
    background: str
    seed: int

    @property
    def text(self) -> str:
        return caption(self.colour, self.shape, self.background)


@dataclass(frozen=True)
class Outcome:
    prompt: Prompt
    negative: str | None
    image: Image.Image
    measured: Measurement

    @property
    def all_right(self) -> bool:
        m, p = self.measured, self.prompt
        return (m.colour, m.shape, m.background) == (p.colour, p.shape, p.background)


@dataclass(frozen=True)
class Check:
    name: str
    count: int
    result: str
    threshold: str
    passed: bool


class HandlerClient:
    def __init__(self, model_dir: Path | None = None, handler=None, guidance: float = GUIDED):
        self.handler = handler if handler is not None else build_handler(model_dir)
        self.guidance = guidance  # unless a call says otherwise
        self.calls = 0

    def __call__(
        self,
        prompt: Prompt,
        side: int | None = None,
        guidance: float | None = None,
        negative: str | None = None,
        loras: dict[str, float] | None = None,
    ) -> Outcome:
        """One image; without ``side`` the handler picks the model's native size."""
        parameters = {
            "seed": prompt.seed,
            "guidance_scale": self.guidance if guidance is None else guidance,
            "num_inference_steps": STEPS,
        }
        if loras:
            parameters["loras"] = loras
        if side is not None:
            parameters.update(height=side, width=side)
        if negative is not None:
            parameters["negative_prompt"] = negative
        response = self.handler({"inputs": prompt.text, "parameters": parameters})
        image = Image.open(io.BytesIO(base64.b64decode(response["image"]))).convert("RGB")
        self.calls += 1
        return Outcome(prompt, negative, image, measure(image))


def build_handler(model_dir: Path):
    """The handler the runtime would build; a bare model folder gets this repo's handler.py."""
    if (model_dir / "handler.py").is_file():
        return load_handler(model_dir)
    spec = importlib.util.spec_from_file_location("handler", REPO_ROOT / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EndpointHandler(str(model_dir))


def prompts(count: int, offset: int = 0) -> list[Prompt]:
    """``count`` prompts cycling through every combination, each with its own seed."""
    return [
        Prompt(*COMBINATIONS[i % len(COMBINATIONS)], seed=SEED_BASE + offset + i)
        for i in range(count)
    ]


def share(flags) -> float:
    flags = list(flags)
    return sum(flags) / len(flags)


def at_least(name: str, outcomes: list[Outcome], right, threshold: float) -> Check:
    rate = share(right(o) for o in outcomes)
    return Check(name, len(outcomes), f"{rate:.0%}", f"≥ {threshold:.0%}", rate >= threshold)


def sign_test(wins: int, losses: int) -> float:
    """One-sided p-value that guidance helps, from the prompts only one setting got right."""
    n = wins + losses
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n


def evaluate(generate: HandlerClient, native: int, large: int, negative: int) -> tuple[list, dict]:
    runs: dict[str, list[Outcome]] = {}
    scale = generate.guidance  # of the guided runs
    native_prompts = prompts(native)
    runs["native"] = [generate(p) for p in native_prompts]
    runs["unguided"] = [generate(p, guidance=UNGUIDED) for p in native_prompts]
    runs["large"] = [generate(p, side=512) for p in prompts(large, offset=5000)]

    # Prompts that name no colour, then the same seeds told to avoid the colour each drew.
    plain = [
        Prompt(None, shape, background, SEED_BASE + 9000 + i)
        for i, (shape, background) in enumerate(
            itertools.islice(itertools.cycle(itertools.product(SHAPES, BACKGROUNDS)), negative)
        )
    ]
    runs["plain"] = [generate(p) for p in plain]
    avoided = [
        o.measured.colour or list(COLOURS)[i % len(COLOURS)] for i, o in enumerate(runs["plain"])
    ]
    runs["negative"] = [generate(p, negative=c) for p, c in zip(plain, avoided, strict=True)]

    size = "{}x{}".format(*runs["native"][0].image.size)
    checks = [
        at_least(
            f"asked colour is the dominant non-background colour, {size}",
            runs["native"],
            lambda o: o.measured.colour == o.prompt.colour,
            0.90,
        ),
        at_least(
            f"asked shape is recognised, {size}",
            runs["native"],
            lambda o: o.measured.shape == o.prompt.shape,
            0.80,
        ),
        at_least(
            f"asked background colour, {size}",
            runs["native"],
            lambda o: o.measured.background == o.prompt.background,
            0.90,
        ),
        at_least(
            "asked colour is the dominant non-background colour, 512x512",
            runs["large"],
            lambda o: o.measured.colour == o.prompt.colour,
            0.80,
        ),
    ]
    kept_out = [o.measured.colour != c for o, c in zip(runs["negative"], avoided, strict=True)]
    drawn = share(o.measured.colour is not None for o in runs["plain"])
    checks.append(
        Check(
            "negative prompt naming the colour the same seed drew without it keeps it out, " + size,
            len(kept_out),
            f"{share(kept_out):.0%} (a colour was drawn without it: {drawn:.0%})",
            "≥ 80%",
            share(kept_out) >= 0.80,
        )
    )
    guided = [o.all_right for o in runs["native"]]
    unguided = [o.all_right for o in runs["unguided"]]
    wins = sum(g and not u for g, u in zip(guided, unguided, strict=True))
    losses = sum(u and not g for g, u in zip(guided, unguided, strict=True))
    p_value = sign_test(wins, losses)
    checks.append(
        Check(
            f"colour, shape and background all right: guidance {scale:g} vs {UNGUIDED:g}, {size}",
            len(guided),
            f"{share(guided):.0%} vs {share(unguided):.0%} (better on {wins}, worse on {losses}; "
            f"sign test p = {p_value:.2g})",
            f"{scale:g} better, p < 0.05",
            share(guided) > share(unguided) and p_value < 0.05,
        )
    )
    return checks, runs


def evaluate_lora(generate: HandlerClient, name: str, colour: str, count: int) -> list[Check]:
    """A LoRA that draws every shape in ``colour``: with it the colour is its, and shape and
    background the prompt's; without it the prompt's colour (prompts asking another colour)."""
    asked = [p for p in prompts(count * 2) if p.colour != colour][:count]
    without = [generate(p) for p in asked]
    with_it = [generate(p, loras={name: 1.0}) for p in asked]
    return [
        at_least(
            f"without {name}: the asked colour",
            without,
            lambda o: o.measured.colour == o.prompt.colour,
            0.85,
        ),
        at_least(
            f"with {name}: {colour}, whatever is asked",
            with_it,
            lambda o: o.measured.colour == colour,
            0.90,
        ),
        at_least(
            f"with {name}: the asked shape and background",
            with_it,
            lambda o: (
                (o.measured.shape, o.measured.background) == (o.prompt.shape, o.prompt.background)
            ),
            0.80,
        ),
    ]


def table(checks: list[Check]) -> str:
    lines = [
        "| check | prompts | result | threshold | pass |",
        "|---|---:|---|---|---|",
    ]
    for c in checks:
        lines.append(
            f"| {c.name} | {c.count} | {c.result} | {c.threshold} | {'yes' if c.passed else 'NO'} |"
        )
    return "\n".join(lines)


def failures(runs: dict[str, list[Outcome]]) -> list[str]:
    lines = []
    for name, outcomes in runs.items():
        for o in outcomes:
            if name in ("native", "unguided", "large") and o.all_right:
                continue
            if name == "large" and o.measured.colour == o.prompt.colour:
                continue
            if name == "plain" or (name == "negative" and o.measured.colour != o.negative):
                continue
            m = o.measured
            lines.append(
                f"{name}: {o.prompt.text!r} seed {o.prompt.seed}"
                + (f" negative {o.negative!r}" if o.negative else "")
                + f" -> {m.colour} {m.shape} on {m.background} (fill {m.fill_ratio:.2f})"
            )
    return lines


def grid(outcomes: list[Outcome], path: Path, columns: int = 6, scale: int = 2) -> None:
    """A labelled contact sheet of real outputs, for the README."""
    cell, gap, line = outcomes[0].image.width * scale, 10, 13
    try:
        font = ImageFont.load_default(size=11)
    except TypeError:  # Pillow < 10.1 has only its small bitmap font
        font = ImageFont.load_default()
    rows = math.ceil(len(outcomes) / columns)
    step_x, step_y = cell + gap, cell + 3 * line + gap
    sheet = Image.new("RGB", (columns * step_x + gap, rows * step_y + gap), "white")
    draw = ImageDraw.Draw(sheet)
    for i, o in enumerate(outcomes):
        x, y = gap + (i % columns) * step_x, gap + (i // columns) * step_y
        sheet.paste(o.image.resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        draw.rectangle((x - 1, y - 1, x + cell, y + cell), outline=(190, 190, 190))
        head, _, tail = o.prompt.text.partition(" on ")
        for n, text in enumerate((head, f"on {tail}", f"seed {o.prompt.seed}")):
            draw.text((x, y + cell + 2 + n * line), text, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--family", choices=sorted(TOYS), default="sd", help="whose toy model to evaluate"
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        help="the model folder (its handler.py if it has one, else this repo's); default: the "
        "family's toy (the repo root for sd, tests/models/sdxl for sdxl)",
    )
    parser.add_argument("--native", type=int, default=72, help="prompts at the native size (>= 50)")
    parser.add_argument("--large", type=int, default=24, help="prompts at 512x512")
    parser.add_argument("--negative", type=int, default=54, help="negative-prompt cases")
    parser.add_argument(
        "--guidance",
        type=float,
        default=GUIDED,
        help="the guidance scale of every guided image; the thresholds were set at the default",
    )
    parser.add_argument("--grid", type=Path, help="write a PNG grid of native-size outputs here")
    parser.add_argument("--show-failures", action="store_true")
    parser.add_argument(
        "--lora",
        metavar="NAME:COLOUR",
        help="evaluate only a LoRA of the model's loras/ that draws every shape in COLOUR, "
        "against the same prompts without it (48 images)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 0 keeps torch's default. On cores that other work also uses, "
        "threads that wait on each other run many times slower than one",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    generate = HandlerClient(args.model_dir or TOYS[args.family].folder, guidance=args.guidance)
    if args.lora:
        name, _, colour = args.lora.rpartition(":")
        checks, runs = evaluate_lora(generate, name, colour, 24), {}
    else:
        checks, runs = evaluate(generate, args.native, args.large, args.negative)
    print(table(checks))
    print(
        f"\n{generate.calls} images through the handler, {STEPS} steps each, "
        f"in {(time.perf_counter() - started) / 60:.1f} min"
    )
    if args.show_failures:
        print("\n".join(["", "misses:", *failures(runs)]))
    if args.grid and "native" in runs:
        grid(runs["native"][: len(COMBINATIONS)], args.grid)
        print(f"wrote {args.grid}")
    sys.exit(0 if all(c.passed for c in checks) else 1)


if __name__ == "__main__":
    main()
