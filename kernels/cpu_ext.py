"""qserve's C++ CPU kernels (kernels/csrc), compiled for this machine on first use.

`torch.utils.cpp_extension` builds them with the system C++ compiler and ninja into
~/.cache/qserve/torch_extensions (about 15 s, once per machine, torch version and source); later
processes load the cached library. Where that is not possible (no compiler, no ninja, a read-only
cache, `QSERVE_CPU_EXT=0`) qserve says so once and runs the torch path instead: the same results,
slower batch-1 decode, and quantized layers dequantized to dense weights at load.

`QSERVE_REQUIRE_CPU_EXT=1` (set by scripts/test.sh wherever a C++ compiler exists, i.e. in CI) turns
that fallback into an error: a failed build raises `CpuExtensionError`, and the kernel tests fail
instead of skipping.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import platform
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_CSRC = Path(__file__).with_name("csrc")
# one library; cpu_packed and calib_ops add to cpu_ops' ops
_SOURCES = (_CSRC / "cpu_ops.cpp", _CSRC / "cpu_packed.cpp", _CSRC / "calib_ops.cpp", _CSRC / "decode_step.cpp")
_HEADERS = (_CSRC / "vec_math.h", _CSRC / "amx.h", _CSRC / "ops.h")  # included by the sources: part of the build key
_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool once tried, "error": str when unavailable


def _cpu_signature() -> str:
    """What a -march=native binary depends on: the CPU model and its feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
    return "\n".join(keep)


def _build_dir() -> Path:
    """A directory per (source, torch version, CPU): the home cache, or the temp dir if that is read-only."""
    key = hashlib.sha256()
    for part in (
        *(src.read_bytes() for src in (*_SOURCES, *_HEADERS)),
        torch.__version__.encode(),
        _cpu_signature().encode(),
    ):
        key.update(part)
    name = f"cpu_ops-{key.hexdigest()[:16]}"
    root = Path(os.environ.get("QSERVE_EXT_CACHE", Path.home() / ".cache" / "qserve" / "torch_extensions"))
    try:
        (root / name).mkdir(parents=True, exist_ok=True)
        return root / name
    except OSError:
        fallback = Path(tempfile.gettempdir()) / f"qserve-torch-extensions-{os.getuid()}" / name
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


class CpuExtensionError(RuntimeError):
    """The C++ kernels could not be built or loaded while QSERVE_REQUIRE_CPU_EXT=1 demands them."""


def required() -> bool:
    """Whether QSERVE_REQUIRE_CPU_EXT=1 is set: no fallback to the torch path (CI)."""
    return os.environ.get("QSERVE_REQUIRE_CPU_EXT", "0") == "1"


def available() -> bool:
    """Whether the compiled CPU kernels are loaded (building them on the first call)."""
    if "ok" not in _state:
        with _lock:
            if "ok" not in _state:
                _state["ok"] = _load()
    if not _state["ok"] and required():
        raise CpuExtensionError(
            f"QSERVE_REQUIRE_CPU_EXT=1 but the C++ CPU kernels are unavailable ({_state.get('error')}); "
            "fix the build (a C++ compiler, ninja and torch's headers are needed) or unset the variable"
        )
    return bool(_state["ok"])


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the compiled ops can take these tensors: all fp32, contiguous, on the CPU, and built."""
    return (
        all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)
        and available()
    )


def unavailable_reason() -> str | None:
    with contextlib.suppress(CpuExtensionError):
        available()
    return _state.get("error")  # type: ignore[return-value]


@contextlib.contextmanager
def _build_guard(build: Path):
    """One qserve process at a time builds or loads the library in `build`, and a build that was killed
    cannot stall the next one.

    torch's own guard is a `lock` file that the building process deletes when it finishes; a process
    killed mid-build (a server stopped during its first start, a timed-out test) leaves the file behind
    and every later process waits on it forever. An flock is released by the kernel when its holder dies,
    so whoever holds this one knows no other qserve process is building here, and a `lock` file it finds
    is stale: it is removed before torch looks for it.
    """
    with open(build / ".qserve-build.flock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = build / "lock"
            if stale.exists():
                log.warning("qserve: removing %s, left by a build that was stopped; rebuilding", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load() -> bool:
    if os.environ.get("QSERVE_CPU_EXT", "1") == "0":
        _state["error"] = "disabled by QSERVE_CPU_EXT=0"
        return False
    if platform.machine().lower() not in ("x86_64", "amd64", "aarch64", "arm64"):
        _state["error"] = f"not built for {platform.machine()}"
        return False
    try:
        from torch.utils import cpp_extension

        build = _build_dir()
        with _build_guard(build):
            if not any(build.glob("*.so")):
                log.warning("qserve: compiling the C++ CPU kernels for this machine (once, ~15-60 s)")
            cpp_extension.load(
                name="qserve_cpu_" + build.name.split("-")[-1],
                sources=[str(src) for src in _SOURCES],
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(build),
                is_python_module=False,
                verbose=False,
            )
        torch.ops.qserve_cpu.linear_small_m  # noqa: B018 - raises if the library did not register
        torch.ops.qserve_cpu.packed_linear  # noqa: B018
        torch.ops.qserve_cpu.mse_qparams  # noqa: B018
        torch.ops.qserve_cpu.sample_rows  # noqa: B018
        torch.ops.qserve_cpu.decode_step  # noqa: B018
    except Exception as exc:  # no compiler / ninja / headers, or a failed build: the torch path stands in
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _state["error"] = f"{type(exc).__name__}: {first}"
        log.warning(
            "qserve: the C++ CPU decode kernels are unavailable (%s); using the slower torch path. "
            "Install a C++ compiler and `pip install ninja` to enable it, or set QSERVE_CPU_EXT=0 to "
            "silence this.",
            _state["error"],
        )
        return False
    return True


# Thin handles on the compiled ops (call only when available()); arguments as the torch paths they
# replace, fp32 contiguous CPU tensors, checked again in C++ with messages naming the op.


def linear_small_m(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T."""
    return torch.ops.qserve_cpu.linear_small_m(x, weight)


def paged_decode(*args) -> torch.Tensor:
    """(q [S, H, D], key_cache, value_cache, block_tables int32, seq_lens int32, scale) -> [S, H, D]:
    one query per sequence over the paged cache, read in place (`torch_attention.paged_decode_torch`)."""
    return torch.ops.qserve_cpu.paged_decode(*args)


def paged_prefill(*args) -> torch.Tensor:
    """(q [T, H, D], key_cache, value_cache, block_tables int32, query_start_loc int32, seq_lens int32,
    scale) -> [T, H, D]: a mixed batch of prefill chunks and decodes, causal, over the paged cache read in
    place (`torch_attention.paged_attention_torch`)."""
    return torch.ops.qserve_cpu.paged_prefill(*args)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for a bf16 [..., 2 I] gate|up projection output, in one pass (`serve.model.MLP`)."""
    return torch.ops.qserve_cpu.silu_mul(gate_up)


def sample_rows(logits: torch.Tensor, inv_temp: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """One token per row of fp32 logits [R, V]: argmax where inv_temp <= 0, else a Gumbel-max draw from
    softmax(logits * inv_temp) keyed by the row's int64 seed (`serve.sampler.Sampler`)."""
    return torch.ops.qserve_cpu.sample_rows(logits, inv_temp, seeds)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., N] (fp32 or bf16, contiguous) by weight [N] in one pass, fp32 arithmetic, rounded
    as the torch path rounds (`serve.model.RMSNorm`)."""
    return torch.ops.qserve_cpu.rms_norm(x, weight, eps)


def usable_low_precision(*tensors: torch.Tensor) -> bool:
    """Whether the compiled ops that also take bf16 can take these: one dtype (fp32 or bf16), contiguous,
    on the CPU, and built."""
    dtype = tensors[0].dtype
    return (
        dtype in (torch.float32, torch.bfloat16)
        and all(t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous() for t in tensors)
        and available()
    )


def rope_write_kv(*args) -> torch.Tensor:
    """(qkv [T, (H + 2 KVH) D], cos [T, D/2], sin [T, D/2], key_cache, value_cache, slot_mapping int64,
    num_heads) -> rotated q [T, H, D]; the rotated k and v land in the caches (`ops.rope_and_write_kv`)."""
    return torch.ops.qserve_cpu.rope_write_kv(*args)
