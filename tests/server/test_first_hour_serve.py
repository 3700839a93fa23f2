"""A server that talks: the access log, request ids, the periodic stats line, their flags, and the
"did you mean" hint for an unknown request field."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time

import httpx
import pytest
from fake_engine import FakeStats
from fastapi.testclient import TestClient
from server_testing import MODEL, free_port

from qserve.serve.api.app import create_app
from qserve.serve.metrics import EngineStats, StatsLogger
from qserve.testing import wait_until_healthy

CMPL = "/v1/completions"
BODY = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
LINE = re.compile(r'^(\S+) "(\w+) (\S+)" (\d{3}) (\d+\.\d) ms request_id=(\S+)$')


def _access(caplog) -> list[re.Match]:
    return [LINE.match(r.getMessage()) for r in caplog.records if r.name == "qserve.serve.access"]


@pytest.fixture
def app_client(engine):
    def make(**kw):
        return TestClient(create_app(engine, [MODEL], **kw), raise_server_exceptions=False)

    return make


def test_one_access_line_per_request_with_its_id(app_client, caplog):
    caplog.set_level(logging.INFO, logger="qserve.serve.access")
    with app_client() as c:
        ok = c.post(CMPL, json=BODY)
        bad = c.post(CMPL, json={**BODY, "max_token": 3})
        missing = c.get("/v1/nope")
        wrong_method = c.get(CMPL)
    lines = _access(caplog)
    assert all(lines) and len(lines) == 4
    got = [(m.group(2), m.group(3), int(m.group(4))) for m in lines]
    assert got == [("POST", CMPL, 200), ("POST", CMPL, 400), ("GET", "/v1/nope", 404), ("GET", CMPL, 405)]
    ids = [r.headers["x-request-id"] for r in (ok, bad, missing, wrong_method)]
    assert [m.group(6) for m in lines] == ids and len(set(ids)) == 4
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert all(float(m.group(5)) >= 0 for m in lines)


def test_client_request_id_is_echoed_and_a_bad_one_replaced(app_client):
    with app_client(log_requests=False) as c:
        assert c.get("/health", headers={"X-Request-Id": "trace-42.a:b"}).headers["x-request-id"] == "trace-42.a:b"
        replaced = c.get("/health", headers={"X-Request-Id": "bad id\twith spaces"}).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", replaced)


def test_refused_requests_are_logged_too(engine, caplog):
    caplog.set_level(logging.INFO, logger="qserve.serve.access")
    app = create_app(engine, [MODEL], api_key="k", max_body_bytes=64)
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.post(CMPL, json=BODY).status_code == 401
        big = c.post(CMPL, json={**BODY, "prompt": "x" * 200}, headers={"Authorization": "Bearer k"})
        assert big.status_code == 413 and big.headers["x-request-id"]
    assert [int(m.group(4)) for m in _access(caplog)] == [401, 413]


def test_streamed_response_is_logged_once(app_client, caplog):
    caplog.set_level(logging.INFO, logger="qserve.serve.access")
    with app_client() as c, c.stream("POST", CMPL, json={**BODY, "stream": True, "max_tokens": 4}) as r:
        assert r.status_code == 200
        chunks = list(r.iter_lines())
    assert any("[DONE]" in x for x in chunks)
    (line,) = _access(caplog)
    assert line.group(4) == "200" and line.group(6) == r.headers["x-request-id"]


def test_disable_log_requests_keeps_the_header_but_logs_nothing(app_client, caplog):
    caplog.set_level(logging.INFO, logger="qserve.serve.access")
    with app_client(log_requests=False) as c:
        r = c.post(CMPL, json=BODY)
        c.get("/nope")
    assert r.headers["x-request-id"] and not _access(caplog)


def test_unknown_field_suggests_the_near_miss(app_client):
    with app_client(log_requests=False) as c:
        err = c.post(CMPL, json={**BODY, "max_token": 3}).json()["error"]
        assert err["param"] == "max_token" and "Did you mean 'max_tokens'?" in err["message"]
        err = c.post(CMPL, json={**BODY, "temprature": 0.5}).json()["error"]
        assert "Did you mean 'temperature'?" in err["message"]
        err = c.post(CMPL, json={**BODY, "zzz": 1}).json()["error"]
        assert "Did you mean" not in err["message"] and err["code"] == "unknown_parameter"
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi", "nmae": "x"}]}
        err = c.post("/v1/chat/completions", json=chat).json()["error"]
        assert err["param"] == "messages[0].nmae" and "Did you mean 'name'?" in err["message"]


# ---------------------------------------------------------------------------------- stats


def _stats(prompt=0, generation=0, running=0, waiting=0, usage=0.0, queries=0, hits=0) -> EngineStats:
    return EngineStats(
        num_running=running, num_waiting=waiting, kv_cache_usage=usage, prefix_cache_queries=queries,
        prefix_cache_hits=hits, num_preemptions=0, prompt_tokens_total=prompt, generation_tokens_total=generation,
        tokens_stored=0, slots_allocated=0,
    )  # fmt: skip


def test_stats_line_reports_throughput_since_the_last_line():
    now = [100.0]
    logger = StatsLogger(clock=lambda: now[0])
    now[0] = 110.0
    line = logger.line(_stats(prompt=500, generation=200, running=3, waiting=2, usage=0.125, queries=400, hits=100))
    assert line == (
        "Avg prompt throughput: 50.0 tokens/s, Avg generation throughput: 20.0 tokens/s, Running: 3 reqs, "
        "Waiting: 2 reqs, KV cache usage: 12.5%, Prefix cache hit rate: 25.0%"
    )
    now[0] = 115.0
    line = logger.line(_stats(prompt=500, generation=300, running=1, queries=400, hits=100))
    assert "Avg prompt throughput: 0.0 tokens/s, Avg generation throughput: 20.0 tokens/s" in line
    assert "Running: 1 reqs, Waiting: 0 reqs" in line and "Prefix cache hit rate: n/a" in line


def test_an_idle_server_logs_one_stats_line_not_one_per_interval():
    now = [0.0]
    logger = StatsLogger(clock=lambda: now[0])
    lines = []
    for step, generation in enumerate([10, 10, 10, 10, 20, 20]):
        now[0] = step + 1.0
        lines.append(logger.line(_stats(generation=generation)))
    assert [x is not None for x in lines] == [True, True, False, False, True, True]
    assert "Avg generation throughput: 0.0" in lines[1]


def test_app_logs_stats_periodically_and_not_when_disabled(engine, caplog):
    caplog.set_level(logging.INFO, logger="qserve.serve.stats")

    def stats():
        prompt = sum(len(p) for p, _, _ in engine.calls)
        return FakeStats(engine.running, engine.waiting, 0.5, 0, 0, 0, prompt_tokens_total=prompt)

    engine.stats = stats
    with TestClient(create_app(engine, [MODEL], log_stats_interval=0.05)) as c:
        c.post(CMPL, json=BODY)
        deadline = time.monotonic() + 10
        while not any("Avg prompt throughput" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "no stats line within 10 s"
            time.sleep(0.05)
    assert any("KV cache usage: 50.0%" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with TestClient(create_app(engine, [MODEL], log_stats_interval=None)) as c:
        c.post(CMPL, json=BODY)
        time.sleep(0.3)
    assert not [r for r in caplog.records if r.name == "qserve.serve.stats"]


# ---------------------------------------------------------------------------------- the real command


def _serve(model_dir, *flags, wait_for: str | None = None):
    """Runs `qserve serve` on the tiny model; sends a 200, a 400 and a 404; returns the process output."""
    port = free_port()
    cmd = [sys.executable, "-m", "qserve.cli", "serve", str(model_dir), "--port", str(port),
           "--served-model-name", MODEL, "--kv-cache-memory", "4MiB", *flags]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QSERVE_LOG_STATS_INTERVAL": "0.2"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(proc, url, 120, lambda: proc.stdout.read() if proc.poll() is not None else "")
        ok = httpx.post(f"{url}{CMPL}", json=BODY, timeout=60)
        assert ok.status_code == 200
        assert httpx.post(f"{url}{CMPL}", json={**BODY, "max_token": 1}).status_code == 400
        assert httpx.get(f"{url}/nope").status_code == 404
        time.sleep(1.0)  # several stats intervals
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
    return out, ok.headers["x-request-id"]


def test_qserve_serve_logs_requests_and_stats_by_default_and_flags_turn_them_off(tiny_llama_dir):
    out, rid = _serve(tiny_llama_dir)
    assert f'"POST {CMPL}" 200' in out and f"request_id={rid}" in out
    assert f'"POST {CMPL}" 400' in out and '"GET /nope" 404' in out and '"GET /health" 200' in out
    assert "Avg prompt throughput:" in out and "Running: " in out
    assert "logging:       one line per request; stats every 0.2 s while busy" in out
    assert "max model len 512 (the model's max_position_embeddings" in out
    assert "try:           curl http://127.0.0.1:" in out

    out, rid = _serve(tiny_llama_dir, "--disable-log-requests", "--disable-log-stats", "--max-model-len", "256")
    assert "request_id=" not in out and "Avg prompt throughput" not in out
    assert "logging:       off" in out and "max model len 256 (--max-model-len)" in out
