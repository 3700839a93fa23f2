"""Fixtures for the server tests: the tiny tokenizer, a fake engine, and live uvicorn servers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).parent))  # helpers live next to the tests (no __init__.py)

from fake_engine import FakeEngine
from server_testing import MODEL, serve_in_thread

from qserve.serve.api.app import create_app


@pytest.fixture(scope="session")
def tokenizer():
    from qserve.testing import make_tiny_tokenizer

    return make_tiny_tokenizer()


@pytest.fixture
def engine(tokenizer):
    return FakeEngine(tokenizer)


@pytest.fixture
def client(engine):
    with TestClient(create_app(engine, [MODEL, "alias"]), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def live(engine):
    """(base_url, engine) of a live server over the fake engine."""
    with serve_in_thread(create_app(engine, [MODEL])) as url:
        yield url, engine
