"""Two Ray Serve replicas of SmolLM2-135M on this machine: N concurrent chat requests through the proxy
(all must succeed; how they spread over the replicas, by response header and by each replica's own
vllm:request_success_total on the node's metrics_port target), then one replica is SIGKILLed and the time until
requests succeed again, and until the replacement replica answers, is measured.

    python deploy/ray/bench_replicas.py [--requests 200] [--max-tokens 16] [--out bench/results/ray_serve.json]

Needs the `ray` extra. Writes a JSON with the command, commit and machine (qserve.provenance)."""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import socket
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def burst(url: str, n: int, max_tokens: int) -> list[tuple[bool, str | None, float]]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)

    async def one(i: int):
        t = time.monotonic()
        try:
            raw = await client.chat.completions.with_raw_response.create(
                model="smollm2", messages=[{"role": "user", "content": f"Say something about the number {i}."}],
                max_tokens=max_tokens, temperature=0,
            )  # fmt: skip
            raw.parse()
            return True, raw.headers.get("x-qserve-replica"), time.monotonic() - t
        except openai.APIError as exc:
            return False, type(exc).__name__, time.monotonic() - t

    return await asyncio.gather(*(one(i) for i in range(n)))


def node_metrics(serve, metrics_port: int) -> dict[str, float]:
    """{replica: finished requests} from the node's merged metrics target."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    handle = serve.get_deployment_handle("qserve-smollm2", app_name="qserve-bench")
    host = handle.identity.remote().result()["node_metrics"]
    assert host.endswith(f":{metrics_port}"), host
    text = httpx.get(f"http://{host}/metrics", timeout=30).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "vllm:request_success_total":
                out[sample.labels["replica"]] = out.get(sample.labels["replica"], 0.0) + sample.value
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", default="bench/results/ray_serve.json")
    args = parser.parse_args()

    import openai
    import ray
    from ray import serve

    from qserve.provenance import describe_run
    from qserve.serve import ray_serve

    port, metrics_port = free_port(), free_port()
    cfg = ray_serve.resolve_models(ray_serve.parse_config({
        "host": "127.0.0.1", "port": port, "app_name": "qserve-bench", "metrics_port": metrics_port,
        "models": [{"model": "smollm2-135m", "served_model_name": ["smollm2"], "replicas": 2, "num_cpus": 1,
                    "kv_cache_memory": "512MiB", "max_num_seqs": 64, "max_queue": 512,
                    "disable_log_requests": True}],
    }))  # fmt: skip
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR",
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    ray_serve.run(cfg, blocking=False)
    startup_s = time.monotonic() - t0
    try:
        t = time.monotonic()
        results = asyncio.run(burst(url, args.requests, args.max_tokens))
        burst_s = time.monotonic() - t
        ok = [r for r in results if r[0]]
        spread = collections.Counter(r[1] for r in ok)
        failures = collections.Counter(r[1] for r in results if not r[0])
        # The node's metrics target (metrics_port): finished requests per replica, from the replicas' own
        # vllm:request_success_total as Prometheus would scrape them (the probe request below not yet in).
        metrics_per_replica = node_metrics(serve, metrics_port)

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)

        def ask():
            raw = client.chat.completions.with_raw_response.create(
                model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
            return raw.headers["x-qserve-replica"], int(raw.headers["x-qserve-replica-pid"])

        replicas = {}
        while len(replicas) < 2:
            name, pid = ask()
            replicas[name] = pid
        victim, pid = sorted(replicas.items())[0]
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        first_ok = replacement = None
        failed_after_kill = 0
        while replacement is None and time.monotonic() - killed < 300:
            try:
                name, _ = ask()
            except openai.APIError:
                failed_after_kill += 1
                time.sleep(0.25)
                continue
            first_ok = first_ok if first_ok is not None else time.monotonic() - killed
            if name not in replicas:
                replacement = time.monotonic() - killed
            time.sleep(0.25)
        after = asyncio.run(burst(url, 20, args.max_tokens)) if replacement is not None else []
    finally:
        serve.shutdown()
        ray.shutdown()

    summary = {
        "replicas": 2, "requests": args.requests, "max_tokens": args.max_tokens, "succeeded": len(ok),
        "failed": dict(failures), "per_replica": dict(spread), "burst_wall_s": round(burst_s, 2),
        "deploy_s": round(startup_s, 2), "metrics_per_replica": metrics_per_replica,
        "kill": {"victim": victim, "first_success_after_s": first_ok and round(first_ok, 2),
                 "replacement_answered_after_s": replacement and round(replacement, 2),
                 "failed_requests_before_recovery": failed_after_kill,
                 "after_replacement_ok": sum(r[0] for r in after), "after_replacement_sent": len(after)},
        "note": "2 shared CPU cores; timings are noisy",
    }  # fmt: skip
    print(json.dumps(summary, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "provenance": describe_run()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
