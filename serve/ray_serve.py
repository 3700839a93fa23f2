"""qserve on Ray Serve: replicas of the qserve engine behind Ray Serve's HTTP proxy, several models in one
application routed by the OpenAI `model` field.

Ray Serve does the distributed work (placing replicas on the cluster's nodes, replacing dead ones,
autoscaling on ongoing requests, the HTTP proxy, graceful shutdown); this module only says what a replica
is and how a request finds its model:

- `QserveModel`: one replica = one `AsyncLLMEngine` with qserve's own OpenAI app (serve/api/app.py) in
  front of it, driven in-process as an ASGI app; `http()` streams the app's response back through Ray.
  `check_health` reports a dead engine loop, so Ray replaces the replica.
- `QserveRouter`: the ingress deployment behind the proxy. It reads `model` from the JSON body and
  forwards the request to that model's deployment; `/v1/models` lists every model of the application.

The configuration (`qserve deploy ray CONFIG`) is YAML:

    host: 0.0.0.0            # Ray Serve's HTTP proxy
    port: 8000
    metrics_sd_dir: /shared/prometheus-sd   # optional: per-replica /metrics targets for Prometheus
    metrics_port: 9400       # optional: each node's replicas' metrics on one port, labelled by replica
    models:
      - model: runs/smollm2-135m-awq          # anything `qserve serve` accepts, plus its options
        served_model_name: [smollm2]
        kv_cache_memory: 2GiB
        autoscaling: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 16}
        num_cpus: 2                            # Ray resources per replica (num_gpus: 1 on GPU nodes)
      - model: /shared/qwen-gptq
        replicas: 2                            # a fixed number instead of autoscaling

On a multi-node cluster every node must see each model at the same path (shared storage).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qserve.errors import ConfigError, QserveError

# Keys of one model entry that configure its Ray deployment; every other key is a `qserve serve` option.
DEPLOY_KEYS = ("replicas", "autoscaling", "num_cpus", "num_gpus", "max_ongoing_requests")
AUTOSCALING_KEYS = ("min_replicas", "max_replicas", "initial_replicas", "target_ongoing_requests",
                    "upscale_delay_s", "downscale_delay_s")  # fmt: skip
TOP_KEYS = ("host", "port", "api_key", "app_name", "metrics_sd_dir", "metrics_port", "models")
# Routes forwarded to a model's replicas, chosen by the body's `model` field.
MODEL_ROUTES = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")
REPLICA_HEADER = "x-qserve-replica"  # which replica answered: "<deployment>#<replica id>"
REPLICA_PID_HEADER = "x-qserve-replica-pid"


@dataclass(frozen=True)
class ModelDeployment:
    serve: dict[str, Any]  # `qserve serve` options (validated by ServeConfig), model included
    names: tuple[str, ...]  # served model names; the first is the deployment's name
    replicas: int | None = None
    autoscaling: dict[str, Any] | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_ongoing_requests: int | None = None  # default: the engine's batch + queue

    @property
    def deployment_name(self) -> str:
        return "qserve-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", self.names[0]).strip("-")


@dataclass(frozen=True)
class RayDeployConfig:
    models: tuple[ModelDeployment, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    app_name: str = "qserve"
    # Per-replica metrics: each replica serves its qserve /metrics on a port of its own and writes a
    # Prometheus file_sd target file here (a directory every node sees, like the weights); None: off.
    metrics_sd_dir: str | None = None
    # Per-node metrics: on every node, one of its replicas serves all of that node's replicas' series on
    # this port, each labelled replica="<deployment>#<id>" (a fixed port a PodMonitor can name); None: off.
    metrics_port: int | None = None
    source: str = "config"


def _expect(cond: bool, source: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{source}: {message}")


def parse_config(data: Any, source: str = "config") -> RayDeployConfig:
    """Checks a deployment config (the parsed YAML) and returns it typed; errors name the key and the fix."""
    from qserve.serve.api.config import ServeConfig, parse_bytes

    _expect(isinstance(data, dict), source, "expected a mapping with a `models:` list")
    unknown = sorted(set(data) - set(TOP_KEYS))
    _expect(not unknown, source, f"unknown key(s) {unknown}; valid top-level keys are {list(TOP_KEYS)}")
    models = data.get("models")
    _expect(isinstance(models, list) and models, source,
            "`models:` must be a non-empty list of model entries (each at least `model: PATH`)")  # fmt: skip
    parsed, seen = [], {}
    for i, entry in enumerate(models):
        where = f"{source}: models[{i}]"
        _expect(isinstance(entry, dict) and "model" in entry, where, "each entry needs `model: PATH or NAME`")
        serve_values = {k: v for k, v in entry.items() if k not in DEPLOY_KEYS}
        if isinstance(serve_values.get("served_model_name"), str):
            serve_values["served_model_name"] = [serve_values["served_model_name"]]
        if isinstance(serve_values.get("served_model_name"), list):
            serve_values["served_model_name"] = tuple(serve_values["served_model_name"])
        for key in ("host", "port", "api_key"):
            _expect(key not in serve_values, where,
                    f"`{key}` belongs at the top level (Ray Serve's proxy), not in a model entry")  # fmt: skip
        if isinstance(serve_values.get("kv_cache_memory"), str):
            serve_values["kv_cache_memory"] = parse_bytes(serve_values["kv_cache_memory"])
        try:
            cfg = ServeConfig.from_dict(serve_values, source=where)
        except QserveError as exc:
            raise ConfigError(f"{exc}; or a deployment key: {list(DEPLOY_KEYS)}") from exc
        names = tuple(cfg.model_names)
        for name in names:
            _expect(name not in seen, where, f"served model name {name!r} is already used by models[{seen.get(name)}]")
            seen[name] = i
        replicas, autoscaling = entry.get("replicas"), entry.get("autoscaling")
        _expect(replicas is None or autoscaling is None, where,
                "give either `replicas: N` (fixed) or `autoscaling: {...}`, not both")  # fmt: skip
        if replicas is not None:
            _expect(isinstance(replicas, int) and not isinstance(replicas, bool) and replicas >= 1, where,
                    f"replicas: expected an integer >= 1, got {replicas!r}")  # fmt: skip
        if autoscaling is not None:
            _expect(isinstance(autoscaling, dict), where, "autoscaling: expected a mapping")
            bad = sorted(set(autoscaling) - set(AUTOSCALING_KEYS))
            _expect(not bad, where, f"autoscaling: unknown key(s) {bad}; valid keys are {list(AUTOSCALING_KEYS)}")
            lo, hi = autoscaling.get("min_replicas", 1), autoscaling.get("max_replicas", 1)
            _expect(isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi and hi >= 1, where,
                    f"autoscaling: need 0 <= min_replicas <= max_replicas, max_replicas >= 1 (got {lo}, {hi})")  # fmt: skip
        for key in ("num_cpus", "num_gpus"):
            value = entry.get(key, 1.0 if key == "num_cpus" else 0.0)
            _expect(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0, where,
                    f"{key}: expected a number >= 0, got {value!r}")  # fmt: skip
        ongoing = entry.get("max_ongoing_requests")
        _expect(ongoing is None or (isinstance(ongoing, int) and ongoing >= 1), where,
                f"max_ongoing_requests: expected an integer >= 1, got {ongoing!r}")  # fmt: skip
        parsed.append(ModelDeployment(
            serve=serve_values, names=names, replicas=replicas, autoscaling=autoscaling,
            num_cpus=float(entry.get("num_cpus", 1.0)), num_gpus=float(entry.get("num_gpus", 0.0)),
            max_ongoing_requests=ongoing,
        ))  # fmt: skip
    deployment_names = [m.deployment_name for m in parsed]
    _expect(len(set(deployment_names)) == len(deployment_names), source,
            f"two models map to the same deployment name: {deployment_names}; give distinct served_model_name")  # fmt: skip
    port = data.get("port", 8000)
    _expect(isinstance(port, int) and 0 < port < 65536, source, f"port: expected 1..65535, got {port!r}")
    metrics_port = data.get("metrics_port")
    _expect(metrics_port is None or (isinstance(metrics_port, int) and not isinstance(metrics_port, bool)
                                     and 0 < metrics_port < 65536 and metrics_port != port), source,
            f"metrics_port: expected 1..65535 other than port ({port}), got {metrics_port!r}")  # fmt: skip
    return RayDeployConfig(
        models=tuple(parsed), host=str(data.get("host", "127.0.0.1")), port=port, api_key=data.get("api_key"),
        app_name=str(data.get("app_name", "qserve")), source=source,
        metrics_sd_dir=str(data["metrics_sd_dir"]) if data.get("metrics_sd_dir") else None,
        metrics_port=metrics_port,
    )  # fmt: skip


def load_config(path: str | Path) -> RayDeployConfig:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the deployment config: {exc}") from exc
    return parse_config(data, source=str(path))


def resolve_models(config: RayDeployConfig) -> RayDeployConfig:
    """Resolves each model to a checkpoint directory and validates it here, before any replica starts: a
    broken checkpoint is refused in seconds on the command line, not in a crash-looping replica."""
    from dataclasses import replace

    from qserve.commands.serve import check_checkpoint
    from qserve.hub import resolve_model

    models = []
    for m in config.models:
        model_dir = Path(resolve_model(m.serve["model"])).resolve()
        check_checkpoint(model_dir)
        models.append(replace(m, serve={**m.serve, "model": str(model_dir), "served_model_name": m.names}))
    return replace(config, models=tuple(models))


# ---- one replica: the qserve app driven in-process --------------------------------------------------


class ASGIForwarder:
    """Runs one HTTP request through an ASGI app in this process and yields the response as it is sent:
    first `{"status": int, "headers": [(name, value), ...]}`, then the body chunks (streams included).
    Closing the iterator early (the client left) tells the app `http.disconnect`, which aborts the
    engine request and frees its KV blocks."""

    def __init__(self, app, extra_headers: list[tuple[str, str]] | None = None) -> None:
        self.app = app
        self.extra_headers = extra_headers or []

    async def __call__(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]],
                       body: bytes, client: tuple[str, int] | None = None) -> AsyncIterator[Any]:  # fmt: skip
        messages: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        body_sent = False

        async def receive() -> dict:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            await messages.put(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "",
            "headers": headers, "client": client, "server": ("qserve-replica", 0), "state": {},
        }  # fmt: skip
        finished = object()
        task = asyncio.create_task(self.app(scope, receive, send))
        task.add_done_callback(lambda _: messages.put_nowait(finished))
        try:
            while True:
                message = await messages.get()
                if message is finished:
                    task.result()  # re-raises what the app raised
                    return
                if message["type"] == "http.response.start":
                    names = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
                    yield {"status": message["status"], "headers": names + self.extra_headers}
                elif message["type"] == "http.response.body" and message.get("body"):
                    yield bytes(message["body"])
        finally:
            gone.set()
            if not task.done():
                try:
                    await asyncio.wait_for(task, timeout=10)
                except (asyncio.TimeoutError, Exception):
                    task.cancel()


class QserveModel:
    """A Ray Serve replica: one engine and qserve's OpenAI app (see the module docstring)."""

    def __init__(self, serve_values: dict[str, Any], metrics_sd_dir: str | None = None,
                 metrics_port: int | None = None) -> None:  # fmt: skip
        import dataclasses

        from qserve.commands.serve import load_chat_template
        from qserve.serve.api.app import create_app
        from qserve.serve.api.config import ServeConfig
        from qserve.serve.async_engine import AsyncLLMEngine

        cfg = ServeConfig.from_dict(dict(serve_values), source="ray deployment")
        self.engine = AsyncLLMEngine(dataclasses.replace(cfg.engine_args(), model=cfg.model))
        app = create_app(
            self.engine, cfg.model_names, None, cfg.max_body_bytes, load_chat_template(cfg.chat_template),
            log_requests=not cfg.disable_log_requests, log_stats_interval=None,
            tool_call_parser=cfg.tool_call_parser,
        )  # fmt: skip
        self.replica = _replica_name()
        self.forward = ASGIForwarder(app, [(REPLICA_HEADER, self.replica), (REPLICA_PID_HEADER, str(os.getpid()))])
        self.metrics = (
            ReplicaMetricsExporter(app.state.metrics.registry, metrics_sd_dir, self.replica, cfg.model_names[0])
            if metrics_sd_dir else None
        )  # fmt: skip
        self.node_metrics = (
            NodeMetrics(app.state.metrics.registry, metrics_port, self.replica) if metrics_port else None
        )

    def __del__(self) -> None:  # Ray Serve calls it when it stops the replica gracefully
        for exporter in (getattr(self, "metrics", None), getattr(self, "node_metrics", None)):
            if exporter is not None:
                exporter.close()

    async def http(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]],
                   body: bytes) -> AsyncIterator[Any]:  # fmt: skip
        async for item in self.forward(method, path, query, headers, body):
            yield item

    def identity(self) -> dict[str, Any]:
        target = self.metrics.target if self.metrics is not None else None
        node = self.node_metrics
        return {"replica": self.replica, "pid": os.getpid(), "healthy": self.engine.is_healthy,
                "metrics": target, "node_metrics": node.target if node is not None else None,
                "serves_node_metrics": node is not None and node.serving}  # fmt: skip

    def check_health(self) -> None:
        """Ray Serve calls this every health_check_period_s; an error makes it replace the replica."""
        if not self.engine.is_healthy:
            raise RuntimeError("the qserve engine loop has stopped")
        if self.node_metrics is not None:
            self.node_metrics.claim()  # take over the node's port if the replica serving it has gone


class ReplicaMetricsExporter:
    """Serves one replica's qserve metrics (the vLLM names the dashboard and HPA read) on a free port of
    this node and announces it to Prometheus with a file_sd target file, `<sd_dir>/<replica>.json`:

        scrape_configs:
          - job_name: qserve-ray
            file_sd_configs: [{files: ["/shared/prometheus-sd/*.json"]}]

    The file is removed when the replica stops; a killed replica's file stays until its replacement
    starts (Prometheus then shows that target down), so a dead target never looks alive."""

    def __init__(self, registry, sd_dir: str | Path, replica: str, model_name: str) -> None:
        from prometheus_client import start_http_server

        host = _node_ip()
        self._server, _ = start_http_server(0, addr=host, registry=registry)
        self.target = f"{host}:{self._server.server_port}"
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", replica)
        self.path = Path(sd_dir) / f"{slug}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entry = [{"targets": [self.target], "labels": {"replica": replica, "served_model": model_name,
                                                       "pod": slug}}]  # fmt: skip
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(entry))
        tmp.replace(self.path)  # Prometheus never reads a half-written file

    def close(self) -> None:
        self.path.unlink(missing_ok=True)
        self._server.shutdown()


class NodeMetrics:
    """`metrics_port`: one scrape target per node (per Ray pod under KubeRay, where a PodMonitor names the
    port) carrying every local replica's qserve metrics, each series labelled replica="<deployment>#<id>".

    Each replica serves its own registry on a loopback port and registers it in a node-local directory;
    whichever replica holds `port` (the first to bind it; another takes over within a health-check period
    when it goes) answers a scrape by fetching every registered replica and merging the families. A
    replica whose process has died is dropped from the directory at the next scrape."""

    def __init__(self, registry, port: int, replica: str) -> None:
        import tempfile

        from prometheus_client import start_http_server

        self.port = port
        self.host = _node_ip()
        self.target = f"{self.host}:{port}"  # what Prometheus scrapes on this node
        self._own, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
        self.directory = Path(tempfile.gettempdir()) / f"qserve-ray-metrics-{port}"
        self.directory.mkdir(parents=True, exist_ok=True)
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", replica)
        self.path = self.directory / f"{slug}.json"
        url = f"http://127.0.0.1:{self._own.server_port}/metrics"
        entry = {"replica": replica, "pid": os.getpid(), "url": url}
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(entry))
        tmp.replace(self.path)
        self._node = None
        self.claim()

    @property
    def serving(self) -> bool:
        return self._node is not None

    def claim(self) -> None:
        """Serve the node's port unless another replica already does."""
        if self._node is not None:
            return
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        directory = self.directory

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics")
                    return
                body = merged_replica_metrics(directory)
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # no line per scrape
                pass

        try:
            server = ThreadingHTTPServer((self.host, self.port), Handler)
        except OSError:  # in use: another replica of this node serves it
            return
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="qserve-node-metrics", daemon=True).start()
        self._node = server

    def close(self) -> None:
        self.path.unlink(missing_ok=True)
        self._own.shutdown()
        if self._node is not None:
            self._node.shutdown()
            self._node.server_close()
            self._node = None


def merged_replica_metrics(directory: Path) -> bytes:
    """Every registered replica's metrics as one exposition, each sample labelled with its replica."""
    import urllib.request

    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    for path in sorted(directory.glob("*.json")):
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced, or gone
        if not _process_alive(entry["pid"]):
            path.unlink(missing_ok=True)  # a killed replica never said goodbye
            continue
        try:
            with urllib.request.urlopen(entry["url"], timeout=5) as response:
                text = response.read().decode()
        except OSError:
            continue  # stopping: its series disappear, as they would from a down target
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = Metric(family.name, family.documentation, family.type, family.unit)
                families[family.name] = merged
            replica = entry["replica"]
            merged.samples += [s._replace(labels={**s.labels, "replica": replica}) for s in family.samples]

    class Merged:
        def collect(self):
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray
        return "127.0.0.1"


def _replica_name() -> str:
    try:
        from ray import serve

        ctx = serve.get_replica_context()
        return f"{ctx.deployment}#{ctx.replica_id.unique_id}"
    except Exception:  # outside a Ray replica (tests drive the class directly)
        return f"local#{os.getpid()}"


# ---- the ingress: route by the `model` field ---------------------------------------------------------


def _error(status: int, message: str, code: str, type_: str = "invalid_request_error"):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": code}},
                        status_code=status)  # fmt: skip


def build_router_app(handles: dict[str, Any], default: str | None, api_key: str | None = None,
                     max_body_bytes: int = 1 << 20):  # fmt: skip
    """The ingress ASGI app. `handles`: served model name -> a handle with `.options(stream=True)` and
    `http.remote(...)` (a Ray DeploymentHandle, or a stand-in in tests); `default`: the model a request
    without `model` goes to (only when the application serves one model)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    from qserve import __version__
    from qserve.serve.api.middleware import AccessLog, BearerAuth, BodyLimit

    served = sorted(handles)

    async def forward(handle, request: Request, body: bytes):
        headers = [(k, v) for k, v in request.headers.raw if k.lower() not in (b"host", b"content-length")]
        stream = handle.options(stream=True).http.remote(
            request.method, request.url.path, request.url.query.encode(), headers, body
        )
        try:
            head = await stream.__anext__()
        except Exception as exc:  # the replica died or could not be reached before answering
            return _error(503, f"no replica of this model could answer ({type(exc).__name__}); retry",
                          "replica_unavailable", "server_error")  # fmt: skip

        async def rest():
            try:
                async for chunk in stream:
                    yield chunk
            except Exception:  # the replica died mid-response: end the stream; the client sees it cut
                return

        skip = {"content-length", "transfer-encoding", "connection"}
        out = {k: v for k, v in head["headers"] if k.lower() not in skip}
        return StreamingResponse(rest(), status_code=head["status"], headers=out)

    async def by_model(request: Request):
        body = await request.body()
        try:
            name = json.loads(body).get("model") if body else None
        except (ValueError, AttributeError):
            return _error(400, "The request body is not a JSON object.", "invalid_json")
        if name is None:
            if default is None:
                return _error(400, f"`model` is required: this server serves {served}.", "model_required")
            name = default
        if name not in handles:
            return _error(404, f"The model `{name}` does not exist. Served models: {served}.", "model_not_found")
        return await forward(handles[name], request, body)

    async def models(request: Request):
        data, done = [], set()
        for name in served:
            handle = handles[name]
            if id(handle) in done:
                continue
            done.add(id(handle))
            stream = handle.options(stream=True).http.remote("GET", "/v1/models", b"", [], b"")
            chunks = [item async for item in stream]
            data += json.loads(b"".join(c for c in chunks if isinstance(c, bytes)))["data"]
        return JSONResponse({"object": "list", "data": data})

    async def health(request: Request):
        return JSONResponse({})

    async def version(request: Request):
        return JSONResponse({"version": __version__})

    routes = [Route(path, by_model, methods=["POST"]) for path in MODEL_ROUTES]
    routes += [Route("/v1/models", models, methods=["GET"]), Route("/health", health, methods=["GET"]),
               Route("/version", version, methods=["GET"])]  # fmt: skip
    app = Starlette(routes=routes)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)
    app.add_middleware(AccessLog, enabled=True)
    return app


class QserveRouter:
    """The ingress replica: `handles` maps each served model name to its deployment's handle."""

    def __init__(self, handles: dict[str, Any], api_key: str | None = None) -> None:
        self.handles = handles
        self.api_key = api_key

    def __serve_build_asgi_app__(self):
        default = next(iter(self.handles)) if len({id(h) for h in self.handles.values()}) == 1 else None
        return build_router_app(self.handles, default, self.api_key)


# ---- the Ray Serve application -------------------------------------------------------------------


def _ray_serve():
    try:
        from ray import serve
    except ImportError as exc:
        raise ConfigError(
            "Ray Serve is not installed: pip install 'qserve[ray]' (ray[serve]) on every node of the cluster"
        ) from exc
    return serve


def build_application(config: RayDeployConfig):
    """The Ray Serve application: one deployment per model, the router in front. `config` should have
    been through `resolve_models`."""
    serve = _ray_serve()
    from qserve.serve.api.config import DEFAULT_MAX_QUEUE

    model_deployment = serve.deployment(QserveModel)
    handles = {}
    for m in config.models:
        batch = m.serve.get("max_num_seqs", 64) + m.serve.get("max_queue", DEFAULT_MAX_QUEUE)
        options: dict[str, Any] = {
            "name": m.deployment_name,
            "ray_actor_options": {"num_cpus": m.num_cpus, "num_gpus": m.num_gpus},
            "max_ongoing_requests": m.max_ongoing_requests or batch,
            "health_check_period_s": 5,
            # A replica being stopped finishes its in-flight requests for this long (the entry's
            # shutdown_timeout, as `qserve serve --shutdown-timeout`, else 120 s).
            "graceful_shutdown_timeout_s": m.serve.get("shutdown_timeout", 120),
        }
        if m.autoscaling is not None:
            options["autoscaling_config"] = dict(m.autoscaling)
        else:
            options["num_replicas"] = m.replicas or 1
        bound = model_deployment.options(**options).bind(m.serve, config.metrics_sd_dir, config.metrics_port)
        for name in m.names:
            handles[name] = bound
    router = serve.deployment(serve.ingress()(QserveRouter)).options(
        name="qserve-router", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000
    )
    return router.bind(handles, config.api_key)


def run(config: RayDeployConfig, address: str | None = None, blocking: bool = True) -> None:
    """Starts (or joins) a Ray cluster, starts Serve's HTTP proxy on config.host:port, deploys the app."""
    import ray

    serve = _ray_serve()
    if not ray.is_initialized():
        ray.init(address=address, logging_level="WARNING")
    serve.start(http_options={"host": config.host, "port": config.port})
    app = build_application(config)
    if not blocking:
        serve.run(app, name=config.app_name, route_prefix="/", blocking=False)
        return
    # Foreground: Ctrl-C or SIGTERM takes the application down gracefully (Ray Serve lets each replica
    # finish its in-flight requests, up to graceful_shutdown_timeout_s), and a local cluster with it.
    import signal

    def interrupt(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        serve.run(app, name=config.app_name, route_prefix="/", blocking=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if address in (None, "local"):
            serve.shutdown()
        else:
            serve.delete(config.app_name)


def app_builder(args: dict[str, Any]):
    """Ray Serve application builder, so Ray's own tooling deploys qserve too:

        serve run qserve.serve.ray_serve:app_builder config=deploy/ray/smollm2.yaml
        # or in a Serve config file / KubeRay RayService serveConfigV2:
        #   import_path: qserve.serve.ray_serve:app_builder
        #   args: {models: [{model: /models/smollm2-135m, replicas: 2}]}

    `args`: {"config": PATH} or the config itself; host and port there are ignored (the Serve config's
    http_options place the proxy)."""
    args = dict(args)
    if "config" in args:
        extra = sorted(set(args) - {"config"})
        if extra:
            raise ConfigError(f"application args: give either config=PATH or the config's keys, not both ({extra})")
        config = load_config(args["config"])
    else:
        config = parse_config(args, source="application args")
    return build_application(resolve_models(config))
