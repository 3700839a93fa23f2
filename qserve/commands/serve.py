"""`qserve serve MODEL`: validate the checkpoint, load it into the engine, serve the OpenAI API.

Flags carry vLLM's names so a command line moves between the two. SIGTERM (or Ctrl-C) drains: new
requests and /health get 503, in-flight responses (streams included) finish within --shutdown-timeout,
then the engine stops and the process exits 0 (serve/api/shutdown.py).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import click

from qserve.errors import CheckpointError, ConfigError, QserveError, RecipeError
from qserve.serve.api.config import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_QUEUE,
    DEFAULT_SHUTDOWN_TIMEOUT,
    TOOL_CALL_PARSERS,
)


class CheckpointRefused(CheckpointError):
    """The validator found errors: serving it would give garbage or crash mid-request."""

    exit_code = 1  # as `qserve validate` exits for a checkpoint with error findings


class EngineCoreDied(QserveError):
    """The engine core process died while serving: the server stops and exits non-zero."""


def _read_config_file(path: str) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise RecipeError(f"{path}: cannot read the serve config: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(
            f"{path}: expected a mapping of serve options (port: 8000, ...), found {type(data).__name__}"
        )
    return data.get("serve", data) if set(data) == {"serve"} else data


def build_config(ctx: click.Context, model: str | None, config_file: str | None, flags: dict[str, Any]):
    """Config file values, overridden by flags given on the command line (or by QSERVE_API_KEY)."""
    from qserve.serve.api.config import ServeConfig, parse_bytes

    values = _read_config_file(config_file) if config_file else {}
    explicit = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    for name, value in flags.items():
        if ctx.get_parameter_source(name) in explicit:
            values[name] = value
    if model is not None:
        values["model"] = model
    if "model" not in values:
        raise ConfigError(
            "no model given: pass MODEL (a checkpoint directory or a model name) or set model: in --config"
        )
    if isinstance(values.get("kv_cache_memory"), str):
        values["kv_cache_memory"] = parse_bytes(values["kv_cache_memory"])
    return ServeConfig.from_dict(values, source=config_file or "command line")


def check_checkpoint(model_dir: Path) -> str:
    """Runs the validator; refuses a broken checkpoint. Returns a one-line verdict for the banner."""
    from qserve.validate import validate_checkpoint

    report = validate_checkpoint(model_dir)
    errors = [f for f in report.findings if f.severity == "error"]
    if errors and all(f.code == "META_MISSING" for f in errors):
        # No quantization metadata at all: a plain full-precision model, which the engine serves as is.
        return "unquantized (no quantization metadata)"
    if not report.ok:
        raise CheckpointRefused(
            f"{model_dir} failed validation; refusing to serve it.\n{report.format_text()}\n"
            f"Fix the checkpoint (or re-quantize it), then check it with `qserve validate {model_dir}`."
        )
    return "valid"


def stats_interval(default: float) -> float:
    """Seconds between stats lines: $QSERVE_LOG_STATS_INTERVAL (as vLLM's VLLM_LOG_STATS_INTERVAL), else default."""
    import os

    raw = os.environ.get("QSERVE_LOG_STATS_INTERVAL", "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"QSERVE_LOG_STATS_INTERVAL={raw!r}: expected a positive number of seconds")
    return value


def max_len_source(cfg, model_dir: Path) -> str:
    """Where the max model len came from, for the banner: a flag, or which field of the model's config."""
    if cfg.max_model_len is not None:
        return "--max-model-len"
    from qserve.serve.loader import read_json

    hf = read_json(model_dir / "config.json")
    if hf.get("max_position_embeddings"):
        return "the model's max_position_embeddings; lower it with --max-model-len"
    return "config.json has no max_position_embeddings: 2048 assumed; set --max-model-len"


def load_chat_template(spec: str | None) -> str | None:
    """--chat-template: a file, or (as vLLM allows) the Jinja template itself."""
    if spec is None:
        return None
    path = Path(spec).expanduser()
    if path.is_file():
        return path.read_text()
    if "{{" in spec or "{%" in spec:
        return spec
    raise ConfigError(f"--chat-template: {spec} is neither a readable file nor a Jinja template")


def run_server(cfg) -> None:
    from qserve.hub import resolve_model

    logging.basicConfig(
        level=cfg.log_level.upper() if cfg.log_level != "trace" else "DEBUG",
        format="%(levelname)s %(asctime)s %(name)s: %(message)s",
        datefmt="%m-%d %H:%M:%S",
    )
    chat_template = load_chat_template(cfg.chat_template)
    model_dir = Path(resolve_model(cfg.model))
    verdict = check_checkpoint(model_dir)  # before the heavy imports: a refusal is quick

    from qserve.serve.api.app import DEFAULT_STATS_INTERVAL, create_app
    from qserve.serve.api.shutdown import serve_app
    from qserve.serve.async_engine import AsyncLLMEngine
    from qserve.serve.engine_core import EngineCoreClient

    interval = stats_interval(DEFAULT_STATS_INTERVAL)
    args = dataclasses.replace(cfg.engine_args(), model=str(model_dir))
    if cfg.engine_in_process:
        engine = AsyncLLMEngine(args)
    else:  # the step loop in its own process (serve/engine_core.py)
        engine = EngineCoreClient(args, log_level="debug" if cfg.log_level == "trace" else cfg.log_level)
    app = create_app(
        engine,
        cfg.model_names,
        cfg.api_key,
        cfg.max_body_bytes,
        chat_template,
        log_requests=not cfg.disable_log_requests,
        log_stats_interval=None if cfg.disable_log_stats else interval,
        tool_call_parser=cfg.tool_call_parser,
    )
    if chat_template is None and not getattr(engine.tokenizer, "chat_template", None):
        click.secho("warning: the tokenizer has no chat template; /v1/chat/completions will answer 400 "
                    "until the server is started with --chat-template", fg="yellow", err=True)  # fmt: skip
    url = f"http://{cfg.host}:{cfg.port}"
    click.echo(f"model:         {model_dir} (served as {', '.join(cfg.model_names)})")
    click.echo(f"checkpoint:    {verdict}; quantization: {engine.quantization or 'none'}")
    if isinstance(engine, EngineCoreClient):
        click.echo(f"engine core:   process {engine.core_pid} (ZeroMQ IPC; --engine-in-process runs it in a thread)")
    else:
        click.echo("engine core:   a thread of this process (--engine-in-process)")
    click.echo(f"KV cache:      {engine.kv_cache_tokens} tokens (block size {cfg.block_size}); "
               f"max model len {engine.max_model_len} ({max_len_source(cfg, model_dir)}); "
               f"max num seqs {cfg.max_num_seqs}; max queue {cfg.max_queue}")  # fmt: skip
    click.echo(
        f"auth:          {'API key required' if cfg.api_key else 'none (anyone who can reach the port)'}"
    )
    click.echo(f"serving:       {url}/v1 (OpenAI base URL); {url}/health, {url}/metrics")
    logs = [
        "one line per request" if not cfg.disable_log_requests else None,
        f"stats every {interval:g} s while busy" if not cfg.disable_log_stats else None,
    ]
    click.echo(
        "logging:       "
        + ("; ".join(x for x in logs if x) or "off")
        + " (--disable-log-requests, --disable-log-stats); x-request-id on every response"
    )
    click.echo(
        f"try:           curl {url}/v1/chat/completions -H 'Content-Type: application/json'"
        + (' -H "Authorization: Bearer $QSERVE_API_KEY"' if cfg.api_key else "")
        + f""" -d '{{"model": "{cfg.model_names[0]}", "messages": [{{"role": "user", "content": "Hello"}}], """
        + """"max_tokens": 32}'"""
    )
    # uvicorn's own access log stays off: the app's AccessLog writes one line per request with its id.
    if isinstance(engine, EngineCoreClient):
        # A dead core has failed every open request; stop serving now (new requests would get 503).
        engine.on_death(lambda: app.state.drain.begin(0.0))
    serve_app(app, cfg.host, cfg.port, cfg.shutdown_timeout, log_level=cfg.log_level, access_log=False)
    if isinstance(engine, EngineCoreClient) and engine.death is not None:
        raise EngineCoreDied(f"{engine.death}; the server has stopped (the log above has the cause)")


@click.command()
@click.argument("model", required=False)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port to bind.")
@click.option(
    "--served-model-name", multiple=True, help="Name(s) clients use as `model` (repeatable); default MODEL."
)
@click.option(
    "--api-key", envvar="QSERVE_API_KEY", default=None, help="Require 'Authorization: Bearer KEY' on /v1/*."
)
@click.option("--max-model-len", type=int, default=None, help="Context length; default the model's.")
@click.option("--max-num-seqs", type=int, default=64, show_default=True, help="Most sequences in one batch.")
@click.option(
    "--max-num-batched-tokens", type=int, default=2048, show_default=True, help="Token budget per step."
)
@click.option("--long-prefill-token-threshold", type=int, default=0, show_default=True,
              help="Most tokens of one prompt computed per step, so short prompts start beside long ones; "
                   "0 = no cap.")  # fmt: skip
@click.option("--block-size", type=int, default=16, show_default=True, help="Tokens per KV-cache block.")
@click.option("--gpu-memory-utilization", type=float, default=0.9, show_default=True,
              help="Fraction of GPU memory for weights + KV cache (CUDA).")  # fmt: skip
@click.option("--kv-cache-memory", default=None, help="KV-cache size on CPU, e.g. 2GiB or bytes.")
@click.option("--chat-template", default=None, help="Jinja chat template file (or inline template).")
@click.option("--tool-call-parser", type=click.Choice(TOOL_CALL_PARSERS), default=None,
              help="How tool calls are read from generated text (Hermes <tool_call>, Llama 3 JSON, Mistral "
                   "[TOOL_CALLS]); default: chosen from the chat template, else hermes.")  # fmt: skip
@click.option("--max-queue", type=int, default=DEFAULT_MAX_QUEUE, show_default=True,
              help="Most requests waiting for a batch slot; beyond it 429 with Retry-After.")  # fmt: skip
@click.option(
    "--max-body-bytes",
    type=int,
    default=DEFAULT_MAX_BODY_BYTES,
    show_default=True,
    help="Larger bodies get 413.",
)
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug", "trace"]),
              default="info", show_default=True)  # fmt: skip
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default="auto",
    show_default=True,
    help="Compute dtype. auto: the checkpoint's half dtype on CUDA; on the CPU bf16 for an unquantized "
    "model where the CPU has AMX (oneDNN's bf16 GEMMs), else float32.",
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Engine seed for unseeded sampling.")
@click.option("--enable-prefix-caching/--no-enable-prefix-caching", default=True, show_default=True)
@click.option("--tensor-parallel-size", "-tp", type=click.IntRange(min=1), default=1, show_default=True,
              help="Split the model over N processes (Megatron-style: heads and MLP columns per rank, one "
                   "all-reduce per o_proj / down_proj); 1 runs it in one process.")  # fmt: skip
@click.option("--enforce-eager", is_flag=True,
              help="CUDA: no decode CUDA graphs (captured per batch size at start-up otherwise).")  # fmt: skip
@click.option("--engine-in-process", is_flag=True,
              help="Run the engine's step loop in a thread of the API process instead of its own process "
                   "(for debugging; the default split keeps HTTP, tokenization and detokenization off the "
                   "step loop's GIL).")  # fmt: skip
@click.option("--disable-log-requests", is_flag=True, help="No access-log line per request.")
@click.option("--disable-log-stats", is_flag=True,
              help="No periodic throughput / queue / KV-cache line (every 10 s while busy).")  # fmt: skip
@click.option("--shutdown-timeout", type=click.FloatRange(min=0), default=DEFAULT_SHUTDOWN_TIMEOUT,
              show_default=True,
              help="Seconds in-flight requests get to finish after SIGTERM (new ones get 503); keep it below "
                   "the pod's terminationGracePeriodSeconds minus its preStop time.")  # fmt: skip
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="YAML of serve options (keys as the flags, '_' for '-'); flags given here override it.")  # fmt: skip
@click.pass_context
def serve(ctx: click.Context, model: str | None, config_file: str | None, **flags: Any) -> None:
    """Serve MODEL (a GPTQ/AWQ or full-precision checkpoint dir, or a model name) over an OpenAI API."""
    flags["served_model_name"] = tuple(flags["served_model_name"])
    run_server(build_config(ctx, model, config_file, flags))
