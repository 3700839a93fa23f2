"""GPTQ and AWQ on one real decoder block of SmolLM2-135M: quality against RTN, and seconds.

Not a test: a measurement. Block `--block` (default 0) of the float model, calibration from c4
(`--n-samples` x `--seqlen`, "concat" blocks), w4 with `--group-size` (default 64: SmolLM2's 576
is not a multiple of 128). Prints, per linear, GPTQ's objective vs RTN's on the same Hessian; per
AWQ group, the best ratio and the inspect-module error vs RTN; the block-output MSE of RTN, GPTQ and
AWQ on held-out samples; and CPU/wall seconds of each phase.

    python bench/algos_smoke.py [--model DIR] [--n-samples 128] [--seqlen 512] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch


class Clock:
    """Wall and process-CPU seconds of a phase (the machine is shared: CPU time is steadier)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def __str__(self):
        return f"{self.wall:6.1f}s wall {self.cpu:6.1f}s cpu"


def load(model_dir: Path, n_samples: int, seqlen: int, block_index: int, n_eval: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qserve.calib_data.sampling import get_calib_samples

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = get_calib_samples("c4", tok, n_samples=n_samples + n_eval, seqlen=seqlen, seed=0)
    layers = model.model.layers
    captured = {}

    def grab(module, args, kwargs):
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

    # kwargs as the model passes them (position embeddings broadcast over the batch): one sample
    # through a one-block model is enough; block 0's inputs are the embeddings.
    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    model.model.layers = layers[:1]
    with torch.no_grad():
        model(ids[:1], use_cache=False)
        x = model.model.embed_tokens(ids)
        for b in range(block_index):
            x = torch.cat([layers[b](x[i : i + 8], **captured["kwargs"]) for i in range(0, len(x), 8)])
    handle.remove()
    model.model.layers = layers
    return layers[block_index], x[:n_samples], x[n_samples:], captured["kwargs"]


def block_output(block, x, kwargs):
    with torch.no_grad():
        y = block(x, **kwargs)
    return y[0] if isinstance(y, tuple) else y


def quantized_copy(block, names, weights):
    q = copy.deepcopy(block)
    with torch.no_grad():
        for name in names:
            q.get_submodule(name).weight.copy_(weights[name])
    return q


def run_gptq(block, x, kwargs, spec, gs, sym, desc_act):
    """All linears from one float forward (no true-sequential: that is the driver's)."""
    from qserve.quantize.gptq import GPTQ

    source = {n: n for n in spec.linears}
    for group in spec.scale_groups:  # linears of a scale group read one input
        source.update({n: group.input_of for n in group.linears})
    solvers = {n: GPTQ(block.get_submodule(n).weight, name=n) for n in spec.linears}
    hooks = [
        block.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: solvers[n].add_batch(a[0]))
        for n in set(source.values())
    ]
    with Clock() as t_h, torch.no_grad():
        for i in range(0, len(x), 16):
            block(x[i : i + 16], **kwargs)
    for h in hooks:
        h.remove()
    with Clock() as t_q:
        for n in spec.linears:
            if source[n] != n:
                solvers[n].take_hessian(solvers[source[n]])
        results = {
            n: solvers[n].quantize(bits=4, group_size=gs, sym=sym, desc_act=desc_act) for n in spec.linears
        }
    return solvers, results, t_h, t_q


def objective(h, w, w_q):
    e = w_q - w.detach().float()
    return 0.5 * float(torch.einsum("oi,ij,oj->", e, h, e))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path.home() / ".cache/qserve/models/smollm2-135m")
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--n-eval", type=int, default=8, help="held-out samples for the block-output MSE")
    ap.add_argument("--block", type=int, default=0)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--search-tokens", type=int, nargs="+", default=[2048])
    ap.add_argument("--skip-gptq", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from qserve.kernels.packing import rtn_quantize
    from qserve.quantize.arch import arch_for_config
    from qserve.quantize.awq import awq_apply_block, awq_search_block, collect_awq_activations

    block, x, x_eval, kwargs = load(args.model, args.n_samples, args.seqlen, args.block, args.n_eval)
    spec = arch_for_config(block.self_attn.config)
    gs = args.group_size
    print(f"block {args.block}: {tuple(x.shape)} calibration, {tuple(x_eval.shape)} held out, w4 g{gs}")
    ref = block_output(block, x_eval, kwargs)

    def mse(b):
        return float((block_output(b, x_eval, kwargs) - ref).square().mean())

    for sym in (True, False):
        rtn = {n: rtn_quantize(block.get_submodule(n).weight, 4, gs, sym).dequantize() for n in spec.linears}
        err = mse(quantized_copy(block, spec.linears, rtn))
        print(f"RTN {'sym ' if sym else 'asym'}: block-output MSE {err:.4e}")

    if not args.skip_gptq:
        for desc_act in (False, True):
            solvers, res, t_h, t_q = run_gptq(block, x, kwargs, spec, gs, True, desc_act)
            print(f"\nGPTQ sym act-order={desc_act}: hessians {t_h}, solves {t_q}")
            for n in spec.linears:
                w, h = block.get_submodule(n).weight, solvers[n].hessian
                rtn_obj = objective(h, w, rtn_quantize(w, 4, gs, True).dequantize())
                gptq_obj = objective(h, w, res[n].qweight.dequantize())
                print(
                    f"  {n:20s} loss {res[n].loss:10.4f}  objective gptq {gptq_obj:10.4f} rtn {rtn_obj:10.4f}"
                    f"  ({gptq_obj / rtn_obj:5.1%})  {res[n].seconds:5.2f}s"
                )
            w_q = {n: res[n].qweight.dequantize() for n in spec.linears}
            print(f"  block-output MSE {mse(quantized_copy(block, spec.linears, w_q)):.4e}")

    for budget in args.search_tokens:
        with Clock() as t_c:
            acts, _ = collect_awq_activations(block, x, kwargs, spec, search_tokens=budget)
        print(f"\nAWQ statistics forward over {x.shape[0] * x.shape[1]} tokens: {t_c}")
        with Clock() as t_s:
            res = awq_search_block(
                block, x, kwargs, spec, group_size=gs, sym=False, search_tokens=budget, activations=acts
            )
        print(f"AWQ search, {budget} tokens: {t_s}")
        for e in res.log:
            print(
                f"  {e['prev_op']:25s} ratio {e['best_ratio']:.2f}  loss {e['loss']:.4e}"
                f"  rtn {e['rtn_loss']:.4e}  ({e['loss'] / e['rtn_loss']:5.1%})  {e['seconds']:5.2f}s"
            )
        awq = copy.deepcopy(block)
        awq_apply_block(awq, res, spec)
        clips = {c.linear: c.max_val for c in res.clips}
        w_q = {
            n: rtn_quantize(awq.get_submodule(n).weight, 4, gs, False, clip_max=clips.get(n)).dequantize()
            for n in spec.linears
        }
        print(f"  block-output MSE {mse(quantized_copy(awq, spec.linears, w_q)):.4e}")


if __name__ == "__main__":
    main()
