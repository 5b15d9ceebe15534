"""The playground page, driven in a real browser (headless Chromium) against the real server.

One browser per module, a fresh browser context (a new tab, its own storage) per test. Most
tests use this repo's own handler (``repo_server``, which requires ``TOKEN``); what the real
model cannot show on demand (a model still loading, a long wait to cancel) uses
``tests/scripted_handler.py``. ``SD_UPDATE_SCREENSHOT=1`` writes the README's screenshot.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from PIL import Image, ImageStat
from servers import TOKEN, LocalServer, scripted_folder

from sd_endpoint import loras
from sd_endpoint.loader import REPO_ROOT
from sd_endpoint.page import CONTENT_SECURITY_POLICY, FOLDER

SCREENSHOT = REPO_ROOT / "docs" / "playground.png"
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 120_000  # a generation on a busy 2-core machine, with margin


def chromium_path() -> str | None:
    names = ("chromium", "chromium-browser", "google-chrome")
    return next((path for path in map(shutil.which, names) if path), None)


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        executable = None
    if executable is None:
        # CI runs as root and scripts/test.sh installs Chromium: there the tests must run.
        reason = "needs playwright (requirements-dev.txt) and Chromium (apt-get install chromium)"
        if os.geteuid() == 0:
            pytest.fail(reason)
        pytest.skip(reason)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=BROWSER_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def context(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(WAIT_MS)
    yield context
    context.close()


def open_page(context, server, *, token: str | None = None):
    """The page at the server's root URL, form built; ``token`` as if the user had typed it."""
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(error))
    page.errors = errors
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready]")
    if token is not None:
        page.evaluate("t => sessionStorage.setItem('sd-endpoint-token', t)", token)
    return page


def generate(page, *, keys: bool = False) -> dict:
    """Submit the form and wait for the image; returns what the page shows of it."""
    before = page.locator("#history li").count()
    if keys:
        page.keyboard.press("Control+Enter")
    else:
        page.click("#generate")
    page.wait_for_function(
        "n => document.querySelectorAll('#history li').length > n || "
        "!document.getElementById('error').hidden",
        arg=before,
    )
    assert page.locator("#error").is_hidden(), page.inner_text("#error")
    src = page.get_attribute("#images img", "src")
    return {
        "src": src,
        "image": src.split(",", 1)[1],
        "seed": int(page.inner_text("#images .seed")),
        "used": used_parameters(page),
    }


def wait_for_text(page, selector: str, pattern: str) -> None:
    """Until the element's text matches the regular expression ``pattern``."""
    # A function, not an expression: the page's policy forbids evaluating strings.
    page.wait_for_function(
        "([selector, pattern]) => "
        "new RegExp(pattern).test(document.querySelector(selector).textContent)",
        arg=[selector, pattern],
    )


def used_parameters(page) -> dict[str, str]:
    names = page.locator("#used dt").all_inner_texts()
    return dict(zip(names, page.locator("#used dd").all_inner_texts(), strict=True))


def decoded(payload: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
    image.load()
    return image


def set_field(page, name: str, value: str) -> None:
    page.fill(f"#field-{name}", value)


# --- what the server sends ---------------------------------------------------------------------


def test_browsers_get_the_page_at_the_root_and_probes_and_api_clients_get_ok(repo_server):
    html = requests.get(repo_server.url + "/", headers={"Accept": "text/html,*/*;q=0.8"})
    assert html.status_code == 200
    assert html.headers["content-type"].startswith("text/html")
    assert "<title>Stable Diffusion playground</title>" in html.text
    assert requests.get(repo_server.url + "/playground").text == html.text
    for accept in (None, "*/*", "application/json", "text/plain"):
        headers = {"Accept": accept} if accept else {}
        for path in ("/", "/health"):
            response = requests.get(repo_server.url + path, headers=headers)
            assert (response.status_code, response.text) == (200, "Ok"), (path, accept)
            assert "content-security-policy" not in response.headers
    probe = requests.get(repo_server.url + "/health", headers={"Accept": "text/html"})
    assert (probe.status_code, probe.text) == (200, "Ok")


def test_the_page_forbids_inline_script_and_other_origins_and_never_holds_the_token(repo_server):
    policy = dict(
        part.strip().split(" ", 1) for part in CONTENT_SECURITY_POLICY.split(";") if part.strip()
    )
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == "'self'"
    assert policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"
    assert "unsafe-inline" not in CONTENT_SECURITY_POLICY
    assert "unsafe-eval" not in CONTENT_SECURITY_POLICY
    assert "http" not in CONTENT_SECURITY_POLICY and "*" not in CONTENT_SECURITY_POLICY
    for path, media in [
        ("/", "text/html"),
        ("/playground/page.js", "text/javascript"),
        ("/playground/page.css", "text/css"),
        ("/playground/request.json", "application/json"),
    ]:
        response = requests.get(repo_server.url + path, headers={"Accept": "text/html"})
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith(media), path
        assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY, path
        assert response.headers["x-content-type-options"] == "nosniff", path
        assert TOKEN not in response.text, path
    html = (FOLDER / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "inline script"
    assert not re.search(r"\son\w+\s*=", html), "inline event handler"
    assert not re.search(r"\sstyle\s*=", html), "inline style"
    assert not re.search(r"(src|href)=\"(https?:)?//", html), "another origin"


def test_the_policy_is_enforced_in_the_browser(context, repo_server):
    page = open_page(context, repo_server)
    blocked = page.evaluate(
        """async (other) => {
            const script = document.createElement("script");
            script.textContent = "window.injected = true";
            document.body.append(script);
            let fetched = true;
            try { await fetch(other); } catch { fetched = false; }
            return {injected: window.injected === true, fetched};
        }""",
        repo_server.url.replace("127.0.0.1", "localhost") + "/health",
    )
    assert blocked == {"injected": False, "fetched": False}


def test_the_server_prints_the_pages_url_at_start(repo_server):
    assert f"playground: open {repo_server.url}/ in a browser" in repo_server.log()


# --- generating --------------------------------------------------------------------------------


def test_the_form_is_the_request_model_with_its_limits_defaults_and_help(context, repo_server):
    page = open_page(context, repo_server)
    schema = requests.get(repo_server.url + "/playground/request.json").json()["request"]
    for name, field in schema["properties"].items():
        box = page.locator(f"#box-{name}")
        assert box.count() == 1, f"no control for `{name}`"
        assert page.inner_text(f"#help-{name}") == field["description"]
    steps = page.locator("#field-num_inference_steps")
    assert (steps.get_attribute("min"), steps.get_attribute("max")) == ("1", "100")
    assert steps.input_value() == str(schema["properties"]["num_inference_steps"]["default"])
    width = page.locator("#field-width")
    assert (width.get_attribute("step"), width.input_value()) == ("8", "")
    options = page.locator("#field-scheduler option").all_inner_texts()
    assert options == schema["properties"]["scheduler"]["enum"]
    assert page.locator("#seed-mode").input_value() == "random"


def test_generate_with_defaults_shows_an_image_whose_pixels_decode(context, repo_server):
    page = open_page(context, repo_server, token=TOKEN)
    shown = generate(page)
    image = decoded(shown["image"])
    assert (image.format, image.size) == ("PNG", (64, 64))  # the shipped model's native size
    assert max(ImageStat.Stat(image.convert("L")).stddev) > 10, "a blank image"
    natural = page.evaluate("document.querySelector('#images img').naturalWidth")
    assert natural == 64  # the browser decoded it too
    used = shown["used"]
    assert used["num_inference_steps"] == "25" and used["seed"] == str(shown["seed"])
    with page.expect_download() as download:
        page.click("#images a.download")
    assert download.value.suggested_filename == f"sd-{shown['seed']}.png"
    assert Path(download.value.path()).read_bytes() == base64.b64decode(shown["image"])
    assert re.fullmatch(r"done in \d+\.\d s", page.inner_text("#status"))
    assert page.errors == []


def test_a_seed_gives_the_same_image_twice_and_random_gives_new_seeds(context, repo_server):
    page = open_page(context, repo_server, token=TOKEN)
    set_field(page, "num_inference_steps", "4")
    set_field(page, "seed", "1234")
    assert page.locator("#seed-mode").input_value() == "keep"  # typing a seed keeps it
    first = generate(page, keys=True)  # Ctrl+Enter submits
    second = generate(page)
    assert first["seed"] == second["seed"] == 1234
    assert first["image"] == second["image"]
    page.select_option("#seed-mode", "random")
    drawn = [generate(page)["seed"], generate(page)["seed"]]
    assert drawn[0] != drawn[1]
    assert page.input_value("#field-seed") == str(drawn[1])  # the last seed, ready to keep


def test_a_bad_width_shows_the_servers_message_at_the_width_field(context, repo_server):
    page = open_page(context, repo_server, token=TOKEN)
    set_field(page, "width", "65")
    page.click("#generate")
    page.wait_for_selector("#error-width:not([hidden])")
    direct = requests.post(
        repo_server.url, json={"inputs": "a red circle", "width": 65}, headers=repo_server.headers
    )
    assert direct.status_code == 400
    message = direct.json()["error"].removeprefix("invalid request: ")
    assert page.inner_text("#error-width") == message
    assert page.get_attribute("#field-width", "aria-invalid") == "true"
    assert page.evaluate("document.activeElement.id") == "field-width"
    assert page.inner_text("#status") == "HTTP 400"
    assert page.locator("#error-height").is_hidden()
    assert page.locator("#images img").count() == 0
    set_field(page, "width", "72")  # editing the field clears its message
    assert page.locator("#error-width").is_hidden()


def test_no_token_asks_for_it_a_wrong_one_is_refused_and_it_stays_in_this_tab(context, repo_server):
    page = open_page(context, repo_server)
    requested = []
    page.on("request", lambda request: requested.append(request))
    page.click("#generate")
    page.wait_for_selector("#token-form:not([hidden])")
    assert "needs a token" in page.inner_text("#token-message")
    page.fill("#token", "not-the-token")
    page.press("#token", "Enter")
    wait_for_text(page, "#token-message", "not the one")
    assert page.locator("#token-form").is_visible()
    page.fill("#token", TOKEN)
    page.press("#token", "Enter")
    page.wait_for_selector("#images img")
    assert page.locator("#token-form").is_hidden()
    assert page.evaluate("sessionStorage.getItem('sd-endpoint-token')") == TOKEN
    assert TOKEN not in page.evaluate("JSON.stringify(localStorage)")
    assert TOKEN not in page.evaluate("document.cookie")
    # Sent to this server only, and only with the predict requests.
    sent = [r for r in requested if "authorization" in r.headers]
    assert sent and all(r.url == repo_server.url + "/" and r.method == "POST" for r in sent)
    assert all(r.url.startswith(repo_server.url + "/") for r in requested)
    other_tab = context.new_page()
    other_tab.goto(repo_server.url + "/")
    assert other_tab.evaluate("sessionStorage.getItem('sd-endpoint-token')") is None
    page.click("#forget-token")
    assert page.evaluate("sessionStorage.getItem('sd-endpoint-token')") is None


def test_every_image_of_a_request_shows_with_its_own_seed(context, repo_server):
    page = open_page(context, repo_server, token=TOKEN)
    if page.locator("#field-num_images_per_prompt").count() == 0:
        pytest.skip("the request model has no num_images_per_prompt")
    set_field(page, "num_images_per_prompt", "2")
    set_field(page, "num_inference_steps", "3")
    set_field(page, "seed", "40")
    generate(page)
    sources = [img.get_attribute("src") for img in page.locator("#images img").all()]
    assert len(sources) == 2 and sources[0] != sources[1]
    for src in sources:
        assert decoded(src.split(",", 1)[1]).size == (64, 64)
    assert page.locator("#images .seed").all_inner_texts() == ["40", "41"]
    downloads = [a.get_attribute("download") for a in page.locator("#images a.download").all()]
    assert downloads == ["sd-40.png", "sd-41.png"]


def test_clicking_a_history_thumbnail_restores_its_settings(context, repo_server):
    page = open_page(context, repo_server, token=TOKEN)
    set_field(page, "inputs", "a blue square on a black background")
    set_field(page, "num_inference_steps", "3")
    set_field(page, "seed", "5")
    first = generate(page)
    set_field(page, "inputs", "a green triangle on a white background")
    set_field(page, "num_inference_steps", "4")
    page.select_option("#seed-mode", "random")
    page.select_option("#field-scheduler", "euler")
    second = generate(page)
    assert first["image"] != second["image"]
    thumbnails = page.locator("#history button")
    assert thumbnails.count() == 2
    thumbnails.nth(1).click()  # newest first: the first image is the second thumbnail
    assert page.input_value("#field-inputs") == "a blue square on a black background"
    assert page.input_value("#field-num_inference_steps") == "3"
    assert page.input_value("#field-seed") == "5"
    assert page.input_value("#seed-mode") == "keep"
    assert page.input_value("#field-scheduler") == "default"
    assert page.get_attribute("#images img", "src") == first["src"]
    again = generate(page)  # the restored settings make the same image
    assert again["image"] == first["image"]
    thumbnails.nth(1).click()  # the second image, now one further down the list
    assert page.input_value("#field-seed") == str(second["seed"])
    assert page.input_value("#field-scheduler") == "euler"


def test_the_page_offers_the_servers_loras_and_applies_the_one_picked_at_its_weight(
    context, repo_server
):
    page = open_page(context, repo_server, token=TOKEN)
    assert page.locator("#field-loras .pick label").all_inner_texts() == list(
        loras.names_in(REPO_ROOT)
    )
    assert not page.is_checked("#pick-loras-0")
    set_field(page, "seed", "21")
    set_field(page, "num_inference_steps", "4")
    plain = generate(page)
    page.fill("#field-loras input.weight", "0.8")  # typing a weight picks the LoRA
    assert page.is_checked("#pick-loras-0")
    picked = generate(page)
    assert json.loads(picked["used"]["loras"]) == {"green-shapes": 0.8}
    body = {
        "inputs": page.input_value("#field-inputs"),
        "parameters": {"seed": 21, "num_inference_steps": 4, "loras": {"green-shapes": 0.8}},
    }
    direct = requests.post(repo_server.url, json=body, headers=repo_server.headers, timeout=120)
    assert picked["image"] == direct.json()["image"] != plain["image"]
    page.uncheck("#pick-loras-0")
    page.locator("#history button").nth(1).click()  # the image without a LoRA
    assert not page.is_checked("#pick-loras-0")
    page.locator("#history button").nth(0).click()  # the newest: the one with it
    assert page.is_checked("#pick-loras-0")
    assert page.input_value("#field-loras input.weight") == "0.8"
    assert generate(page)["image"] == picked["image"]
    assert page.errors == []


def test_the_copied_curl_and_python_requests_return_the_same_image(context, repo_server, tmp_path):
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=repo_server.url)
    page = open_page(context, repo_server, token=TOKEN)
    prompt = 'a red circle\'s "edge" $HOME `id` \\ on a white background ü'  # quoting, both ways
    set_field(page, "inputs", prompt)
    set_field(page, "num_inference_steps", "5")
    set_field(page, "guidance_scale", "6")
    page.select_option("#field-output_format", "webp")
    shown = generate(page)  # a random seed: the snippet must pin the one drawn
    page.click("#copy summary")
    page.click("button[data-target=curl]")
    wait_for_text(page, "#copied", "^copied")
    curl = page.evaluate("navigator.clipboard.readText()")
    assert curl == page.inner_text("#curl")
    words = shlex.split(curl.replace("\\\n", " "))  # as the shell reads it
    sent = json.loads(words[words.index("-d") + 1])
    assert sent == {  # what was set, and the seed drawn; defaults are the endpoint's anyway
        "inputs": prompt,
        "parameters": {
            "num_inference_steps": 5,
            "guidance_scale": 6,
            "output_format": "webp",
            "seed": shown["seed"],
        },
    }
    python = page.inner_text("#python")
    for snippet in (curl, python):
        assert TOKEN not in snippet and "HF_TOKEN" in snippet
    env = {**os.environ, "HF_TOKEN": TOKEN}
    done = subprocess.run(["bash", "-c", curl], env=env, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    answer = json.loads(done.stdout)
    assert answer["seed"] == shown["seed"]
    assert answer["image"] == shown["image"]
    assert decoded(answer["image"]).format == "WEBP"
    done = subprocess.run(
        [sys.executable, "-c", python], env=env, cwd=tmp_path, capture_output=True, timeout=120
    )
    assert done.returncode == 0, done.stderr.decode()
    written = f"sd-{shown['seed']}.webp"
    assert done.stdout.decode().split() == ["wrote", written]
    assert (tmp_path / written).read_bytes() == base64.b64decode(shown["image"])


# --- loading, waiting, cancelling: the scripted handler ----------------------------------------


def test_while_the_model_loads_the_page_says_so_and_retries_until_it_answers(context, tmp_path):
    folder = scripted_folder(tmp_path / "model", "hold")
    server = LocalServer(folder, tmp_path / "server.log")
    try:
        server.wait_listening()
        assert requests.get(server.url + "/").status_code == 503  # probes: unchanged
        page = open_page(context, server)
        assert "loading" in page.inner_text("#health")
        page.click("#generate")
        wait_for_text(page, "#status", "model is loading")
        (folder / "hold").unlink()
        page.wait_for_selector("#images img")
        wait_for_text(page, "#health", "^model loaded$")
        assert re.fullmatch(r"done in \d+\.\d s", page.inner_text("#status"))
    finally:
        server.stop()


def test_a_long_wait_shows_the_elapsed_time_and_can_be_cancelled(context, tmp_path):
    server = LocalServer(scripted_folder(tmp_path / "model"), tmp_path / "server.log")
    try:
        server.wait_ready()
        page = open_page(context, server)
        set_field(page, "inputs", "sleep 3")
        page.click("#generate")
        wait_for_text(page, "#status", r"^working… [1-9]\.\d s$")
        assert page.locator("#generate").is_disabled()
        page.click("#cancel")
        assert page.inner_text("#status") == "cancelled"
        assert page.locator("#generate").is_enabled() and page.locator("#cancel").is_hidden()
        assert page.locator("#images img").count() == 0
        set_field(page, "inputs", "a red circle")
        generate(page)  # the page works on after a cancel
    finally:
        server.stop()


# --- the README's screenshot -------------------------------------------------------------------


def test_a_screenshot_of_the_page(context, repo_server, tmp_path):
    page = open_page(context, repo_server, token=TOKEN)
    for prompt, seed in [
        ("a green triangle on a black background", 3),
        ("a blue square on a white background", 11),
        ("a red circle on a white background", 7),
    ]:
        set_field(page, "inputs", prompt)
        set_field(page, "seed", str(seed))
        generate(page)
    page.click("#copy summary")
    page.fill("#endpoint-url", "https://abcdef123456.us-east-1.aws.endpoints.huggingface.cloud/")
    page.locator("#endpoint-url").blur()
    path = tmp_path / "playground.png"
    page.screenshot(path=path, full_page=True)
    # 256 colours: the page is flat colour and text, and the file stays small in the repo.
    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)
    shot = Image.open(path)
    assert shot.width == 1280 and shot.height >= 900
    if os.environ.get("SD_UPDATE_SCREENSHOT") == "1":
        shutil.copy(path, SCREENSHOT)
