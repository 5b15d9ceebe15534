"""The handler's contract: request forms, defaults, seeds, sizes, validation, concurrency."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from sd_endpoint.schema import DEFAULT_GUIDANCE, DEFAULT_STEPS, SCHEDULERS, GenerationResponse
from tests.conftest import decode_image

FAST = {"inference_steps": 4}  # enough steps to exercise the sampler, few enough to be quick


@pytest.fixture
def unet_calls(handler):
    """Counts real UNet forward passes, to prove when generation did (not) start."""
    calls = []
    hook = handler.engine.pipe.unet.register_forward_hook(lambda *args: calls.append(1))
    yield calls
    hook.remove()


def test_loads_like_the_runtime_on_cpu_in_float32(handler):
    assert type(handler).__name__ == "EndpointHandler"
    assert handler.engine.device.type == "cpu"
    assert str(handler.engine.dtype) == "torch.float32"
    assert handler.engine.pipe.safety_checker is None


def test_defaults_give_a_png_of_the_native_size(family_handler):
    response = family_handler({"inputs": "a red circle on a white background"})
    assert set(response) == set(GenerationResponse.model_fields)
    assert response["images"] == [response["image"]]
    assert response["seeds"] == [response["seed"]]
    assert response["nsfw_content_detected"] is None  # no checker ships with this model
    image = decode_image(response["image"])
    assert image.format == "PNG"
    assert image.size == family_handler.engine.native_size[::-1]
    assert response["parameters"]["num_inference_steps"] == DEFAULT_STEPS == 25
    assert response["parameters"]["guidance_scale"] == DEFAULT_GUIDANCE == 7.5
    assert 0 <= response["seed"] < 2**32
    assert response["warnings"] == []


def test_flat_and_standard_forms_give_identical_bytes(family_handler):
    values = {
        "negative_prompt": "blue",
        "height": 64,
        "width": 96,
        "guidance_scale": 5.0,
        "seed": 7,
    }
    flat = family_handler({"inputs": "a green square", **values, "inference_steps": 5})
    standard = family_handler(
        {"inputs": "a green square", "parameters": {**values, "num_inference_steps": 5}}
    )
    assert flat["image"] == standard["image"]
    assert flat["parameters"] == standard["parameters"]


def test_same_seed_gives_identical_png_and_other_seed_differs(family_handler):
    request = {"inputs": "a blue triangle", "seed": 1234, **FAST}
    first, second = family_handler(request), family_handler(dict(request))
    other = family_handler({**request, "seed": 1235})
    assert first["image"] == second["image"]
    assert first["seed"] == 1234
    assert other["image"] != first["image"]


def test_drawn_seed_is_returned_and_reproduces_the_image(family_handler):
    drawn = family_handler({"inputs": "a yellow circle", **FAST})
    again = family_handler({"inputs": "a yellow circle", "seed": drawn["seed"], **FAST})
    assert again["image"] == drawn["image"]
    # The echoed parameters are a complete request: sending them back reproduces the image.
    echoed = family_handler({"inputs": "a yellow circle", "parameters": drawn["parameters"]})
    assert echoed["image"] == drawn["image"]


@pytest.mark.parametrize(("height", "width"), [(64, 128), (128, 64), (72, 200)])
def test_non_square_sizes_come_out_as_asked(family_handler, height, width):
    response = family_handler({"inputs": "a red square", "height": height, "width": width, **FAST})
    assert decode_image(response["image"]).size == (width, height)


def test_integral_floats_count_as_integers(handler):
    as_int = handler({"inputs": "a red square", "height": 64, "seed": 3, **FAST})
    as_float = handler({"inputs": "a red square", "height": 64.0, "seed": 3.0, **FAST})
    assert as_float["image"] == as_int["image"]


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_lossy_output_formats_decode(family_handler, fmt):
    response = family_handler({"inputs": "a red square", "output_format": fmt, **FAST})
    assert decode_image(response["image"]).format == fmt.upper()


@pytest.mark.parametrize("name", [s for s in SCHEDULERS if s != "default"])
def test_every_scheduler_generates_reproducibly(family_handler, name):
    request = {"inputs": "a green circle", "scheduler": name, "seed": 5, **FAST}
    first, second = family_handler(request), family_handler(request)
    assert first["image"] == second["image"]
    assert first["parameters"]["scheduler"] == name


def test_default_scheduler_is_the_model_folders_own(handler, repo_root):
    config = json.loads((repo_root / "scheduler" / "scheduler_config.json").read_text())
    assert type(handler.engine.new_scheduler("default")).__name__ == config["_class_name"]


def test_a_prompt_past_77_tokens_is_used_whole_without_a_warning(family_handler):
    response = family_handler({"inputs": "a red circle " * 20, **FAST})  # 200 tokens: 3 chunks
    assert response["warnings"] == []


@pytest.mark.parametrize(
    "change",
    [
        {"inputs": "a blue square"},
        {"negative_prompt": "red"},
        {"guidance_scale": 3.0},
        {"inference_steps": 5},
        {"seed": 8},
    ],
    ids=lambda change: next(iter(change)),
)
def test_each_field_that_shapes_the_image_changes_it(family_handler, change):
    request = {"inputs": "a red circle", "seed": 7, "height": 64, "width": 64, **FAST}
    changed, unchanged = family_handler({**request, **change}), family_handler(request)
    # Pixels, not bytes: the PNG's parameters text differs anyway.
    assert not np.array_equal(_pixels(changed), _pixels(unchanged))


def test_warns_that_negative_prompt_needs_guidance(family_handler):
    response = family_handler(
        {"inputs": "a red circle", "negative_prompt": "blue", "guidance_scale": 1, **FAST}
    )
    assert any("negative_prompt" in w for w in response["warnings"])


BAD_REQUESTS = [
    # (body, words the message must contain)
    (["a", "list"], ["JSON object", "array"]),
    ("a string", ["JSON object"]),
    (None, ["JSON object", "null"]),
    ({}, ["`inputs`", "required"]),
    ({"s": "a red circle"}, ["unknown field `s`", "`inputs`", "Accepted fields", "inputs"]),
    ({"inputs": ""}, ["`inputs`", "at least 1 character"]),
    ({"inputs": "   "}, ["`inputs`", "white space"]),
    ({"inputs": 42}, ["`inputs`", "string"]),
    ({"inputs": ["a", "b"]}, ["`inputs`", "string"]),
    ({"inputs": "x", "parameters": "height=512"}, ["`parameters`", "JSON object"]),
    ({"inputs": "x", "parameters": {"inputs": "y"}}, ["`inputs`", "top level"]),
    ({"inputs": "x", "height": 64, "parameters": {"height": 64}}, ["`height`", "once"]),
    ({"inputs": "x", "steps": 5}, ["unknown field `steps`", "num_inference_steps"]),
    ({"inputs": "x", "height": "512"}, ["`height`", "integer", "multiple of 8"]),
    ({"inputs": "x", "height": True}, ["`height`", "boolean"]),
    ({"inputs": "x", "width": 512.5}, ["`width`", "integer"]),
    ({"inputs": "x", "width": 513}, ["`width`", "multiple of 8", "(got 513)"]),
    ({"inputs": "x", "height": 8}, ["`height`", "greater than or equal to 64"]),
    ({"inputs": "x", "height": 4096}, ["`height`", "less than or equal to 1024"]),
    ({"inputs": "x", "height": 10**30}, ["`height`"]),
    (
        {"inputs": "x", "height": 1024, "width": 1024, "inference_steps": 100},
        ["height × width × steps", "limit"],
    ),
    (
        # Within the work limit as one image (20,971,520), over it as three.
        {
            "inputs": "x",
            "height": 1024,
            "width": 1024,
            "inference_steps": 20,
            "num_images_per_prompt": 3,
        },
        ["height × width × steps × images", "62,914,560", "num_images_per_prompt"],
    ),
    (
        {"inputs": "x", "num_images_per_prompt": 0},
        ["`num_images_per_prompt`", "greater than or equal to 1"],
    ),
    (
        {"inputs": "x", "num_images_per_prompt": 5},
        ["`num_images_per_prompt`", "less than or equal to 4"],
    ),
    ({"inputs": "x", "num_images_per_prompt": True}, ["`num_images_per_prompt`", "boolean"]),
    ({"inputs": "x", "metadata": "yes"}, ["`metadata`", "true or false"]),
    ({"inputs": "x", "metadata": 1}, ["`metadata`", "true or false"]),
    ({"inputs": "x", "guidance_scale": float("nan")}, ["`guidance_scale`", "finite"]),
    ({"inputs": "x", "guidance_scale": float("inf")}, ["`guidance_scale`", "finite"]),
    ({"inputs": "x", "guidance_scale": -1}, ["`guidance_scale`", "greater than or equal to 0"]),
    ({"inputs": "x", "guidance_scale": 1e6}, ["`guidance_scale`", "less than or equal to 30"]),
    ({"inputs": "x", "guidance_scale": "7.5"}, ["`guidance_scale`", "number"]),
    ({"inputs": "x", "inference_steps": 0}, ["`inference_steps`", "greater than or equal to 1"]),
    (
        {"inputs": "x", "parameters": {"num_inference_steps": 1000}},
        ["`num_inference_steps`", "less than or equal to 100"],
    ),
    ({"inputs": "x", "inference_steps": 5, "num_inference_steps": 5}, ["same field"]),
    ({"inputs": "x", "negative_prompt": 3}, ["`negative_prompt`", "string"]),
    ({"inputs": "x" * 5000}, ["`inputs`", "at most 4000"]),
    ({"inputs": "x", "seed": -1}, ["`seed`", "greater than or equal to 0"]),
    ({"inputs": "x", "seed": 2**32}, ["`seed`", "4294967295"]),
    ({"inputs": "x", "seed": "42"}, ["`seed`", "integer"]),
    ({"inputs": "x", "scheduler": "k_lms"}, ["`scheduler`", "dpm++2m"]),
    ({"inputs": "x", "output_format": "gif"}, ["`output_format`", "png"]),
]


@pytest.mark.parametrize(("body", "words"), BAD_REQUESTS, ids=lambda v: repr(v)[:40])
def test_rejects_bad_input_before_generating_with_a_clear_message(handler, unet_calls, body, words):
    with pytest.raises(ValueError) as caught:
        handler(body)
    for word in words:
        assert word in str(caught.value)
    assert unet_calls == [], "generation started for a bad request"
    # ...and the handler is healthy afterwards.
    response = handler({"inputs": "a red circle", "inference_steps": 1, "seed": 1})
    assert decode_image(response["image"]).size == handler.engine.native_size[::-1]


def test_reports_every_bad_field_at_once(handler):
    with pytest.raises(ValueError) as caught:
        handler({"inputs": "x", "height": 7, "seed": -5})
    assert "`height`" in str(caught.value) and "`seed`" in str(caught.value)


def test_concurrent_calls_return_the_bytes_of_sequential_calls(handler):
    requests = [
        {"inputs": prompt, "seed": seed, "height": 64, "width": width, **FAST, "scheduler": sched}
        for prompt, seed, width, sched in [
            ("a red circle", 1, 64, "default"),
            ("a blue square", 2, 96, "euler-a"),
            ("a green triangle", 3, 64, "ddim"),
            ("a yellow circle", 4, 128, "default"),
            ("a red square", 5, 64, "euler"),
            ("a blue circle", 6, 96, "dpm++2m-karras"),
        ]
    ]
    sequential = [handler(r)["image"] for r in requests]
    start = threading.Barrier(len(requests))

    def call(request):
        start.wait()
        return handler(request)["image"]

    with ThreadPoolExecutor(len(requests)) as pool:
        concurrent = list(pool.map(call, requests))
    assert concurrent == sequential


def _pixels(response) -> np.ndarray:
    return np.asarray(decode_image(response["image"]), dtype=np.int16)


CROSS_STACK_SCRIPT = """
import json, sys
from sd_endpoint.loader import load_handler
print(json.dumps(load_handler(sys.argv[1])(json.loads(sys.argv[2]))))
"""


@pytest.mark.skipif(
    not os.environ.get("SD_OTHER_PYTHON"),
    reason="set SD_OTHER_PYTHON to the other stack's python (scripts/test.sh does)",
)
def test_other_library_stack_gives_the_same_image(handler, repo_root):
    """transformers 4.51 re-initialises unmatched weights with only a warning: a model folder
    it half-loads would still give images, just different ones. Compare across stacks."""
    request = {"inputs": "a red circle on a white background", "seed": 99, "inference_steps": 10}
    here = handler(request)
    other = subprocess.run(
        [
            os.environ["SD_OTHER_PYTHON"],
            "-c",
            CROSS_STACK_SCRIPT,
            str(repo_root),
            json.dumps(request),
        ],
        capture_output=True,
        text=True,
        cwd=repo_root,
        timeout=600,
        check=True,
    )
    there = json.loads(other.stdout.strip().splitlines()[-1])
    assert there["seed"] == here["seed"]
    difference = np.abs(_pixels(here) - _pixels(there))
    # Same weights and noise give the same picture; kernels may differ in the last bit.
    assert difference.max() <= 2, f"images differ by up to {difference.max()} levels"


def test_text_encoder_and_tokenizer_load_completely(repo_root):
    from transformers import CLIPTextModel, CLIPTokenizer

    _, info = CLIPTextModel.from_pretrained(repo_root / "text_encoder", output_loading_info=True)
    # position_ids is a buffer rebuilt at load time, never a weight.
    assert set(info["missing_keys"]) <= {"text_model.embeddings.position_ids"}
    assert not info["unexpected_keys"]
    assert not info.get("mismatched_keys")
    tokenizer = CLIPTokenizer.from_pretrained(repo_root / "tokenizer")
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (repo_root / "tokenizer").iterdir()}
    ids = tokenizer("a red circle").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id


def test_shipped_weights_are_safetensors_only(repo_root):
    model_files = [*repo_root.glob("*.*"), *repo_root.glob("*/*.*")]
    pickles = [p for p in model_files if p.suffix in {".bin", ".ckpt", ".pt", ".pth", ".pkl"}]
    assert pickles == []
    for component in ("unet", "vae", "text_encoder"):
        assert list((repo_root / component).glob("*.safetensors"))


def test_runtime_style_load_from_a_fresh_process(repo_root):
    """The runtime executes handler.py by path with only the repo folder on sys.path."""
    script = (
        "import importlib.util, sys; sys.path.insert(0, sys.argv[1]); "
        "spec = importlib.util.spec_from_file_location('handler', sys.argv[1] + '/handler.py'); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        "h = m.EndpointHandler(sys.argv[1]); "
        "print(len(h({'inputs': 'a red circle', 'inference_steps': 1})['image']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(repo_root)],
        capture_output=True,
        text=True,
        cwd=Path("/"),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.strip().splitlines()[-1]) > 100
