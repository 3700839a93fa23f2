"""AutoAWQ 0.2.9, the reader the AWQ-GEMM layout comes from, loads qserve's AWQ checkpoints unchanged.

Its code shares nothing with `qserve.kernels.packing`, so agreement here catches a packing, naming or
metadata bug that a round trip through qserve's own unpack would hide. The checkpoint goes through AutoAWQ's
own `from_quantized` (its config reader, its WQLinear_GEMM layers and its accelerate-based weight load),
then every layer is dequantized with AutoAWQ's `dequantize_gemm` and run through WQLinear_GEMM's forward.

AutoAWQ is installed with `pip install --no-deps autoawq==0.2.9` (scripts/test.sh): its declared
`datasets` requirement would switch qserve's calibration presets to a Hub fallback, and the only module
that imports `datasets` is its calibration loader, which loading a checkpoint never calls.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from quant_helpers import make_model, quantize_tiny, read_tensors, write_calib_text
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from qserve.evaluate import load_causal_lm
from qserve.kernels.packing import dequantize_awq, rtn_quantize

if importlib.util.find_spec("awq") is None:
    pytest.skip(
        "AutoAWQ is not installed; `pip install --no-deps autoawq==0.2.9` (scripts/test.sh does) to run "
        "the independent-reader checks of qserve's AWQ checkpoints",
        allow_module_level=True,
    )

torch.set_num_threads(2)
# WQLinear_GEMM announces its torch path once per process; that path is the one under test here.
pytestmark = pytest.mark.filterwarnings("ignore:Using naive \\(slow\\) implementation:UserWarning")

# One AWQ calibration run (scales folded into the norms, clipped ranges) and one fast RTN run covering
# what the first does not: per-channel groups, q/k/v biases, an untied lm_head, a bf16 source model.
CASES = {
    # A 5-point scale grid: its size changes the values found, not the layout, and keeps the run short.
    "llama-awq-g32": dict(family="llama", method="awq", group_size=32, model={}, run=dict(n_grid=5)),
    "qwen2-rtn-per-channel": dict(
        family="qwen2",
        method="rtn",
        group_size=-1,
        model=dict(dtype="bfloat16", tie_word_embeddings=False),
        run={},
    ),
}


def _no_calibration(*_args, **_kwargs):
    raise RuntimeError("AutoAWQ calibration data is not available in this test (installed without datasets)")


@pytest.fixture(scope="module")
def autoawq():
    """AutoAWQ's package, imported as shipped, set up for a CPU without IPEX or a GPU."""
    with pytest.MonkeyPatch.context() as mp:
        if importlib.util.find_spec("datasets") is None:
            # awq/__init__ imports its quantizer, whose calibration loader imports `datasets` at module
            # level; stand in for that one module so everything the loader uses imports unchanged.
            stub = types.ModuleType("awq.utils.calib_data")
            stub.get_calib_dataset = _no_calibration
            mp.setitem(sys.modules, "awq.utils.calib_data", stub)
        # record=True keeps awq/__init__'s deprecation banner, and the global warning filter it installs
        # to show that banner, inside this block.
        with warnings.catch_warnings(record=True):
            awq = importlib.import_module("awq")
        base = importlib.import_module("awq.models.base")
        gemm = importlib.import_module("awq.modules.linear.gemm")
        # from_quantized sends every load on a "cpu" best device to the IPEX kernels
        # (intel_extension_for_pytorch pins its own torch); any other answer keeps the GEMM layers.
        mp.setattr(base, "get_best_device", lambda: "cpu-without-ipex")
        # Its Triton kernels need a GPU; with neither them nor awq_ext, WQLinear_GEMM takes its torch path.
        mp.setattr(gemm, "TRITON_AVAILABLE", False)
        yield types.SimpleNamespace(
            AutoAWQForCausalLM=awq.AutoAWQForCausalLM,
            AwqConfig=importlib.import_module("awq.models._config").AwqConfig,
            WQLinear_GEMM=gemm.WQLinear_GEMM,
            dequantize_gemm=importlib.import_module("awq.utils.packing_utils").dequantize_gemm,
        )


def _randomize_biases(model_dir: Path) -> None:
    """HF initialises biases to zero, which would let a dropped or misread bias pass unnoticed."""
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    gen = torch.Generator().manual_seed(1)
    for name, t in tensors.items():
        if name.endswith(".bias"):
            tensors[name] = (torch.randn(t.shape, generator=gen) * 0.1).to(t.dtype)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return write_calib_text(tmp_path_factory.mktemp("calib") / "calib.txt")


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory, calib):
    spec = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    source = make_model(root, spec["family"], **spec["model"])
    _randomize_biases(source)
    out = root / "awq-ckpt"
    quantize_tiny(
        source,
        out,
        calib,
        spec["method"],
        format="awq",
        group_size=spec["group_size"],
        seqlen=64,
        **spec["run"],
    )
    return types.SimpleNamespace(
        source=source, path=out, group_size=spec["group_size"], tensors=read_tensors(out)
    )


@pytest.fixture(scope="module")
def awq_model(case, autoawq):
    """The checkpoint as AutoAWQ's own loader builds it (fp16, its only AWQ-GEMM dtype)."""
    loaded = autoawq.AutoAWQForCausalLM.from_quantized(
        str(case.path), device_map={"": "cpu"}, fuse_layers=False, torch_dtype=torch.float16
    )
    return loaded.model


def _quantized_prefixes(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight"))


def _qserve_weight(case, prefix: str) -> torch.Tensor:
    t = case.tensors
    return dequantize_awq(
        t[f"{prefix}.qweight"], t[f"{prefix}.qzeros"], t[f"{prefix}.scales"], case.group_size
    )


def test_autoawq_reads_the_quantization_config(case, autoawq):
    cfg = autoawq.AwqConfig.from_pretrained(str(case.path))
    assert (cfg.quant_method, cfg.version, cfg.w_bit, cfg.zero_point) == ("awq", "gemm", 4, True)
    assert cfg.q_group_size == case.group_size


def test_every_quantized_linear_loads_into_a_gemm_layer_with_the_files_tensors(case, awq_model, autoawq):
    layers = {n: m for n, m in awq_model.named_modules() if isinstance(m, autoawq.WQLinear_GEMM)}
    prefixes = _quantized_prefixes(case.tensors)
    assert len(prefixes) == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    assert sorted(layers) == prefixes
    for prefix in prefixes:
        # A tensor the loader failed to match would keep from_linear's zero placeholder.
        buffers = dict(layers[prefix].named_buffers())
        expected = {
            k.removeprefix(prefix + "."): v for k, v in case.tensors.items() if k.startswith(prefix + ".")
        }
        assert sorted(buffers) == sorted(expected), prefix
        for name, value in expected.items():
            assert torch.equal(buffers[name], value), f"{prefix}.{name}"


def test_autoawq_dequantizes_every_linear_to_qserves_weights(case, awq_model, autoawq):
    for prefix in _quantized_prefixes(case.tensors):
        layer = awq_model.get_submodule(prefix)
        theirs = autoawq.dequantize_gemm(
            layer.qweight, layer.qzeros, layer.scales, layer.w_bit, layer.group_size
        )
        ours = _qserve_weight(case, prefix)  # [out, in] float32
        # AutoAWQ multiplies in fp16; (q - z) is a small integer, so s * (q - z) is exact in fp32 and one
        # fp16 rounding of it is exactly what fp16 multiplication gives.
        assert theirs.dtype == torch.float16 and theirs.shape == ours.t().shape, prefix
        assert torch.equal(theirs, ours.t().half()), prefix


def test_autoawq_gemm_forward_is_x_times_the_dequantized_weight(case, awq_model):
    gen = torch.Generator().manual_seed(0)
    for prefix in _quantized_prefixes(case.tensors):
        layer = awq_model.get_submodule(prefix)
        x = torch.randn(2, 5, layer.in_features, generator=gen).half()
        expected = x.float() @ _qserve_weight(case, prefix).t()
        bias = case.tensors.get(f"{prefix}.bias")
        if bias is not None:
            expected = expected + bias.float()
        out = layer(x)
        assert out.shape == (2, 5, layer.out_features)
        # fp16 inputs, weights and output: allow a few fp16 roundings of the largest output.
        torch.testing.assert_close(out.float(), expected, rtol=0, atol=4e-3 * expected.abs().max().item())


def test_whole_autoawq_model_gives_qserves_logits(case, awq_model):
    """Embeddings, norms (with AWQ's folded scales), the head and every layer all come through."""
    ids = torch.randint(3, awq_model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    ours_model = load_causal_lm(case.path, dtype="float32", device="cpu")
    with torch.no_grad():
        theirs = awq_model(ids).logits.float()
        ours = ours_model(ids).logits
    rel = ((theirs - ours).norm() / ours.norm()).item()
    assert rel < 1e-2, f"AutoAWQ's fp16 model differs from qserve's by {rel:.2e} (relative)"


@pytest.mark.parametrize("case", ["qwen2-rtn-per-channel"], indirect=True)
def test_autoawq_reads_the_rtn_weights_qserve_computed_from_the_source(case, awq_model, autoawq):
    """What AutoAWQ reconstructs is what qserve meant to store: true zero points, fp16 scales, in order."""
    source = load_file(case.source / "model.safetensors")
    for prefix in _quantized_prefixes(case.tensors):
        layer = awq_model.get_submodule(prefix)
        theirs = autoawq.dequantize_gemm(
            layer.qweight, layer.qzeros, layer.scales, layer.w_bit, layer.group_size
        )
        qw = rtn_quantize(source[f"{prefix}.weight"].float(), 4, case.group_size, sym=False)
        expected = dataclasses.replace(qw, scales=qw.scales.half()).dequantize()  # [out, in]
        assert torch.equal(theirs, expected.t().half()), prefix


def test_autoawq_model_stays_close_to_the_float_model(case, awq_model):
    """Agreement of two readers cannot see a field both read the same wrong way (a GPTQ-style z - 1
    zero point, say); distance from the unquantized model can: 4-bit error on these random tiny models is
    about 6% of the logits' norm, while a zero point off by one step gives over 30%."""
    ids = torch.randint(3, awq_model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    source = AutoModelForCausalLM.from_pretrained(case.source, dtype=torch.float32)
    with torch.no_grad():
        theirs = awq_model(ids).logits.float()
        reference = source(ids).logits
    rel = ((theirs - reference).norm() / reference.norm()).item()
    assert rel < 0.15, f"AutoAWQ's reading of the checkpoint is {rel:.0%} away from the float model"
