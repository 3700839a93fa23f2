"""GPU benchmark of qserve's kernels (docs/benchmarks.md, "Kernels").

Dequant-GEMM: for Llama-class layer shapes (K x N = in x out) and M rows, the fused Triton kernel and
the dequantize + torch.matmul path against torch.matmul on the already-dequantized fp16/bf16 weight
(the speed of an unquantized Linear), all timed with triton.testing.do_bench (median). At M = 1 the
fused kernel's achieved bandwidth (packed weight + scales + zeros + activations) is reported as a
fraction of a device-to-device copy measured in the same run. The "best" column is what the
dispatcher should pick; qserve.kernels.FUSED_MAX_TOKENS should sit at the measured crossover.

Paged attention: the decode kernel against the same attention over a contiguous cache (SDPA), and the
prefill kernel against the torch gather path, at equal context lengths.

    python bench/gpu_kernels.py --out bench/results/kernels.json  # needs CUDA; exits 2 on a CPU machine
    python bench/gpu_kernels.py --cpu-attention                   # CPU: the torch paged-attention path
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from qserve.kernels import dequant_gemm, dequantize_weight, packing, paged_attention, paged_attention_decode
from qserve.kernels.torch_attention import paged_attention_torch, paged_decode_torch

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336)]  # (K = in, N = out)
MS = [1, 4, 16, 32, 64, 128, 512, 2048]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/kernels.json"), help="JSON results file")
    p.add_argument("--dtypes", default="fp16,bf16", help="activation dtypes, comma separated")
    p.add_argument("--formats", default="awq,gptq", help="packed formats, comma separated")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--ms", default=",".join(map(str, MS)), help="M values, comma separated")
    p.add_argument("--cpu-attention", action="store_true", help="time the CPU torch paged-attention path")
    return p.parse_args(argv)


def packed_linear(fmt: str, k: int, n: int, group_size: int, device: str) -> dict:
    w = torch.randn(n, k, device=device) * 0.02
    qw = packing.rtn_quantize(w, bits=4, group_size=group_size, sym=fmt == "gptq")
    p = packing.pack_gptq(qw) if fmt == "gptq" else packing.pack_awq(qw)
    return {"qweight": p.qweight, "qzeros": p.qzeros, "scales": p.scales}


def gemm_rows(args, do_bench, copy_gbps: float, device: str = "cuda") -> list[dict]:
    rows = []
    ms = [int(m) for m in args.ms.split(",")]
    for fmt in args.formats.split(","):
        for k, n in SHAPES:
            lin = packed_linear(fmt, k, n, args.group_size, device)
            packed_bytes = sum(
                lin[t].numel() * lin[t].element_size() for t in ("qweight", "qzeros", "scales")
            )
            for dname in args.dtypes.split(","):
                dtype = DTYPES[dname]
                w = dequantize_weight(
                    lin["qweight"], lin["qzeros"], lin["scales"], None,
                    fmt=fmt, group_size=args.group_size, dtype=dtype,
                )  # fmt: skip  # [N, K], as an unquantized Linear holds it
                kw = {"fmt": fmt, "bits": 4, "group_size": args.group_size}
                q = (lin["qweight"], lin["qzeros"], lin["scales"], None)
                for m in ms:
                    x = torch.randn(m, k, device=device, dtype=dtype)
                    dense = F.linear(x, w)
                    fused = dequant_gemm(x, *q, **kw, path="fused")
                    err = float((fused.float() - dense.float()).abs().max() / dense.float().abs().max())
                    t_dense = do_bench(partial(F.linear, x, w), return_mode="median")
                    t_fused = do_bench(partial(dequant_gemm, x, *q, **kw, path="fused"), return_mode="median")
                    t_deq = do_bench(partial(dequant_gemm, x, *q, **kw, path="dequant"), return_mode="median")
                    row = {
                        "fmt": fmt, "dtype": dname, "K": k, "N": n, "M": m,
                        "dense_ms": t_dense, "fused_ms": t_fused, "dequant_matmul_ms": t_deq,
                        "fused_speedup": t_dense / t_fused, "dequant_speedup": t_dense / t_deq,
                        "best": "fused" if t_fused <= t_deq else "dequant", "max_rel_err_vs_dense": err,
                    }  # fmt: skip
                    if m == 1:
                        moved = packed_bytes + (k + n) * x.element_size()
                        row["fused_gbps"] = moved / t_fused / 1e6
                        row["fraction_of_copy"] = row["fused_gbps"] / copy_gbps
                    rows.append(row)
    return rows


def copy_bandwidth(do_bench, device: str = "cuda") -> float:
    """GB/s of a device-to-device copy (bytes read + written), the memory ceiling of this GPU."""
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = do_bench(partial(dst.copy_, src), return_mode="median")
    return 2 * src.numel() / t / 1e6


def paged_case(num_seqs, ctx, heads, kv_heads, head_dim, block_size, device, dtype):
    """Equal-length sequences whose blocks are a random permutation of the cache, plus the same K/V
    laid out contiguously [S, KVH, ctx, D]."""
    per_seq = -(-ctx // block_size)
    num_blocks = num_seqs * per_seq
    tables = torch.randperm(num_blocks, device=device).view(num_seqs, per_seq).to(torch.int32)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    kc = torch.randn(shape, device=device, dtype=dtype)
    vc = torch.randn(shape, device=device, dtype=dtype)

    # [S, per_seq, block, KVH, D] -> [S, KVH, ctx, D]
    def contiguous(cache):
        return (
            cache[tables.long()].view(num_seqs, -1, kv_heads, head_dim)[:, :ctx].transpose(1, 2).contiguous()
        )

    lens = torch.full((num_seqs,), ctx, dtype=torch.int32, device=device)
    return kc, vc, tables, lens, contiguous(kc), contiguous(vc)


def attention_rows(do_bench, dtype, device: str = "cuda", contexts=((1, 2048), (16, 1024), (64, 512), (64, 2048)),
                   chunks=((1, 2048), (4, 512))) -> list[dict]:  # fmt: skip
    rows = []
    heads, kv_heads, head_dim, block_size = 32, 8, 128, 16  # Llama-3-8B attention
    for num_seqs, ctx in contexts:
        kc, vc, tables, lens, k, v = paged_case(
            num_seqs, ctx, heads, kv_heads, head_dim, block_size, device, dtype
        )
        q = torch.randn(num_seqs, heads, head_dim, device=device, dtype=dtype)
        scale = head_dim**-0.5
        paged = partial(paged_attention_decode, q, kc, vc, tables, lens, scale)
        contiguous = partial(
            F.scaled_dot_product_attention, q[:, :, None], k, v, scale=scale, enable_gqa=True
        )
        t_paged = do_bench(paged, return_mode="median")
        t_contig = do_bench(contiguous, return_mode="median")
        rows.append({"kind": "decode", "seqs": num_seqs, "ctx": ctx, "paged_ms": t_paged,
                     "contiguous_ms": t_contig, "ratio": t_paged / t_contig})  # fmt: skip
    for num_seqs, chunk in chunks:
        kc, vc, tables, lens, _, _ = paged_case(
            num_seqs, chunk, heads, kv_heads, head_dim, block_size, device, dtype
        )
        q = torch.randn(num_seqs * chunk, heads, head_dim, device=device, dtype=dtype)
        qsl = torch.arange(0, num_seqs * chunk + 1, chunk, device=device, dtype=torch.int32)
        args = (q, kc, vc, tables, qsl, lens, head_dim**-0.5)
        # max_query_len as the engine passes it (from the scheduler): the kernel alone, no host sync
        t_kernel = do_bench(partial(paged_attention, *args, max_query_len=chunk), return_mode="median")
        t_torch = do_bench(partial(paged_attention_torch, *args), return_mode="median")
        rows.append({"kind": "prefill", "seqs": num_seqs, "ctx": chunk, "paged_ms": t_kernel,
                     "torch_gather_ms": t_torch, "ratio": t_kernel / t_torch})  # fmt: skip
    return rows


def _run_all(fns) -> None:
    for fn in fns:
        fn()


def cpu_attention(reps: int = 15) -> dict:
    """The engine's CPU decode step: 64 sequences at context 250..350, SmolLM2-135M heads (9 / 3, D 64).

    Variants run round-robin (interleaved, so load on a shared machine hits them alike); each figure
    is a median, and ratios are against SDPA over the same K/V already laid out contiguously.
    """
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        lens = torch.randint(250, 351, (64,), generator=gen, dtype=torch.int32)
        kc, vc, tables, _, k, v = paged_case(64, 352, 9, 3, 64, 16, "cpu", dtype)
        q = torch.randn(64, 9, 64, dtype=dtype)
        qsl = torch.arange(65, dtype=torch.int32)
        valid = (torch.arange(352)[None, :] < lens[:, None])[:, None, None, :]  # [S, 1, 1, L]
        per_seq = [partial(paged_decode_torch, q[i : i + 1], kc, vc, tables[i : i + 1], lens[i : i + 1], 0.125)
                   for i in range(64)]  # fmt: skip
        variants = {
            # the same attention with K/V already contiguous [S, KVH, L, D]: what paging costs on top
            "contiguous_sdpa": partial(
                F.scaled_dot_product_attention, q.view(64, 3, 3, 64), k, v, attn_mask=valid, scale=0.125
            ),
            "paged_batched": partial(paged_attention_torch, q, kc, vc, tables, qsl, lens, 0.125),
            "paged_per_sequence": partial(_run_all, per_seq),
        }
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(reps):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - start) * 1e3)
        med = {name: sorted(t)[len(t) // 2] for name, t in samples.items()}
        base = med["contiguous_sdpa"]
        results[str(dtype).removeprefix("torch.")] = {
            "median_ms": med,
            "ratio_to_contiguous": {name: t / base for name, t in med.items()},
        }
    return results


def print_gemm(rows: list[dict]) -> None:
    print(f"{'fmt':5} {'dtype':5} {'KxN':>11} {'M':>5} {'dense ms':>9} {'fused ms':>9} {'deq ms':>9} "
          f"{'fused x':>8} {'best':>8} {'%copy':>6}")  # fmt: skip
    for r in rows:
        frac = f"{100 * r['fraction_of_copy']:.0f}" if "fraction_of_copy" in r else ""
        print(f"{r['fmt']:5} {r['dtype']:5} {r['K']:>5}x{r['N']:<5} {r['M']:>5} {r['dense_ms']:9.4f} "
              f"{r['fused_ms']:9.4f} {r['dequant_matmul_ms']:9.4f} {r['fused_speedup']:8.2f} {r['best']:>8} {frac:>6}")  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    from qserve.provenance import describe_run

    full = None if argv is None else [__file__, *argv]
    meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__}
    if args.cpu_attention:
        result = {**meta, "machine": "CPU, 2 threads", "paged_attention_cpu_ms": cpu_attention()}
        print(json.dumps(result, indent=2))
        return 0
    if not torch.cuda.is_available():
        print(
            "error: bench/gpu_kernels.py times the Triton kernels and needs a CUDA GPU; none is visible here. "
            "On CPU the kernels run only under TRITON_INTERPRET=1, for correctness (pytest tests/kernels); "
            "`python bench/gpu_kernels.py --cpu-attention` times the CPU torch attention path instead.",
            file=sys.stderr,
        )
        return 2
    import triton
    from triton.testing import do_bench

    meta |= {"machine": torch.cuda.get_device_name(), "triton": triton.__version__}
    meta["provenance"] = describe_run(full)
    copy_gbps = copy_bandwidth(do_bench)
    gemm = gemm_rows(args, do_bench, copy_gbps)
    attention = attention_rows(do_bench, torch.float16)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({**meta, "copy_gbps": copy_gbps, "gemm": gemm, "attention": attention}, indent=2)
    )
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s ({meta['machine']})")
    for r in attention:
        print(r)
    print_gemm(gemm)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
