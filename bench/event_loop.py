"""Does a long prompt stall the server's event loop? /health latency while the densest prompt the byte
limit lets through is tokenized, with tokenization on the tokenizer thread (the server) and, side by
side in the same run, on the event loop (the server's route with `off_loop` made synchronous, as it
was before). Also: the startup cost of the byte limit and how fast an over-limit prompt is refused.

No model is loaded: the engine is a stub that is never reached (the prompt is too long in tokens, so
it is refused after tokenization with a 400), which isolates the tokenizer's share of the loop.

    python bench/event_loop.py --model smollm2-135m
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from transformers import AutoTokenizer

from qserve.hub import resolve_model
from qserve.provenance import describe_run
from qserve.serve.api import serving
from qserve.serve.api.app import create_app
from qserve.serve.api.prompts import PromptBuilder, utf8_len
from qserve.serve.api.shutdown import uvicorn_config
from qserve.serve.loader import read_json

TEXT = Path("/work/shared/data/eval/wikitext-2-raw/wiki.test.raw")


class StubEngine:
    model_name = "stub"
    quantization = None
    is_healthy = True

    def __init__(self, tokenizer, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.kv_cache_tokens = 0

    async def generate(self, *args, **kwargs):  # pragma: no cover - the prompt never gets this far
        raise RuntimeError("the stub engine was reached")
        yield

    async def abort(self, request_id: str) -> None:
        pass

    async def shutdown(self, drain: bool = True) -> None:
        pass


@contextlib.contextmanager
def server(app):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port, log_level="error"))  # as `qserve serve`
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


def probe_during(url: str, body: dict) -> dict:
    """Send `body` to /v1/completions and GET /health every 10 ms until it is answered."""
    done = threading.Event()
    result: dict = {}

    def send() -> None:
        with httpx.Client(base_url=url, timeout=600) as c:
            start = time.perf_counter()
            r = c.post("/v1/completions", json=body)
            result["request_s"] = time.perf_counter() - start
            result["status"] = r.status_code
        done.set()

    latencies = []
    worker = threading.Thread(target=send)
    with httpx.Client(base_url=url, timeout=600) as c:
        c.get("/health")  # connection warm
        worker.start()
        time.sleep(0.05)
        while not done.is_set():
            start = time.perf_counter()
            c.get("/health")
            latencies.append(time.perf_counter() - start)
            time.sleep(0.01)
    worker.join()
    return {
        "request_s": round(result["request_s"], 3),
        "request_status": result["status"],
        "health_probes": len(latencies),
        "health_max_ms": round(1000 * max(latencies), 1),
        "health_median_ms": round(1000 * statistics.median(latencies), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="bench/results/event_loop.json")
    args = ap.parse_args()
    model_dir = Path(resolve_model(args.model))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    max_model_len = int(read_json(model_dir / "config.json")["max_position_embeddings"])
    start = time.perf_counter()
    builder = PromptBuilder(tokenizer, max_model_len)
    limit_s = time.perf_counter() - start
    raw = TEXT.read_text()
    text = raw
    while utf8_len(text) < builder.max_prompt_bytes:
        text += raw
    text = text.encode()[: builder.max_prompt_bytes].decode(errors="ignore")  # just under the limit
    record = {**describe_run(), "model": args.model, "max_model_len": max_model_len,
              "max_token_bytes": builder.max_token_bytes, "max_prompt_bytes": builder.max_prompt_bytes,
              "limit_startup_s": round(limit_s, 3), "prompt_bytes": utf8_len(text)}  # fmt: skip
    body = {"prompt": text, "max_tokens": 1}
    over = {"prompt": "x" * (4 * 1024 * 1024), "max_tokens": 1}
    app = create_app(StubEngine(tokenizer, max_model_len), ["stub"], max_body_bytes=64 * 1024 * 1024)
    with server(app) as url:
        record["off_loop"] = probe_during(url, body)
        with httpx.Client(base_url=url, timeout=600) as c:
            start = time.perf_counter()
            r = c.post("/v1/completions", json=over)
            record["over_limit_4mib"] = {
                "status": r.status_code,
                "answered_s": round(time.perf_counter() - start, 3),
            }
        original = serving.OpenAIServing.off_loop

        async def on_loop(self, fn, *a):  # the route as it was: the tokenizer runs on the event loop
            return fn(*a)

        serving.OpenAIServing.off_loop = on_loop
        try:
            record["on_loop"] = probe_during(url, body)
        finally:
            serving.OpenAIServing.off_loop = original
    print(json.dumps(record, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
