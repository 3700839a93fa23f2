"""How much memory a quantization run needs, said before it starts, and refused if it will not fit.

The driver holds one block at a time, so the estimate is: the largest block (twice: the block and the
solver's fp32 working copy), the calibration activations (block inputs, outputs, and the AWQ search's
cached inputs of the widest Linear), GPTQ Hessians, the embedding while block 0's inputs are captured,
forward scratch for one chunk, and the runtime's own footprint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from qserve.errors import ResourceError
from qserve.quantize.arch import ArchSpec
from qserve.quantize.config import QuantConfig
from qserve.quantize.lazy_model import LazyCheckpoint

GIB = 1024**3
RUNTIME_OVERHEAD = 600 * 1024**2  # torch + transformers loaded, CPU side; measured ~0.5 GiB here
HEADROOM = 0.9  # refuse above 90% of what is available: the estimate is approximate


@dataclass(frozen=True)
class MemoryEstimate:
    parts: dict[str, int]  # bytes per item
    available: int  # bytes the device has free now
    device: str
    # --gptaq: one float forward per block, holding every group's float Linear inputs ("float_inputs"
    # part) when that fits; otherwise a float pass per group and the part is left out.
    hold_float_inputs: bool = False

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.total <= HEADROOM * self.available

    def describe(self) -> str:
        items = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.parts.items())
        text = (
            f"memory: needs ~{self.total / GIB:.2f} GiB ({items}) of {self.available / GIB:.2f} GiB "
            f"available on {self.device}"
        )
        if "float_stream" in self.parts and not self.hold_float_inputs:
            text += "; too little to hold a block's float Linear inputs: one float pass per group instead"
        return text


def estimate(
    ckpt: LazyCheckpoint, spec: ArchSpec, config, cfg: QuantConfig, compute_dtype: torch.dtype, device: str
) -> MemoryEstimate:
    elt = torch.tensor([], dtype=compute_dtype).element_size()
    n_blocks = config.num_hidden_layers
    block_params = max(
        sum(_numel(ckpt.shape(n)) for n in ckpt.names if n.startswith(f"{spec.blocks}.{i}."))
        for i in range(n_blocks)
    )
    embed = _numel(ckpt.shape(f"{spec.embed}.weight"))
    hidden = config.hidden_size
    widest = max(config.intermediate_size, hidden)
    tokens = cfg.n_samples * cfg.seqlen
    parts = {"block": 2 * block_params * max(elt, 4), "embedding": embed * elt}
    if cfg.method != "rtn":
        parts["activations"] = 2 * tokens * hidden * elt
        chunk_tokens = min(tokens, 8192)
        heads = config.num_attention_heads
        parts["scratch"] = chunk_tokens * (4 * widest + heads * cfg.seqlen) * 4
    if cfg.method == "gptq":
        linears = [ckpt.shape(f"{spec.blocks}.0.{n}.weight") for n in spec.linears]
        parts["hessians"] = sum(2 * shape[1] ** 2 * 4 for shape in linears)  # H and its inverse, fp32
        if cfg.gptaq:
            # The float model's activations (in and out), a float copy of the block, one chunk of
            # float Linear inputs held for pairing, and the cross terms beside the Hessians.
            parts["float_stream"] = (
                2 * tokens * hidden * elt
                + block_params * max(elt, 4)
                + chunk_tokens * 2 * widest * 4
                + sum(shape[1] ** 2 * 4 for shape in linears)
            )
    if cfg.method == "awq" or cfg.awq_scales:
        # The search keeps a token subset (a few thousand rows, plus whole sequences for attention)
        # of each scale group's input in fp32: bounded by the 16k-token chunk it works in.
        parts["awq_cache"] = min(tokens, 16384) * 2 * (hidden + widest) * 4
    if device == "cpu":
        parts["runtime"] = RUNTIME_OVERHEAD
    available = available_bytes(device)
    hold = False
    if cfg.method == "gptq" and cfg.gptaq:
        # Every collected Linear's float inputs over all tokens (q, o, gate, down in a Llama block).
        widths = [
            ckpt.shape(f"{spec.blocks}.0.{n}.weight")[1]
            for group in spec.solve_groups(cfg.true_sequential)
            for n in spec.collected(group)
        ]
        held = tokens * sum(widths) * elt
        hold = sum(parts.values()) + held <= HEADROOM * available
        if hold:
            parts["float_inputs"] = held
    return MemoryEstimate(parts=parts, available=available, device=device, hold_float_inputs=hold)


def check_fits(est: MemoryEstimate) -> None:
    if not est.fits:
        raise ResourceError(
            f"{est.describe()}; this run will not fit. Use fewer calibration tokens (--n-samples / --seqlen), "
            "a smaller --dtype, or a device with more memory"
        )


def available_bytes(device: str) -> int:
    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    return _mem_available(Path("/proc/meminfo"))


def _mem_available(meminfo: Path) -> int:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping), in bytes."""
    text = meminfo.read_text() if meminfo.is_file() else ""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # the file reports kB
    # No /proc (macOS): physical memory is the only portable upper bound.
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
