"""Tensor-parallel offline throughput on the CPU: the same prompts through `LLM(tensor_parallel_size=N)`.

Each configuration (N ranks, T torch threads in all, so T // N per rank) runs in a fresh process:
N ShareGPT prompts (bench/throughput.py's filter), greedy, `--max-tokens` output tokens each with EOS
ignored, all submitted at once. Reported per configuration: engine start-up seconds, generation
seconds, output tok/s, and whether its greedy tokens equal the first configuration's.

    python bench/tensor_parallel.py --model smollm2-135m --configs 1x2 3x3 1x1 --num-prompts 16 \
        --max-tokens 64 --out bench/results/tensor_parallel_smollm2.json

`RxT` = R ranks sharing T threads. SmolLM2-135M has 9 attention heads and 3 KV heads, so it splits over
1, 3 or 9 ranks only (2 is refused at start-up).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def worker(args) -> None:
    import torch

    from qserve import LLM, SamplingParams

    ranks, threads = (int(x) for x in args.worker.split("x"))
    torch.set_num_threads(threads)
    from throughput import SHAREGPT, data_root, load_prompts
    from transformers import AutoTokenizer

    from qserve.hub import resolve_model

    model_dir = resolve_model(args.model)
    prompts = load_prompts(data_root() / SHAREGPT, AutoTokenizer.from_pretrained(model_dir), args.num_prompts)
    start = time.perf_counter()
    llm = LLM(str(model_dir), dtype="float32", max_num_seqs=args.num_prompts, max_model_len=2048,
              kv_cache_memory=args.kv_cache_memory, tensor_parallel_size=ranks)  # fmt: skip
    started = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = [o.outputs[0].token_ids for o in outs]
    llm.close()
    row = {"config": args.worker, "ranks": ranks, "threads_total": threads, "threads_per_rank": max(1, threads // ranks),
           "startup_s": started, "generate_s": seconds, "output_tokens": sum(map(len, tokens)),
           "tok_s": sum(map(len, tokens)) / seconds, "tokens": tokens}  # fmt: skip
    print("TP_WORKER " + json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--configs", nargs="+", default=["1x2", "3x3", "1x1"], help="RANKSxTHREADS, first = reference")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--kv-cache-memory", type=int, default=1 << 29)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "tensor_parallel_smollm2.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    runs = []
    for config in args.configs:
        cmd = [sys.executable, __file__, "--worker", config, "--model", args.model, "--num-prompts",
               str(args.num_prompts), "--max-tokens", str(args.max_tokens), "--kv-cache-memory",
               str(args.kv_cache_memory)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": config.split("x")[1]}
        load = os.getloadavg()[0]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if out.returncode != 0 or "TP_WORKER " not in out.stdout:
            raise SystemExit(f"{config} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        row = json.loads(out.stdout.split("TP_WORKER ", 1)[1].splitlines()[0])
        row["load_avg_1m_before"] = load
        runs.append(row)
        print(f"{config}: {row['tok_s']:.1f} tok/s ({row['generate_s']:.1f} s), start-up {row['startup_s']:.1f} s, "
              f"load {load:.1f}", flush=True)  # fmt: skip
    reference = runs[0]["tokens"]
    for row in runs:
        row["greedy_identical_to_first"] = sum(a == b for a, b in zip(row.pop("tokens"), reference, strict=True)) / len(
            reference
        )
    result = {
        "date": date.today().isoformat(), "machine": f"{os.cpu_count()}-core CPU, shared (see load_avg_1m_before)",
        "model": args.model, "dtype": "float32", "num_prompts": args.num_prompts, "max_tokens": args.max_tokens,
        "backend": "gloo", "runs": runs,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
