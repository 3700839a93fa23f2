"""Everything that needs an NVIDIA GPU, in one run (called by scripts/gpu_check.sh after set-up).

Stages, each a subprocess with its exit status and wall time recorded:
  compile   python -m qserve.kernels.compile_check --arch <this GPU's>   (real ptxas, all variants)
  tests     pytest -m gpu                                                 (kernels compiled, not interpreted)
  kernels   bench/kernels.py                                              (fused GEMM vs fp16 matmul, attention)
  quantize  qserve quantize smollm2-135m --method awq                     (the AWQ checkpoint, once)
  engine    offline throughput, SmolLM2-135M fp16 and AWQ, CUDA graphs on and off
  moe       the fused MoE kernel in the engine: tiny Qwen3-MoE (AWQ) and Mixtral (GPTQ) checkpoints,
            greedy tokens on CUDA fp32 with the fused kernel = the per-expert loop = the CPU engine,
            fp16 with CUDA graphs = eager, and fp16 decode speed (batch 1 and 16) fused vs per-expert
  structured  bench/structured.py on CUDA: JSON-schema validity, grammar-mask cost per step, decode
            throughput at batch 32 with a JSON schema vs unconstrained

Prints one table and writes one JSON (default bench/results/gpu_check.json) with the command, commit,
GPU and every stage's figures. Exit 0 when every stage passed, 1 otherwise, 2 without a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def gpu_or_exit() -> tuple[str, int]:
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible to torch (torch.cuda.is_available() is False); this "
              "script only runs on a machine with an NVIDIA GPU and a CUDA build of torch", file=sys.stderr)  # fmt: skip
        sys.exit(2)
    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), major * 10 + minor


def run(stage: str, cmd: list[str], log_dir: Path, timeout: int) -> dict:
    """Run one stage, its output teed to LOG_DIR/<stage>.log; never raises."""
    print(f"[gpu_check] {stage}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    log = log_dir / f"{stage}.log"
    with log.open("w") as fh:
        try:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    seconds = round(time.perf_counter() - start, 1)
    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
    print(f"[gpu_check] {stage}: exit {rc} in {seconds} s; " + " | ".join(tail)[-300:], flush=True)
    return {"command": " ".join(cmd), "exit": rc, "seconds": seconds, "log": str(log)}


def junit_counts(path: Path) -> dict:
    if not path.exists():
        return {}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    keys = ("tests", "failures", "errors", "skipped")
    return {} if suite is None else {k: int(suite.get(k, 0)) for k in keys}


def engine_throughput(model: str, eager: bool, num_prompts: int, max_tokens: int, out: Path) -> int:
    """One engine configuration: batch throughput over ShareGPT prompts (or synthetic ones) and
    batch-1 decode speed, where launch overhead, the thing graphs remove, matters most."""
    from qserve import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model, dtype="float16", device="cuda", max_num_seqs=64, enforce_eager=eager)
    startup = time.perf_counter() - start
    prompts = _prompts(llm.get_tokenizer(), num_prompts)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:4], params, use_tqdm=False)  # warm
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    batch_s = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    start = time.perf_counter()
    single = llm.generate(prompts[:1], params, use_tqdm=False)
    single_s = time.perf_counter() - start
    graphs = llm.engine.runner.graphs
    result = {
        "model": model, "enforce_eager": eager, "graphs_captured": graphs is not None,
        "graph_buckets": graphs.buckets if graphs is not None else [], "startup_s": round(startup, 1),
        "num_prompts": len(prompts), "max_tokens": max_tokens, "generated_tokens": generated,
        "batch_tok_s": round(generated / batch_s, 1),
        "batch1_decode_tok_s": round(len(single[0].outputs[0].token_ids) / single_s, 1),
    }  # fmt: skip
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


MOE_PROMPTS = ["the quick brown fox", "a lazy dog while many requests", "over the", "jumps over a lazy dog " * 6]


def _moe_tokens(model: str, device: str, dtype: str, *, eager: bool = True, fused: bool = True,
                max_tokens: int = 24) -> dict:  # fmt: skip
    """Greedy tokens of MOE_PROMPTS, the fused-layer count and the batch-1 / batch-16 decode speed of
    one engine configuration; the engine is released before returning."""
    import gc

    import torch

    from qserve import LLM, SamplingParams

    llm = LLM(model, device=device, dtype=dtype, enforce_eager=eager, gpu_memory_utilization=0.3, max_model_len=256,
              validate=False)  # fmt: skip
    layers = llm.engine.runner.model.layers
    fused_layers = sum(getattr(layer.mlp, "fused", None) is not None for layer in layers)
    if not fused:
        for layer in layers:
            layer.mlp.fused = None  # the per-expert loop over the same (stacked) QuantLinears
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    tokens = [o.outputs[0].token_ids for o in llm.generate(MOE_PROMPTS, params, use_tqdm=False)]
    speed = {}
    if device == "cuda":
        long = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
        for batch in (1, 16):
            llm.generate(MOE_PROMPTS[:1] * batch, long, use_tqdm=False)  # warm
            torch.cuda.synchronize()
            start = time.perf_counter()
            llm.generate(MOE_PROMPTS[:1] * batch, long, use_tqdm=False)
            torch.cuda.synchronize()
            speed[f"batch{batch}_tok_s"] = round(128 * batch / (time.perf_counter() - start), 1)
    graphs = llm.engine.runner.graphs is not None
    del llm, layers
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"tokens": tokens, "fused_layers": fused_layers, "graphs_captured": graphs, **speed}


def moe_check(work: Path, out: Path) -> int:
    """Tiny MoE checkpoints quantized here (round to nearest: no calibration data needed), each served
    on CUDA with the fused MoE kernel and compared with the per-expert loop and the CPU engine."""
    from qserve.testing import make_tiny_model

    result: dict = {"checkpoints": {}}
    ok = True
    for family, fmt in (("qwen3_moe", "awq"), ("mixtral", "gptq")):
        src = work / f"moe-{family}"
        ckpt = work / f"moe-{family}-{fmt}"
        if not (ckpt / "config.json").exists():
            make_tiny_model(src, family, seed=1, tie_word_embeddings=False)
            subprocess.run(["qserve", "quantize", str(src), "--method", "rtn", "--format", fmt, "--group-size", "32",
                            "--no-eval", "--output", str(ckpt)], check=True, cwd=REPO)  # fmt: skip
        runs = {
            "cpu_fp32": _moe_tokens(str(ckpt), "cpu", "float32"),
            "cuda_fp32_fused": _moe_tokens(str(ckpt), "cuda", "float32"),
            "cuda_fp32_loop": _moe_tokens(str(ckpt), "cuda", "float32", fused=False),
            "cuda_fp16_eager": _moe_tokens(str(ckpt), "cuda", "float16"),
            "cuda_fp16_loop": _moe_tokens(str(ckpt), "cuda", "float16", fused=False),
            "cuda_fp16_graphs": _moe_tokens(str(ckpt), "cuda", "float16", eager=False),
        }
        checks = {
            "fused_on_cuda": runs["cuda_fp32_fused"]["fused_layers"] > 0 and runs["cpu_fp32"]["fused_layers"] == 0,
            "fused_equals_cpu_fp32": runs["cuda_fp32_fused"]["tokens"] == runs["cpu_fp32"]["tokens"],
            "fused_equals_loop_fp32": runs["cuda_fp32_fused"]["tokens"] == runs["cuda_fp32_loop"]["tokens"],
            "graphs_captured": runs["cuda_fp16_graphs"]["graphs_captured"],
            "graphs_equal_eager_fp16": runs["cuda_fp16_graphs"]["tokens"] == runs["cuda_fp16_eager"]["tokens"],
        }  # fmt: skip
        ok &= all(checks.values())
        result["checkpoints"][ckpt.name] = {"checks": checks, "runs": runs}
        print(ckpt.name, json.dumps(checks), {k: {m: v for m, v in r.items() if m != "tokens"} for k, r in runs.items()})
    result["passed"] = ok
    out.write_text(json.dumps(result, indent=1))
    return 0 if ok else 1


def _prompts(tokenizer, n: int) -> list[str]:
    data = Path(os.environ.get("QSERVE_DATA", REPO.parent / "shared" / "data"))
    path = data / "prompts" / "sharegpt" / "sharegpt_v3_first500.json"
    prompts = []
    if path.exists():
        for conv in json.loads(path.read_text()):
            turns = conv.get("conversations") or []
            if turns and turns[0].get("from") == "human" and 4 <= len(tokenizer(turns[0]["value"]).input_ids) <= 512:
                prompts.append(turns[0]["value"])
            if len(prompts) == n:
                return prompts
    words = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "many", "requests")
    return [" ".join(words[(i + j) % len(words)] for j in range(16 + i % 64)) for i in range(n)]


def _figures(stages: dict, out_dir: Path) -> dict:
    figs: dict = {}
    cc = out_dir / "compile_check.json"
    if cc.exists():
        s = json.loads(cc.read_text())["summary"]
        figs["compile"] = f"{s['variants']} variants, {s['failures']} failures"
    t = stages.get("tests", {}).get("junit")
    if t:
        figs["tests"] = f"{t['tests']} run, {t['failures'] + t['errors']} failed, {t['skipped']} skipped"
    kj = out_dir / "kernels.json"
    if kj.exists():
        k = json.loads(kj.read_text())
        m1 = [r for r in k["gemm"] if r["M"] == 1]
        if m1:
            figs["kernels"] = (
                f"M=1 fused vs fp16 matmul: {min(r['fused_speedup'] for r in m1):.2f}-"
                f"{max(r['fused_speedup'] for r in m1):.2f}x, {100 * min(r['fraction_of_copy'] for r in m1):.0f}-"
                f"{100 * max(r['fraction_of_copy'] for r in m1):.0f}% of copy bandwidth"
            )
    r = stages.get("structured", {}).get("result", {})
    if "validity" in r and "throughput" in r:
        v, ratios = r["validity"], r["throughput"]["ratio_vs_unconstrained"]
        figs["structured"] = f"{v['valid']}/{v['num_schemas']} schemas valid; decode vs unconstrained: " + ", ".join(
            f"{k} {x:.2f}x" for k, x in ratios.items())  # fmt: skip
    moe = stages.get("moe", {}).get("result")
    if moe:
        parts = []
        for name, c in moe["checkpoints"].items():
            runs = c["runs"]
            speed = ", ".join(
                f"batch {b}: {runs['cuda_fp16_eager'].get(f'batch{b}_tok_s')} fused vs "
                f"{runs['cuda_fp16_loop'].get(f'batch{b}_tok_s')} per-expert tok/s (fp16 eager), "
                f"{runs['cuda_fp16_graphs'].get(f'batch{b}_tok_s')} with graphs"
                for b in (1, 16)
            )
            parts.append(f"{name}: {sum(c['checks'].values())}/{len(c['checks'])} checks, {speed}")
        figs["moe"] = "; ".join(parts)
    for name, st in stages.items():
        if name.startswith("engine") and "result" in st:
            r = st["result"]
            figs[name] = f"{r['batch_tok_s']} tok/s batch, {r['batch1_decode_tok_s']} tok/s batch-1"
    return figs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu_check.json")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "gpu-check", help="logs, checkpoints")
    ap.add_argument("--num-prompts", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--skip", default="", help="stages to skip, comma separated (compile, tests, kernels, "
                    "quantize, engine, moe)")
    ap.add_argument("--engine-one", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--moe-one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.engine_one:  # a child process: one engine configuration, its own GPU memory
        model, mode = args.engine_one
        return engine_throughput(model, mode == "eager", args.num_prompts, args.max_tokens, args.out)
    if args.moe_one:  # a child process: the fused-MoE stage
        return moe_check(args.work, args.out)

    gpu, arch = gpu_or_exit()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    args.work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    stages: dict[str, dict] = {}
    from qserve.kernels.compile_check import SMEM_LIMITS

    if "compile" not in skip:
        if arch in SMEM_LIMITS:
            stages["compile"] = run("compile", [py, "-m", "qserve.kernels.compile_check", "--arch", str(arch),
                                                "--jobs", str(min(16, os.cpu_count() or 2)),
                                                "--json", str(args.work / "compile_check.json")], args.work, 900)  # fmt: skip
        else:
            stages["compile"] = {"exit": None, "note": f"sm_{arch} has no shared-memory limit entry in compile_check"}
    if "tests" not in skip:
        junit = args.work / "gpu_tests.xml"
        stages["tests"] = run("tests", [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                        f"--junitxml={junit}"], args.work, 900)  # fmt: skip
        stages["tests"]["junit"] = junit_counts(junit)
    if "kernels" not in skip:
        stages["kernels"] = run("kernels", [py, "bench/kernels.py", "--out", str(args.work / "kernels.json"),
                                            "--ms", "1,16,64,256,2048"], args.work, 900)  # fmt: skip
    awq = args.work / "smollm2-135m-awq"
    if "quantize" not in skip and not (awq / "config.json").exists():
        stages["quantize"] = run("quantize", ["qserve", "quantize", "smollm2-135m", "--method", "awq", "--group-size",
                                              "64", "--n-samples", "32", "--no-eval", "--output", str(awq)],
                                 args.work, 900)  # fmt: skip
    if "engine" not in skip:
        for label, model in (("fp16", "smollm2-135m"), ("awq", str(awq))):
            for mode in ("graphs", "eager"):
                name = f"engine-{label}-{mode}"
                res = args.work / f"{name}.json"
                stages[name] = run(name, [py, __file__, "--engine-one", model, mode, "--out", str(res),
                                          "--num-prompts", str(args.num_prompts), "--max-tokens",
                                          str(args.max_tokens)], args.work, 600)  # fmt: skip
                if res.exists():
                    stages[name]["result"] = json.loads(res.read_text())
    if "structured" not in skip:
        res = args.work / "structured.json"
        stages["structured"] = run("structured", [py, "bench/structured.py", "--device", "cuda", "--num-schemas",
                                                  "50", "--batch", "32", "--max-tokens", "64", "--repeats", "3",
                                                  "--threads", "4", "--out", str(res)], args.work, 900)  # fmt: skip
        if res.exists():
            stages["structured"]["result"] = json.loads(res.read_text())
    if "moe" not in skip:
        res = args.work / "moe.json"
        stages["moe"] = run("moe", [py, __file__, "--moe-one", "--work", str(args.work), "--out", str(res)],
                            args.work, 900)  # fmt: skip
        if res.exists():
            stages["moe"]["result"] = json.loads(res.read_text())
    figures = _figures(stages, args.work)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    report = {
        "command": "scripts/gpu_check.sh " + " ".join(sys.argv[1:] if argv is None else argv),
        "commit": commit, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "gpu": gpu, "arch": f"sm_{arch}", "stages": stages, "figures": figures,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n{'stage':<22} {'exit':>4} {'seconds':>8}  figures   ({gpu}, sm_{arch})")
    for name, st in stages.items():
        print(f"{name:<22} {st.get('exit')!s:>4} {st.get('seconds', '-')!s:>8}  {figures.get(name, st.get('note', ''))}")
    print(f"wrote {args.out}")
    return 0 if all(st.get("exit") in (0, None) for st in stages.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
