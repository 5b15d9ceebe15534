"""The soak's requests: valid ones with known seeds (sizes, samplers, formats, both request
forms, a raw image answer), invalid ones (broken or hostile JSON, fields over the limits, a
body over the size limit, a wrong content type or token), and one its client abandons."""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Case:
    name: str
    body: bytes
    kind: str  # "valid", "invalid" or "abandoned"
    status: int = 200  # the status it must get
    headers: dict = field(default_factory=dict)


def _json(value) -> bytes:
    return json.dumps(value).encode()


def valid_cases() -> list[Case]:
    """Requests with known seeds: sizes, samplers, formats, both forms, raw image answers."""
    bodies = [
        ("flat, defaults", {"inputs": "a red circle", "seed": 1, "inference_steps": 2}),
        (
            "standard form, euler-a, 96 wide",
            {
                "inputs": "a blue square",
                "parameters": {
                    "seed": 2,
                    "num_inference_steps": 3,
                    "height": 64,
                    "width": 96,
                    "scheduler": "euler-a",
                },
            },
        ),
        (
            "jpeg, negative prompt",
            {
                "inputs": "a green triangle",
                "seed": 3,
                "inference_steps": 2,
                "output_format": "jpeg",
                "negative_prompt": "red",
            },
        ),
        (
            "webp, karras, 96 high",
            {
                "inputs": "a yellow circle",
                "seed": 4,
                "inference_steps": 2,
                "height": 96,
                "width": 64,
                "scheduler": "dpm++2m-karras",
                "output_format": "webp",
            },
        ),
        (
            "unicode prompt, no guidance",
            {
                "inputs": "日本語のプロンプト 😀 \u202e",
                "seed": 5,
                "inference_steps": 2,
                "guidance_scale": 1.0,
            },
        ),
        (
            "prompt over 77 tokens, ddim",
            {"inputs": "a red square " * 40, "seed": 6, "inference_steps": 2, "scheduler": "ddim"},
        ),
    ]
    cases = [Case(name, _json(body), "valid") for name, body in bodies]
    cases.append(
        Case(
            "raw png via Accept",
            _json({"inputs": "a blue circle", "seed": 7, "inference_steps": 2}),
            "valid",
            headers={"Accept": "image/png"},
        )
    )
    return cases


def invalid_cases(max_body_bytes: int, token: str | None) -> list[Case]:
    def bad(name, body, status=400, **headers):
        return Case(
            name, body if isinstance(body, bytes) else _json(body), "invalid", status, headers
        )

    cases = [
        bad("broken JSON", b'{"inputs": "a red circle"'),
        bad("invalid UTF-8", b'{"inputs": "\xff"}'),
        bad("not an object", b"[1, 2, 3]"),
        bad("nested 100,000 deep", b"[" * 100_000 + b"]" * 100_000),
        bad(
            "a field nested 990 deep", b'{"inputs": "x", "seed": ' + b"[" * 990 + b"]" * 990 + b"}"
        ),
        bad("lone surrogate", b'{"inputs": "\\ud800"}'),
        bad("NaN guidance", b'{"inputs": "x", "guidance_scale": NaN}'),
        bad("infinite height", b'{"inputs": "x", "height": 1e999}'),
        bad("5,000-digit seed", b'{"inputs": "x", "seed": ' + b"9" * 5000 + b"}"),
        bad("missing inputs", {"parameters": {"seed": 1}}),
        bad("unknown field", {"inputs": "x", "steps": 5}),
        bad("side over the limit", {"inputs": "x", "height": 4096}),
        bad(
            "work over the limit",
            {"inputs": "x", "height": 1024, "width": 1024, "num_inference_steps": 100},
        ),
        bad("prompt over the limit", {"inputs": "x" * 100_000}),
        bad("body over the size limit", b'{"inputs": "' + b"x" * (max_body_bytes + 1) + b'"}', 413),
        bad("wrong content type", b'{"inputs": "x"}', 415, **{"Content-Type": "text/plain"}),
    ]
    if token:
        cases.append(
            bad("wrong token", b'{"inputs": "x"}', 401, Authorization="Bearer not-" + token)
        )
    return cases


def abandoned_case() -> Case:
    return Case(
        "abandoned midway",
        _json({"inputs": "a red circle", "seed": 8, "inference_steps": 3}),
        "abandoned",
    )
