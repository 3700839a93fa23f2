"""bench/cpu_decode.py without llama.cpp: argument checks, the clear exits for a missing llama venv,
llama_cpp or GGUF, the per-run summary, and the JSON of a qserve-only run on a tiny model."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "cpu_decode.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_cpu_decode", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def fake_venv(root: Path, module_dir: Path | None = None) -> Path:
    """A venv-shaped directory whose bin/python is this interpreter (optionally with `module_dir` on its path)."""
    (root / "bin").mkdir(parents=True)
    python = root / "bin" / "python"
    path = f'PYTHONPATH="{module_dir}" ' if module_dir else ""
    python.write_text(f'#!/bin/sh\n{path}exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    return root


def test_arguments(bench, monkeypatch):
    monkeypatch.delenv("LLAMA_VENV", raising=False)
    args = bench.parse_args(["--model", "ckpt"])
    assert args.systems == ["packed", "dense", "llama"] and args.threads == 2 and args.max_tokens == 128
    assert args.dense == "smollm2-135m" and args.quant is None and args.repeats == 3
    assert args.llama_extra_bufts == "auto"
    assert args.llama_venv == BENCH.parents[2] / "llama-venv"
    monkeypatch.setenv("LLAMA_VENV", "/opt/lv")
    assert bench.parse_args(["--systems", "dense,llama"]).llama_venv == Path("/opt/lv")
    assert bench.parse_args(["--systems", "llama", "--llama-venv", "/x"]).llama_venv == Path("/x")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--systems", "packed,vllm", "--model", "m"], "unknown system 'vllm'"),
        (["--systems", "dense,dense"], "at most once"),
        (["--systems", ","], "--systems is empty"),
        (["--systems", "packed,llama"], "--model (a 4-bit checkpoint) is required"),
        (["--systems", "dense", "--quant", "Q4_0"], "--quant applies to llama.cpp"),
        (["--model", "m", "--max-tokens", "1"], "--max-tokens must be >= 2"),
        (["--model", "m", "--threads", "0"], "--threads must be >= 1"),
        (["--model", "m", "--llama-extra-bufts", "maybe"], "invalid choice: 'maybe'"),
    ],
)
def test_bad_arguments_are_named(bench, capsys, argv, message):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err


def test_missing_llama_venv_says_how_to_create_it(bench, tmp_path):
    venv = tmp_path / "no-venv"
    with pytest.raises(SystemExit) as exc:
        bench.main(["--systems", "dense,llama", "--llama-venv", str(venv), "--out", str(tmp_path / "r.json")])
    text = str(exc.value)
    assert "llama.cpp venv not found" in text and f"python3 -m venv {venv}" in text
    assert f"{venv}/bin/pip install llama-cpp-python" in text
    assert not (tmp_path / "r.json").exists()


def test_venv_without_llama_cpp(bench, tmp_path):
    if importlib.util.find_spec("llama_cpp") is not None:
        pytest.skip("llama_cpp is importable in the test interpreter")
    venv = fake_venv(tmp_path / "venv")
    with pytest.raises(SystemExit) as exc:
        bench.main(["--systems", "llama", "--llama-venv", str(venv)])
    assert "cannot import llama_cpp" in str(exc.value) and "pip install llama-cpp-python" in str(exc.value)


def test_missing_gguf_is_named(bench, tmp_path):
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "llama_cpp.py").write_text("__version__ = '0'\n")  # enough for the import probe
    venv = fake_venv(tmp_path / "venv", mods)
    gguf = tmp_path / "absent.gguf"
    with pytest.raises(SystemExit, match=r"GGUF not found: .*absent\.gguf; pass --gguf"):
        bench.main(["--systems", "llama", "--llama-venv", str(venv), "--gguf", str(gguf)])


def test_summarize_run(bench):
    prompts = [
        {"tokens": [1, 2, 3, 4], "prompt_s": 0.5, "decode_s": 1.0},
        {"tokens": [5, 6, 7, 8], "prompt_s": 0.25, "decode_s": 2.0},
    ]
    s = bench.summarize_run({"prompts": prompts}, 4)
    assert s == {"decode_tok_s": pytest.approx(6 / 3.0), "prompt_s": pytest.approx(0.75)}
    for p in prompts:
        p["perf"] = {"n_eval": 3, "t_eval_ms": 500.0, "t_p_eval_ms": 100.0, "n_p_eval": 9}
        p["cpu_s"] = 2.0
    s = bench.summarize_run({"prompts": prompts}, 4)
    assert s["tok_per_cpu_s"] == pytest.approx(8 / 4.0)
    assert s["llama_perf_decode_tok_s"] == pytest.approx(6.0)
    assert s["llama_perf_prompt_s"] == pytest.approx(0.2)
    with pytest.raises(SystemExit, match="produced 4 tokens, not --max-tokens 5"):
        bench.summarize_run({"prompts": prompts}, 5)  # a run that stopped early (EOS honoured) is refused


def test_qserve_only_run_writes_json(bench, tiny_llama_dir, tmp_path):
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog"]
    convs = [{"conversations": [{"from": "human", "value": " ".join(words[: 4 + i])}]} for i in range(4)]
    prompts = tmp_path / "sharegpt.json"
    prompts.write_text(json.dumps(convs))
    out = tmp_path / "res" / "r.json"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = bench.main(["--systems", "dense", "--dense", str(tiny_llama_dir), "--threads", "1", "--repeats", "1",
                         "--max-tokens", "5", "--num-prompts", "2", "--prompts", str(prompts), "--out", str(out)])  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["systems"] == ["dense"] and saved["ratios"] == {} and len(saved["runs"]["dense"]) == 1
    run = saved["runs"]["dense"][0]
    assert [p["prompt_tokens"] for p in run["prompts"]] == [p["tokens"] for p in saved["prompts"]]
    assert saved["prompts"][0]["text_start"] == "the quick brown fox"
    assert run["resident_weight_bytes"] > 0 and run["summary"]["decode_tok_s"] > 0
    assert run["summary"]["tok_per_cpu_s"] > 0 and (run["isa"] is not None) == run["cpu_ext"]
    assert saved["median"]["dense"]["decode_tok_s"] == run["summary"]["decode_tok_s"]
    assert saved["provenance"]["command"].startswith("python bench/cpu_decode.py --systems dense")
    assert "llama_cpp" not in saved and saved["max_tokens"] == 5


def test_a_crashing_llama_worker(bench, tmp_path):
    """A worker killed by llama.cpp (the AMX matmul's SIGSEGV) is None to the probe, a clear exit elsewhere."""
    python = tmp_path / "python"
    python.write_text('#!/bin/sh\necho "ggml: boom" >&2\nkill -SEGV $$\n')
    python.chmod(0o755)
    assert bench.call_llama(python, {"mode": "probe", "threads": 1}, check=False) is None
    with pytest.raises(SystemExit, match=r"llama.cpp worker \(decode\) failed, exit -11:\nggml: boom"):
        bench.call_llama(python, {"mode": "decode", "threads": 1})
