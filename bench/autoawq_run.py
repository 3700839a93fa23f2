"""AutoAWQ 0.2.9's own AWQ quantizer on this CPU, fed qserve's calibration tokens (issue 3's reference).

    python bench/autoawq_run.py smollm2-135m --output /tmp/autoawq-g64 --group-size 64 --calib c4 \
        --n-samples 128 --seqlen 512 --seed 0 --dtype float16 --threads 2

Runs `AutoAWQForCausalLM.from_pretrained` -> `.quantize(tokenizer, quant_config, calib_data)` ->
`.save_quantized(OUTPUT)` unchanged, and writes `OUTPUT/autoawq_report.json` (times, peak RSS,
settings, versions). `bench/quality.py --methods ...,autoawq` runs this script in a fresh process and
scores the checkpoint next to qserve's rows.

Same data as qserve: the calibration rows are `qserve.calib_data.get_calib_samples(..., mode="concat")`,
qserve's AWQ calibration, passed to AutoAWQ as lists of token ids. AutoAWQ's `get_calib_dataset` keeps
a token list of at most `max_calib_seq_len` tokens, concatenates the first `max_calib_samples` of them
and re-cuts the result into `max_calib_seq_len` blocks: with rows of exactly `--seqlen` tokens that
gives back the same rows in the same order. The script checks this (`calib_blocks_identical` in the
report) on the blocks AutoAWQ's quantizer actually received.

Same settings as qserve's AWQ: w_bit 4, `--group-size`, zero point, GEMM layout, AutoAWQ's defaults
for the rest (duo_scaling and clipping on, a 20-point scale grid: qserve's n_grid, duo_scaling and clip
defaults are the same). AutoAWQ computes in the model's load dtype: fp16 (its default) unless
`--dtype float32`.

AutoAWQ is installed with `pip install --no-deps autoawq==0.2.9`, without its `datasets` requirement;
the one module that imports `datasets` (its calibration loader) is loaded here with a stand-in for it.
AutoAWQ was last tested with transformers 4.51. On transformers 5 (5.24 here) its Llama path needs no
patch: its Catcher, `prepare_inputs_for_generation`, rotary-embedding and causal-mask handling still give
each decoder block the arguments transformers gives it. That is checked on every run, not assumed
(`_check_block0`, result in the report). Patched: AutoAWQ's device choice (CPU, see `_import_autoawq`),
its `datasets` import, and one CPU-only bug: its scale search restores the weights from a dict that on
the CPU aliases them, so without the fix every block keeps the first grid point's scaling (checkpoints
~55% off per layer, perplexity in the hundreds of thousands; see `_checked_quantizer`). The fix gives
the search what a GPU run gives it, copies, and each search is checked to leave the weights unchanged.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

REPORT_FILE = "autoawq_report.json"
INSTALL_HINT = "pip install --no-deps autoawq==0.2.9"


def _load_calib_module(awq_dir: Path) -> types.ModuleType:
    """AutoAWQ's own `awq/utils/calib_data.py`, executed with a stand-in for `datasets`.

    The file imports `datasets.load_dataset` at module level and calls it only for a dataset NAME; given
    token lists it never does. The stand-in is in `sys.modules` only while that one file executes (it
    imports nothing else), so no other import sees a fake `datasets`.
    """
    path = awq_dir / "utils" / "calib_data.py"
    fake = types.ModuleType("datasets")

    def load_dataset(*_args, **_kwargs):
        raise RuntimeError(
            "bench/autoawq_run.py passes token ids; loading a dataset by name is not supported"
        )

    fake.load_dataset = load_dataset
    spec = importlib.util.spec_from_file_location("awq.utils.calib_data", path)
    module = importlib.util.module_from_spec(spec)
    saved = sys.modules.get("datasets")
    sys.modules["datasets"] = fake
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            del sys.modules["datasets"]
        else:
            sys.modules["datasets"] = saved
    return module


def _import_autoawq(received: list):
    spec = importlib.util.find_spec("awq")
    if spec is None or spec.origin is None:
        raise SystemExit(f"AutoAWQ is not installed in this environment; install it with `{INSTALL_HINT}`")
    awq_dir = Path(spec.origin).parent
    if importlib.util.find_spec("datasets") is None:
        # awq/__init__ imports its quantizer, which imports the calibration loader, which imports
        # `datasets`: register AutoAWQ's own loader first so the quantizer imports it from sys.modules.
        sys.modules["awq.utils.calib_data"] = _load_calib_module(awq_dir)
    # record=True keeps awq/__init__'s deprecation banner, and the global filter it installs, in here.
    with warnings.catch_warnings(record=True):
        try:
            awq = importlib.import_module("awq")
        except ImportError as e:
            raise SystemExit(f"AutoAWQ failed to import ({e}); install it with `{INSTALL_HINT}`") from e
    if getattr(awq, "__version__", None) != "0.2.9":
        print(
            f"warning: AutoAWQ {awq.__version__} installed; this benchmark is written for 0.2.9",
            file=sys.stderr,
        )
    base = importlib.import_module("awq.models.base")
    quantizer = importlib.import_module("awq.quantize.quantizer")
    # AutoAWQ moves each block to get_best_device() (mps, xpu or cpu) while it works on it, and its
    # from_quantized reads "cpu" as "use the IPEX kernels". This run is on the CPU and never loads with
    # from_quantized; both names stay "cpu" so no accelerator that torch may see is picked up.
    base.get_best_device = lambda: "cpu"
    quantizer.get_best_device = lambda: "cpu"
    # Not a behaviour change: keep the blocks AutoAWQ's calibration loader returns to the quantizer, for
    # the identity check against qserve's rows.
    real = quantizer.get_calib_dataset

    def get_calib_dataset(*args, **kwargs):
        blocks = real(*args, **kwargs)
        received.extend(blocks)
        return blocks

    quantizer.get_calib_dataset = get_calib_dataset
    return awq


def _checked_quantizer(awq_quantizer_cls, check: dict):
    """AutoAWQ's AwqQuantizer plus one check right after it captured block 0's inputs, and its scale
    search handed copies of the weights it saves (its CPU aliasing bug, see `_compute_best_scale`).

    AutoAWQ 0.2.9 was last tested on transformers 4.51. It never calls the whole model again after
    capturing block 0's input: it calls each decoder block (and the attention and MLP inside it) itself,
    with the keyword arguments its Catcher took from the model's own call, completed by
    `prepare_inputs_for_generation` and the rotary embedding. If transformers changed that calling
    convention (argument names, the rotary embedding, the causal mask, the cache) the run would not fail,
    it would calibrate on wrong activations. So block 0 is run here the way AutoAWQ will run every
    block, on the first calibration row, and compared with block 0's output inside transformers' own
    forward of that row. The check's time is left out of the reported times.
    """

    class CheckedQuantizer(awq_quantizer_cls):
        def init_quant(self, n_samples=128, max_seq_len=512):
            modules, layer_kwargs, inps = super().init_quant(n_samples=n_samples, max_seq_len=max_seq_len)
            check.update(_check_block0(self, modules[0], layer_kwargs, inps))
            return modules, layer_kwargs, inps

        def _compute_best_scale(self, x, w_mean, x_mean, module2inspect, linears2scale, *args, **kwargs):
            # AutoAWQ's scale search saves the weights as `{k: v.cpu() for k, v in state_dict()}`,
            # scales them in place for each grid point and restores them from that dict. On a GPU `.cpu()`
            # is a copy; on the CPU it is the same tensor, so the in-place scaling also rewrites the
            # "saved" weights and every block leaves the search with its weights multiplied by the first
            # grid point's scales (~55% off, which is what made AutoAWQ's CPU checkpoints unusable).
            # Handing the search copies, as a GPU run gets them, is the whole fix; the check after it
            # proves the search left the weights as it found them.
            import torch

            real = module2inspect.state_dict
            module2inspect.state_dict = lambda *a, **k: {n: t.clone() for n, t in real(*a, **k).items()}
            before = [fc.weight.detach().clone() for fc in linears2scale]
            try:
                scales = super()._compute_best_scale(
                    x, w_mean, x_mean, module2inspect, linears2scale, *args, **kwargs
                )
            finally:
                del module2inspect.state_dict
            if not all(torch.equal(fc.weight, w) for fc, w in zip(linears2scale, before, strict=True)):
                raise SystemExit("AutoAWQ's scale search changed the weights it should have restored")
            check["scale_searches_restored"] = check.get("scale_searches_restored", 0) + 1
            return scales

    return CheckedQuantizer


class _Stop(Exception):
    pass


def _check_block0(quantizer, block, layer_kwargs: dict, inps) -> dict:
    import torch

    t0 = time.perf_counter()
    model = quantizer.model
    ids = torch.tensor([quantizer.calib_data[0]], dtype=torch.long)
    seen = {}

    def grab(_module, _args, output):
        seen["out"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    handle = block.register_forward_hook(grab)
    try:
        with torch.no_grad():
            model(ids)
    except _Stop:
        pass
    finally:
        handle.remove()
    n = inps.shape[0]
    kwargs = {
        k: v[:1] if isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape[0] == n else v
        for k, v in quantizer._sanitize_kwargs(layer_kwargs, block).items()
    }
    with torch.no_grad():
        theirs = quantizer._module_forward(inps[:1], block, kwargs)
    ref = seen["out"]
    rel = ((theirs.float() - ref.float()).norm() / ref.float().norm()).item()
    tol = 1e-5 if ref.dtype == torch.float32 else 2e-3  # one row vs a batch: a different matmul blocking
    result = {
        "block0_kwargs": sorted(kwargs),
        "block0_rel_diff": rel,
        "block0_check_seconds": time.perf_counter() - t0,
    }
    if not rel <= tol:
        raise SystemExit(
            f"AutoAWQ's call of decoder block 0 (kwargs {sorted(kwargs)}) gives an output {rel:.2e} (relative) "
            f"away from block 0's output in transformers' own forward (tolerance {tol:g}): its captured "
            "layer arguments do not fit this transformers version, so its calibration would be wrong"
        )
    return result


def _loadable_by_this_transformers(model_dir: Path, transformers_version: str) -> Path:
    """`model_dir`, or a stand-in for it that transformers < 5 can read.

    AutoAWQ was last tested with transformers 4.51, which is where this script is best run. A directory
    written by transformers 5 (qserve's `pull` output, for one) keeps RoPE's base in `rope_parameters`,
    which 4.x does not read (it would silently use 10000 instead of SmolLM2's 100000), and names its
    tokenizer class `TokenizersBackend`, which 4.x does not know. The stand-in is a temporary directory of
    links to the same files, with `rope_theta` and `PreTrainedTokenizerFast` written in; the weights are
    the same files.
    """
    if int(transformers_version.split(".")[0]) >= 5:
        return model_dir
    config = json.loads((model_dir / "config.json").read_text())
    tok_path = model_dir / "tokenizer_config.json"
    tok = json.loads(tok_path.read_text()) if tok_path.is_file() else None
    rope = config.get("rope_parameters")
    fix_rope = isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in config
    fix_tok = tok is not None and tok.get("tokenizer_class") == "TokenizersBackend"
    if not (fix_rope or fix_tok):
        return model_dir
    shadow = Path(tempfile.mkdtemp(prefix="autoawq-model-"))
    for f in model_dir.iterdir():
        (shadow / f.name).symlink_to(f.resolve())
    if fix_rope:
        config["rope_theta"] = rope["rope_theta"]
        if "dtype" in config and "torch_dtype" not in config:
            config["torch_dtype"] = config["dtype"]
        (shadow / "config.json").unlink()
        (shadow / "config.json").write_text(json.dumps(config, indent=2))
    if fix_tok:
        tok["tokenizer_class"] = "PreTrainedTokenizerFast"
        tok.pop("backend", None)
        template = model_dir / "chat_template.jinja"
        if template.is_file() and "chat_template" not in tok:
            tok["chat_template"] = template.read_text()
        (shadow / "tokenizer_config.json").unlink()
        (shadow / "tokenizer_config.json").write_text(json.dumps(tok, indent=2))
    return shadow


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="HF safetensors model directory or an embedded name (smollm2-135m)")
    ap.add_argument("--output", required=True, help="checkpoint directory; the report is written into it")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--calib", default="c4", help="qserve calibration source (preset, text file, ...)")
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    t_start = time.perf_counter()
    # The comparison is on this CPU: AutoAWQ's quantize() sends each block to "cuda:i" whenever torch
    # sees a GPU, before it asks get_best_device().
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch
    import transformers
    from transformers import AutoTokenizer

    from qserve.calib_data import get_calib_samples
    from qserve.hub import resolve_model
    from qserve.quantize.report import peak_rss_bytes

    torch.set_num_threads(args.threads)
    received: list = []
    awq = _import_autoawq(received)

    model_dir = resolve_model(args.model, progress=False)
    load_dir = _loadable_by_this_transformers(Path(model_dir), transformers.__version__)
    output = Path(args.output).expanduser()
    # Made (or refused) now, not after hours of calibration.
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(
            f"--output {output}: cannot create it ({e.strerror}); choose a writable directory"
        ) from e
    dtype = getattr(torch, args.dtype)
    quant_config = {"w_bit": 4, "q_group_size": args.group_size, "zero_point": True, "version": "GEMM"}

    # From here on is what qserve's quantize_seconds covers: calibration data, load, quantize, write.
    t_work = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(load_dir)
    rows = get_calib_samples(args.calib, tokenizer, args.n_samples, args.seqlen, args.seed, mode="concat")
    model = awq.AutoAWQForCausalLM.from_pretrained(
        str(load_dir), torch_dtype=dtype, device_map={"": "cpu"}, safetensors=True
    )
    check: dict = {}
    quantizer_cls = _checked_quantizer(importlib.import_module("awq.quantize.quantizer").AwqQuantizer, check)
    t_q = time.perf_counter()
    model.quantize(
        tokenizer,
        quant_config=quant_config,
        calib_data=rows.tolist(),  # list of lists of python ints: AutoAWQ's "tokenized" input
        duo_scaling=True,
        apply_clip=True,
        max_calib_samples=args.n_samples,
        max_calib_seq_len=args.seqlen,
        quantizer_cls=quantizer_cls,
    )
    quantize_call_seconds = time.perf_counter() - t_q - check["block0_check_seconds"]
    model.save_quantized(str(output))
    tokenizer.save_pretrained(output)
    quantize_seconds = time.perf_counter() - t_work - check["block0_check_seconds"]
    peak = peak_rss_bytes()  # this process image's own high-water mark, as in quant_report.json

    got = torch.cat(received, dim=0) if received else torch.empty(0, dtype=torch.long)
    identical = got.shape == rows.shape and torch.equal(got, rows)
    report = {
        "tool": "autoawq",
        "autoawq_version": awq.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "model": str(model_dir),
        "model_loaded_from": str(load_dir),  # a stand-in with 4.x-readable config (same weights), or model
        "output": str(output),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "dtype": args.dtype,
        "quant_config": quant_config,
        "settings": {
            "group_size": args.group_size,
            "calib": args.calib,
            "calib_mode": "concat",
            "n_samples": args.n_samples,
            "seqlen": args.seqlen,
            "seed": args.seed,
            "duo_scaling": True,
            "apply_clip": True,
            "n_grid": 20,  # fixed inside AutoAWQ's _compute_best_scale
            "threads": args.threads,
        },
        "calib_blocks": list(got.shape),
        "calib_blocks_identical": identical,
        **check,
        "quantize_call_seconds": quantize_call_seconds,
        "quantize_seconds": quantize_seconds,
        "wall_seconds": time.perf_counter() - t_start,
        "peak_rss_bytes": peak,
    }
    (output / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    if not identical:
        raise SystemExit(
            f"AutoAWQ quantized with calibration blocks {tuple(got.shape)} that differ from qserve's rows "
            f"{tuple(rows.shape)}; the report in {output / REPORT_FILE} records it"
        )
    print(
        f"AutoAWQ {awq.__version__} ({args.dtype}): quantize() {quantize_call_seconds:.1f} s, "
        f"load+quantize+save {quantize_seconds:.1f} s, peak RSS {peak / 1024**3:.2f} GiB -> {output}"
    )


if __name__ == "__main__":
    main()
