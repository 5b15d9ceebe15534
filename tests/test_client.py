"""The client, as a command and as a function, against real local servers on loopback."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image
from servers import TOKEN, LocalServer, clean_environ, free_port, scripted_folder

from sd_endpoint.client import EndpointError, build_parser, generate
from sd_endpoint.loader import REPO_ROOT
from sd_endpoint.schema import accepted_fields, request_model

SMALL = ["--height", "64", "--width", "64", "--num-inference-steps", "2"]


def run_client(*args: str, env: dict[str, str] | None = None, cwd=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "sd_endpoint.client", *args],
        capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO_ROOT,
        env={**clean_environ(), **(env or {})},
    )  # fmt: skip


def test_the_command_writes_a_png_and_prints_the_seed_and_time(repo_server, tmp_path):
    out = tmp_path / "out.png"
    done = run_client("a red circle on a white background", "-o", str(out), "--seed", "41",
                      "--url", repo_server.url, "--token", TOKEN, *SMALL)  # fmt: skip
    assert done.returncode == 0, done.stderr
    with Image.open(out) as image:
        assert (image.format, image.size) == ("PNG", (64, 64))
    assert f"wrote {out}" in done.stdout
    assert "seed 41" in done.stdout
    assert " s" in done.stdout.split("seed 41")[1]  # the time taken


def test_the_command_takes_the_token_from_hf_token_and_the_format_from_the_file_name(
    repo_server, tmp_path
):
    out = tmp_path / "cat.jpg"
    done = run_client("a blue square", "-o", str(out), "--url", repo_server.url, *SMALL,
                      env={"HF_TOKEN": TOKEN})  # fmt: skip
    assert done.returncode == 0, done.stderr
    with Image.open(out) as image:
        assert image.format == "JPEG"


def test_without_the_token_the_command_fails_with_the_servers_message(repo_server, tmp_path):
    done = run_client("a red circle", "-o", str(tmp_path / "x.png"), "--url", repo_server.url)
    assert done.returncode == 1
    assert "HTTP 401" in done.stderr and "Authorization: Bearer" in done.stderr
    assert not (tmp_path / "x.png").exists()


def test_a_bad_field_fails_with_the_servers_explanation(repo_server):
    done = run_client("a red circle", "--width", "65", "--url", repo_server.url, "--token", TOKEN)
    assert done.returncode == 1
    assert "HTTP 400" in done.stderr and "`width`" in done.stderr and "multiple of 8" in done.stderr


def test_an_unreachable_server_is_reported_with_a_hint():
    done = run_client("a red circle", "--url", f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 1
    assert "cannot reach" in done.stderr and "sd_endpoint.server" in done.stderr


def test_every_request_field_is_an_option():
    options = {o for action in build_parser()._actions for o in action.option_strings}
    for name in accepted_fields(request_model()):
        if name != "inputs":  # the positional prompt
            assert "--" + name.replace("_", "-") in options


def test_loras_are_options_named_once_per_lora_and_adding_up_per_name(repo_server, tmp_path):
    runs = {
        "split": ["--lora", "green-shapes:0.25", "--lora", "green-shapes:0.5"],
        "whole": ["--loras", "green-shapes:0.75"],
        "none": [],
    }
    images = {}
    for name, options in runs.items():
        out = tmp_path / f"{name}.png"
        done = run_client("a red circle", "-o", str(out), "--seed", "5", *options,
                          "--url", repo_server.url, "--token", TOKEN, *SMALL)  # fmt: skip
        assert done.returncode == 0, done.stderr
        images[name] = out.read_bytes()
    assert images["split"] == images["whole"] != images["none"]
    done = run_client("a red circle", "--lora", "nope", "--url", repo_server.url, "--token", TOKEN)
    assert done.returncode == 1 and "`nope`" in done.stderr and "green-shapes" in done.stderr
    assert build_parser().parse_args(["x", "--lora", "a:2", "--lora", "b"]).loras == [
        ("a", 2.0),
        ("b", 1.0),
    ]


def test_generate_returns_the_image_and_the_seed_that_reproduces_it(repo_server):
    first = generate("a green triangle", url=repo_server.url, token=TOKEN, height=64, width=64,
                     num_inference_steps=2)  # fmt: skip
    again = generate("a green triangle", url=repo_server.url, token=TOKEN, height=64, width=64,
                     num_inference_steps=2, seed=first.seed)  # fmt: skip
    assert again.image == first.image
    assert first.image.startswith(b"\x89PNG")
    assert first.parameters["width"] == 64 and first.seconds > 0


def test_generate_raises_with_the_status_and_the_servers_message(repo_server):
    with pytest.raises(EndpointError) as caught:
        generate("a red circle", url=repo_server.url, token="not-the-token")
    assert caught.value.status == 401
    assert "bearer token" in caught.value.message


def test_the_command_waits_while_the_server_loads_and_says_so(tmp_path):
    folder = scripted_folder(tmp_path / "model", "hold")
    server = LocalServer(folder, tmp_path / "server.log")
    try:
        server.wait_listening()
        client = subprocess.Popen(
            [sys.executable, "-m", "sd_endpoint.client", "ok", "-o", str(tmp_path / "o.png"),
             "--url", server.url],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            server.wait_for_log(r"POST / 503")
            (folder / "hold").unlink()
            stdout, stderr = client.communicate(timeout=120)
        finally:
            client.kill()
    finally:
        server.stop()
    assert client.returncode == 0, stderr
    assert "not ready" in stderr and "loading" in stderr
    assert (tmp_path / "o.png").exists() and "wrote" in stdout


@pytest.mark.skipif(
    not (REPO_ROOT / ".venv" / "bin" / "python").exists(),
    reason="scripts/imagine.sh uses .venv, which scripts/setup_env.sh .venv makes",
)
def test_the_readme_quickstart_script_writes_a_png_where_the_caller_asked(tmp_path):
    done = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "imagine.sh"), "a red circle", "-o", "out.png",
         "--seed", "42", *SMALL],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env=clean_environ(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    with Image.open(tmp_path / "out.png") as image:
        assert image.size == (64, 64)
    assert "seed 42" in done.stdout
