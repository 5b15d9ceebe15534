"""The README's reference tables, made from the request model and the settings.

``python -m sd_endpoint.docs`` rewrites the marked blocks of README.md; the test suite fails
when README.md and the code disagree.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from .schema import ALIASES, DEFAULT_LIMITS, request_model
from .settings import Limits, documented_variables

README = Path(__file__).resolve().parent.parent / "README.md"


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


def environment_table() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, default, help_text in documented_variables():
        rows.append(f"| `{name}` | `{default}` | {help_text} |")
    return "\n".join(rows)


BLOCKS = {"parameters": parameter_table, "environment": environment_table}


def render(text: str) -> str:
    for name, make in BLOCKS.items():
        pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", flags=re.DOTALL)
        if not pattern.search(text):
            raise ValueError(f"README.md lacks the <!-- {name}:begin/end --> markers")
        text = pattern.sub(lambda m, make=make: m.group(1) + make() + "\n" + m.group(2), text)
    return text


if __name__ == "__main__":
    rendered = render(README.read_text())
    if "--check" in sys.argv:
        sys.exit(0 if rendered == README.read_text() else "README.md is out of date")
    README.write_text(rendered)
