"""The README is the Hub model card: its front matter and reference tables must stay right."""

from __future__ import annotations

import re

from sd_endpoint import docs


def test_readme_tables_match_the_code():
    text = docs.README.read_text()
    assert docs.render(text) == text, "run: .venv/bin/python -m sd_endpoint.docs"


def test_model_card_front_matter_is_kept(repo_root):
    text = (repo_root / "README.md").read_text()
    front = re.match(r"---\n(.*?)\n---\n", text, flags=re.DOTALL)
    assert front, "README.md must start with YAML front matter"
    lines = front.group(1).splitlines()
    assert "license: creativeml-openrail-m" in lines
    assert "inference: true" in lines
    assert "pipeline_tag: text-to-image" in lines
    for tag in ("stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "diffusers"):
        assert f"- {tag}" in lines


def test_requirements_never_pin_torch_and_fit_the_base_image(repo_root):
    lines = [
        line.split("#")[0].strip()
        for line in (repo_root / "requirements.txt").read_text().splitlines()
    ]
    specs = [line for line in lines if line]
    assert not [s for s in specs if re.match(r"torch\b", s)], "torch comes from the base image"
    base = {"diffusers": "0.33.1", "transformers": "4.51.3", "accelerate": "1.6.0"}
    for spec in specs:
        name, _, bound = spec.partition(">=")
        if name in base:
            assert tuple(map(int, bound.split("."))) <= tuple(map(int, base[name].split(".")))
        assert "==" not in spec and "<" not in spec, f"{spec}: no pins in requirements.txt"
