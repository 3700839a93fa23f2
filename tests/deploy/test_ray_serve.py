"""qserve on Ray Serve (qserve/serve/ray_serve.py, `qserve deploy ray`).

The config, the in-process ASGI forwarding of a replica and the router's model routing run without Ray
(two fake engines behind stand-in handles). The live test starts a local Ray cluster on 127.0.0.1 and
needs the `ray` extra; it is skipped, with that reason, where Ray Serve is not installed, and fails there
under QSERVE_REQUIRE_RAY=1 (scripts/test.sh installs the extra and sets it)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from starlette.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))  # the fake engine's folder

from fake_engine import FakeEngine

from qserve.errors import ConfigError, QserveError
from qserve.serve.api.app import create_app
from qserve.serve.ray_serve import (
    REPLICA_HEADER,
    ASGIForwarder,
    build_router_app,
    parse_config,
)


def need_ray() -> None:
    """Skips without Ray Serve, with the reason; where QSERVE_REQUIRE_RAY=1 (scripts/test.sh, so CI) a
    missing Ray fails instead, so the live tests can never be skipped there unnoticed."""
    import importlib.util
    import os

    if importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.serve") is not None:
        return
    if os.environ.get("QSERVE_REQUIRE_RAY") == "1":
        pytest.fail("QSERVE_REQUIRE_RAY=1 but Ray Serve is not installed: pip install -e '.[ray]'")
    pytest.skip("Ray Serve is not installed: pip install -e '.[ray]'")


def config(**overrides):
    base = {"port": 8100, "models": [{"model": "/m/a", "served_model_name": ["a", "a-alias"], "replicas": 2},
                                     {"model": "/m/b", "autoscaling": {"min_replicas": 1, "max_replicas": 3}}]}  # fmt: skip
    base.update(overrides)
    return base


def test_config_is_typed():
    cfg = parse_config(config(), "deploy.yaml")
    a, b = cfg.models
    assert a.names == ("a", "a-alias") and a.replicas == 2 and a.autoscaling is None
    assert b.names == ("/m/b",) and b.autoscaling == {"min_replicas": 1, "max_replicas": 3}
    assert a.deployment_name == "qserve-a" and b.deployment_name == "qserve-m-b"
    assert cfg.port == 8100 and a.serve["model"] == "/m/a" and "replicas" not in a.serve


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"modles": []}, r"unknown key\(s\) \['modles'\]"),
        ({"models": []}, "non-empty list"),
        ({"models": [{"model": "/m/a", "max_num_seq": 4}]}, "max_num_seq"),
        ({"models": [{"model": "/m/a"}, {"model": "/m/a"}]}, "already used"),
        ({"models": [{"model": "/m/a", "replicas": 2, "autoscaling": {"max_replicas": 2}}]}, "not both"),
        ({"models": [{"model": "/m/a", "autoscaling": {"max_replica": 2}}]}, "max_replica"),
        ({"models": [{"model": "/m/a", "autoscaling": {"min_replicas": 3, "max_replicas": 2}}]}, "min_replicas"),
        ({"models": [{"model": "/m/a", "replicas": 0}]}, "replicas: expected an integer >= 1"),
        ({"models": [{"model": "/m/a", "port": 9000}]}, "top level"),
        ({"port": "80"}, "port"),
    ],
)
def test_config_errors_name_the_problem(change, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(config(**change), "deploy.yaml")


def test_cli_refuses_a_bad_config_without_a_traceback(tmp_path):
    from click.testing import CliRunner

    from qserve.cli import cli

    path = tmp_path / "deploy.yaml"
    path.write_text("models:\n  - model: /m/a\n    replica: 2\n")
    result = CliRunner().invoke(cli, ["deploy", "ray", str(path)])
    assert result.exit_code != 0 and "replica" in str(result.exception)
    assert isinstance(result.exception, ConfigError)


def test_missing_ray_is_a_clear_error_before_any_model_loads(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from qserve.cli import cli

    monkeypatch.setitem(sys.modules, "ray", None)  # as if the ray extra were not installed
    path = tmp_path / "deploy.yaml"
    path.write_text("models:\n  - model: /nowhere/model\n")
    result = CliRunner().invoke(cli, ["deploy", "ray", str(path)])
    assert isinstance(result.exception, ConfigError)
    assert "pip install 'qserve[ray]'" in str(result.exception)


def test_example_config_in_deploy_ray_parses():
    from qserve.serve.ray_serve import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "deploy" / "ray" / "smollm2.yaml")
    (model,) = cfg.models
    assert model.names == ("smollm2",) and model.autoscaling["max_replicas"] == 2
    assert model.serve["kv_cache_memory"] == 1 << 30


def test_app_builder_for_rays_own_tooling(tiny_model_dir, tmp_path):
    """`serve run qserve.serve.ray_serve:app_builder config=...` and KubeRay's serveConfigV2 call this."""
    need_ray()
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application

    from qserve.serve.ray_serve import app_builder

    inline = {"models": [{"model": str(tiny_model_dir), "served_model_name": "m", "replicas": 2}]}
    assert isinstance(call_user_app_builder_with_args_if_necessary(app_builder, inline), Application)
    path = tmp_path / "deploy.yaml"
    path.write_text(f"models:\n  - model: {tiny_model_dir}\n")
    assert isinstance(app_builder({"config": str(path)}), Application)
    with pytest.raises(ConfigError, match="not both"):
        app_builder({"config": str(path), "models": []})
    with pytest.raises(QserveError, match="not found"):
        app_builder({"models": [{"model": str(tmp_path / "absent")}]})


def test_shutdown_timeout_is_the_replicas_graceful_shutdown(tiny_model_dir):
    """A model entry's shutdown_timeout (the `qserve serve` option) is how long Ray lets a replica being
    stopped finish its requests, not a key accepted and then ignored."""
    need_ray()
    from qserve.serve.ray_serve import build_application, resolve_models

    entry = {"model": str(tiny_model_dir), "served_model_name": ["a"]}
    for extra, expected in (({"shutdown_timeout": 7}, 7.0), ({}, 120.0)):
        app = build_application(resolve_models(parse_config({"models": [{**entry, **extra}]})))
        (handle,) = app._bound_deployment.init_args[0].values()  # the router's handle to model `a`
        assert handle._bound_deployment._deployment_config.graceful_shutdown_timeout_s == expected


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from qserve.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny"), family="llama")


# ---- routing without Ray: fake engines behind stand-in handles ----------------------------------


class StandInHandle:
    """What the router uses of a Ray DeploymentHandle: .options(stream=True).http.remote(...) -> async iter."""

    def __init__(self, forwarder: ASGIForwarder) -> None:
        self.forwarder = forwarder
        self.http = self

    def options(self, stream: bool):
        assert stream
        return self

    def remote(self, *args):
        return self.forwarder(*args)


@pytest.fixture
def two_models(tokenizer):
    engines = {name: FakeEngine(tokenizer) for name in ("a", "b")}
    handles = {
        name: StandInHandle(ASGIForwarder(create_app(engine, [name], log_stats_interval=None),
                                          [(REPLICA_HEADER, f"{name}#0")]))
        for name, engine in engines.items()
    }  # fmt: skip
    return engines, handles


@pytest.fixture(scope="module")
def tokenizer():
    from qserve.testing import make_tiny_tokenizer

    return make_tiny_tokenizer()


def test_forwarder_streams_the_app_response_in_chunks(tokenizer):
    forward = ASGIForwarder(create_app(FakeEngine(tokenizer), ["a"], log_stats_interval=None), [("x-extra", "1")])
    body = json.dumps({"model": "a", "prompt": "hi", "max_tokens": 5, "stream": True}).encode()

    async def collect():
        headers = [(b"content-type", b"application/json")]
        return [item async for item in forward("POST", "/v1/completions", b"", headers, body)]

    items = asyncio.run(collect())
    head, chunks = items[0], items[1:]
    assert head["status"] == 200 and ("x-extra", "1") in head["headers"]
    assert len(chunks) >= 5  # one SSE event per token at least, not one buffered body
    assert b"".join(chunks).endswith(b"data: [DONE]\n\n")


def test_forwarder_abandoned_stream_aborts_the_engine_request(tokenizer):
    engine = FakeEngine(tokenizer, delay=0.01)
    forward = ASGIForwarder(create_app(engine, ["a"], log_stats_interval=None))
    body = json.dumps({"model": "a", "prompt": "hi", "max_tokens": 1000, "stream": True}).encode()

    async def leave_early():
        stream = forward("POST", "/v1/completions", b"", [(b"content-type", b"application/json")], body)
        await stream.__anext__()
        await stream.__anext__()
        await stream.aclose()
        for _ in range(200):
            if not engine.live:
                break
            await asyncio.sleep(0.01)

    asyncio.run(leave_early())
    assert not engine.live and engine.used_blocks == 0


def test_router_routes_by_model_and_lists_every_model(two_models):
    engines, handles = two_models
    with TestClient(build_router_app(handles, default=None)) as client:
        for name in ("a", "b"):
            r = client.post("/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 3})
            assert r.status_code == 200 and r.json()["model"] == name
            assert r.headers[REPLICA_HEADER] == f"{name}#0"
        assert [len(e.calls) for e in engines.values()] == [1, 1]
        listed = client.get("/v1/models").json()
        assert sorted(m["id"] for m in listed["data"]) == ["a", "b"]
        missing = client.post("/v1/completions", json={"model": "c", "prompt": "x"})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
        assert "['a', 'b']" in missing.json()["error"]["message"]
        no_model = client.post("/v1/completions", json={"prompt": "x"})
        assert no_model.status_code == 400 and no_model.json()["error"]["code"] == "model_required"
        assert client.post("/v1/completions", content=b"[1").status_code == 400
        assert client.get("/health").status_code == 200


def test_router_streams_and_passes_replica_errors_through(two_models):
    _, handles = two_models
    with TestClient(build_router_app(handles, default="a")) as client:
        body = {"prompt": "x", "max_tokens": 4, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as r:
            lines = [x for x in r.iter_lines() if x]
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert lines[-1] == "data: [DONE]" and len(lines) >= 5
        bad = client.post("/v1/completions", json={"model": "b", "prompt": "x", "max_tokens": -1})
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def test_router_answers_503_when_no_replica_can_answer():
    class Dead(StandInHandle):
        def remote(self, *args):
            async def fail():
                raise RuntimeError("actor died")
                yield  # pragma: no cover

            return fail()

    with TestClient(build_router_app({"a": Dead(None)}, default="a")) as client:
        r = client.post("/v1/completions", json={"prompt": "x"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "replica_unavailable"


def test_replica_metrics_exporter_serves_and_announces_the_metrics(tokenizer, tmp_path):
    import httpx

    from qserve.serve.ray_serve import ReplicaMetricsExporter

    app = create_app(FakeEngine(tokenizer), ["a"], log_stats_interval=None)
    exporter = ReplicaMetricsExporter(app.state.metrics.registry, tmp_path / "sd", "qserve-a#x1", "a")
    try:
        (entry,) = json.loads((tmp_path / "sd" / "qserve-a_x1.json").read_text())
        assert entry["targets"] == [exporter.target] and entry["labels"]["replica"] == "qserve-a#x1"
        text = httpx.get(f"http://{exporter.target}/metrics", timeout=10).text
        assert 'vllm:num_requests_waiting{model_name="a"}' in text
    finally:
        exporter.close()
    assert not list((tmp_path / "sd").iterdir())


def _samples(text: str, name: str) -> dict[tuple, float]:
    """{(sorted label items): value} of one sample name in an exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return {tuple(sorted(x.labels.items())): x.value for f in text_string_to_metric_families(text)
            for x in f.samples if x.name == name}  # fmt: skip


def test_node_metrics_merge_every_local_replica_labelled_by_replica(tokenizer, tmp_path):
    """metrics_port without Ray: two replicas in one node; one serves the port with both replicas' series,
    each labelled by replica; when it closes, the other takes the port over at its next health check; a
    replica whose process died is dropped."""
    import subprocess

    import httpx

    from qserve.serve.ray_serve import NodeMetrics

    engines = [FakeEngine(tokenizer), FakeEngine(tokenizer)]
    apps = [create_app(e, ["a"], log_stats_interval=None) for e in engines]
    with TestClient(apps[0]) as c:  # one finished request on the first replica only
        assert c.post("/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 2}).status_code == 200
    port = _free_port()
    first = NodeMetrics(apps[0].state.metrics.registry, port, "qserve-a#one")
    second = NodeMetrics(apps[1].state.metrics.registry, port, "qserve-a#two")
    try:
        assert first.serving and not second.serving  # one port per node, held by one replica
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)  # fmt: skip
        ghost = first.directory / "qserve-a_gone.json"
        ghost.write_text(json.dumps({"replica": "qserve-a#gone", "pid": int(dead.stdout), "url": "http://x"}))
        text = httpx.get(f"http://{first.target}/metrics", timeout=10).text
        waiting = _samples(text, "vllm:num_requests_waiting")
        assert set(waiting) == {(("model_name", "a"), ("replica", r)) for r in ("qserve-a#one", "qserve-a#two")}
        done = _samples(text, "vllm:request_success_total")
        per_replica = {dict(k)["replica"]: 0.0 for k in done}
        for labels, value in done.items():
            per_replica[dict(labels)["replica"]] += value
        assert per_replica == {"qserve-a#one": 1.0, "qserve-a#two": 0.0}
        assert text.count("# TYPE vllm:num_requests_waiting gauge") == 1  # families merged, not repeated
        assert not ghost.exists()
        first.close()
        second.claim()  # what the replica's check_health does
        assert second.serving and second.target == first.target
        text = httpx.get(f"http://{second.target}/metrics", timeout=10).text
        assert {dict(k)["replica"] for k in _samples(text, "vllm:num_requests_waiting")} == {"qserve-a#two"}
    finally:
        first.close()
        second.close()
    assert not list(first.directory.glob("*.json"))


# ---- a live local Ray cluster -----------------------------------------------------------------------


def test_qserve_deploy_ray_command_serves_until_sigterm(tmp_path):
    """The command itself, in a subprocess with its own local cluster: it resolves and validates the model,
    serves through the proxy, and on SIGTERM takes the application down and exits (130, as Ctrl-C).
    Runs before the module's shared cluster starts: one local Ray cluster at a time."""
    need_ray()
    import os
    import signal
    import subprocess
    import time

    import httpx

    from qserve.testing import make_tiny_model

    model = make_tiny_model(tmp_path / "m", family="llama")
    port = _free_port()
    config = tmp_path / "deploy.yaml"
    config.write_text(f"host: 127.0.0.1\nport: {port}\nmodels:\n  - model: {model}\n    served_model_name: [m]\n"
                      "    kv_cache_memory: 4MiB\n    num_cpus: 0.5\n")  # fmt: skip
    log = tmp_path / "deploy.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "qserve.cli", "deploy", "ray", str(config), "--address", "local"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "not serving after 240 s:\n" + log.read_text()
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                               json={"model": "m", "prompt": "hi", "max_tokens": 3})  # fmt: skip
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        assert r.json()["model"] == "m" and r.headers[REPLICA_HEADER].startswith("qserve-m#")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 130, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert "serving:  http://127.0.0.1" in log.read_text()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)


@pytest.fixture(scope="module")
def ray_app(tmp_path_factory):
    """A local Ray cluster on 127.0.0.1 serving model `a` (two replicas) and model `b` (one replica)."""
    need_ray()
    import os

    import httpx
    import ray
    from ray import serve

    from qserve.serve import ray_serve
    from qserve.testing import make_tiny_model

    root = tmp_path_factory.mktemp("ray-models")
    sd_dir = tmp_path_factory.mktemp("prometheus-sd")
    dirs = {name: make_tiny_model(root / name, family="llama") for name in ("a", "b")}
    port, metrics_port = _free_port(), _free_port()
    common = {"kv_cache_memory": "4MiB", "disable_log_requests": True, "num_cpus": 0.5, "max_num_seqs": 8}
    cfg = ray_serve.resolve_models(ray_serve.parse_config({
        "host": "127.0.0.1", "port": port, "app_name": "qserve-test", "metrics_sd_dir": str(sd_dir),
        "metrics_port": metrics_port,
        "models": [{"model": str(dirs["a"]), "served_model_name": ["a"], "replicas": 2, **common},
                   {"model": str(dirs["b"]), "served_model_name": ["b"], "replicas": 1, **common}],
    }))  # fmt: skip
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR",
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})  # fmt: skip
    try:
        ray_serve.run(cfg, blocking=False)
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        yield SimpleNamespace(url=url, sd_dir=sd_dir, metrics_port=metrics_port)
    finally:
        serve.shutdown()
        ray.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _complete(client, model: str, **kw):
    return client.completions.with_raw_response.create(model=model, prompt="hello", max_tokens=4, temperature=0,
                                                       **kw)  # fmt: skip


def test_ray_two_replicas_both_answer_and_models_route_by_name(ray_app):
    import openai

    client = openai.OpenAI(base_url=f"{ray_app.url}/v1", api_key="unused", max_retries=0, timeout=60)
    assert sorted(m.id for m in client.models.list().data) == ["a", "b"]
    seen = {"a": set(), "b": set()}

    async def burst():
        aclient = openai.AsyncOpenAI(base_url=f"{ray_app.url}/v1", api_key="unused", max_retries=0, timeout=120)
        return await asyncio.gather(*(_complete_async(aclient, "a" if i % 3 else "b") for i in range(30)))

    for model, raw in asyncio.run(burst()):
        assert raw.parse().model == model
        seen[model].add(raw.headers[REPLICA_HEADER])
    assert len(seen["a"]) == 2, seen  # requests reached both replicas of `a`
    assert len(seen["b"]) == 1 and not (seen["a"] & seen["b"])
    assert all(r.startswith("qserve-a#") for r in seen["a"]) and next(iter(seen["b"])).startswith("qserve-b#")
    # Every replica's own metrics reach Prometheus through its file_sd target.
    import httpx

    targets = {}
    for path in ray_app.sd_dir.glob("*.json"):
        (entry,) = json.loads(path.read_text())
        targets[entry["labels"]["replica"]] = entry["targets"][0]
    assert seen["a"] | seen["b"] <= set(targets)
    finished = {}
    for replica in seen["a"] | seen["b"]:
        text = httpx.get(f"http://{targets[replica]}/metrics", timeout=10).text
        total = sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
                    if line.startswith("vllm:request_success_total{"))  # fmt: skip
        assert "vllm:num_requests_waiting{" in text and total >= 1, replica
        finished[replica] = total
    assert sum(v for k, v in finished.items() if k.startswith("qserve-b#")) >= 10  # 10 of the 30 went to b
    # metrics_port: the node's one target (on the node's address, as the file_sd targets) carries the
    # same series, each labelled by its replica.
    (node,) = {target.rpartition(":")[0] for target in targets.values()}
    text = httpx.get(f"http://{node}:{ray_app.metrics_port}/metrics", timeout=10).text
    merged: dict[str, float] = {}
    for labels, value in _samples(text, "vllm:request_success_total").items():
        replica = dict(labels)["replica"]
        merged[replica] = merged.get(replica, 0.0) + value
    assert merged == finished
    assert {dict(k)["replica"] for k in _samples(text, "vllm:num_requests_running")} == seen["a"] | seen["b"]


async def _complete_async(client, model: str):
    raw = await client.completions.with_raw_response.create(model=model, prompt="hello", max_tokens=8,
                                                             temperature=0)  # fmt: skip
    return model, raw


def test_ray_replaces_a_killed_replica(ray_app):
    import os
    import signal
    import time

    import openai

    client = openai.OpenAI(base_url=f"{ray_app.url}/v1", api_key="unused", max_retries=0, timeout=60)
    # Concurrent bursts, not one request at a time: Ray's router picks by (cached) queue lengths, and
    # sequential requests can all land on one replica for several seconds.
    replicas = {}

    async def burst():
        aclient = openai.AsyncOpenAI(base_url=f"{ray_app.url}/v1", api_key="unused", max_retries=0, timeout=120)
        calls = (aclient.completions.with_raw_response.create(model="a", prompt="hello", max_tokens=8)
                 for _ in range(8))  # fmt: skip
        return await asyncio.gather(*calls)

    for _ in range(5):
        for raw in asyncio.run(burst()):
            replicas[raw.headers[REPLICA_HEADER]] = int(raw.headers["x-qserve-replica-pid"])
        if len(replicas) == 2:
            break
    assert len(replicas) == 2, replicas
    victim, pid = next(iter(replicas.items()))
    os.kill(pid, signal.SIGKILL)
    # Until Ray has replaced it some requests may fail; once the new replica is up, none does.
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline, "no replacement replica answered within 120 s"
        try:
            header = _complete(client, "a").headers[REPLICA_HEADER]
        except openai.APIError:
            time.sleep(0.5)
            continue
        if header not in replicas:
            break
        time.sleep(0.2)
    answered = {_complete(client, "a").headers[REPLICA_HEADER] for _ in range(20)}
    assert victim not in answered and len(answered) <= 2
