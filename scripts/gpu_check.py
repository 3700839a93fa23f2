"""Everything that needs an NVIDIA GPU, in one run (called by scripts/gpu_check.sh after set-up).

Stages, each a subprocess with its exit status and wall time recorded:
  compile   python -m qserve.kernels.compile_check --arch <this GPU's>   (real ptxas, all variants)
  tests     pytest -m gpu                                                 (kernels compiled, not interpreted)
  kernels   bench/gpu_kernels.py                                              (fused GEMM vs fp16 matmul, attention)
  quantize  qserve quantize smollm2-135m --method awq                     (the AWQ checkpoint, once)
  engine    offline throughput, SmolLM2-135M fp16 and AWQ, CUDA graphs on and off
  moe       the fused MoE kernel in the engine: tiny Qwen3-MoE (AWQ) and Mixtral (GPTQ) checkpoints,
            greedy tokens on CUDA fp32 with the fused kernel = the per-expert loop = the CPU engine,
            fp16 with CUDA graphs = eager, and fp16 decode speed (batch 1 and 16) fused vs per-expert
  structured  bench/structured.py on CUDA: JSON-schema validity, grammar-mask cost per step, decode
            throughput at batch 32 with a JSON schema vs unconstrained
  tp        tensor parallelism (needs 2 CUDA devices, else reported skipped, not passed): a random-weight
            fp16 checkpoint of Llama-3-8B's shapes written here (--tp-format gptq: its RTN 4-bit form), decode throughput at batch 1 and 16
            (--max-tokens new tokens) at TP=1 and TP=2 (both eager: TP > 1 runs without CUDA graphs; TP=1
            with graphs reported beside), greedy tokens compared; passes when TP2/TP1 >= 1.6 at both
            batch sizes and the first 8 greedy tokens of every prompt agree

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
STAGES = ("compile", "tests", "kernels", "quantize", "engine", "structured", "moe", "tp")


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


# Llama-3-8B's shapes (config of meta-llama/Meta-Llama-3-8B): the model the tensor-parallel stage times.
LLAMA3_8B_SHAPE = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336, vocab_size=128256)  # fmt: skip
TP_TARGET = 1.6  # TP=2 decode throughput / TP=1 the stage requires, at batch 1 and batch 16
TP_CHECKED_TOKENS = 8  # leading greedy tokens that must agree between TP=1 and TP=2 for every prompt


def write_random_llama(path: Path, *, hidden_size: int, num_hidden_layers: int, num_attention_heads: int,
                       num_key_value_heads: int, intermediate_size: int, vocab_size: int, dtype: str = "float16",
                       device: str = "cpu", seed: int = 0, shard_bytes: int = 2 << 30) -> Path:  # fmt: skip
    """A random-weight Llama checkpoint in Hugging Face layout (config.json, sharded safetensors with
    their index, the tiny test tokenizer) that the engine loads like a downloaded one. The tensors are
    drawn one at a time (on `device`, a GPU makes an 8B model in seconds) and written shard by shard, so
    host memory holds one shard, never the whole model. The tokenizer knows 384 tokens; the model's
    vocabulary may be larger (ids past the tokenizer decode to nothing), the stage uses token prompts."""
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig

    from qserve.testing import make_tiny_tokenizer

    if hidden_size % num_attention_heads or num_attention_heads % num_key_value_heads:
        raise ValueError(f"write_random_llama: hidden_size {hidden_size} must divide by num_attention_heads "
                         f"{num_attention_heads}, and that by num_key_value_heads {num_key_value_heads}")  # fmt: skip
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    head_dim = hidden_size // num_attention_heads
    kv = num_key_value_heads * head_dim
    gen = torch.Generator(device=device).manual_seed(seed)

    def shapes():
        yield "model.embed_tokens.weight", (vocab_size, hidden_size)
        for i in range(num_hidden_layers):
            p = f"model.layers.{i}."
            yield p + "input_layernorm.weight", (hidden_size,)
            yield p + "self_attn.q_proj.weight", (hidden_size, hidden_size)
            yield p + "self_attn.k_proj.weight", (kv, hidden_size)
            yield p + "self_attn.v_proj.weight", (kv, hidden_size)
            yield p + "self_attn.o_proj.weight", (hidden_size, hidden_size)
            yield p + "post_attention_layernorm.weight", (hidden_size,)
            yield p + "mlp.gate_proj.weight", (intermediate_size, hidden_size)
            yield p + "mlp.up_proj.weight", (intermediate_size, hidden_size)
            yield p + "mlp.down_proj.weight", (hidden_size, intermediate_size)
        yield "model.norm.weight", (hidden_size,)
        yield "lm_head.weight", (vocab_size, hidden_size)

    shards: list[dict] = [{}]
    size = 0
    files: list[str] = []
    weight_map: dict[str, str] = {}
    total = 0

    def flush() -> None:
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shards[0], str(path / name), metadata={"format": "pt"})
        files.append(name)
        for key in shards[0]:
            weight_map[key] = name
        shards[0] = {}

    for name, shape in shapes():
        if len(shape) == 1:  # RMSNorm scales: around 1, varied so a mis-sharded one would show
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        else:
            std = 1.0 if "embed" in name else 0.02
            t = std * torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        t = t.to(torch_dtype).cpu()
        nbytes = t.numel() * t.element_size()
        if shards[0] and size + nbytes > shard_bytes:
            flush()
            size = 0
        shards[0][name] = t
        size += nbytes
        total += nbytes
    flush()
    # Files were named before their count was known: rename to Hugging Face's -of- convention.
    final = {f: f.replace(".safetensors", f"-of-{len(files):05d}.safetensors") for f in files}
    for old, new in final.items():
        (path / old).rename(path / new)
    index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, torch_dtype=dtype,
    ).save_pretrained(path)  # fmt: skip
    make_tiny_tokenizer().save_pretrained(path)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(path)
    return path


def tp_prompts(n: int = 16, length: int = 32) -> list[list[int]]:
    """Token prompts (ids inside the tiny tokenizer's 384), distinct per prompt, deterministic."""
    return [[3 + (7 * i + 13 * j) % 380 for j in range(length)] for i in range(n)]


def tp_run(model: str, tp: int, device: str, dtype: str, eager: bool, max_tokens: int, out: Path,
           batches: tuple[int, ...] = (1, 16)) -> int:  # fmt: skip
    """One configuration of the tensor-parallel stage, in its own process: greedy tokens of
    tp_prompts() (batch 16, distinct prompts) and decode speed at each batch size (`max_tokens` new
    tokens per sequence, EOS ignored, a warm-up run first)."""
    import torch

    from qserve import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model, dtype=dtype, device=device, tensor_parallel_size=tp, enforce_eager=eager, max_num_seqs=16,
              max_model_len=max(512, 64 + max_tokens), gpu_memory_utilization=0.5, validate=False)  # fmt: skip
    startup = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    prompts = tp_prompts(max(batches))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    result = {"model": model, "tensor_parallel_size": tp, "device": device, "dtype": dtype, "eager": eager or tp > 1,
              "graphs_captured": llm.engine.runner.graphs is not None, "startup_s": round(startup, 1),
              "max_tokens": max_tokens}  # fmt: skip
    for batch in batches:
        llm.generate(prompts[:batch], params, use_tqdm=False)  # warm
        sync()
        t0 = time.perf_counter()
        outs = llm.generate(prompts[:batch], params, use_tqdm=False)
        sync()
        seconds = time.perf_counter() - t0
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        result[f"batch{batch}_tok_s"] = round(generated / seconds, 1)
        if batch == max(batches):
            result["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
    llm.close()
    out.write_text(json.dumps(result))
    print(json.dumps({k: v for k, v in result.items() if k != "tokens"}))
    return 0


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def tp_summary(tp1: dict, tp2: dict, target: float = TP_TARGET, checked_tokens: int = TP_CHECKED_TOKENS) -> dict:
    """TP=2 against TP=1 (both eager: the engine runs TP > 1 without CUDA graphs): speed ratio per batch
    size against `target`, and greedy agreement. fp16 random weights leave near-tied logits, so one
    rounding difference from the all-reduce's summation order can flip a late token; a sharding bug
    changes the first ones. Hence the check is on the first `checked_tokens` of every prompt, with full
    agreement and the common-prefix lengths reported beside it."""
    ratios, checks = {}, {}
    for key in sorted(k for k in tp1 if k.endswith("_tok_s")):
        if key not in tp2:
            raise ValueError(f"tp_summary: {key} is in the TP=1 run but not in the TP=2 run")
        ratios[key.removesuffix("_tok_s")] = round(tp2[key] / tp1[key], 3)
    if not ratios:
        raise ValueError("tp_summary: the runs carry no *_tok_s figures")
    for batch, r in ratios.items():
        checks[f"{batch}_ratio_ge_{target}"] = r >= target
    t1, t2 = tp1.get("tokens"), tp2.get("tokens")
    if not t1 or not t2 or len(t1) != len(t2):
        raise ValueError("tp_summary: both runs must carry greedy tokens for the same prompts")
    prefixes = [_common_prefix(a, b) for a, b in zip(t1, t2, strict=True)]
    checks[f"greedy_first_{checked_tokens}_equal"] = all(
        p >= min(checked_tokens, len(a), len(b)) for p, a, b in zip(prefixes, t1, t2, strict=True))  # fmt: skip
    return {"target_ratio": target, "ratios": ratios, "checks": checks, "passed": all(checks.values()),
            "greedy_all_equal": t1 == t2, "common_prefix": prefixes,
            "tok_s": {"tp1": {k: v for k, v in tp1.items() if k.endswith("_tok_s")},
                      "tp2": {k: v for k, v in tp2.items() if k.endswith("_tok_s")}}}  # fmt: skip


def tp_quantize_cmd(src: Path, dst: Path, group_size: int, device: str) -> list[str]:
    """qserve's round-to-nearest 4-bit GPTQ layout of `src` (no calibration data, no evaluation)."""
    return ["qserve", "quantize", str(src), "--method", "rtn", "--format", "gptq", "--group-size", str(group_size),
            "--device", device, "--no-eval", "--output", str(dst)]  # fmt: skip


def tp_stage(py: str, work: Path, max_tokens: int, device_count: int, fmt: str = "fp16") -> dict:
    """The tensor-parallel stage: needs two CUDA devices; writes the Llama-3-8B-shaped fp16 checkpoint
    (once; with fmt "gptq" also its 4-bit RTN GPTQ form, group 128), times TP=1 and TP=2 (each its own
    process), and TP=1 with CUDA graphs for reference."""
    if fmt not in ("fp16", "gptq"):
        raise ValueError(f"tp_stage: format {fmt!r} is not one of fp16, gptq")
    if device_count < 2:
        return {"exit": None, "status": "skipped",
                "note": f"skipped: needs 2 CUDA devices (found {device_count}); not a pass"}  # fmt: skip
    start = time.perf_counter()
    stage = _tp_stage(py, work, max_tokens, fmt)
    return {**stage, "seconds": round(time.perf_counter() - start, 1)}


def _tp_stage(py: str, work: Path, max_tokens: int, fmt: str) -> dict:
    src = work / "llama3-8b-shaped-fp16"
    ckpt = src if fmt == "fp16" else work / "llama3-8b-shaped-rtn-gptq-g128"
    stage: dict = {"checkpoint": str(ckpt), "shape": LLAMA3_8B_SHAPE, "format": fmt, "dtype": "float16", "runs": {}}
    if not (src / "model.safetensors.index.json").exists():
        stage["write"] = run("tp-write", [py, __file__, "--tp-write", str(src)], work, 900)
        if stage["write"]["exit"] != 0:
            return {**stage, "exit": stage["write"]["exit"], "status": "failed", "note": "writing the checkpoint failed"}
    if fmt == "gptq" and not (ckpt / "config.json").exists():
        stage["quantize"] = run("tp-quantize", tp_quantize_cmd(src, ckpt, 128, "cuda"), work, 1800)
        if stage["quantize"]["exit"] != 0:
            return {**stage, "exit": stage["quantize"]["exit"], "status": "failed", "note": "RTN quantization failed"}
    for label, tp, mode in (("tp1", 1, "eager"), ("tp2", 2, "eager"), ("tp1_graphs", 1, "graphs")):
        res = work / f"tp-{label}.json"
        res.unlink(missing_ok=True)
        st = run(f"tp-{label}", [py, __file__, "--tp-one", str(ckpt), str(tp), mode, "--out", str(res),
                                 "--max-tokens", str(max_tokens)], work, 900)  # fmt: skip
        if res.exists():
            st["result"] = json.loads(res.read_text())
        stage["runs"][label] = st
    r1, r2 = (stage["runs"][k].get("result") for k in ("tp1", "tp2"))
    if r1 is None or r2 is None:
        return {**stage, "exit": 1, "status": "failed", "note": "a TP=1 or TP=2 run produced no result (see its log)"}
    stage["summary"] = summary = tp_summary(r1, r2)
    return {**stage, "exit": 0 if summary["passed"] else 1, "status": "passed" if summary["passed"] else "failed"}


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
    tp = stages.get("tp", {}).get("summary")
    if tp:
        t1, t2 = tp["tok_s"]["tp1"], tp["tok_s"]["tp2"]
        figs["tp"] = ", ".join(
            f"{b}: TP1 {t1[b + '_tok_s']} -> TP2 {t2[b + '_tok_s']} tok/s = {r:.2f}x (target {tp['target_ratio']}x)"
            for b, r in tp["ratios"].items()
        ) + f"; greedy {'equal' if tp['greedy_all_equal'] else 'common prefix ' + str(min(tp['common_prefix']))}"
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
                    "quantize, engine, structured, moe, tp)")
    ap.add_argument("--engine-one", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--moe-one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tp-format", choices=("fp16", "gptq"), default="fp16",
                    help="tp stage's checkpoint: fp16 (cuBLAS GEMMs) or its 4-bit RTN GPTQ form (group 128)")
    ap.add_argument("--tp-write", type=Path, metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--tp-one", nargs=3, metavar=("MODEL", "TP", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.max_tokens < 1 or args.num_prompts < 1:
        ap.error(f"--max-tokens and --num-prompts must be >= 1 (found {args.max_tokens}, {args.num_prompts})")
    if args.tp_write:  # a child process: the tensor-parallel stage's checkpoint, drawn on the GPU
        write_random_llama(args.tp_write, **LLAMA3_8B_SHAPE, dtype="float16", device="cuda")
        return 0
    if args.tp_one:  # a child process: one tensor-parallel configuration
        model, tp, mode = args.tp_one
        return tp_run(model, int(tp), "cuda", "float16", mode == "eager", args.max_tokens, args.out)
    if args.engine_one:  # a child process: one engine configuration, its own GPU memory
        model, mode = args.engine_one
        return engine_throughput(model, mode == "eager", args.num_prompts, args.max_tokens, args.out)
    if args.moe_one:  # a child process: the fused-MoE stage
        return moe_check(args.work, args.out)

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - set(STAGES)
    if unknown:
        ap.error(f"--skip: unknown stage(s) {', '.join(sorted(unknown))}; the stages are {', '.join(STAGES)}")
    gpu, arch = gpu_or_exit()
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
        stages["kernels"] = run("kernels", [py, "bench/gpu_kernels.py", "--out", str(args.work / "kernels.json"),
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
    if "tp" not in skip:
        import torch

        stages["tp"] = tp_stage(py, args.work, args.max_tokens, torch.cuda.device_count(), args.tp_format)
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
    skipped = [name for name, st in stages.items() if st.get("status") == "skipped"]
    if skipped:
        print(f"NOT RUN (skipped, not passed): {', '.join(skipped)}")
    print(f"wrote {args.out}")
    return 0 if all(st.get("exit") in (0, None) for st in stages.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
