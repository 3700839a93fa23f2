"""Layer-wise GPTQ vs RTN: output error of each Linear on calibration AND held-out inputs.

For the chosen decoder blocks of the float model, accumulates H = 2/n sum x x^T of every Linear's
inputs twice: on the calibration sample (what GPTQ solves against) and on WikiText-2 windows (data
GPTQ never saw). For RTN and several GPTQ variants it prints 0.5 * tr(dW H dW^T), the expected
output error of the layer, under both. A variant whose held-out error is far above its calibration
error is fitting the sample, not the layer; one above RTN's held-out error is worse than no
calibration at all. It also prints how much of each H comes from the first token of each calibration
window (SmolLM2's attention-sink token has huge activations in late blocks). Used to choose the GPTQ
recipe (see bench/RESULTS.md).

    python bench/layer_loss.py --n-samples 64 --blocks 27,28,29 --layers mlp.down_proj,self_attn.o_proj
"""

from __future__ import annotations

import argparse

import torch

VARIANTS = {
    "act": {"desc_act": True},
    "act-damp0.1": {"desc_act": True, "damp": 0.1},
    "act-static": {"desc_act": True, "static_groups": True},
    "no-act": {},
}
LINEARS = "self_attn.q_proj,self_attn.k_proj,self_attn.v_proj,self_attn.o_proj,mlp.gate_proj,mlp.up_proj,mlp.down_proj"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--heldout-windows", type=int, default=8, help="WikiText-2 test windows")
    ap.add_argument(
        "--heldout-seqlen", type=int, default=2048, help="their length (2048: as qserve eval scores)"
    )
    ap.add_argument(
        "--drop-first",
        action="store_true",
        help="leave each calibration window's first token out of H (the held-out H keeps every token)",
    )
    ap.add_argument("--blocks", default="0,15,28")
    ap.add_argument("--layers", default=LINEARS)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qserve.calib_data import get_calib_samples
    from qserve.evaluate import eval_tokens
    from qserve.hub import resolve_model
    from qserve.kernels.packing import rtn_quantize
    from qserve.quantize.gptq import GPTQ

    model_dir = resolve_model(args.model, progress=False)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    calib = get_calib_samples(args.calib, tok, args.n_samples, args.seqlen, 0, mode="windows")
    n_held = args.heldout_windows * args.heldout_seqlen
    held = eval_tokens(tok)[0, :n_held].view(args.heldout_windows, args.heldout_seqlen)
    blocks = [int(b) for b in args.blocks.split(",")]
    layers = args.layers.split(",")
    variants = args.variants.split(",")

    # share of trace(H) = sum of squared input norms that comes from the first token of each window
    first_share: dict[tuple[int, str], list[float]] = {}

    dropping = False  # set while the calibration H is accumulated with --drop-first

    def observe(solver: GPTQ, key: tuple[int, str], x: torch.Tensor) -> None:
        solver.add_batch(x[:, 1:] if dropping else x)
        energy = x.float().pow(2).sum(-1)  # [batch, seq]
        acc = first_share.setdefault(key, [0.0, 0.0])
        acc[0] += float(energy[:, 0].sum())
        acc[1] += float(energy.sum())

    def hessians(ids: torch.Tensor) -> dict[tuple[int, str], GPTQ]:
        out, hooks = {}, []
        first_share.clear()
        for b in blocks:
            for name in layers:
                linear = model.model.layers[b].get_submodule(name)
                solver = out[(b, name)] = GPTQ(linear.weight, name=f"{b}.{name}")
                hooks.append(
                    linear.register_forward_hook(lambda _m, a, _o, s=solver, k=(b, name): observe(s, k, a[0]))
                )
        with torch.no_grad():
            for chunk in ids.split(8):
                model(chunk, use_cache=False)
        for h in hooks:
            h.remove()
        return out

    dropping = args.drop_first
    fit = hessians(calib)
    dropping = False
    print("share of trace(H) from the first token of each calibration window:")
    for (b, name), (first, total) in first_share.items():
        print(f"{b:>3} {name:<18} {first / total:.3f}")
    heldout = hessians(held)

    def loss(dw: torch.Tensor, h: torch.Tensor) -> float:
        return 0.5 * float(torch.trace(dw @ h @ dw.t()))

    for sym in (True, False):
        totals: dict[str, list[float]] = {}
        print(f"\n{'sym' if sym else 'asym'} w4 g{args.group_size}: calibration / held-out error per layer")
        for key, solver in fit.items():
            w = solver.weight
            cands = {"rtn": rtn_quantize(w, 4, args.group_size, sym).dequantize()}
            for v in variants:
                res = solver.quantize(bits=4, group_size=args.group_size, sym=sym, **VARIANTS[v])
                cands[v] = res.qweight.dequantize()
            cells = []
            for name, wq in cands.items():
                a, b = loss(wq - w, solver.hessian), loss(wq - w, heldout[key].hessian)
                totals.setdefault(name, [0.0, 0.0])
                totals[name][0] += a
                totals[name][1] += b
                cells.append(f"{name} {a:.3g}/{b:.3g}")
            print(f"{key[0]:>3} {key[1]:<18} " + "  ".join(cells))
        print("total " + "  ".join(f"{k} {a:.4g}/{b:.4g}" for k, (a, b) in totals.items()))


if __name__ == "__main__":
    main()
