"""qserve's GPTQ solve against the reference implementation, layer by layer, on identical Hessians.

The reference is IST-DASLab's `gptq.py` + `quant.py` (the code of Frantar et al. 2022). It is not
vendored: pass the folder holding those two files with `--reference-dir` (a checkout of
github.com/IST-DASLab/gptq). Both solvers get the same weight and the same H (accumulated once by
qserve's `GPTQ.add_batch` from the float model's inputs to each Linear), the same damping, group size,
act-order and symmetric/asymmetric grid. For each layer the script prints:

- the layer error 0.5 tr(dW H dW^T) of RTN, qserve and the reference, on the calibration H and on a
  held-out H (WikiText-2 windows of 2048 tokens, as `qserve eval ppl` scores them);
- how many quantized entries differ between qserve and the reference, and the largest difference.

The two solvers differ in one documented place: where a group starts inside a lazy-update block,
qserve computes its scale/zero from the group's columns with every earlier update applied, while the
reference reads them before the current block's updates (see `quantize/gptq.py _solve`). Where no group
starts mid-block (group size >= block size, or `--block-size` equal to the group size) the two agree
bit for bit up to float rounding.

    python bench/gptq_reference.py --reference-dir /path/to/IST-DASLab/gptq --blocks 2,15,28 \
        --n-samples 32 --out bench/results/gptq_reference.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

LINEARS = (
    "self_attn.q_proj,self_attn.k_proj,self_attn.v_proj,self_attn.o_proj,"
    "mlp.gate_proj,mlp.up_proj,mlp.down_proj"
)


def _load_reference(ref_dir: Path):
    """Import the reference's gptq.py (which imports `quant` by name) from ref_dir."""
    for f in ("gptq.py", "quant.py"):
        if not (ref_dir / f).is_file():
            sys.exit(f"--reference-dir {ref_dir}: no {f} there (expected a checkout of IST-DASLab/gptq)")
    sys.path.insert(0, str(ref_dir))
    spec = importlib.util.spec_from_file_location("ref_gptq", ref_dir / "gptq.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # The reference synchronizes CUDA after each solve; on a CPU-only torch that call raises.
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None
    return mod


def _err(dw: torch.Tensor, h: torch.Tensor) -> float:
    return 0.5 * float(torch.einsum("oi,ij,oj->", dw, h, dw))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference-dir", required=True, type=Path)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--heldout-windows", type=int, default=4)
    ap.add_argument("--blocks", default="2,15,28")
    ap.add_argument("--layers", default=LINEARS)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument(
        "--variants",
        default="sym,sym-act,asym-act",
        help="comma list of sym|asym with optional -act (act-order) and -static (static groups)",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    ref = _load_reference(args.reference_dir.resolve())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qserve.calib_data import get_calib_samples
    from qserve.evaluate import eval_tokens
    from qserve.hub import resolve_model
    from qserve.kernels.packing import rtn_quantize
    from qserve.quantize.gptq import GPTQ

    torch.manual_seed(0)
    model_dir = resolve_model(args.model, progress=False)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    calib = get_calib_samples(args.calib, tok, args.n_samples, args.seqlen, 0, mode="windows")
    held = eval_tokens(tok)[0, : args.heldout_windows * 2048].view(args.heldout_windows, 2048)
    blocks = [int(b) for b in args.blocks.split(",")]
    layers = args.layers.split(",")

    solvers: dict[tuple[int, str], GPTQ] = {}
    collecting = {}

    def hook_for(key):
        def hook(_mod, inputs, _out):
            collecting[key].add_batch(inputs[0])

        return hook

    handles = []
    for b in blocks:
        blk = model.model.layers[b]
        for name in layers:
            lin = blk.get_submodule(name)
            handles.append(lin.register_forward_hook(hook_for((b, name))))

    def accumulate(tokens: torch.Tensor) -> dict:
        collecting.clear()
        for b in blocks:
            for name in layers:
                lin = model.model.layers[b].get_submodule(name)
                collecting[(b, name)] = GPTQ(lin.weight, f"{b}.{name}")
        with torch.no_grad():
            for i in range(tokens.shape[0]):
                model.model(tokens[i : i + 1], use_cache=False)  # the LM head is not needed
        return dict(collecting)

    tick = time.perf_counter()
    solvers = accumulate(calib)
    held_h = {k: s.hessian for k, s in accumulate(held).items()}
    for h in handles:
        h.remove()
    print(f"Hessians in {time.perf_counter() - tick:.1f} s", flush=True)

    rows = []
    for variant in args.variants.split(","):
        parts = variant.split("-")
        sym = parts[0] == "sym"
        act = "act" in parts
        static = "static" in parts
        print(f"\n== {variant}: group {args.group_size}, damp {args.damp}, block {args.block_size}")
        print(f"{'layer':28} {'rtn cal/held':>19} {'qserve cal/held':>19} {'ref cal/held':>19} {'diff':>8}")
        for key, solver in solvers.items():
            lin = model.model.layers[key[0]].get_submodule(key[1])
            w = lin.weight.detach().float()
            h_cal, h_held = solver.hessian, held_h[key]
            rtn = rtn_quantize(w, 4, args.group_size, sym).dequantize()
            q = solver.quantize(
                bits=4, group_size=args.group_size, sym=sym, damp=args.damp, desc_act=act,
                static_groups=static, block_size=args.block_size,
            ).qweight.dequantize()
            layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            layer.weight.data = w.clone()
            rg = ref.GPTQ(layer)
            rg.H = h_cal.clone()
            rg.nsamples = solver.n_samples
            rg.quantizer = ref.Quantizer()
            rg.quantizer.configure(4, perchannel=True, sym=sym, mse=False)
            rg.fasterquant(
                blocksize=args.block_size, percdamp=args.damp, groupsize=args.group_size,
                actorder=act, static_groups=static,
            )
            qr = layer.weight.data.float()
            row = {
                "variant": variant,
                "block": key[0],
                "layer": key[1],
                "rtn": [_err(rtn - w, h_cal), _err(rtn - w, h_held)],
                "qserve": [_err(q - w, h_cal), _err(q - w, h_held)],
                "reference": [_err(qr - w, h_cal), _err(qr - w, h_held)],
                "differing_fraction": float((q != qr).float().mean()),
                "max_abs_diff": float((q - qr).abs().max()),
            }
            rows.append(row)
            f = "{:9.3g}/{:<9.3g}"
            print(
                f"{key[0]:>2} {key[1]:25} {f.format(*row['rtn'])} {f.format(*row['qserve'])} "
                f"{f.format(*row['reference'])} {row['differing_fraction']:8.4f}",
                flush=True,
            )
        tot = {m: [sum(r[m][i] for r in rows if r["variant"] == variant) for i in (0, 1)]
               for m in ("rtn", "qserve", "reference")}
        print("total " + "  ".join(f"{m} {v[0]:.4g}/{v[1]:.4g}" for m, v in tot.items()))

    if args.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps(
                {"command": " ".join(sys.argv), "commit": commit.strip(), "date": time.strftime("%Y-%m-%d"),
                 "rows": rows},
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
