"""`quant_report.json` and the short table printed at the end of `qserve quantize`."""

from __future__ import annotations

import json
import os
import resource
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

REPORT_FILE = "quant_report.json"


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (the kernel's high-water mark).

    On Linux this is VmHWM: getrusage's ru_maxrss survives exec, so a process started by a big
    parent (a benchmark that loaded a model, then ran `qserve quantize`) would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports kB, macOS bytes


def cuda_peak_bytes() -> int | None:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


@dataclass
class QuantReport:
    """Everything a run measured; one JSON file, one table."""

    model: str
    output: str
    config: dict[str, Any]
    device: str
    compute_dtype: str
    blocks: list[dict[str, Any]]  # per block: layers' log, out_rel_err, seconds
    quantize_seconds: float  # calibration + solve + export
    peak_rss_bytes: int  # measured when quantization ended, before evaluation
    cuda_peak_bytes: int | None
    memory_estimate: dict[str, int]
    resumed_from_block: int = 0
    ppl: dict[str, Any] | None = None  # {"original": PplResult dict, "quantized": PplResult dict}
    wall_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, directory: Path) -> Path:
        path = directory / REPORT_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    def ppl_increase(self) -> float | None:
        if not self.ppl:
            return None
        return self.ppl["quantized"]["ppl"] / self.ppl["original"]["ppl"] - 1.0

    def format_table(self) -> str:
        c = self.config
        g = "per-channel" if c["group_size"] == -1 else f"g{c['group_size']}"
        title = (
            f"{c['method']} w{c['bits']} {g} {'sym' if c['sym'] else 'asym'} ({c['format']} layout), "
            f"{len(self.blocks)} blocks on {self.device} in {self.compute_dtype}"
        )
        rows = [("checkpoint", self.output), ("quantize time", _duration(self.quantize_seconds))]
        if self.wall_seconds is not None:
            rows.append(("wall time", _duration(self.wall_seconds)))
        rows.append(("peak memory", f"{self.peak_rss_bytes / 1024**3:.2f} GiB RSS"))
        if self.cuda_peak_bytes is not None:
            rows.append(("peak CUDA memory", f"{self.cuda_peak_bytes / 1024**3:.2f} GiB"))
        errs = [(b["block"], b["out_rel_err"]) for b in self.blocks if "out_rel_err" in b]
        if errs:
            worst = max(errs, key=lambda e: e[1])
            mean = sum(e for _, e in errs) / len(errs)
            rows.append(("block output err", f"mean {mean:.4f}, worst {worst[1]:.4f} (block {worst[0]})"))
        if self.resumed_from_block:
            rows.append(("resumed", f"from block {self.resumed_from_block}"))
        if self.ppl:
            o, q = self.ppl["original"], self.ppl["quantized"]
            rows.append(
                (
                    "perplexity",
                    f"{o['ppl']:.2f} -> {q['ppl']:.2f} ({self.ppl_increase():+.1%}) on {q['windows']} "
                    f"{q['dataset']} windows of {q['seqlen']}",
                )
            )
        width = max(len(k) for k, _ in rows)
        return "\n".join([title, *(f"  {k:<{width}}  {v}" for k, v in rows)])


def _duration(seconds: float) -> str:
    tenths = round(seconds * 10)  # round once, so 59.96 s reads 1m00.0s, never 0m60.0s
    m, t = divmod(tenths, 600)
    return f"{m}m{t / 10:04.1f}s" if m else f"{t / 10:.1f}s"
