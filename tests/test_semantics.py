"""The shipped model draws what it is told: wiring mistakes (a prompt ignored, prompt and
negative prompt swapped, guidance dropped) change the pictures, and these tests see it.

Pictures are judged by the numpy measurements of ``model_tools.synthetic``;
``python -m model_tools.evaluate`` runs the same judgement over many more prompts.
"""

from __future__ import annotations

import numpy as np
import pytest

from model_tools.evaluate import COMBINATIONS, prompts
from model_tools.synthetic import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    Scene,
    caption,
    measure,
    random_scene,
    render,
)
from tests.conftest import decode_image


def generate(handler, prompt: str, seed: int, **parameters):
    response = handler({"inputs": prompt, "parameters": {"seed": seed, **parameters}})
    return measure(decode_image(response["image"]))


def test_the_measurements_read_back_every_rendered_scene():
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng) for _ in range(120)]
    for scene in scenes:
        m = measure(render(scene))
        assert (m.background, m.colour, m.shape) == (scene.background, scene.colour, scene.shape)


@pytest.mark.parametrize("side", [48, 128, 512])
def test_the_measurements_do_not_depend_on_the_image_size(side):
    scene = Scene("triangle", "yellow", "white", cx=0.4, cy=0.55, size=0.5)
    m = measure(render(scene, side))
    assert (m.background, m.colour, m.shape) == ("white", "yellow", "triangle")


def test_an_empty_picture_has_no_colour_and_no_shape():
    for name, rgb in BACKGROUNDS.items():
        m = measure(np.full((64, 64, 3), rgb, dtype=np.uint8))
        assert (m.background, m.colour, m.shape) == (name, None, None)


def test_the_asked_colour_is_the_one_drawn(handler):
    cases = [
        (colour, SHAPES[i % len(SHAPES)], background)
        for i, (colour, background) in enumerate((c, b) for c in COLOURS for b in BACKGROUNDS)
    ]
    misses = []
    for seed, (colour, shape, background) in enumerate(cases):
        m = generate(handler, caption(colour, shape, background), seed)
        if m.colour != colour or m.background != background:
            misses.append(f"{colour} {shape} on {background}: got {m.colour} on {m.background}")
    # One miss in eight is the model's error rate; a prompt that does not reach the model
    # gets about three in four colours wrong.
    assert len(misses) <= 1, misses


def test_a_negative_prompt_keeps_out_the_colour_it_names(handler):
    """Each seed is first drawn with a prompt that names no colour; told to avoid the colour
    it drew, the same seed must draw another. Dropping the negative prompt, dropping
    guidance, or swapping it with the prompt each leave the colour in."""
    prompt = caption(None, "circle", "white")
    drawn = {seed: generate(handler, prompt, seed).colour for seed in range(6)}
    assert all(drawn.values()), drawn
    kept_in = [
        (seed, colour)
        for seed, colour in drawn.items()
        if generate(handler, prompt, seed, negative_prompt=colour).colour == colour
    ]
    assert len(kept_in) <= 1, kept_in


def test_guidance_makes_the_pictures_follow_the_prompt(handler):
    """Without guidance the shipped model gets about one prompt in seven wrong (colour, shape
    or background); at guidance 7.5 about one in a hundred (``model_tools.evaluate``). A
    handler that loses guidance_scale on the way to the pipeline draws the same either way."""

    def misses(guidance: float) -> list[str]:
        wrong = []
        for p in prompts(len(COMBINATIONS)):
            m = generate(handler, p.text, p.seed, guidance_scale=guidance)
            if (m.colour, m.shape, m.background) != (p.colour, p.shape, p.background):
                wrong.append(f"{p.text!r} seed {p.seed}: {m.colour} {m.shape} on {m.background}")
        return wrong

    guided, unguided = misses(7.5), misses(1.0)
    assert len(guided) <= 1, guided
    assert len(guided) < len(unguided), (guided, unguided)
