"""Several images per request, and the samplers by both their names."""

from __future__ import annotations

import numpy as np
import pytest

from sd_endpoint import samplers
from tests.conftest import decode_image

FAST = {"inference_steps": 4, "height": 64, "width": 64}


def pixels(payload: str) -> np.ndarray:
    return np.asarray(decode_image(payload), dtype=np.int16)


# The model's own, and samplers that draw fresh noise at every step (one generator per image
# must feed each image its own).
@pytest.mark.parametrize("scheduler", ["default", "euler-a", "dpm++2m-sde", "dpm2-a"])
def test_image_i_of_a_batch_is_the_single_request_with_seed_plus_i(family_handler, scheduler):
    request = {"inputs": "a red circle", "scheduler": scheduler, **FAST}
    batch = family_handler({**request, "seed": 40, "num_images_per_prompt": 3})
    assert batch["seeds"] == [40, 41, 42]
    assert batch["image"] == batch["images"][0]
    assert len({*batch["images"]}) == 3, "the images of a batch should differ"
    for i, payload in enumerate(batch["images"]):
        alone = family_handler({**request, "seed": 40 + i, "num_images_per_prompt": 1})
        # A batch runs the same arithmetic on a larger tensor: at most one level apart.
        difference = np.abs(pixels(payload) - pixels(alone["image"])).max()
        assert difference <= 1, f"image {i} differs by {difference} levels from its own request"


def test_seeds_of_a_batch_wrap_around_past_the_largest(handler):
    response = handler(
        {"inputs": "a red circle", "seed": 2**32 - 1, "num_images_per_prompt": 2, **FAST}
    )
    assert response["seeds"] == [2**32 - 1, 0]
    alone = handler({"inputs": "a red circle", "seed": 0, **FAST})
    assert np.abs(pixels(response["images"][1]) - pixels(alone["image"])).max() <= 1


def test_echoed_parameters_reproduce_every_image_of_a_batch(family_handler):
    request = {
        "inputs": "a blue square",
        "negative_prompt": "red",
        "num_images_per_prompt": 2,
        "scheduler": "Euler a",
        **FAST,
    }
    first = family_handler(request)
    assert first["parameters"]["num_images_per_prompt"] == 2
    assert first["parameters"]["scheduler"] == "euler-a"  # the canonical name
    again = family_handler({"inputs": "a blue square", "parameters": first["parameters"]})
    assert again["images"] == first["images"]


def test_every_sampler_gives_its_own_image(family_handler):
    # Without metadata, which names the sampler: the pixels must differ, not only that text.
    request = {"inputs": "a green circle", "seed": 5, "metadata": False, **FAST}
    images = {
        s.name: family_handler({**request, "scheduler": s.name})["image"] for s in samplers.SAMPLERS
    }
    same = [(a, b) for a in images for b in images if a < b and images[a] == images[b]]
    assert same == [], f"samplers giving identical images: {same}"


@pytest.mark.parametrize("sampler", samplers.SAMPLERS, ids=lambda s: s.a1111)
def test_automatic1111_names_are_aliases_of_the_projects_names(family_handler, sampler):
    request = {"inputs": "a green circle", "seed": 5, "inference_steps": 2}
    canonical = family_handler({**request, "scheduler": sampler.name})
    for spelling in (sampler.a1111, sampler.a1111.upper(), sampler.name.upper()):
        aliased = family_handler({**request, "scheduler": spelling})
        assert aliased["image"] == canonical["image"], spelling
        assert aliased["parameters"]["scheduler"] == sampler.name


def test_samplers_that_need_packages_the_base_image_lacks_are_refused_by_name(handler):
    with pytest.raises(ValueError) as caught:
        handler({"inputs": "x", "scheduler": "DPM++ SDE"})  # needs torchsde
    assert "`scheduler`" in str(caught.value) and "DPM++ 2M SDE" in str(caught.value)


def test_the_schema_lists_both_names_of_every_sampler():
    from sd_endpoint.schema import request_model

    enum = request_model().model_json_schema()["properties"]["scheduler"]["enum"]
    for sampler in samplers.SAMPLERS:
        assert sampler.name in enum and sampler.a1111 in enum
