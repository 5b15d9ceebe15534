"""model_tools.families: each family's description agrees with the configs shipped for it, and
the lookups that detection and the import make find the right family."""

from __future__ import annotations

import dataclasses
import json

import pytest

from model_tools import families
from model_tools.families import FAMILIES, SD1, SD2
from model_tools.single_file import to_original


def read(folder, *parts) -> dict:
    return json.loads(folder.joinpath(*parts).read_text())


@pytest.mark.parametrize("family", FAMILIES.values(), ids=FAMILIES)
def test_description_agrees_with_the_shipped_configs(family):
    folder = family.config
    index = read(folder, "model_index.json")
    assert index["_class_name"] == family.pipeline_class
    assert all(index[name] == [None, None] for name in family.unused_components)
    assert all(index[key] == value for key, value in family.pipeline_options.items())
    scheduler = read(folder, "scheduler", "scheduler_config.json")
    assert scheduler["prediction_type"] == family.default_prediction
    native = family.native_sizes[family.default_prediction]
    assert read(folder, "vae", "config.json")["sample_size"] == native
    assert read(folder, "unet", "config.json")["sample_size"] * 8 == native
    for encoder in family.text_encoders:
        config = read(folder, encoder.component, "config.json")
        assert (config["hidden_size"], config["hidden_act"]) == (encoder.width, encoder.hidden_act)
        assert index[encoder.component] == ["transformers", encoder.model_class]
        specials = read(folder, encoder.tokenizer, "special_tokens_map.json")
        assert specials["pad_token"] == encoder.pad_token
        assert encoder.prefix.startswith(family.marker)


def test_markers_tell_the_families_apart():
    markers = [family.marker for family in FAMILIES.values()]
    assert not [a for a in markers for b in markers if a != b and a.startswith(b)]


def test_shipped_configs_are_found_by_path_however_it_is_spelled(tmp_path):
    assert families.of_config(SD2.config) is SD2
    assert families.of_config(SD1.config / ".." / "sd1") is SD1
    assert families.of_config(tmp_path) is None


def test_a_family_whose_first_encoder_is_another_familys_only_one_is_told_by_its_second():
    second = dataclasses.replace(SD2.text_encoders[0], component="text_encoder_2")
    two = dataclasses.replace(SD1, key="two", text_encoders=(*SD1.text_encoders, second))
    has = {"text_encoder"}
    fits = lambda encoder: encoder.component in has  # noqa: E731
    assert families.best_match([SD1, two], fits) is SD1
    has.add("text_encoder_2")
    assert families.best_match([SD1, two], fits) is two
    has.clear()
    assert families.best_match([SD1, two], fits) is None


def test_the_writer_wants_one_state_per_text_encoder():
    with pytest.raises(ValueError, match="1 text encoder"):
        to_original("sd1", {}, {}, {}, {})
    with pytest.raises(ValueError, match="2 text encoder"):
        to_original("sdxl", {}, {}, {}, {}, {})
    with pytest.raises(ValueError, match="not one of sd1, sd2, sdxl"):
        to_original("sd3", {}, {}, {}, {}, {})
