"""Batch-1 decode on a 4-bit checkpoint with fp32 against int8 activations (QSERVE_CPU_ACT_INT8=0 / 1).

Each configuration runs in a fresh process, alternating, `--repeats` times: batch-1 decode tok/s
(bench/throughput.py's batch1_decode: LLM.generate, --max-tokens tokens, decode time after the first
token) and the greedy tokens of a few prompts, which are compared between the two: tokens equal at the
same position, and the length of the common prefix (after the first difference the texts diverge).

    python bench/cpu_int8_decode.py --model CKPT_DIR --threads 1 --repeats 3 --out bench/results/X.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

PROMPTS = [
    "The capital of France is",
    "Write a short story about a robot who learns to paint.",
    "def fibonacci(n):",
    "The three most important causes of the French Revolution were",
]


def worker(args) -> None:
    import torch

    from qserve import LLM, SamplingParams
    from qserve.kernels import cpu_packed

    sys.path.insert(0, str(Path(__file__).parent))
    from throughput import batch1_decode

    torch.set_num_threads(args.threads)
    llm = LLM(args.model, dtype="float32", max_num_seqs=1, max_model_len=2048)
    row = {"int8_body": cpu_packed.int8_body(), "isa": cpu_packed.isa_name()}
    row["batch1_decode_tok_s"] = batch1_decode(llm, args.max_tokens)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    # this process's CPU time per token of one request (prompt included): steadier than wall time on a
    # machine whose other processes take the cores away (meaningful with --threads 1)
    cpu = time.process_time()
    out = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0]
    row["batch1_tok_per_cpu_s"] = len(out.outputs[0].token_ids) / (time.process_time() - cpu)
    row["tokens"] = (
        []
        if args.skip_greedy
        else [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    )
    print("INT8_WORKER " + json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--skip-greedy", action="store_true", help="no greedy-token comparison (faster)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    runs: dict[str, list[dict]] = {"fp32": [], "int8": []}
    loads = [list(os.getloadavg())]
    for _ in range(args.repeats):
        for name, flag in (("fp32", "0"), ("int8", "1")):
            env = {**os.environ, "QSERVE_CPU_ACT_INT8": flag}
            cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--threads", str(args.threads),
                   "--max-tokens", str(args.max_tokens)] + (["--skip-greedy"] if args.skip_greedy else [])  # fmt: skip
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            row = json.loads(next(ln for ln in out.splitlines() if ln.startswith("INT8_WORKER "))[12:])
            runs[name].append(row)
            print(name, f"{row['batch1_decode_tok_s']:.2f} tok/s, {row['batch1_tok_per_cpu_s']:.2f} tok per CPU-s",
                  flush=True)  # fmt: skip
        loads.append(list(os.getloadavg()))
    fp32_tokens, int8_tokens = runs["fp32"][0]["tokens"], runs["int8"][0]["tokens"]
    match = []
    for prompt, a, b in zip(PROMPTS if fp32_tokens else [], fp32_tokens, int8_tokens, strict=True):
        prefix = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
        match.append({"prompt": prompt, "tokens": len(a), "same_position": sum(x == y for x, y in zip(a, b, strict=True)),
                      "common_prefix": prefix})  # fmt: skip
    summary = {
        name: {
            "tok_s_median": statistics.median(r["batch1_decode_tok_s"] for r in rows),
            "tok_s_min": min(r["batch1_decode_tok_s"] for r in rows),
            "tok_s_max": max(r["batch1_decode_tok_s"] for r in rows),
            "tok_per_cpu_s_median": statistics.median(r["batch1_tok_per_cpu_s"] for r in rows),
            "tok_per_cpu_s_min": min(r["batch1_tok_per_cpu_s"] for r in rows),
            "tok_per_cpu_s_max": max(r["batch1_tok_per_cpu_s"] for r in rows),
        }
        for name, rows in runs.items()
    }
    summary["int8_over_fp32_median"] = summary["int8"]["tok_s_median"] / summary["fp32"]["tok_s_median"]
    summary["int8_over_fp32_cpu_median"] = (
        summary["int8"]["tok_per_cpu_s_median"] / summary["fp32"]["tok_per_cpu_s_median"]
    )
    deterministic = all(r["tokens"] == runs[n][0]["tokens"] for n, rows in runs.items() for r in rows)
    result = {
        "date": date.today().isoformat(),
        "time": time.strftime("%H:%M UTC", time.gmtime()),
        "command": "python bench/cpu_int8_decode.py " + " ".join(sys.argv[1:]),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "model": args.model,
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "int8_body": runs["int8"][0]["int8_body"],
        "isa": runs["int8"][0]["isa"],
        "loadavg_per_round": loads,
        "summary": summary,
        "greedy_fp32_vs_int8": match,
        "greedy_repeatable_across_runs": deterministic,
        "runs": {
            n: [{k: v for k, v in r.items() if k != "tokens"} for r in rows] for n, rows in runs.items()
        },
    }
    print(json.dumps({k: result[k] for k in ("summary", "greedy_fp32_vs_int8")}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
