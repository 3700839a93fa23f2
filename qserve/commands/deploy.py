"""`qserve deploy ray CONFIG`: serve one or more models as replicas on a Ray cluster behind Ray Serve's
HTTP proxy (see qserve/serve/ray_serve.py for the CONFIG format).

The Kubernetes manifests, Grafana dashboard and container images are files, not commands: they live in
deploy/ (deploy/k8s, deploy/grafana, deploy/docker).
"""

from __future__ import annotations

import click


@click.group("deploy")
def deploy() -> None:
    """Deploy qserve on a cluster engine (Ray Serve). Kubernetes files: deploy/k8s in the repository."""


@deploy.command("ray")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--address", default=None,
              help="Ray cluster to join ('auto' after `ray start --head` on this node, or ray://HOST:10001); "
                   "default (or 'local'): start a local cluster.")  # fmt: skip
@click.option("--host", default=None, help="Bind Ray Serve's HTTP proxy here (overrides CONFIG's host).")
@click.option("--port", type=int, default=None, help="Proxy port (overrides CONFIG's port).")
@click.option("--detach", is_flag=True,
              help="Deploy and return, leaving the application running on the cluster (with --address); "
                   "default: stay in the foreground until Ctrl-C, then shut the application down.")  # fmt: skip
def ray_command(config: str, address: str | None, host: str | None, port: int | None, detach: bool) -> None:
    """Serve the models in CONFIG (YAML) as Ray Serve replicas, routed by the OpenAI `model` field."""
    from dataclasses import replace

    from qserve.serve import ray_serve

    cfg = ray_serve.load_config(config)
    cfg = replace(cfg, host=host or cfg.host, port=port or cfg.port)
    if detach and address in (None, "local"):
        raise click.UsageError("--detach needs --address: a local cluster ends with this process")
    ray_serve._ray_serve()  # a clear error now if Ray Serve is missing, before any model is resolved
    cfg = ray_serve.resolve_models(cfg)
    for m in cfg.models:
        scale = (f"autoscaling {m.autoscaling}" if m.autoscaling is not None else f"{m.replicas or 1} replica(s)")
        click.echo(f"model:    {m.serve['model']} as {', '.join(m.names)}: {scale}, "
                   f"{m.num_cpus:g} CPU / {m.num_gpus:g} GPU each")  # fmt: skip
    url = f"http://{cfg.host}:{cfg.port}"
    click.echo(f"serving:  {url}/v1 (OpenAI base URL, Ray Serve proxy); {url}/v1/models lists every model")
    ray_serve.run(cfg, address=address, blocking=not detach)
    if detach:
        click.echo(f"deployed application {cfg.app_name!r}; remove it with `serve shutdown` or `serve delete`")
