"""README.md is the Hub model card and docs/ its reference: the card's front matter, the tables
made from the code and every link between the pages must stay right."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from sd_endpoint import docs


def test_generated_tables_match_the_code():
    assert docs.out_of_date() == [], "run: .venv/bin/python -m sd_endpoint.docs"


def test_a_table_edited_by_hand_is_out_of_date_until_regenerated(tmp_path):
    for path in docs.GENERATED:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(docs.ROOT / path, tmp_path / path)
    configuration = tmp_path / "docs" / "configuration.md"
    text = configuration.read_text()
    row = "| `SD_MAX_STEPS` | `100` |"
    assert row in text
    configuration.write_text(text.replace(row, "| `SD_MAX_STEPS` | `50` |"))
    assert docs.out_of_date(tmp_path) == ["docs/configuration.md"]
    docs.write(tmp_path)
    assert docs.out_of_date(tmp_path) == []
    assert configuration.read_text() == text


def test_every_setting_and_limit_has_a_row_in_the_configuration_page(repo_root):
    text = (repo_root / "docs" / "configuration.md").read_text()
    for name, _, _ in docs.documented_variables():
        assert f"| `{name}` |" in text
    limits = text[text.index("<!-- limits:begin -->") : text.index("<!-- limits:end -->")]
    assert "`SD_MAX_WORK`" in limits and "`SD_DEVICE`" not in limits


def test_a_page_without_its_markers_is_refused():
    with pytest.raises(ValueError, match=r"docs/configuration.md lacks the <!-- limits:begin"):
        docs.render("no markers here", {"limits": docs.limits_table}, "docs/configuration.md")


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


# --- links -----------------------------------------------------------------------------------

FENCE = re.compile(r"^(```|~~~).*?^\1", flags=re.DOTALL | re.MULTILINE)
CODE_SPAN = re.compile(r"(`+).+?\1", flags=re.DOTALL)
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", flags=re.MULTILINE)


def _prose(text: str) -> str:
    """The text outside code blocks and code spans, where a link is a link."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def _anchors(text: str) -> set[str]:
    """The anchors GitHub and the Hub give a page's headings (``## The request`` ->
    ``the-request``; a repeated heading gets ``-1``, ``-2``...)."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in HEADING.findall(FENCE.sub("", text)):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def broken_links(pages: list[Path]) -> list[str]:
    """Every relative link in ``pages`` whose file, or heading in that file, does not exist."""
    broken = []
    for page in pages:
        for target in LINK.findall(_prose(page.read_text())):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked.read_text()):
                broken.append(f"{page.name}: {target} (no such heading)")
    return broken


def documentation_pages(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def test_every_relative_link_points_at_an_existing_file_and_heading(repo_root):
    pages = documentation_pages(repo_root)
    assert len(pages) > 5
    assert broken_links(pages) == []


def test_every_docs_page_is_linked_from_the_readme(repo_root):
    readme = _prose((repo_root / "README.md").read_text())
    linked = {Path(target.partition("#")[0]).name for target in LINK.findall(readme)}
    assert [p.name for p in documentation_pages(repo_root)[1:] if p.name not in linked] == []


def test_the_link_check_finds_a_missing_file_or_heading(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Some `code`: here\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/page.md) [ok](docs/page.md#some-code-here) [ok](#title) [web](https://x.y)\n"
        "`[not a link](gone.md)`\n\n```\n[not a link](gone.md)\n```\n\n# Title\n"
        "[gone](docs/gone.md) [bad anchor](docs/page.md#nowhere) ![img](docs/missing.png)\n"
    )
    assert broken_links(documentation_pages(tmp_path)) == [
        "README.md: docs/gone.md (no such file)",
        "README.md: docs/page.md#nowhere (no such heading)",
        "README.md: docs/missing.png (no such file)",
    ]
