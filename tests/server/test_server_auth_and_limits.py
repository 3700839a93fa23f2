"""API-key auth, the body-size limit (413), and the open endpoints (/health, /metrics, /version)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi.testclient import TestClient

from qserve.serve.api.app import create_app

BODY = {"model": "tiny", "prompt": "hi", "max_tokens": 1}


@pytest.fixture
def keyed(engine):
    with TestClient(create_app(engine, ["tiny"], api_key="s3cret"), raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "s3cret"},
        {"Authorization": "bearer s3cret"},
        {"Authorization": "Bearer s3cret "},
        {"Authorization": "Bearer s3cre"},
    ],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("POST", "/tokenize"),
        ("POST", "/detokenize"),
        ("GET", "/v1/anything"),
    ],
)
def test_key_required(keyed, engine, method, path, headers):
    r = keyed.request(method, path, json=BODY, headers=headers)
    assert r.status_code == 401
    err = r.json()["error"]
    assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    assert engine.calls == []


def test_right_key_passes(keyed):
    assert (
        keyed.post("/v1/completions", json=BODY, headers={"Authorization": "Bearer s3cret"}).status_code
        == 200
    )
    assert keyed.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200


@pytest.mark.parametrize("path", ["/health", "/metrics", "/version"])
def test_probes_stay_open(keyed, path):
    assert keyed.get(path).status_code == 200


def test_no_key_configured_means_open(client):
    assert client.post("/v1/completions", json=BODY).status_code == 200


def test_health_follows_the_engine(client, engine):
    assert client.get("/health").status_code == 200
    engine.is_healthy = False
    r = client.get("/health")
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    assert client.post("/v1/completions", json=BODY).status_code == 503


def test_version(client):
    from qserve import __version__

    assert client.get("/version").json() == {"version": __version__}


def test_body_over_limit_by_content_length(engine):
    with TestClient(create_app(engine, ["tiny"], max_body_bytes=200)) as c:
        ok = c.post("/v1/completions", json=BODY)
        assert ok.status_code == 200
        r = c.post("/v1/completions", json={**BODY, "prompt": "x" * 300})
        assert r.status_code == 413
        assert (
            r.json()["error"]["code"] == "request_too_large" and "200 bytes" in r.json()["error"]["message"]
        )
    assert len(engine.calls) == 1


def test_chunked_body_over_limit_is_cut_off_without_reading_it_all(engine):
    # No Content-Length: the middleware must count the streamed bytes and stop reading at the limit.
    sent = 0

    async def body():
        nonlocal sent
        for _ in range(1000):
            sent += 100
            yield b" " * 100

    async def go():
        transport = httpx.ASGITransport(app=create_app(engine, ["tiny"], max_body_bytes=1000))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.post(
                "/v1/completions", content=body(), headers={"content-type": "application/json"}
            )

    r = asyncio.run(go())
    assert r.status_code == 413
    assert sent < 100_000  # stopped early, never buffered the whole upload
    assert engine.calls == []


def test_bad_content_length_is_rejected(engine):
    async def go():
        transport = httpx.ASGITransport(app=create_app(engine, ["tiny"]))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.post("/v1/completions", content=b"{}", headers={"content-length": "abc"})

    assert asyncio.run(go()).status_code == 400
