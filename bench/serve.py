"""Online serving benchmark against any OpenAI-compatible server (`qserve serve`, `vllm serve`, ...).

ShareGPT conversations give the prompts (first human turn) and, unless --max-tokens caps it, each
request's output length (the token count of the first answer, as vLLM's benchmark does). Requests
arrive as a Poisson process at --request-rate (inf = all at once), at most --max-concurrency in flight,
each streamed with `stream_options.include_usage`. Reported with `vllm bench serve`'s metric names:
TTFT, TPOT = (latency - TTFT) / (output_tokens - 1), ITL (gaps between streamed chunks) and E2EL,
mean / median / p99, plus request and token throughput. Prints a table last and writes JSON.

    python bench/serve.py --base-url http://127.0.0.1:8000 --model smollm2 --num-prompts 32 --request-rate 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

DEFAULT_DATASET = (
    Path(__file__).resolve().parents[2] / "shared/data/prompts/sharegpt/sharegpt_v3_first500.json"
)
# vLLM's ShareGPT filter: drop a conversation whose prompt or answer is shorter than MIN_TOKENS, whose
# prompt is longer than --max-prompt-len (1024), or whose prompt + answer exceed MAX_TOTAL_TOKENS.
MIN_TOKENS = 4
MAX_TOTAL_TOKENS = 2048


@dataclass(frozen=True)
class BenchRequest:
    prompt: str
    prompt_len: int
    output_len: int


@dataclass
class RequestResult:
    success: bool = False
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""


async def count_tokens(client: httpx.AsyncClient, model: str, text: str) -> int:
    r = await client.post("/tokenize", json={"model": model, "prompt": text, "add_special_tokens": False})
    r.raise_for_status()
    return r.json()["count"]


async def load_sharegpt(
    client: httpx.AsyncClient,
    path: Path,
    model: str,
    n: int,
    seed: int,
    max_total: int,
    max_prompt_len: int,
    max_tokens: int | None,
) -> list[BenchRequest]:
    """Up to `n` requests from shuffled ShareGPT conversations that pass vLLM's length filter."""
    data = json.loads(path.read_text())
    pairs = [
        (c["conversations"][0]["value"], c["conversations"][1]["value"])
        for c in data
        if len(c["conversations"]) >= 2
    ]
    random.Random(seed).shuffle(pairs)
    out: list[BenchRequest] = []
    for prompt, answer in pairs:
        if len(out) == n:
            break
        prompt_len = await count_tokens(client, model, prompt)
        output_len = await count_tokens(client, model, answer)
        if max_tokens is not None:
            output_len = min(output_len, max_tokens) if output_len >= MIN_TOKENS else max_tokens
        if not MIN_TOKENS <= prompt_len <= max_prompt_len or output_len < MIN_TOKENS:
            continue
        if prompt_len + output_len > max_total:
            continue
        out.append(BenchRequest(prompt, prompt_len, output_len))
    if len(out) < n:
        raise SystemExit(
            f"only {len(out)} ShareGPT conversations pass the length filter; lower --num-prompts or raise --max-prompt-len"
        )
    return out


async def send(client: httpx.AsyncClient, args, req: BenchRequest) -> RequestResult:
    """One streamed request; times the first chunk that carries a choice, then the gaps between them."""
    chat = args.endpoint.endswith("chat/completions")
    body = {"model": args.model, "max_tokens": req.output_len, "temperature": args.temperature, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    body.update({"messages": [{"role": "user", "content": req.prompt}]} if chat else {"prompt": req.prompt})
    if args.ignore_eos:
        body["ignore_eos"] = True
    result = RequestResult(prompt_tokens=req.prompt_len)
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", args.endpoint, json=body) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("choices"):
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                elif chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
        result.latency = last - start
        result.success = result.ttft > 0.0
    except httpx.HTTPError as exc:
        result.error = repr(exc)
    return result


async def run(args) -> tuple[dict, list[RequestResult]]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(
        base_url=args.base_url, headers=headers, timeout=None, limits=limits
    ) as client:
        models = (await client.get("/v1/models")).json()["data"]
        model = next((m for m in models if m["id"] == args.model), None)
        if model is None:
            raise SystemExit(
                f"model {args.model!r} is not served; the server has {[m['id'] for m in models]}"
            )
        max_total = min(MAX_TOTAL_TOKENS, model.get("max_model_len", MAX_TOTAL_TOKENS))
        requests = await load_sharegpt(client, Path(args.dataset), args.model, args.num_prompts, args.seed,
                                       max_total, args.max_prompt_len, args.max_tokens)  # fmt: skip
        gate = asyncio.Semaphore(args.max_concurrency or len(requests))
        rng = random.Random(args.seed)

        async def limited(req: BenchRequest) -> RequestResult:
            async with gate:
                return await send(client, args, req)

        tasks = []
        start = time.perf_counter()
        for req in requests:
            tasks.append(asyncio.create_task(limited(req)))
            if not math.isinf(args.request_rate):
                await asyncio.sleep(rng.expovariate(args.request_rate))  # Poisson arrivals
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(results, duration, args), results


def _stats(name: str, values: list[float]) -> dict:
    ms = np.asarray(values or [0.0]) * 1000.0
    return {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
            f"std_{name}_ms": float(ms.std()), f"p99_{name}_ms": float(np.percentile(ms, 99))}  # fmt: skip


def summarize(results: list[RequestResult], duration: float, args) -> dict:
    ok = [r for r in results if r.success]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "base_url": args.base_url, "endpoint": args.endpoint,
        "model": args.model, "request_rate": args.request_rate, "max_concurrency": args.max_concurrency,
        "num_prompts": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5], "duration": duration,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
    }  # fmt: skip
    summary |= _stats("ttft", [r.ttft for r in ok]) | _stats("tpot", tpots)
    summary |= _stats("itl", [x for r in ok for x in r.itl]) | _stats("e2el", [r.latency for r in ok])
    return summary


def print_table(s: dict) -> None:
    rows = [("Successful requests", s["completed"]), ("Failed requests", s["failed"]),
            ("Benchmark duration (s)", s["duration"]), ("Total input tokens", s["total_input_tokens"]),
            ("Total generated tokens", s["total_output_tokens"]), ("Request throughput (req/s)", s["request_throughput"]),
            ("Output token throughput (tok/s)", s["output_throughput"]),
            ("Total Token throughput (tok/s)", s["total_token_throughput"])]  # fmt: skip
    for key, title in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2EL")):
        rows += [(f"{kind} {title} (ms)", s[f"{prefix}_{key}_ms"]) for kind, prefix in
                 (("Mean", "mean"), ("Median", "median"), ("P99", "p99"))]  # fmt: skip
    print(f"{' Serving Benchmark Result ':=^52}")
    for title, value in rows:
        print(f"{title:<40}{value:>12.2f}" if isinstance(value, float) else f"{title:<40}{value:>12}")
    print("=" * 52)


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument(
        "--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"]
    )
    p.add_argument("--model", required=True, help="A served model name (GET /v1/models).")
    p.add_argument("--dataset", default=str(DEFAULT_DATASET), help="ShareGPT-format JSON.")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument(
        "--request-rate", type=float, default=math.inf, help="Requests/s (Poisson); inf = all at once."
    )
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument(
        "--max-tokens", type=int, default=None, help="Cap each output length (default: the answer's)."
    )
    p.add_argument("--max-prompt-len", type=int, default=1024, help="Skip longer prompts (vLLM's filter).")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true", help="Generate exactly the target length.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None)
    p.add_argument("--result-file", default=None, help="JSON output (default: bench/results/serve_rate<rate>.json).")
    args = p.parse_args(argv)
    if args.request_rate <= 0 or (args.max_concurrency is not None and args.max_concurrency < 1):
        p.error("--request-rate must be > 0 and --max-concurrency >= 1")
    return args


def _provenance(argv: list[str] | None) -> dict:
    """Command, commit and machine (qserve.provenance); only the command when qserve is not installed,
    e.g. when this script runs from another server's environment."""
    full = None if argv is None else [__file__, *argv]
    try:
        from qserve.provenance import describe_run
    except ImportError:
        import shlex
        import sys

        return {"command": shlex.join(["python", *(full or sys.argv)]), "commit": None}
    return describe_run(full)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    summary, results = asyncio.run(run(args))
    path = Path(args.result_file or Path(__file__).with_name("results") / f"serve_rate{args.request_rate:g}.json")
    record = {"summary": summary, "provenance": _provenance(argv), "requests": [asdict(r) for r in results]}
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")
    print_table(summary)
    return summary


if __name__ == "__main__":
    main()
