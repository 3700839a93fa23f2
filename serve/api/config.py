"""`qserve serve` settings: one frozen dataclass, a field per CLI flag (vLLM's names, underscored).

`ServeConfig.from_dict` is what a recipe's `serve:` section (issue 8) or `--config FILE` maps onto, key
for key; an unknown key is an error, never ignored.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from qserve.errors import ConfigError, RecipeError

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_MAX_QUEUE = 256
# Generous for chat histories (a 32k-token prompt is ~130 kB of text) yet far below memory trouble.
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
# Seconds in-flight requests get after SIGTERM: inside Kubernetes' default terminationGracePeriodSeconds
# (30 s) with time left to stop the engine; a pod with a longer grace period passes more.
DEFAULT_SHUTDOWN_TIMEOUT = 25.0
_INT_FIELDS = ("port", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size", "kv_cache_memory",
               "max_queue", "max_body_bytes", "seed", "long_prefill_token_threshold",
               "tensor_parallel_size")  # fmt: skip
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_bytes(text: str | int) -> int:
    """`4GiB`, `512M`, `1.5G`, `1073741824` -> bytes (K/M/G/T are powers of 1024 with or without the i)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise ConfigError(
            f"kv_cache_memory: expected a byte size such as 4GiB, 512MiB or 1073741824; found {text!r}"
        )
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * 1024 ** "_KMGT".index(unit)) if unit else int(number)


# serve/api/tools.py's TOOL_PARSERS (named here so the CLI does not import the API to list them).
TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral")


@dataclass(frozen=True)
class ServeConfig:
    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: tuple[str, ...] = ()  # default: the MODEL argument as given
    api_key: str | None = None
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    long_prefill_token_threshold: int = 0  # most tokens of one prompt per step; 0 = no cap
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: int | None = None  # bytes (CPU); default: the engine's
    chat_template: str | None = None  # a file path, or the template itself
    tool_call_parser: str | None = None  # one of TOOL_CALL_PARSERS; default: chosen from the chat template
    max_queue: int = DEFAULT_MAX_QUEUE
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    log_level: str = "info"
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # CUDA: no decode CUDA graphs
    tensor_parallel_size: int = 1  # ranks the model is split over (serve/tensor_parallel.py)
    engine_in_process: bool = False  # the step loop in a thread of the API process, not its own process
    disable_log_requests: bool = False  # no access-log line per request (vLLM's flag)
    disable_log_stats: bool = False  # no periodic throughput/queue line (vLLM's flag)
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT  # seconds of draining after SIGTERM

    def __post_init__(self) -> None:
        for name in _INT_FIELDS:
            value = getattr(self, name)
            # bool is an int subclass: `port: true` in a YAML file is a mistake, not port 1.
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{name}: expected an integer, found {value!r}")
        if isinstance(self.gpu_memory_utilization, bool) or not isinstance(
            self.gpu_memory_utilization, (int, float)
        ):
            raise ConfigError(
                f"gpu_memory_utilization: expected a number, found {self.gpu_memory_utilization!r}"
            )
        if (isinstance(self.shutdown_timeout, bool) or not isinstance(self.shutdown_timeout, (int, float))
                or not self.shutdown_timeout >= 0):  # fmt: skip
            raise ConfigError(
                f"shutdown_timeout: expected a number of seconds >= 0, found {self.shutdown_timeout!r}"
            )
        for name in ("enable_prefix_caching", "disable_log_requests", "disable_log_stats", "enforce_eager",
                     "engine_in_process"):  # fmt: skip
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: expected true or false, found {getattr(self, name)!r}")
        for name in ("model", "host", "log_level", "dtype", "device"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name}: expected a string, found {getattr(self, name)!r}")
        if not self.model:
            raise ConfigError("model: give a checkpoint directory or a model name (the MODEL argument)")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port: expected 0..65535, found {self.port}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_queue", "max_body_bytes",
                     "tensor_parallel_size"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected an integer >= 1, found {getattr(self, name)}")
        if self.long_prefill_token_threshold < 0:
            raise ConfigError(
                f"long_prefill_token_threshold: expected an integer >= 0 (0 = no cap), "
                f"found {self.long_prefill_token_threshold}"
            )
        for name in ("max_model_len", "kv_cache_memory"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected an integer >= 1, found {getattr(self, name)}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(
                f"gpu_memory_utilization: expected a fraction in (0, 1], found {self.gpu_memory_utilization}"
            )
        choices = {"log_level": LOG_LEVELS, "dtype": DTYPES, "device": DEVICES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"{name}: expected one of {', '.join(allowed)}; found {getattr(self, name)!r}"
                )
        if self.api_key is not None and not self.api_key.strip():
            # An empty QSERVE_API_KEY must not silently mean "no auth".
            raise ConfigError("api_key: empty; give a key or unset QSERVE_API_KEY to serve without auth")
        if any(not name for name in self.served_model_name):
            raise ConfigError("served_model_name: names must be non-empty")
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ConfigError(
                f"tool_call_parser: expected one of {', '.join(TOOL_CALL_PARSERS)}; found {self.tool_call_parser!r}"
            )

    @property
    def model_names(self) -> list[str]:
        return list(self.served_model_name) or [self.model]

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> ServeConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise RecipeError(
                f"{source}: unknown serve key(s) {unknown}; valid keys are {sorted(known)} "
                "(the `qserve serve` flags with '_' for '-')"
            )
        values = dict(values)
        if isinstance(values.get("served_model_name"), str):
            values["served_model_name"] = (values["served_model_name"],)
        elif values.get("served_model_name") is not None:
            values["served_model_name"] = tuple(values["served_model_name"])
        if values.get("kv_cache_memory") is not None:
            values["kv_cache_memory"] = parse_bytes(values["kv_cache_memory"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["served_model_name"] = list(self.served_model_name)
        out.pop("api_key")  # a secret never goes into a report or a saved recipe
        return out

    def engine_args(self):
        from qserve.serve.engine import EngineArgs

        return EngineArgs(
            model=self.model,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            block_size=self.block_size,
            kv_cache_memory=self.kv_cache_memory,
            gpu_memory_utilization=self.gpu_memory_utilization,
            device=self.device,
            enable_prefix_caching=self.enable_prefix_caching,
            seed=self.seed,
            validate=False,  # `qserve serve` validates first, with its own policy for unquantized models
            max_waiting=self.max_queue,
            long_prefill_token_threshold=self.long_prefill_token_threshold,
            enforce_eager=self.enforce_eager,
            tensor_parallel_size=self.tensor_parallel_size,
        )
