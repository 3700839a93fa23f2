"""CPU GEMMs at decode sizes: torch's F.linear, the thread split and qserve's C++ kernels, vs bandwidth.

For SmolLM2-135M's linear shapes (fused qkv 960x576, o 576x576, fused gate/up 3072x576, down 576x1536,
each 30 times, plus the 49152x576 LM head) and M activation rows, the time of one forward's GEMMs with
each implementation, and `torch.sum` over the same weight bytes (the read bandwidth the batch-1
ceiling is measured with). Weights rotate through >= 256 MB per shape, so every call reads them from
memory as a real forward does, not from cache.

    python bench/cpu_gemv.py --rows 1,2,4,8,16,64,256 --threads 2 --out bench/results/cpu_gemv.json

With --packed, the 4-bit layers are timed twice in the same run where the CPU has an int8 body:
`packed_fp32` (QSERVE_CPU_ACT_INT8=0, fp32 activations) and `packed_int8` (the int8-activation kernel at
every M); `packed` is what the default (`auto`) takes, and each has its fraction of `sum_packed`'s
bandwidth. --skip-dense leaves out the fp32-weight implementations (less memory and time).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from qserve.kernels import cpu_ext, cpu_gemm, cpu_packed, packing

SHAPES = {(960, 576): 30, (576, 576): 30, (3072, 576): 30, (576, 1536): 30, (49152, 576): 1}


CLOCK = time.perf_counter


def best_us(fn, calls: int) -> float:
    """Best of 4 means over calls/4 calls, after a warm-up: microseconds per call."""
    for _ in range(3):
        fn()
    per = max(1, calls // 4)
    runs = []
    for _ in range(4):
        t = CLOCK()
        for _ in range(per):
            fn()
        runs.append((CLOCK() - t) / per * 1e6)
    return min(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,4,8,16,64,256", help="activation rows M, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--packed", action="store_true", help="also time the 4-bit kernels (and bf16 LM head)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--only-packed", action="store_true", help="skip F.linear and the split")
    ap.add_argument("--skip-dense", action="store_true", help="time only the packed kernels and sum_packed")
    ap.add_argument(
        "--clock",
        choices=("wall", "process"),
        default="wall",
        help="process: this process's CPU time (with --threads 1 only), steadier than wall time on a machine "
        "whose other processes take the cores away",
    )
    args = ap.parse_args()
    if args.clock == "process":
        if args.threads != 1:
            raise SystemExit("--clock process measures one thread; use it with --threads 1")
        global CLOCK
        CLOCK = time.process_time
    torch.set_num_threads(args.threads)
    if not cpu_ext.available():
        raise SystemExit(f"qserve's C++ CPU kernels are not available: {cpu_ext.unavailable_reason()}")
    if args.skip_dense and not args.packed:
        raise SystemExit("--skip-dense leaves nothing to time without --packed")
    copies_dense = 1 if args.skip_dense else None
    weights = {
        s: [torch.randn(*s) for _ in range(copies_dense or max(4, (256 << 20) // (s[0] * s[1] * 4)))]
        for s in SHAPES
    }
    nbytes = sum(o * i * 4 * n for (o, i), n in SHAPES.items())
    packed, packed_bytes, sum_packed = {}, 0, {}
    if args.packed:
        for (o, i), n in SHAPES.items():
            if o == 49152:  # the LM head: bf16 weight
                one = torch.randn(o, i).bfloat16()
                size = one.numel() * 2
                packed[(o, i)] = [one.clone() for _ in range(max(4, (256 << 20) // size))]
            else:
                qw = packing.rtn_quantize(torch.randn(o, i), 4, args.group_size, sym=False)
                one = cpu_packed.repack(qw.intweight, qw.scales.half(), qw.zeros, None, args.group_size)
                size = one.nbytes
                copies = max(4, (256 << 20) // size)
                packed[(o, i)] = [
                    cpu_packed.CpuPackedWeight(
                        one.qdata.clone(), one.scales.clone(), one.zeros.clone(), None, o, one.group_size
                    )
                    for _ in range(copies)
                ]
            packed_bytes += size * n
            sum_packed[(o, i)] = [torch.randn(size // 4) for _ in range(max(4, (256 << 20) // size))]

    def split(x, w):  # the thread split alone, as cpu_gemm runs it without the C++ kernel
        real = cpu_ext.available
        cpu_ext.available = lambda: False
        try:
            return cpu_gemm.linear(x, w)
        finally:
            cpu_ext.available = real

    impls = {"F.linear": F.linear, "split": split, "cpp": cpu_ext.linear_small_m, "sum": None}
    if args.only_packed:
        impls = {"cpp": cpu_ext.linear_small_m, "sum": None}
    if args.skip_dense:
        impls = {}

    def with_int8(mode, fn):
        def call(*a):
            previous = os.environ.get("QSERVE_CPU_ACT_INT8")
            if mode is not None:
                os.environ["QSERVE_CPU_ACT_INT8"] = mode
            try:
                return fn(*a)
            finally:
                if previous is None:
                    os.environ.pop("QSERVE_CPU_ACT_INT8", None)
                else:
                    os.environ["QSERVE_CPU_ACT_INT8"] = previous

        return call

    def packed_fn(x, w):
        if isinstance(w, torch.Tensor):
            return cpu_packed.linear_bf16_weight(x, w)
        return cpu_packed.linear(x, w)

    def int8_fn(x, w):  # the int8 kernel at every M (the default takes it up to INT8_MAX_ROWS rows)
        if isinstance(w, torch.Tensor):
            return cpu_packed.linear_bf16_weight(x, w)
        return cpu_packed.linear_int8(x, w)

    # the default path, and both numerics side by side where the CPU has an int8 body
    int8_body = cpu_packed.Q8_BODIES[cpu_packed._q8_isa()] if args.packed else None
    packed_variants = {"packed": with_int8(None, packed_fn)}
    if args.packed and int8_body != "scalar":
        packed_variants["packed_fp32"] = with_int8("0", packed_fn)
        packed_variants["packed_int8"] = int8_fn

    load_start = list(os.getloadavg())
    results = []
    for m in [int(r) for r in args.rows.split(",")]:
        ms = dict.fromkeys(impls, 0.0)
        per_shape: dict[str, dict[str, float]] = {}  # packed variants: ms per forward by weight shape
        for shape, count in SHAPES.items():
            ws, x, k = weights[shape], torch.randn(m, shape[1]), [0]

            def nxt(ws=ws, k=k):
                k[0] = (k[0] + 1) % len(ws)
                return ws[k[0]]

            for name, fn in impls.items():
                call = (lambda: nxt().sum()) if fn is None else (lambda fn=fn, x=x: fn(x, nxt()))
                ms[name] += best_us(call, args.calls) * count / 1e3
            if args.packed:
                timed = [(name, packed[shape], fn) for name, fn in packed_variants.items()]
                for name, pool, fn in [*timed, ("sum_packed", sum_packed[shape], None)]:
                    k2 = [0]

                    def nxt2(pool=pool, k2=k2):
                        k2[0] = (k2[0] + 1) % len(pool)
                        return pool[k2[0]]

                    call = (lambda: nxt2().sum()) if fn is None else (lambda x=x, fn=fn: fn(x, nxt2()))
                    t_ms = best_us(call, args.calls) * count / 1e3
                    ms[name] = ms.get(name, 0.0) + t_ms
                    per_shape.setdefault(name, {})[f"{shape[0]}x{shape[1]}"] = t_ms
        sizes = {k: (packed_bytes if k.startswith(("packed", "sum_packed")) else nbytes) for k in ms}
        row = {"rows": m, "ms_per_forward": ms, "gb_s": {k: sizes[k] / v / 1e6 for k, v in ms.items()}}
        if args.packed:
            row["packed_ms_by_shape"] = per_shape
            for name in packed_variants:
                row[f"{name}_bw_fraction"] = ms["sum_packed"] / ms[name]
            if "cpp" in ms:
                row["packed_speedup_vs_cpp_fp32"] = ms["cpp"] / ms["packed"]
            if "packed_int8" in ms:
                row["int8_speedup_vs_fp32"] = ms["packed_fp32"] / ms["packed_int8"]
        results.append(row)
        print(
            f"M={m:<4d} " + "  ".join(f"{k} {v:7.2f} ms ({row['gb_s'][k]:5.1f} GB/s)" for k, v in ms.items()),
            flush=True,
        )
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "date": date.today().isoformat(),
                    "threads": args.threads,
                    "clock": args.clock,
                    "command": "python bench/cpu_gemv.py " + " ".join(__import__("sys").argv[1:]),
                    "commit": __import__("subprocess")
                    .run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
                    .stdout.strip(),
                    "isa": cpu_packed.isa_name() if args.packed else None,
                    "int8_default": cpu_packed.int8_activations() if args.packed else None,
                    "int8_body": int8_body,
                    "int8_max_rows": cpu_packed.INT8_MAX_ROWS if args.packed else None,
                    "loadavg_start_end": [load_start, list(os.getloadavg())],
                    "group_size": args.group_size if args.packed else None,
                    "weight_mb": nbytes / 1e6,
                    "packed_weight_mb": packed_bytes / 1e6,
                    "rows": results,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
