"""CPU decode step of a mixture-of-experts model against a dense model with the same active parameters.

Two random-weight models from qserve.testing, identical but for the MLP: Qwen3-MoE with E experts of
intermediate size I, k routed per token, and dense Qwen3 with intermediate size k x I (the same MLP
weights read per token; the MoE adds only its router, E x hidden). Each is served by the engine's model
(fp32 weights, and 4-bit RTN checkpoints through the packed CPU kernels with --quantized) and one decode
step for B sequences (forward + logits) is timed, the two models alternating run by run so that the
load of a shared machine falls on both alike; the figure is the ratio of their medians. A MoE that ran
every expert would cost about E / k times the dense MLP; grouping tokens by expert keeps it near 1.

    python bench/moe_decode.py --batch 1,8 --out bench/results/moe_decode.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from qserve.provenance import describe_run
from qserve.serve.loader import load_model
from qserve.serve.outputs import ScheduledChunk
from qserve.serve.runner import ModelRunner
from qserve.serve.sampler import Sampler
from qserve.testing import make_tiny_model

CPU = torch.device("cpu")
BLOCK = 16


def build(root: Path, args, quantized: bool) -> dict[str, Path]:
    common = dict(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                  num_key_value_heads=max(1, args.hidden // 256), head_dim=64, tie_word_embeddings=False)  # fmt: skip
    dirs = {
        "moe": make_tiny_model(root / "moe", "qwen3_moe", num_experts=args.experts,
                               num_experts_per_tok=args.top_k, moe_intermediate_size=args.inter, **common),
        "dense": make_tiny_model(root / "dense", "qwen3", intermediate_size=args.top_k * args.inter, **common),
    }  # fmt: skip
    if not quantized:
        return dirs
    from qserve.quantize.config import QuantConfig
    from qserve.quantize.pipeline import quantize_model

    for name, src in list(dirs.items()):
        out = root / f"{name}-rtn"
        cfg = QuantConfig(model=str(src), output=str(out), method="rtn", group_size=64, device="cpu",
                          eval=False, quiet=True)  # fmt: skip
        quantize_model(cfg, log=lambda _m: None)
        dirs[name] = out
    return dirs


def decode_step(model_dir: Path, batch: int, context: int):
    """A closure running one decode step of `batch` sequences at position `context` (KV of zeros)."""
    loaded = load_model(model_dir, CPU, torch.float32, max_positions=context + 8, validate=False)
    per_seq = context // BLOCK + 1
    runner = ModelRunner(loaded.model, batch * per_seq, BLOCK, CPU, torch.float32, Sampler(CPU))
    vocab = loaded.config.vocab_size
    chunks = tuple(
        ScheduledChunk(i, ((37 * i + 11) % vocab,), context, tuple(range(i * per_seq, (i + 1) * per_seq)), True)
        for i in range(batch)
    )
    prepared = runner._prepare(chunks)

    def step() -> None:
        with torch.inference_mode():
            hidden = loaded.model(prepared.input_ids, prepared.positions, runner.kv_caches, prepared.meta)
            loaded.model.compute_logits(hidden)

    return step, sum(p.numel() for p in loaded.model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="1,8", help="decode batch sizes, comma-separated")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--inter", type=int, default=512, help="an expert's intermediate size")
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--runs", type=int, default=15, help="timed runs per model, alternating")
    ap.add_argument("--calls", type=int, default=20, help="decode steps per timed run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quantized", action="store_true", help="also time 4-bit RTN checkpoints of both")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    record = {**describe_run(), "config": vars(args), "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        variants = [("fp32", False)] + ([("rtn-w4g64", True)] if args.quantized else [])
        for label, quantized in variants:
            dirs = build(Path(tmp) / label, args, quantized)
            for batch in [int(b) for b in args.batch.split(",")]:
                steps = {name: decode_step(d, batch, args.context) for name, d in dirs.items()}
                times: dict[str, list[float]] = {name: [] for name in steps}
                for fn, _ in steps.values():  # warm-up
                    for _ in range(3):
                        fn()
                for _ in range(args.runs):
                    for name, (fn, _) in steps.items():
                        t = time.perf_counter()
                        for _ in range(args.calls):
                            fn()
                        times[name].append((time.perf_counter() - t) / args.calls * 1e3)
                med = {name: statistics.median(v) for name, v in times.items()}
                row = {"weights": label, "batch": batch, "moe_ms": med["moe"], "dense_ms": med["dense"],
                       "ratio": med["moe"] / med["dense"], "moe_params": steps["moe"][1],
                       "dense_params": steps["dense"][1]}  # fmt: skip
                record["results"].append(row)
                print(f"{label:10s} batch {batch:3d}: MoE {row['moe_ms']:.3f} ms, dense {row['dense_ms']:.3f} ms, "
                      f"ratio {row['ratio']:.2f}")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
