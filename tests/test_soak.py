"""The soak, short: concurrent clients against the real server on loopback lose nothing.

``scripts/soak.py`` with its defaults (8 clients x 50 requests) is the long run; this is the
same code with fewer requests.
"""

from __future__ import annotations

import pytest
from servers import LocalServer, scripted_folder

from benchmarks import soak


def test_short_soak_no_5xx_identical_bytes_bounded_memory_and_a_clean_sigterm(
    tmp_path, monkeypatch
):
    # Inherited by the server: its tensors are small, and a second thread only spin-waits
    # on a CPU that other jobs share.
    monkeypatch.setenv("SD_NUM_THREADS", "1")
    figures = soak.soak(
        clients=4,
        requests_per_client=8,
        seed=1,
        max_seconds=300,
        log_path=tmp_path / "server.log",
    )
    assert figures["failed"] == [], figures
    assert figures["requests"] == 32
    assert figures["5xx"] == 0 and figures["no answer"] == 0
    assert figures["valid"] > 0 and figures["valid byte-identical"] == figures["valid"]
    assert figures["invalid"] > 0 and figures["problems"] == []
    assert figures["rss growth MB"] < soak.RSS_GROWTH_LIMIT_MB
    assert figures["healthy after"]
    assert figures["sigterm"]["problems"] == [] and figures["sigterm"]["sent"] > 0


def test_the_soak_fails_when_answers_change_or_the_server_errs(tmp_path):
    """Against a handler whose answers differ from call to call (the scripted test handler
    counts its calls in every response), the soak must report it and fail."""
    server = LocalServer(scripted_folder(tmp_path / "model"), tmp_path / "server.log")
    try:
        server.wait_ready()
        figures = soak.soak(
            clients=2,
            requests_per_client=6,
            seed=2,
            max_seconds=120,
            url=server.url,
            pid=server.process.pid,
        )
    finally:
        server.stop()
    assert any("bytes differ" in problem for problem in figures["problems"])
    assert figures["failed"]


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com"])
def test_the_soak_refuses_a_server_off_loopback(url):
    with pytest.raises(SystemExit, match="loopback"):
        soak.soak(url=url, clients=1, requests_per_client=1)
