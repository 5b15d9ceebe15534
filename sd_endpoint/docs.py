"""The reference tables of README.md and docs/, made from the request model and the settings.

``python -m sd_endpoint.docs`` rewrites the marked blocks (``<!-- name:begin -->`` ...
``<!-- name:end -->``) of every file in ``GENERATED``; ``--check`` only says whether any is out
of date. The test suite fails when a file and the code disagree.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from .schema import ALIASES, DEFAULT_LIMITS, request_model
from .settings import Limits, documented_variables, env_name

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def parameter_table(limits: Limits = DEFAULT_LIMITS) -> str:
    model = request_model(limits)
    rows = ["| field | type | default | allowed, and what it does |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        names = " / ".join(f"`{n}`" for n in [name, *[a for a, t in ALIASES.items() if t == name]])
        kind = _type_name(name, field.annotation)
        value = None if field.is_required() else field.get_default(call_default_factory=True)
        if field.is_required():
            default = "required"
        elif value is None:
            default = "native size" if name in {"height", "width"} else "none"
        elif isinstance(value, bool):
            default = f"`{str(value).lower()}`"  # as JSON writes it
        else:
            default = f"`{value}`"
        rows.append(f"| {names} | {kind} | {default} | {field.description} |")
    return "\n".join(rows)


def _type_name(name: str, annotation: object) -> str:
    text = str(annotation)
    if name in {"scheduler", "output_format"}:
        return "string (enum)"
    for token, label in (
        ("dict", "object"),
        ("bool", "boolean"),
        ("str", "string"),
        ("int", "integer"),
        ("float", "number"),
    ):
        if re.search(rf"\b{token}\b", text):
            return label
    return text


LIMIT_VARIABLES = frozenset(env_name(f.name) for f in fields(Limits))


def _variable_table(*, limits: bool) -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, default, help_text in documented_variables():
        if (name in LIMIT_VARIABLES) == limits:
            rows.append(f"| `{name}` | `{default}` | {help_text} |")
    return "\n".join(rows)


def settings_table() -> str:
    """How the endpoint loads and runs the model: every setting that is not a request limit."""
    return _variable_table(limits=False)


def limits_table() -> str:
    """What one request may ask for."""
    return _variable_table(limits=True)


# Which file holds which generated blocks, by path from the repository root.
GENERATED: dict[str, dict[str, Callable[[], str]]] = {
    "README.md": {"parameters": parameter_table},
    "docs/configuration.md": {"settings": settings_table, "limits": limits_table},
}


def render(text: str, blocks: dict[str, Callable[[], str]], where: str = "README.md") -> str:
    """``text`` with each named block between its markers made afresh."""
    for name, make in blocks.items():
        pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", flags=re.DOTALL)
        if not pattern.search(text):
            raise ValueError(f"{where} lacks the <!-- {name}:begin/end --> markers")
        text = pattern.sub(lambda m, make=make: m.group(1) + make() + "\n" + m.group(2), text)
    return text


def out_of_date(root: Path = ROOT) -> list[str]:
    """The generated files whose blocks disagree with the code."""
    return [
        path
        for path, blocks in GENERATED.items()
        if render((text := (root / path).read_text()), blocks, path) != text
    ]


def write(root: Path = ROOT) -> None:
    for path, blocks in GENERATED.items():
        file = root / path
        file.write_text(render(file.read_text(), blocks, path))


if __name__ == "__main__":
    if "--check" in sys.argv:
        stale = out_of_date()
        sys.exit(f"out of date: {', '.join(stale)}" if stale else 0)
    write()
