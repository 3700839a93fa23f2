"""llama.cpp side of bench/cpu_decode.py; runs in the llama-cpp-python venv (no torch, no qserve).

Reads one JSON request on stdin and prints one line `LLAMA_WORKER {json}`. Modes:
  info      llama_cpp's version and llama.cpp's system-info line (the ISA it was built for)
  quantize  requantize `gguf` to llama.cpp type `quant` (Q4_0, Q8_0, ...) at `out`
  probe     load `gguf` and evaluate a few tokens: a build whose extra CPU buffer types crash (the AMX
            matmul segfaults on some machines) dies here, not in the measurement
  decode    batch-1 greedy decode of each prompt (token ids) for `max_tokens` tokens, EOS ignored

`extra_bufts` false loads the model with llama_model_params.use_extra_bufts off: no AMX and no weight
repacking (llama.cpp's --no-repack), the plain ggml CPU matmuls.

Decode runs llama.cpp's own forward (`Llama.eval`) one token at a time and takes the argmax of the
last logits row, so every prompt yields exactly `max_tokens` tokens whatever the model samples.
Timing, the same convention as qserve's side: prompt seconds = start to first token (prefill and
its argmax); decode tok/s = (tokens - 1) / (last token - first token), the first token excluded.
llama.cpp's own counters (llama_perf_context: t_p_eval_ms, t_eval_ms) are reported beside them.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def info(req: dict) -> dict:
    import llama_cpp

    return {
        "llama_cpp_python": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode().strip(),
    }


def quantize(req: dict) -> dict:
    import llama_cpp

    name = f"LLAMA_FTYPE_MOSTLY_{req['quant'].upper()}"
    if not hasattr(llama_cpp, name):
        known = sorted(
            k.removeprefix("LLAMA_FTYPE_MOSTLY_")
            for k in dir(llama_cpp)
            if k.startswith("LLAMA_FTYPE_MOSTLY_")
        )
        raise SystemExit(f"--quant {req['quant']!r} is not a llama.cpp type; pick one of {', '.join(known)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, name)
    params.allow_requantize = True  # the shipped GGUF is already 4-bit
    params.nthread = req["threads"]
    start = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(req["gguf"].encode(), req["out"].encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({req['gguf']} -> {req['quant']}) failed with code {rc}")
    return {
        "quant": req["quant"].upper(),
        "seconds": time.perf_counter() - start,
        "bytes": os.path.getsize(req["out"]),
    }


def load(req: dict):
    import llama_cpp
    import llama_cpp.llama_cpp as low  # what Llama() calls for its model parameters

    if not req.get("extra_bufts", True):
        default_params = low.llama_model_default_params

        def params():
            p = default_params()
            p.use_extra_bufts = False
            return p

        low.llama_model_default_params = params
    return llama_cpp.Llama(
        req["gguf"], n_ctx=req["n_ctx"], n_batch=512, n_threads=req["threads"], n_threads_batch=req["threads"],
        logits_all=False, verbose=False,
    )  # fmt: skip


def probe(req: dict) -> dict:
    llm = load(req)
    llm.eval(req["warmup"])
    llm.eval(req["warmup"][:1])
    return {"ok": True}


def decode(req: dict) -> dict:
    import llama_cpp
    import numpy as np

    llama_cpp.llama_backend_init()
    before = rss_bytes()
    start = time.perf_counter()
    llm = load(req)
    load_s = time.perf_counter() - start
    n_vocab = llm.n_vocab()
    eos = llama_cpp.llama_vocab_eos(llama_cpp.llama_model_get_vocab(llm.model))

    def next_token() -> int:
        row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(row, shape=(n_vocab,))))

    def generate(ids: list[int], n: int) -> dict:
        llm.reset()  # n_tokens = 0: the next eval drops the whole KV cache
        llama_cpp.llama_perf_context_reset(llm.ctx)
        cpu, t0 = time.process_time(), time.perf_counter()
        llm.eval(ids)
        tokens = [next_token()]
        t1 = time.perf_counter()
        while len(tokens) < n:
            llm.eval([tokens[-1]])
            tokens.append(next_token())
        t2, cpu = time.perf_counter(), time.process_time() - cpu
        perf = llama_cpp.llama_perf_context(llm.ctx)
        return {
            "prompt_tokens": len(ids), "tokens": tokens, "prompt_s": t1 - t0, "decode_s": t2 - t1,
            "decode_tok_s": (len(tokens) - 1) / (t2 - t1), "eos_generated": tokens.count(eos), "cpu_s": cpu,
            "perf": {"t_p_eval_ms": perf.t_p_eval_ms, "t_eval_ms": perf.t_eval_ms, "n_p_eval": perf.n_p_eval,
                     "n_eval": perf.n_eval},
        }  # fmt: skip

    generate(req["warmup"], req["warmup_tokens"])
    runs = [generate(ids, req["max_tokens"]) for ids in req["prompts"]]
    return {
        "load_s": load_s,
        "resident_weight_bytes": int(llama_cpp.llama_model_size(llm.model)),
        "rss_growth_bytes": rss_bytes() - before,  # mmap'd weights that were read, KV cache, compute buffers
        "rss_after_load_bytes": rss_bytes(),
        "n_ctx": llm.n_ctx(),
        "prompts": runs,
    }


def main() -> None:
    req = json.loads(sys.stdin.read())
    row = {"info": info, "quantize": quantize, "probe": probe, "decode": decode}[req["mode"]](req)
    print("LLAMA_WORKER " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
