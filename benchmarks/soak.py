"""Bounded soak of the local server on loopback: concurrent clients, valid and hostile bodies.

    python scripts/soak.py                      # 8 clients x 50 requests, its own server
    python scripts/soak.py --clients 4 --requests 10 --seed 3
    python scripts/soak.py --url http://127.0.0.1:8000 --pid 1234 --token "$SD_API_TOKEN"

Without ``--url`` it starts ``python -m sd_endpoint.server`` on a free loopback port (with a
random bearer token, in the environment of this script: ``SD_*`` settings apply), and ends
it with SIGTERM while requests are in flight. Each client sends a seeded mix of valid
requests with known seeds, invalid ones (broken or hostile JSON, fields over the limits, a
body over the size limit, a wrong content type or token) and requests it abandons midway.

Criteria; the exit status is 1 when any fails:
* no response with a 5xx status, and every invalid request gets its 4xx with an ``error``;
* every valid response byte-identical to the same request sent alone before the soak;
* the server's RSS after the soak at most 50 MB over its RSS after the warm-up pass;
* the server healthy afterwards, and (own server) every request in flight at SIGTERM
  answered in full, then a clean exit.
It never runs longer than ``--max-seconds``: clients stop sending at that deadline, and an
unfinished soak fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import requests

from benchmarks.common import REPO_ROOT
from benchmarks.soak_cases import Case, abandoned_case, invalid_cases, valid_cases

JSON = "application/json"
RSS_GROWTH_LIMIT_MB = 50
STARTUP_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 600


@dataclass
class Answer:
    case: Case
    status: int | None
    seconds: float
    content: bytes = b""
    problem: str = ""  # empty when the answer met its criterion
    finished_at: float = 0.0


class Soak:
    def __init__(self, url: str, token: str | None, pid: int | None, max_body_bytes: int):
        self.url = url.rstrip("/")
        self.token = token
        self.process = psutil.Process(pid) if pid else None
        self.valid = valid_cases()
        self.invalid = invalid_cases(max_body_bytes, token)
        self.abandoned = abandoned_case()
        self.reference: dict[str, bytes] = {}
        self._local = threading.local()

    # ------------------------------------------------------------ one request

    def send(self, case: Case) -> Answer:
        if case.kind == "abandoned":
            return self.abandon(case)
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        headers = {"Content-Type": JSON}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        headers.update(case.headers)
        started = time.perf_counter()
        try:
            response = session.post(
                self.url + "/", data=case.body, headers=headers, timeout=REQUEST_TIMEOUT_S
            )
        except requests.RequestException as exc:
            return Answer(
                case,
                None,
                time.perf_counter() - started,
                problem=f"no answer: {type(exc).__name__}: {exc}",
            )
        answer = Answer(
            case,
            response.status_code,
            time.perf_counter() - started,
            response.content,
            finished_at=time.monotonic(),
        )
        answer.problem = self.judge(answer)
        return answer

    def abandon(self, case: Case) -> Answer:
        """Send a whole request, then hang up before the answer, at a random moment."""
        host, port = urlsplit(self.url).hostname, urlsplit(self.url).port
        head = (
            f"POST / HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {JSON}\r\n"
            f"Content-Length: {len(case.body)}\r\n"
        )
        if self.token:
            head += f"Authorization: Bearer {self.token}\r\n"
        started = time.perf_counter()
        with socket.create_connection((host, port), timeout=30) as connection:
            connection.sendall(head.encode() + b"\r\n" + case.body)
            time.sleep(random.random() * 0.3)
        return Answer(case, None, time.perf_counter() - started)

    def judge(self, answer: Answer) -> str:
        case, status = answer.case, answer.status
        if status != case.status:
            return f"status {status}, expected {case.status}: {answer.content[:200]!r}"
        if case.kind == "valid":
            expected = self.reference.get(case.name)
            if expected is not None and answer.content != expected:
                return "bytes differ from the same request sent alone"
            return ""
        try:
            error = json.loads(answer.content)["error"]
        except (ValueError, KeyError, TypeError):
            return f"no JSON error message: {answer.content[:200]!r}"
        return "" if isinstance(error, str) and error else "empty error message"

    # ------------------------------------------------------------ phases

    def rss_mb(self) -> float | None:
        return self.process.memory_info().rss / 2**20 if self.process else None

    def warm_up(self) -> list[Answer]:
        """Every case once, one at a time: the valid answers become the reference bytes."""
        answers = [self.send(case) for case in self.valid + self.invalid]
        for answer in answers:
            if answer.case.kind == "valid" and answer.status == 200:
                self.reference[answer.case.name] = answer.content
        self.send(self.abandoned)
        return answers

    def run(self, clients: int, per_client: int, seed: int, deadline: float) -> list[Answer]:
        def client(index: int) -> list[Answer]:
            rng = random.Random(seed * 1000 + index)
            answers = []
            for _ in range(per_client):
                if time.monotonic() > deadline:
                    break
                pick = rng.random()
                if pick < 0.55:
                    case = rng.choice(self.valid)
                elif pick < 0.92:
                    case = rng.choice(self.invalid)
                else:
                    case = self.abandoned
                answers.append(self.send(case))
            return answers

        start = threading.Barrier(clients)

        def started_together(index: int) -> list[Answer]:
            start.wait()
            return client(index)

        with ThreadPoolExecutor(clients) as pool:
            return [a for answers in pool.map(started_together, range(clients)) for a in answers]

    def healthy(self) -> bool:
        try:
            return requests.get(self.url + "/health", timeout=30).status_code == 200
        except requests.RequestException:
            return False


class RssSampler:
    """The server's peak RSS, sampled a few times a second in the background."""

    def __init__(self, soak: Soak):
        self.soak, self.peak, self._stop = soak, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self.peak = max(self.peak, self.soak.rss_mb() or 0.0)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *_):
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------- the server it owns


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(token: str, max_body_bytes: int, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "SD_API_TOKEN": token}
    log = open(log_path, "wb")  # noqa: SIM115  the server writes to it until it exits
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sd_endpoint.server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--max-body-bytes",
            str(max_body_bytes),
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}; see {log_path}")
        try:
            if requests.get(url + "/health", timeout=5).status_code == 200:
                return process, url
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the server was not ready after {STARTUP_TIMEOUT_S} s; see {log_path}")


def sigterm_in_flight(soak: Soak, process: subprocess.Popen) -> dict:
    """Send every valid case at once, SIGTERM the server mid-way, and check the answers."""
    with ThreadPoolExecutor(len(soak.valid)) as pool:
        futures = [pool.submit(soak.send, case) for case in soak.valid]
        time.sleep(0.3)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        answers = [f.result() for f in futures]
    try:
        code = process.wait(120)
    except subprocess.TimeoutExpired:
        process.kill()
        code = "no exit within 120 s"
    return {
        "sent": len(answers),
        "answered after SIGTERM": sum(a.finished_at > signalled for a in answers if a.status),
        "problems": [f"{a.case.name}: {a.problem}" for a in answers if a.problem],
        "exit code": code,
    }


# ---------------------------------------------------------------- figures


def percentiles(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000

    return f"{at(0.5):.0f} / {at(0.9):.0f} / {at(0.99):.0f} / {ordered[-1] * 1000:.0f} ms"


def soak(
    clients: int = 8,
    requests_per_client: int = 50,
    seed: int = 0,
    max_seconds: float = 900,
    url: str | None = None,
    pid: int | None = None,
    token: str | None = None,
    max_body_bytes: int = 1024 * 1024,
    log_path: Path | None = None,
) -> dict:
    """Run the whole soak and return its figures; ``figures["failed"]`` lists what failed."""
    started = time.monotonic()
    deadline = started + max_seconds
    process = None
    if url is None:
        token = token or secrets.token_hex(16)
        log_path = log_path or Path(os.environ.get("TMPDIR", "/tmp")) / "soak-server.log"
        process, url = start_server(token, max_body_bytes, log_path)
        pid = process.pid
    elif urlsplit(url).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("the soak runs against a server on loopback only")
    try:
        runner = Soak(url, token, pid, max_body_bytes)
        warm = runner.warm_up()
        rss_before = runner.rss_mb()
        soak_started = time.monotonic()
        with RssSampler(runner) as sampler:
            answers = runner.run(clients, requests_per_client, seed, deadline)
        soak_seconds = time.monotonic() - soak_started
        # The same requests alone once more: nothing the soak did changed any answer.
        after = [runner.send(case) for case in runner.valid]
        healthy = runner.healthy()
        rss_after = runner.rss_mb()
        shutdown = sigterm_in_flight(runner, process) if process else None
    finally:
        if process and process.poll() is None:
            process.kill()
            process.wait()

    answered = [a for a in answers if a.case.kind != "abandoned"]
    valid = [a for a in answered if a.case.kind == "valid"]
    invalid = [a for a in answered if a.case.kind == "invalid"]
    figures = {
        "requests": len(answers),
        "planned": clients * requests_per_client,
        "valid": len(valid),
        "invalid": len(invalid),
        "abandoned": len(answers) - len(answered),
        "statuses": dict(sorted(Counter(a.status for a in answered).items(), key=str)),
        "5xx": sum(1 for a in answered if a.status is not None and a.status >= 500),
        "no answer": sum(1 for a in answered if a.status is None),
        "valid byte-identical": sum(1 for a in valid if not a.problem),
        "problems": [f"{a.case.name}: {a.problem}" for a in warm + answers + after if a.problem],
        "latency valid (p50/p90/p99/max)": percentiles([a.seconds for a in valid]),
        "latency invalid (p50/p90/p99/max)": percentiles([a.seconds for a in invalid]),
        "images per second": len(valid) / soak_seconds if soak_seconds else 0.0,
        "rss after warm-up MB": rss_before,
        "rss peak MB": sampler.peak or None,
        "rss after soak MB": rss_after,
        "rss growth MB": None if rss_before is None else rss_after - rss_before,
        "healthy after": healthy,
        "sigterm": shutdown,
        "seconds": time.monotonic() - started,
    }
    failed = []
    if figures["requests"] < figures["planned"]:
        failed.append(f"stopped at the {max_seconds:g} s deadline")
    if figures["5xx"]:
        failed.append(f"{figures['5xx']} responses with a 5xx status")
    if figures["problems"]:
        failed.append(f"{len(figures['problems'])} answers not as expected")
    growth = figures["rss growth MB"]
    if growth is not None and growth >= RSS_GROWTH_LIMIT_MB:
        failed.append(f"RSS grew {growth:.1f} MB (limit {RSS_GROWTH_LIMIT_MB})")
    if not healthy:
        failed.append("/health did not answer 200 after the soak")
    # uvicorn re-raises SIGTERM once it has shut down: exiting by it is a clean exit.
    if shutdown and (shutdown["problems"] or shutdown["exit code"] not in (0, -signal.SIGTERM)):
        failed.append(
            "SIGTERM in flight: "
            + "; ".join(shutdown["problems"] + [f"exit code {shutdown['exit code']}"])
        )
    figures["failed"] = failed
    return figures


def print_table(figures: dict, clients: int, per_client: int) -> None:
    def mb(value):
        return "not measured (no --pid)" if value is None else f"{value:.1f} MB"

    rows = [
        ("clients x requests", f"{clients} x {per_client}"),
        (
            "requests sent",
            f"{figures['requests']} ({figures['valid']} valid, "
            f"{figures['invalid']} invalid, {figures['abandoned']} abandoned midway)",
        ),
        ("statuses", ", ".join(f"{k}: {v}" for k, v in figures["statuses"].items())),
        ("5xx responses", figures["5xx"]),
        (
            "valid answers byte-identical to alone",
            f"{figures['valid byte-identical']} of {figures['valid']}",
        ),
        ("latency valid p50/p90/p99/max", figures["latency valid (p50/p90/p99/max)"]),
        ("latency invalid p50/p90/p99/max", figures["latency invalid (p50/p90/p99/max)"]),
        ("images per second", f"{figures['images per second']:.2f}"),
        ("RSS after warm-up", mb(figures["rss after warm-up MB"])),
        ("RSS peak during soak", mb(figures["rss peak MB"])),
        (
            "RSS growth after soak",
            mb(figures["rss growth MB"]) + f" (limit {RSS_GROWTH_LIMIT_MB} MB)",
        ),
        ("healthy after", figures["healthy after"]),
    ]
    if figures["sigterm"]:
        s = figures["sigterm"]
        rows.append(
            (
                "SIGTERM with requests in flight",
                f"{s['sent'] - len(s['problems'])} of {s['sent']} answered in full "
                f"({s['answered after SIGTERM']} after the signal), exit code "
                f"{s['exit code']}",
            )
        )
    rows.append(("wall time", f"{figures['seconds']:.1f} s"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    for problem in figures["problems"][:20]:
        print("  problem:", problem)
    print("RESULT:", "PASS" if not figures["failed"] else "FAIL: " + "; ".join(figures["failed"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--requests", type=int, default=50, help="requests per client (50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of each client's mix (0)")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=900,
        help="stop sending after this long, and fail (default 900)",
    )
    parser.add_argument("--url", help="an already running server on loopback (default: start one)")
    parser.add_argument("--pid", type=int, help="with --url: its process id, to measure RSS")
    parser.add_argument(
        "--token",
        default=os.environ.get("SD_API_TOKEN"),
        help="with --url: its bearer token (default: $SD_API_TOKEN)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=1024 * 1024,
        help="the server's body size limit (default 1048576)",
    )
    args = parser.parse_args(argv)
    figures = soak(
        args.clients,
        args.requests,
        args.seed,
        args.max_seconds,
        args.url,
        args.pid,
        args.token if args.url else None,
        args.max_body_bytes,
    )
    print_table(figures, args.clients, args.requests)
    return 1 if figures["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
