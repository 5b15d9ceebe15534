"""The local server over real HTTP on loopback: `python -m sd_endpoint.server` in a subprocess.

Most tests talk to this repo's own handler (``repo_server``, shared by the session, with a
bearer token). What the real model cannot show on demand (slow loading, a crash inside the
handler, a long call to interrupt) uses ``tests/scripted_handler.py``, served the same way
from a folder of its own.
"""

from __future__ import annotations

import base64
import io
import json
import re
import signal
import socket
import threading
import time

import pytest
import requests
from PIL import Image
from servers import TOKEN, LocalServer, scripted_folder

from sd_endpoint import loras
from sd_endpoint.loader import REPO_ROOT
from sd_endpoint.schema import GenerationResponse, accepted_fields, request_model
from sd_endpoint.settings import Limits

SMALL = {"height": 64, "width": 64, "num_inference_steps": 2}
STOP_TIMEOUT = 120


def post(server, body, *, path="/", headers=None, **kwargs) -> requests.Response:
    headers = {**server.headers, **(headers or {})}
    return requests.post(server.url + path, json=body, headers=headers, timeout=300, **kwargs)


def image_of(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# --- bearer token -----------------------------------------------------------------------------


def test_predict_without_a_token_is_refused_with_401_and_a_bearer_challenge(repo_server):
    response = requests.post(repo_server.url, json={"inputs": "a red circle", **SMALL})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "Authorization: Bearer" in response.json()["error"]


@pytest.mark.parametrize("header", ["Bearer wrong-token", "Basic dXNlcjpwYXNz", "Bearer", TOKEN])
def test_a_wrong_or_malformed_token_is_refused_the_same_way(repo_server, header):
    response = requests.post(
        repo_server.url + "/predict",
        json={"inputs": "a red circle"},
        headers={"Authorization": header},
    )
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.json()["error"]


def test_the_right_token_reaches_the_handler(repo_server):
    # A bad width: the handler's own 400 proves the request got past the token check.
    response = post(repo_server, {"inputs": "a red circle", "width": 65})
    assert response.status_code == 400
    assert "`width`" in response.json()["error"]


def test_health_needs_no_token_and_answers_ok_once_loaded(repo_server):
    for path in ("/health", "/"):
        response = requests.get(repo_server.url + path)
        assert (response.status_code, response.text) == (200, "Ok")


# --- generating -------------------------------------------------------------------------------


def test_post_root_returns_the_handlers_json_with_a_png_and_the_seed(repo_server):
    response = post(repo_server, {"inputs": "a red circle", "seed": 11, **SMALL})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = GenerationResponse.model_validate(response.json())  # the documented response shape
    assert body.seed == 11
    image = image_of(base64.b64decode(body.image))
    assert (image.format, image.size) == ("PNG", (64, 64))


def test_accept_image_png_returns_the_same_png_as_raw_bytes_with_the_seed(repo_server):
    body = {"inputs": "a blue square", "parameters": {"seed": 12, **SMALL}}
    as_json = post(repo_server, body, path="/predict")
    raw = post(repo_server, body, path="/predict", headers={"Accept": "image/png"})
    assert raw.status_code == 200, raw.text
    assert raw.headers["content-type"] == "image/png"
    assert raw.headers["X-Seed"] == "12"
    assert raw.content == base64.b64decode(as_json.json()["image"])


def test_accept_image_jpeg_gets_a_jpeg_with_the_warnings_in_a_header(repo_server):
    body = {"inputs": "a green triangle", "negative_prompt": "red", "guidance_scale": 1.0,
            "seed": 13, **SMALL}  # fmt: skip
    response = post(repo_server, body, headers={"Accept": "image/jpeg"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    assert image_of(response.content).format == "JPEG"
    warnings = json.loads(response.headers["X-Warnings"])
    assert any("negative_prompt" in warning for warning in warnings)


def test_accept_that_contradicts_output_format_is_406_naming_both(repo_server):
    response = post(
        repo_server,
        {"inputs": "a red circle", "output_format": "jpeg"},
        headers={"Accept": "image/png"},
    )
    assert response.status_code == 406
    assert "image/jpeg" in response.json()["error"]


def test_the_seeds_python_example_request_works(repo_server):
    # The seed README's Python example (flat form, `inference_steps`, explicit JSON content
    # type), at 64x64 and 2 steps instead of 512x512 and 25 to keep the suite fast.
    API_URL = repo_server.url
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    payload = {
        "inputs": "a red circle on a white background",
        "negative_prompt": "blurry",
        "height": 64,
        "width": 64,
        "guidance_scale": 7.5,
        "inference_steps": 2,
    }
    response = requests.post(API_URL, headers=headers, json=payload)
    assert response.status_code == 200, response.text
    image = image_of(base64.b64decode(response.json()["image"]))
    assert image.size == (64, 64)


def test_huggingface_hub_text_to_image_gets_an_image(repo_server):
    # InferenceClient asks for `Accept: image/png` and sends the standard `parameters` form.
    from huggingface_hub import InferenceClient

    client = InferenceClient(model=repo_server.url, token=TOKEN)
    image = client.text_to_image(
        "a yellow circle", height=64, width=64, num_inference_steps=2, seed=14
    )
    assert image.size == (64, 64)


# --- error semantics --------------------------------------------------------------------------


def test_a_handler_value_error_is_400_with_its_message(repo_server):
    response = post(repo_server, {"inputs": "a red circle", "parameters": {"height": 100}})
    assert response.status_code == 400
    assert "`height`" in response.json()["error"] and "multiple of 8" in response.json()["error"]


@pytest.mark.parametrize("body", [b'{"inputs": "a red circle"', b"", b"\xff\xfe not text"])
def test_a_body_that_is_not_json_is_400_saying_so(repo_server, body):
    response = requests.post(
        repo_server.url,
        data=body,
        headers={**repo_server.headers, "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_content_type_other_than_json_is_415(repo_server, content_type):
    headers = {**repo_server.headers}
    if content_type:
        headers["Content-Type"] = content_type
    response = requests.post(repo_server.url, data=b'{"inputs": "a red circle"}', headers=headers)
    assert response.status_code == 415
    assert "application/json" in response.json()["error"]


def test_json_with_a_charset_parameter_is_accepted(repo_server):
    response = requests.post(
        repo_server.url,
        data=b'{"inputs": "a red circle", "width": 65}',
        headers={**repo_server.headers, "Content-Type": "application/json; charset=UTF-8"},
    )
    assert response.status_code == 400  # the handler's verdict, not 415
    assert "`width`" in response.json()["error"]


def test_a_body_over_the_size_limit_is_413_with_or_without_a_declared_length(repo_server):
    big = json.dumps({"inputs": "x" * (2 * 1024 * 1024)}).encode()
    headers = {**repo_server.headers, "Content-Type": "application/json"}
    declared = requests.post(repo_server.url, data=big, headers=headers)
    chunked = requests.post(repo_server.url, data=iter([big[:1000], big[1000:]]), headers=headers)
    for response in (declared, chunked):
        assert response.status_code == 413
        assert "1,048,576 bytes" in response.json()["error"]
    assert "Transfer-Encoding" in chunked.request.headers  # no length was declared


def test_unknown_routes_answer_in_the_same_error_shape(repo_server):
    assert requests.get(repo_server.url + "/nowhere").json() == {"error": "Not Found"}
    assert requests.put(repo_server.url + "/predict").status_code == 405


# --- OpenAPI ----------------------------------------------------------------------------------


def test_openapi_describes_both_request_forms_from_the_handlers_request_model(repo_server):
    spec = requests.get(repo_server.url + "/openapi.json").json()
    model = request_model(Limits(), loras.names_in(REPO_ROOT))
    schemas = spec["components"]["schemas"]
    for path in ("/", "/predict"):
        operation = spec["paths"][path]["post"]
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": "#/components/schemas/TextToImageRequest"}
        ok = operation["responses"]["200"]["content"]
        assert ok["application/json"]["schema"]["$ref"].endswith("/GenerationResponse")
        assert "image/png" in ok
        assert {"400", "401", "413", "415", "500", "503"} <= set(operation["responses"])
    flat = schemas["TextToImageRequest"]
    assert set(flat["properties"]) == {*accepted_fields(model), "parameters"}
    assert flat["required"] == ["inputs"]
    for name, field in model.model_fields.items():
        assert flat["properties"][name]["description"] == field.description
    # The LoRAs of the repository's loras/ folder, known before the model loads.
    assert flat["properties"]["loras"]["propertyNames"]["enum"] == ["green-shapes"]
    width = flat["properties"]["width"]["anyOf"][0]  # an integer, or null for the default
    assert (width["minimum"], width["maximum"], width["multipleOf"]) == (64, Limits().max_side, 8)
    nested = schemas["TextToImageParameters"]
    assert set(nested["properties"]) == set(accepted_fields(model)) - {"inputs"}
    assert set(schemas["GenerationResponse"]["properties"]) == {
        "image",
        "images",
        "seed",
        "seeds",
        "parameters",
        "warnings",
        "nsfw_content_detected",
    }
    # The echoed parameters are the request's fields, every one, the prompt aside.
    used = schemas["UsedParameters"]
    assert set(used["properties"]) == set(model.model_fields) - {"inputs"}
    assert set(used["required"]) == set(used["properties"])


# --- logs -------------------------------------------------------------------------------------


def test_the_log_has_an_access_line_per_request_and_never_the_token_or_prompt(repo_server):
    prompt = "a secret-prompt-4c1e circle"
    ok = post(repo_server, {"inputs": prompt, "seed": 15, **SMALL}, path="/predict")
    refused = requests.post(
        repo_server.url + "/predict",
        json={"inputs": prompt},
        headers={"Authorization": "Bearer wrong-token-9d2b"},
    )
    assert (ok.status_code, refused.status_code) == (200, 401)
    log = repo_server.wait_for_log(r"POST /predict 401 [\d.]+ ms")
    line = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} - sd_endpoint\.server\.access - INFO - "
    assert re.search(line + r"127\.0\.0\.1 - POST /predict 200 [\d.]+ ms", log)
    assert re.search(line + r"127\.0\.0\.1 - POST /predict 401 [\d.]+ ms", log)
    assert TOKEN not in log and "wrong-token-9d2b" not in log
    assert "secret-prompt" not in log


# --- loading, failures and concurrency (scripted handler) -------------------------------------


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """A scripted handler served with no token (so, on loopback only)."""
    folder = scripted_folder(tmp_path_factory.mktemp("scripted"))
    server = LocalServer(folder, folder / "server.log")
    server.folder = folder
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_with_no_token_configured_it_serves_unauthenticated_on_loopback_only(scripted):
    assert post(scripted, {"inputs": "ok"}).status_code == 200
    assert f"Uvicorn running on http://127.0.0.1:{scripted.port}" in scripted.log()


def test_health_answers_503_while_the_model_loads_and_200_after(tmp_path):
    folder = scripted_folder(tmp_path, "hold")
    server = LocalServer(folder, tmp_path / "server.log")
    try:
        server.wait_listening()
        health = requests.get(server.url + "/health")
        assert health.status_code == 503 and "loading" in health.json()["error"]
        early = post(server, {"inputs": "ok"})
        assert early.status_code == 503 and "Retry-After" in early.headers
        (folder / "hold").unlink()
        server.wait_ready()
        assert post(server, {"inputs": "ok"}).status_code == 200
    finally:
        server.stop()


def test_a_handler_that_fails_to_load_stops_the_server_with_the_reason_in_the_log(tmp_path):
    server = LocalServer(scripted_folder(tmp_path, "fail"), tmp_path / "server.log")
    try:
        assert server.process.wait(STOP_TIMEOUT) == 1
    finally:
        server.stop()
    log = server.log()
    assert "the handler failed to load" in log and "told to fail at start" in log


def test_an_unexpected_handler_error_is_a_generic_500_and_the_server_keeps_serving(scripted):
    response = post(scripted, {"inputs": "crash"})
    assert response.status_code == 500
    message = response.json()["error"]
    assert "internal error" in message and "crashed on purpose" not in message
    incident = re.search(r"request ([0-9a-f]{8})", message).group(1)
    log = scripted.wait_for_log("crashed on purpose")
    assert f"request {incident} failed inside the handler" in log
    assert "Traceback (most recent call last)" in log
    assert post(scripted, {"inputs": "ok"}).status_code == 200


def test_a_value_error_from_any_handler_is_400_with_its_message(scripted):
    response = post(scripted, {"inputs": "bad"})
    assert response.status_code == 400
    assert response.json() == {"error": "`inputs` said bad: the scripted handler refuses it"}


def run_in_threads(*calls):
    """Run the calls at once; their results, in order, and the order they finished in."""
    results, finished = [None] * len(calls), []

    def run(i, call):
        results[i] = call()
        finished.append(i)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    return results, finished


def test_one_handler_call_at_a_time_while_health_still_answers(scripted):
    sleepers = [lambda s=s: post(scripted, {"inputs": "sleep 0.4", "seed": s}) for s in (1, 2, 3)]
    health = lambda: requests.get(scripted.url + "/health")  # noqa: E731
    results, finished = run_in_threads(*sleepers, health)
    assert all(r.status_code == 200 for r in results)
    assert [r.json()["parameters"]["concurrent_calls"] for r in results[:3]] == [1, 1, 1]
    assert finished.index(3) < finished.index(2)  # health did not wait for the queue


def test_the_concurrency_option_lets_calls_overlap(tmp_path):
    server = LocalServer(scripted_folder(tmp_path), tmp_path / "server.log", "--concurrency", "2")
    try:
        server.wait_ready()
        calls = [lambda s=s: post(server, {"inputs": "sleep 0.5", "seed": s}) for s in (1, 2)]
        results, _ = run_in_threads(*calls)
        assert max(r.json()["parameters"]["concurrent_calls"] for r in results) == 2
    finally:
        server.stop()


def raw_request(server, body: dict) -> socket.socket:
    """A request sent by hand, so that the test can hang up before the answer."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


def wait_for_file(path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)


def test_clients_that_hang_up_break_nothing_and_queued_ones_are_not_run(scripted):
    folder = scripted.folder
    busy = threading.Thread(target=post, args=(scripted, {"inputs": "sleep 1", "seed": 21}))
    busy.start()
    wait_for_file(folder / "started-21")
    queued = raw_request(scripted, {"inputs": "sleep 0", "seed": 22})  # waits behind 21
    time.sleep(0.3)  # for the server to read it and queue it
    queued.close()
    busy.join()
    assert "client left" in scripted.wait_for_log("client left")
    assert not (folder / "started-22").exists()

    running = raw_request(scripted, {"inputs": "sleep 0.5", "seed": 23})
    wait_for_file(folder / "started-23")
    running.close()  # hangs up while the handler runs
    after = post(scripted, {"inputs": "ok"})
    assert after.status_code == 200
    assert requests.get(scripted.url + "/health").status_code == 200


def test_sigterm_lets_the_request_in_flight_finish(tmp_path):
    folder = scripted_folder(tmp_path)
    server = LocalServer(folder, tmp_path / "server.log")
    answers = []
    flight = threading.Thread(
        target=lambda: answers.append(post(server, {"inputs": "sleep 1.5", "seed": 31}))
    )
    try:
        server.wait_ready()
        flight.start()
        wait_for_file(folder / "started-31")
    finally:
        code = server.stop()  # SIGTERM while the handler sleeps
    flight.join()
    assert answers[0].status_code == 200 and answers[0].json()["seed"] == 31
    # uvicorn re-raises the signal once it has shut down, so the exit is by SIGTERM, but clean.
    assert code in (0, -signal.SIGTERM)
    assert "Finished server process" in server.log()


def test_body_limit_and_concurrency_defaults_come_from_the_environment(monkeypatch):
    from sd_endpoint.server import parse_args

    monkeypatch.setenv("SD_MAX_BODY_BYTES", "2048")
    monkeypatch.setenv("SD_CONCURRENCY", "3")
    args = parse_args([])
    assert (args.max_body_bytes, args.concurrency) == (2048, 3)
    assert parse_args(["--max-body-bytes", "10"]).max_body_bytes == 10
