"""The event loop stays free: prompts are tokenized and templated on the tokenizer thread, and text too
long to fit the context is refused by its size before any tokenizer work."""

from __future__ import annotations

import threading

import httpx
import pytest
from fake_engine import FakeEngine
from fastapi.testclient import TestClient
from server_testing import MODEL, serve_in_thread

from qserve.serve.api.app import create_app
from qserve.serve.api.prompts import PromptBuilder

FOUR_MIB = 4 * 1024 * 1024


class SpyTokenizer:
    """The tiny tokenizer, with every call that tokenizes or templates text counted; `gate` (when set
    up) makes those calls block until the test opens it."""

    WATCHED = ("encode", "__call__", "tokenize", "encode_plus", "batch_encode_plus", "apply_chat_template")

    def __init__(self, inner) -> None:
        self._inner = inner
        self.calls: list[str] = []
        self.entered = threading.Event()
        self.gate: threading.Event | None = None

    def __len__(self) -> int:
        return len(self._inner)

    def __getattr__(self, name: str):
        attr = getattr(self._inner, name)
        if name not in self.WATCHED:
            return attr

        def spied(*args, **kwargs):
            self.calls.append(name)
            self.entered.set()
            if self.gate is not None:
                assert self.gate.wait(20), "the test never opened the gate"
            return attr(*args, **kwargs)

        return spied

    def __call__(self, *args, **kwargs):
        return self.__getattr__("__call__")(*args, **kwargs)


@pytest.fixture
def spy(tokenizer):
    return SpyTokenizer(tokenizer)


@pytest.fixture
def big_client(spy):
    # A body limit above 4 MiB, so the prompt reaches the route instead of the 413 of the middleware.
    app = create_app(FakeEngine(spy, max_model_len=128), [MODEL], max_body_bytes=16 * 1024 * 1024)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _assert_refused_by_size(r: httpx.Response, param: str, builder_limit: int) -> None:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == param
    assert str(builder_limit) in error["message"] and "without being tokenized" in error["message"]


def test_4mib_prompt_is_refused_before_the_tokenizer(big_client, spy):
    limit = PromptBuilder(spy, 128).max_prompt_bytes
    assert limit < FOUR_MIB
    spy.calls.clear()
    text = "x" * FOUR_MIB
    cases = [
        ("/v1/completions", {"model": MODEL, "prompt": text, "max_tokens": 4}, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": ["hi", text], "max_tokens": 4}, "prompt"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": text}]}, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "stream": True,
                                  "messages": [{"role": "user", "content": text[: FOUR_MIB // 2]},
                                               {"role": "assistant", "content": "ok"},
                                               {"role": "user", "content": text[: FOUR_MIB // 2]}]}, "messages"),
        ("/tokenize", {"model": MODEL, "prompt": text}, "prompt"),
    ]  # fmt: skip
    for path, body, param in cases:
        _assert_refused_by_size(big_client.post(path, json=body), param, limit)
    assert spy.calls == []  # not one tokenizer or template call


def test_size_limit_counts_utf8_bytes_not_characters(big_client, spy):
    limit = PromptBuilder(spy, 128).max_prompt_bytes
    text = "é" * (limit // 2 + 1)  # fewer characters than the limit, more bytes
    assert len(text) <= limit
    r = big_client.post("/v1/completions", json={"model": MODEL, "prompt": text, "max_tokens": 4})
    _assert_refused_by_size(r, "prompt", limit)
    assert spy.calls == []


def test_size_limit_never_refuses_a_prompt_that_fits(tokenizer):
    """The bound is an upper one: the densest text the vocabulary can spell (its longest token, over and
    over) in max_model_len - 1 tokens passes the size check and fits the context."""
    max_model_len = 128
    builder = PromptBuilder(tokenizer, max_model_len)
    pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    longest = max(range(len(pieces)), key=lambda i: len(pieces[i].encode()))
    ids = [longest] * (max_model_len - 1)
    text = tokenizer.decode(ids)
    builder.check_text_size(len(text.encode()), "prompt")  # does not raise
    assert len(tokenizer.encode(text, add_special_tokens=False)) < max_model_len
    assert builder.max_prompt_bytes == max_model_len * (len(pieces[longest].encode()) + 1)
    with pytest.raises(Exception, match="without being tokenized"):
        builder.check_text_size(builder.max_prompt_bytes + 1, "prompt")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"model": MODEL, "prompt": "hello world", "max_tokens": 3}),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}),
        ("/tokenize", {"model": MODEL, "prompt": "hello world"}),
    ],
)  # fmt: skip
def test_slow_tokenization_does_not_block_the_loop(spy, path, body):
    """While a prompt is stuck in the tokenizer (or chat template), /health and /v1/models still answer;
    with tokenization on the loop they would wait for it (and here time out)."""
    spy.gate = threading.Event()
    engine = FakeEngine(spy)
    with serve_in_thread(create_app(engine, [MODEL])) as url:
        result: dict = {}

        def slow_request() -> None:
            with httpx.Client(base_url=url, timeout=30) as c:
                result["response"] = c.post(path, json=body)

        worker = threading.Thread(target=slow_request, daemon=True)
        worker.start()
        try:
            assert spy.entered.wait(10), "the request never reached the tokenizer"
            with httpx.Client(base_url=url, timeout=2) as c:
                assert c.get("/health").status_code == 200
                assert c.get("/v1/models").status_code == 200
            assert worker.is_alive()  # the slow request was still inside the tokenizer meanwhile
        finally:
            spy.gate.set()
        worker.join(20)
    assert result["response"].status_code == 200, result["response"].text
