"""A killed run resumed with --resume gives the same checkpoint as an uninterrupted one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from quant_helpers import make_model, quantize_tiny, read_tensors, write_calib_text

from qserve.errors import ConfigError
from qserve.quantize import resume

torch.set_num_threads(1)  # tiny ops: a second thread only adds sync latency on a shared machine

# Runs `qserve quantize` in a child process that SIGKILLs itself right after block KILL_AFTER is
# committed: no test hook in the package, and nothing gets a chance to clean up.
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    torch.set_num_threads(int(sys.argv[2]))  # as the parent: reductions must split the same way
    from qserve.quantize import resume
    kill_after = int(sys.argv[1])
    real = resume.PartialState.commit_block
    def commit(self, index, *args, **kwargs):
        real(self, index, *args, **kwargs)
        if index == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    resume.PartialState.commit_block = commit
    from qserve.cli import main
    main(["quantize", *sys.argv[3:]])
    """
)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return write_calib_text(tmp_path_factory.mktemp("calib") / "calib.txt")


@pytest.fixture(scope="module")
def model4(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("models"), "llama", num_hidden_layers=4)


def _assert_same_tensors(a, b):
    ta, tb = read_tensors(a), read_tensors(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, different


@pytest.mark.parametrize(
    "sym, gptaq, awq_scales", [(True, False, False), (True, True, False), (True, False, True), (None, None, False)]
)
def test_sigkill_then_resume_is_bit_identical(tmp_path, model4, calib, sym, gptaq, awq_scales):
    """With --gptaq the float model's activations are saved and restored beside the quantized ones;
    with --awq-scales the folded norms of finished blocks come back from disk. Without grid flags
    (sym/gptaq None) the automatic grid (zero points + MSE + gptaq on this 64-wide model) resolves the
    same way in the resumed run."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    grid = {k: v for k, v in (("sym", sym), ("gptaq", gptaq)) if v is not None}
    flags = {**grid, "awq_scales": awq_scales, "n_grid": 4}
    quantize_tiny(model4, whole, calib, "gptq", desc_act=True, **flags)

    script = tmp_path / "child.py"
    script.write_text(CHILD)
    args = [
        str(model4),
        "-o",
        str(killed),
        "--method",
        "gptq",
        "--desc-act",
        "--group-size",
        "32",
        "--calib",
        str(calib),
    ]
    args += ["--n-samples", "4", "--seqlen", "32", "--device", "cpu", "--no-eval", "--quiet"]
    args += [] if sym is None else ["--sym" if sym else "--asym"]
    args += [] if gptaq is None else ["--gptaq" if gptaq else "--no-gptaq"]
    args += ["--awq-scales"] if awq_scales else []
    args += ["--n-grid", "4"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, str(script), "1", str(torch.get_num_threads()), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not killed.exists(), "a killed run must not leave a checkpoint that looks complete"
    assert json.loads((tmp_path / "killed.partial" / "progress.json").read_text()) == {"done": 2}

    report = quantize_tiny(model4, killed, calib, "gptq", desc_act=True, resume=True, **flags)
    assert report.resumed_from_block == 2
    assert [b["block"] for b in report.blocks] == [0, 1, 2, 3]
    _assert_same_tensors(whole, killed)
    assert not (tmp_path / "killed.partial").exists()
    # Logs of the blocks done before the kill come back from disk.
    assert report.blocks[0]["layers"][0]["layer"] == "self_attn.q_proj"
    if sym is None:
        assert (report.config["sym"], report.config["mse"], report.config["gptaq"]) == (False, True, True)


class _Crash(Exception):
    pass


def _crash_after(monkeypatch, block: int, before_progress: bool = False):
    """Make the run die right after (or in the middle of) committing `block`."""
    real_commit, real_json = resume.PartialState.commit_block, resume.PartialState._atomic_json

    def commit(self, index, *args, **kwargs):
        real_commit(self, index, *args, **kwargs)
        if index == block:
            raise _Crash

    def atomic_json(path, data):
        if path.name == "progress.json" and data == {"done": block + 1}:
            raise _Crash  # the block's files are on disk but it was never marked done
        real_json(path, data)

    if before_progress:
        monkeypatch.setattr(resume.PartialState, "_atomic_json", staticmethod(atomic_json))
    else:
        monkeypatch.setattr(resume.PartialState, "commit_block", commit)


@pytest.mark.parametrize("before_progress", [False, True])
def test_awq_resume_after_crash_is_bit_identical(tmp_path, model4, calib, monkeypatch, before_progress):
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    quantize_tiny(model4, whole, calib, "awq", n_grid=5)
    with monkeypatch.context() as m:
        _crash_after(m, block=2, before_progress=before_progress)
        with pytest.raises(_Crash):
            quantize_tiny(model4, crashed, calib, "awq", n_grid=5)
    # The saved search is plain data that rebuilds the algorithm's result object.
    from qserve.quantize.awq import AwqBlockResult

    state = resume.PartialState(tmp_path / "crashed.partial")
    record = state.block_record(1)
    search = AwqBlockResult.from_state_dict(
        {**state.block_extra(1), "meta": {**record["search"], "log": record["layers"]}}
    )
    assert search.scales[0].prev_op == "input_layernorm" and search.clips
    report = quantize_tiny(model4, crashed, calib, "awq", n_grid=5, resume=True)
    assert report.resumed_from_block == (2 if before_progress else 3)
    _assert_same_tensors(whole, crashed)


def test_resume_with_different_settings_is_refused(tmp_path, model4, calib, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _crash_after(m, block=0)
        with pytest.raises(_Crash):
            quantize_tiny(model4, out, calib, "gptq")
    with pytest.raises(ConfigError, match=r"calibration tokens differ.*seed: saved 0, now 1"):
        quantize_tiny(model4, out, calib, "gptq", seed=1, resume=True)
    with pytest.raises(ConfigError, match=r"damp: saved 0\.01, now 0\.02"):
        quantize_tiny(model4, out, calib, "gptq", damp=0.02, resume=True)
    with pytest.raises(ConfigError, match="pass --resume to continue"):
        quantize_tiny(model4, out, calib, "gptq")
    assert (tmp_path / "out.partial" / "block_0000.safetensors").exists(), "refusals keep the saved state"


def test_resume_without_saved_state_starts_from_block_zero(tmp_path, model4, calib):
    report = quantize_tiny(model4, tmp_path / "out", calib, "rtn", resume=True)
    assert report.resumed_from_block == 0 and len(report.blocks) == 4


def test_changed_model_weights_change_the_fingerprint(tmp_path, calib):
    from safetensors.torch import load_file, save_file

    src = make_model(tmp_path, "llama")
    out = tmp_path / "out"
    from qserve.quantize.config import QuantConfig
    from qserve.quantize.lazy_model import LazyCheckpoint

    cfg = QuantConfig(model=str(src), output=str(out), method="rtn")
    before = resume.fingerprint(src, LazyCheckpoint(src), None, cfg)
    tensors = load_file(src / "model.safetensors")
    tensors["model.embed_tokens.weight"][0, 0] += 1.0
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    after = resume.fingerprint(src, LazyCheckpoint(src), None, cfg)
    assert before["model_files"] != after["model_files"] and before["config"] == after["config"]
