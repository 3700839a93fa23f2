"""scripts/gpu_check.sh refuses clearly, before installing anything, where there is no NVIDIA GPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="an NVIDIA GPU driver is present")
def test_refuses_without_a_gpu(tmp_path):
    env = {**os.environ, "QSERVE_VENV": str(tmp_path / "venv-must-not-be-created")}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          env=env, timeout=60)  # fmt: skip
    assert proc.returncode == 2
    assert "gpu_check: no NVIDIA GPU here" in proc.stderr
    assert not (tmp_path / "venv-must-not-be-created").exists()


def test_python_stage_runner_refuses_without_cuda():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py")], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "no CUDA GPU is visible to torch" in proc.stderr


def _gpu_check_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_script", REPO / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tp_stage_skips_with_fewer_than_two_devices(tmp_path):
    gc = _gpu_check_module()
    for count in (0, 1):
        st = gc.tp_stage("python", tmp_path, 128, count)
        assert st["status"] == "skipped" and st["exit"] is None
        assert st["note"].startswith(f"skipped: needs 2 CUDA devices (found {count})")
    assert not any(tmp_path.iterdir())  # nothing written, nothing run


def test_main_reports_tp_skipped_not_passed(tmp_path, monkeypatch, capsys):
    """The whole runner on one (pretended) GPU with every other stage skipped: the JSON records the tp
    stage as skipped with its reason, the table says it was not run, and no figure is invented."""
    torch = pytest.importorskip("torch")
    gc = _gpu_check_module()
    monkeypatch.setattr(gc, "gpu_or_exit", lambda: ("Pretend GPU", 90))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    out = tmp_path / "gpu_check.json"
    rc = gc.main(["--skip", "compile,tests,kernels,quantize,engine,structured,moe", "--out", str(out),
                  "--work", str(tmp_path / "work")])  # fmt: skip
    report = json.loads(out.read_text())
    assert list(report["stages"]) == ["tp"]
    assert report["stages"]["tp"]["status"] == "skipped"
    assert "needs 2 CUDA devices (found 1)" in report["stages"]["tp"]["note"]
    assert "tp" not in report["figures"]
    text = capsys.readouterr().out
    assert "skipped: needs 2 CUDA devices (found 1)" in text and "NOT RUN (skipped, not passed): tp" in text
    assert rc == 0  # no stage failed; the skip is reported, not counted as a pass


@pytest.mark.parametrize("argv, message", [
    (["--skip", "tp,bogus"], "unknown stage(s) bogus"),
    (["--max-tokens", "0"], "--max-tokens and --num-prompts must be >= 1"),
])  # fmt: skip
def test_bad_arguments_are_refused_before_anything_runs(argv, message, capsys):
    gc = _gpu_check_module()
    with pytest.raises(SystemExit) as exc:
        gc.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def _run(tokens, **speed):
    return {"tokens": tokens, **{f"{k}_tok_s": v for k, v in speed.items()}}


def test_tp_summary_ratio_and_tokens():
    gc = _gpu_check_module()
    tok = [[5] * 20, [6] * 20]
    ok = gc.tp_summary(_run(tok, batch1=50.0, batch16=600.0), _run(tok, batch1=85.0, batch16=1000.0))
    assert ok["passed"] and ok["greedy_all_equal"]
    assert ok["ratios"] == {"batch1": 1.7, "batch16": 1.667}
    slow = gc.tp_summary(_run(tok, batch1=50.0, batch16=600.0), _run(tok, batch1=70.0, batch16=1000.0))
    assert not slow["passed"] and slow["checks"] == {"batch16_ratio_ge_1.6": True, "batch1_ratio_ge_1.6": False,
                                                      "greedy_first_8_equal": True}  # fmt: skip
    late = [[5] * 20, [6] * 12 + [7] * 8]  # diverges after 12 tokens: reported, within the checked 8
    r = gc.tp_summary(_run(tok, batch1=50.0), _run(late, batch1=90.0))
    assert r["passed"] and not r["greedy_all_equal"] and r["common_prefix"] == [20, 12]
    early = [[5] * 20, [6] * 3 + [7] * 17]
    assert not gc.tp_summary(_run(tok, batch1=50.0), _run(early, batch1=90.0))["passed"]
    with pytest.raises(ValueError, match="batch16_tok_s is in the TP=1 run but not in the TP=2 run"):
        gc.tp_summary(_run(tok, batch1=1.0, batch16=1.0), _run(tok, batch1=1.0))


def test_tp_checkpoint_writer_tiny_on_cpu_tp1_equals_tp2(tmp_path):
    """The stage's checkpoint writer at a tiny size (several shards, a vocabulary larger than the
    tokenizer's) loads in transformers and in the engine, and the stage's per-configuration runner gives
    the same greedy tokens at TP=1 and TP=2 (gloo on CPU, float32)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    gc = _gpu_check_module()
    shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1024)  # fmt: skip
    ckpt = gc.write_random_llama(tmp_path / "ckpt", **shape, dtype="float32", shard_bytes=200_000)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((ckpt / f).exists() for f in files)
    assert files[0].endswith(f"-of-{len(files):05d}.safetensors")
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    assert hf.config.num_key_value_heads == 2 and hf.config.vocab_size == 1024
    assert sum(p.numel() for p in hf.parameters()) * 4 == index["metadata"]["total_size"]
    runs = {}
    for tp in (1, 2):
        out = tmp_path / f"tp{tp}.json"
        assert gc.tp_run(str(ckpt), tp, "cpu", "float32", True, 8, out, batches=(1, 4)) == 0
        runs[tp] = json.loads(out.read_text())
        assert runs[tp]["batch1_tok_s"] > 0 and len(runs[tp]["tokens"]) == 4
        assert all(len(t) == 8 for t in runs[tp]["tokens"])
    summary = gc.tp_summary(runs[1], runs[2])
    assert summary["greedy_all_equal"], summary["common_prefix"]
    assert set(summary["ratios"]) == {"batch1", "batch4"}


def test_tp_gptq_variant_tiny_on_cpu(tmp_path):
    """--tp-format gptq at a tiny size: the stage's RTN command quantizes the written checkpoint to the
    GPTQ layout, and the quantized model gives the same greedy tokens at TP=1 and TP=2 (gloo, CPU)."""
    pytest.importorskip("torch")
    gc = _gpu_check_module()
    src = gc.write_random_llama(tmp_path / "fp", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=128, vocab_size=512, dtype="float32")  # fmt: skip
    dst = tmp_path / "gptq"
    cmd = gc.tp_quantize_cmd(src, dst, 32, "cpu")
    cmd[0] = str(Path(sys.executable).parent / "qserve")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    runs = {}
    for tp in (1, 2):
        out = tmp_path / f"tp{tp}.json"
        assert gc.tp_run(str(dst), tp, "cpu", "float32", True, 6, out, batches=(1, 3)) == 0
        runs[tp] = json.loads(out.read_text())
    assert gc.tp_summary(runs[1], runs[2])["greedy_all_equal"]
