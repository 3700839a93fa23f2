"""Tensor parallelism on CPU (gloo, two processes): N=2 greedy tokens equal N=1, refusals, dead workers.

Each N=2 engine starts one worker interpreter (a few seconds on a loaded machine); the models are the
tiny random Llamas of tiny_checkpoints (4 heads, 2 KV heads, intermediate 128, head_dim 16), and its tiny
Mixtral and Qwen2-MoE (8 experts of intermediate 64, top-2; Qwen2-MoE with a shared expert of 128).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
import torch
from tiny_checkpoints import (
    quantize_checkpoint,
    single_thread,  # noqa: F401  (autouse fixture: one torch thread)
    varied_model,
)

from qserve.errors import ConfigError
from qserve.kernels import packing
from qserve.serve import tensor_parallel
from qserve.serve.llm import LLM
from qserve.serve.loader import QuantSpec
from qserve.serve.model import ModelConfig
from qserve.serve.quant_linear import CpuQuantLinear, DenseLinear, PackedLinear
from qserve.serve.sampling_params import SamplingParams
from qserve.serve.tensor_parallel import RowParallelLinear, TensorParallelError
from qserve.testing import wait_until_healthy

PREFIX = "A paged key-value cache stores attention state in fixed-size blocks. "
PROMPTS = [
    PREFIX + "The quick brown fox",
    "The capital of France is",
    PREFIX + "Quantization maps weights to a few bits",  # shares PREFIX's blocks: prefix-cache hits
    "0123",
    "Héllo wörld, naïve café",
]
# 2 layers x (K, V) x 4 slots x 2 kv heads x 16 dims x 4 bytes: one block of the whole tiny model;
# a rank of N holds 2 / N of the KV heads (at least one), so the same number of blocks costs less.
BLOCK_BYTES = 2 * 2 * 4 * 2 * 16 * 4
NUM_BLOCKS = 24  # too few for the batch: preemption is forced


@pytest.fixture(autouse=True)
def exact_activations(monkeypatch):
    # N=1 and N=2 must agree token for token: keep the CPU kernels' fp32 activations (the int8 decode
    # path, a per-row quantization of the input, moves each rank's partial sums differently)
    monkeypatch.setenv("QSERVE_CPU_ACT_INT8", "0")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return varied_model(tmp_path_factory.mktemp("llama") / "m", "llama")


def tp_llm(model_dir, n: int, kv_heads: int = 2, **kwargs) -> LLM:
    per_rank_block = BLOCK_BYTES * max(kv_heads // n, 1) // 2  # BLOCK_BYTES holds 2 KV heads
    kwargs = {"max_model_len": 96, "max_num_seqs": 8, "max_num_batched_tokens": 16, "block_size": 4,
              "kv_cache_memory": NUM_BLOCKS * per_rank_block, "validate": False, "tensor_parallel_size": n,
              **kwargs}  # fmt: skip
    return LLM(str(model_dir), **kwargs)


def greedy(max_tokens: int = 20) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def worker_pids(llm: LLM) -> list[int]:
    return [p.pid for p in llm.engine.executor._workers.procs]


def wait_gone(pids: list[int], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by a parent that is not us) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(llm: LLM) -> list[list[int]]:
    outs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0, "the cache was meant to be too small for the batch"
    assert stats.prefix_cache_hits > 0, "the shared prefix was meant to be found in the prefix cache"
    assert stats.num_running == stats.num_waiting == 0 and stats.kv_cache_usage == 0.0
    return [o.outputs[0].token_ids for o in outs]


def assert_tp_matches_single(model_dir, kv_heads: int = 2) -> LLM:
    with tp_llm(model_dir, 1, kv_heads) as one:
        expected = run(one)
        assert one.engine.executor is None  # N=1: today's path, no worker
    assert all(len(set(t)) > 3 for t in expected), "degenerate tokens: the test would prove little"
    two = tp_llm(model_dir, 2, kv_heads)
    assert two.engine.kv_cache_tokens == NUM_BLOCKS * 4  # same blocks, each rank holding its own heads
    assert run(two) == expected
    return two


# ---- end to end: N=2 equals N=1 ----------------------------------------------------------------------


def test_dense_two_ranks_match_one_and_workers_stop_on_close(llama):
    llm = assert_tp_matches_single(llama)
    model = llm.engine.runner.model
    assert model.config.num_heads == 2 and model.config.num_kv_heads == 1  # this rank's share
    key_cache = llm.engine.runner.kv_caches[0][0]
    assert key_cache.shape[2] == 1  # the KV cache holds this rank's KV head only
    rows = [m for m in model.modules() if isinstance(m, RowParallelLinear)]
    assert len(rows) == 4  # o_proj and down_proj of both layers
    assert torch.get_num_threads() == 1
    pids = worker_pids(llm)
    assert len(pids) == 1 and _alive(pids[0])
    llm.close()
    assert wait_gone(pids, 10)
    with pytest.raises(TensorParallelError):
        llm.generate(["again"], greedy(4), use_tqdm=False)


def test_replicated_kv_heads_and_garbage_collection(tmp_path):
    # one KV head for two ranks: each rank keeps a copy of it
    model_dir = varied_model(tmp_path / "mqa", "llama", num_key_value_heads=1)
    llm = assert_tp_matches_single(model_dir, kv_heads=1)
    assert llm.engine.runner.kv_caches[0][0].shape[2] == 1
    pids = worker_pids(llm)
    del llm
    gc.collect()
    assert wait_gone(pids, 10), "a garbage-collected engine must stop its workers"


@pytest.mark.parametrize(("method", "act_order"), [("gptq", True), ("awq", False), ("gptq", False)])
def test_quantized_two_ranks_match_one(tmp_path, llama, method, act_order):
    qdir, _ = quantize_checkpoint(llama, tmp_path / "q", method, act_order=act_order)
    llm = assert_tp_matches_single(qdir)
    model = llm.engine.runner.model
    column = [m.self_attn.qkv_proj for m in model.layers] + [m.mlp.gate_up_proj for m in model.layers]
    rows = [m.inner for m in model.modules() if isinstance(m, RowParallelLinear)]
    if all(isinstance(m, CpuQuantLinear) for m in column):  # the C++ kernels are built here
        # down_proj shards hold whole act-order groups and stay 4-bit; an act-order o_proj shard (its
        # heads' inputs: part of every group) runs dequantized on the CPU
        o_rows = [m.self_attn.o_proj.inner for m in model.layers]
        down_rows = [m.mlp.down_proj.inner for m in model.layers]
        assert all(isinstance(m, CpuQuantLinear) for m in down_rows)
        assert all(isinstance(m, DenseLinear if act_order else CpuQuantLinear) for m in o_rows)
    assert len(rows) == 4
    llm.close()


def assert_moe_sharded(llm: LLM, experts: int, expert_size: int, shared_size: int = 0) -> None:
    """Every layer's MoE block is the all-reduced one; its experts hold half their intermediate channels
    and reduce nothing themselves (o_proj is the only other row-parallel Linear)."""
    model = llm.engine.runner.model
    for layer in model.layers:
        moe = layer.mlp
        assert isinstance(moe, tensor_parallel.ParallelSparseMoE)
        assert moe.gate.weight.shape == (experts, 64)  # the router is whole on every rank
        mlps = [*moe.experts, *([moe.shared_expert] if shared_size else [])]
        sizes = [expert_size] * experts + ([shared_size] if shared_size else [])
        for mlp, size in zip(mlps, sizes, strict=True):
            assert not isinstance(mlp.down_proj, RowParallelLinear)
            x = torch.randn(3, 64)
            assert mlp.gate_up_proj(x).shape == (3, size)  # gate|up: 2 x size / 2 channels
            assert mlp.down_proj(torch.randn(3, size // 2)).shape == (3, 64)
    rows = [m for m in model.modules() if isinstance(m, RowParallelLinear)]
    assert len(rows) == 2  # o_proj of both layers


def test_mixtral_two_ranks_match_one(tmp_path):
    model_dir = varied_model(tmp_path / "mixtral", "mixtral")  # 8 experts of intermediate 64, top-2
    llm = assert_tp_matches_single(model_dir)
    assert_moe_sharded(llm, experts=8, expert_size=64)
    llm.close()


def test_quantized_moe_with_a_shared_expert_two_ranks_match_one(tmp_path):
    # Qwen2-MoE: 8 routed experts of intermediate 64 and a shared expert of 128, GPTQ act-order with
    # group 32: each rank keeps one whole group of every expert's down_proj (two of the shared one's four)
    src = varied_model(tmp_path / "qwen2_moe", "qwen2_moe")
    qdir, _ = quantize_checkpoint(src, tmp_path / "q", "gptq", act_order=True)
    llm = assert_tp_matches_single(qdir)
    assert_moe_sharded(llm, experts=8, expert_size=64, shared_size=128)
    downs = [m.down_proj for layer in llm.engine.runner.model.layers for m in layer.mlp.experts]
    if all(isinstance(m, CpuQuantLinear) for m in downs):  # the C++ kernels are built here: still 4-bit
        assert all(isinstance(layer.mlp.shared_expert.down_proj, CpuQuantLinear)
                   for layer in llm.engine.runner.model.layers)  # fmt: skip
    llm.close()


# ---- refusals --------------------------------------------------------------------------------------------


def test_heads_that_do_not_divide_are_refused(llama):
    with pytest.raises(ConfigError, match=r"self_attn: 4 attention heads / 2 KV heads .* values for this model: 1, 2, 4"):
        tp_llm(llama, 3)


def test_group_size_that_does_not_divide_is_refused(tmp_path, llama):
    qdir, _ = quantize_checkpoint(llama, tmp_path / "q", "awq", group_size=64)
    # o_proj has 64 inputs: 32 per rank is half a group
    with pytest.raises(ConfigError, match=r"self_attn.o_proj: .*not a whole number of quantization groups "
                                          r"\(group_size=64\).* values for this model: 1$"):  # fmt: skip
        tp_llm(qdir, 2)


def test_expert_intermediate_size_that_does_not_divide_is_refused():
    base = {"vocab_size": 32, "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_experts_per_tok": 2}  # fmt: skip
    mixtral = ModelConfig.from_hf({**base, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                                   "intermediate_size": 6, "num_local_experts": 4})  # fmt: skip
    tensor_parallel.check_shardable(mixtral, None, 2)  # 3 channels of each expert per rank
    with pytest.raises(ConfigError, match=r"^tensor_parallel_size=4: mlp.experts \(gate/up/down of each of the 4 "
                                          r"experts\): intermediate_size=6 does not divide by 4; valid "
                                          r"tensor_parallel_size values for this model: 1, 2$"):  # fmt: skip
        tensor_parallel.check_shardable(mixtral, None, 4)
    qwen2_moe = ModelConfig.from_hf({**base, "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
                                     "intermediate_size": 128, "num_experts": 4, "moe_intermediate_size": 8,
                                     "shared_expert_intermediate_size": 6})  # fmt: skip
    with pytest.raises(ConfigError, match=r"mlp.shared_expert \(gate/up/down\): intermediate_size=6 does not "
                                          r"divide by 4; valid tensor_parallel_size values for this model: 1, 2$"):  # fmt: skip
        tensor_parallel.check_shardable(qwen2_moe, None, 4)
    # packed: 32 / 2 = 16 inputs per rank of each expert's down_proj is half a group of 32
    with pytest.raises(ConfigError, match=r"mlp.experts .*down_proj's 32 input features split into 16 per rank, "
                                          r"which is not a whole number of quantization groups \(group_size=32\); "
                                          r"valid tensor_parallel_size values for this model: 1$"):  # fmt: skip
        tensor_parallel.check_shardable(dataclasses.replace(mixtral, intermediate_size=32,
                                                            expert_intermediate_size=32),
                                        QuantSpec("awq", 4, 32, "gptq", False), 2)  # fmt: skip


# ---- the shards are exact -------------------------------------------------------------------------------


def _random_packed(method: str, fmt: str, sym: bool, act_order: bool, out_f=96, in_f=128, gs=32):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(out_f, in_f, generator=gen)
    perm = torch.randperm(in_f, generator=gen) if act_order else torch.arange(in_f)
    qw = packing.rtn_quantize(w[:, perm], bits=4, group_size=gs, sym=sym)
    inverse = torch.argsort(perm)
    qw = packing.QuantizedWeight(qw.intweight[:, inverse], qw.scales.half().float(), qw.zeros, qw.g_idx[inverse], 4, gs)
    spec = QuantSpec(method, 4, gs, fmt, act_order)
    if method == "awq":
        p = packing.pack_awq(qw)
        part = PackedLinear(p.qweight, p.qzeros, p.scales, None)
    else:
        p = packing.pack_gptq(qw, fmt)
        part = PackedLinear(p.qweight, p.qzeros, p.scales, p.g_idx)
    return part, spec


@pytest.mark.parametrize(
    ("method", "fmt", "sym", "act_order"),
    [("gptq", "gptq", True, False), ("gptq", "gptq", False, True), ("gptq", "gptq_v2", False, True),
     ("gptq", "gptq_v2", True, False), ("awq", "gptq", False, False)],
)  # fmt: skip
def test_packed_shards_dequantize_to_the_slices_of_the_whole(method, fmt, sym, act_order):
    part, spec = _random_packed(method, fmt, sym, act_order)
    whole = part.dequantize(spec)  # [96, 128]
    cfg = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32,
                               "hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 1,
                               "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16})  # fmt: skip
    for rank in range(2):
        # row-parallel (down_proj: the intermediate's inputs [64 r, 64 r + 64))
        (row,), _ = tensor_parallel.shard_linear("down", [part], [None], cfg, spec, rank, 2)
        assert torch.equal(row.dequantize(spec), whole[:, 64 * rank : 64 * rank + 64])
        # column-parallel, fused gate|up of 2 x 48 outputs is not this cfg; use q|k|v parts instead
        q, k, v = part, part, part
        cfg_qkv = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                       "vocab_size": 32, "hidden_size": 128, "intermediate_size": 64,
                                       "num_hidden_layers": 1, "num_attention_heads": 6,
                                       "num_key_value_heads": 6, "head_dim": 16})  # fmt: skip
        parts, _ = tensor_parallel.shard_linear("qkv", [q, k, v], [None] * 3, cfg_qkv, spec, rank, 2)
        for shard in parts:
            assert torch.equal(shard.dequantize(spec), whole[48 * rank : 48 * rank + 48])


def test_act_order_mlp_shards_hold_whole_groups_and_sum_to_the_whole_mlp():
    gen = torch.Generator().manual_seed(5)
    down, spec = _random_packed("gptq", "gptq", False, True, out_f=32, in_f=128, gs=32)  # 4 groups
    gate, up = torch.randn(128, 32, generator=gen), torch.randn(128, 32, generator=gen)
    cfg = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32,
                               "hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 1,
                               "num_attention_heads": 2, "num_key_value_heads": 2})  # fmt: skip
    x = torch.randn(5, 32, generator=gen)
    whole = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.dequantize(spec).T
    total = torch.zeros_like(whole)
    for rank in range(2):
        channels = tensor_parallel.mlp_channels(down, rank, 2)
        assert channels is not None and channels.numel() == 64
        (g, u), _ = tensor_parallel.shard_linear("gate_up", [gate, up], [None, None], cfg, spec, rank, 2, channels)
        (d,), _ = tensor_parallel.shard_linear("down", [down], [None], cfg, spec, rank, 2, channels)
        assert d.scales.shape[0] == 2  # exactly two whole groups of the four
        total += (torch.nn.functional.silu(x @ g.T) * (x @ u.T)) @ d.dequantize(spec).T
    torch.testing.assert_close(total, whole, rtol=1e-5, atol=1e-4)


# ---- a worker that dies -----------------------------------------------------------------------------------


def test_killed_worker_fails_generation_within_seconds(llama):
    llm = tp_llm(llama, 2, max_model_len=256, max_num_batched_tokens=64, kv_cache_memory=256 * BLOCK_BYTES // 2)
    llm.generate(PROMPTS[:2], greedy(4), use_tqdm=False)  # healthy first
    pid = worker_pids(llm)[0]
    threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
    start = time.monotonic()
    with pytest.raises(TensorParallelError, match=rf"worker rank 1 \(pid {pid}\) was killed by SIGKILL"):
        llm.generate(PROMPTS * 4, greedy(90), use_tqdm=False)  # still running when the kill lands
    assert time.monotonic() - start < 8.0
    with pytest.raises(TensorParallelError):  # the engine stays failed
        llm.engine.check_health()
    llm.close()


def test_worker_failing_to_load_fails_the_engine_promptly(tmp_path, llama, monkeypatch):
    # The worker (a fresh interpreter) imports this sitecustomize, which makes its load_model fail;
    # rank 0, already running, loads normally and must not wait for a worker that will never report.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import qserve.serve.loader as loader\n"
        "def load_model(*args, **kwargs):\n"
        "    raise OSError('model.safetensors: permission denied')\n"
        "loader.load_model = load_model\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    start = time.monotonic()
    with pytest.raises(TensorParallelError, match=r"^tensor-parallel worker rank 1 failed to start: OSError: "
                                                  r"model.safetensors: permission denied"):  # fmt: skip
        tp_llm(llama, 2)
    assert time.monotonic() - start < 60  # the worker's start (seconds on a loaded machine), not a timeout
    workers = [c for c in _children() if "qserve.serve.tp_worker" in c[1]]
    assert not workers, f"the failed engine left its workers running: {workers}"


def _children() -> list[tuple[int, str]]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == os.getpid() and fields[0] != "Z":
                out.append((int(stat.parent.name), (stat.parent / "cmdline").read_text().replace("\0", " ")))
        except (OSError, ValueError, IndexError):
            pass
    return out


# ---- qserve serve --tensor-parallel-size 2 ---------------------------------------------------------------


def test_qserve_serve_with_two_ranks_answers_the_openai_client_and_exits_when_a_worker_dies(llama):
    with tp_llm(llama, 1) as one:
        expected = one.generate(["The capital of France is"], greedy(12), use_tqdm=False)[0].outputs[0].text
    port = free_port()
    cmd = [sys.executable, "-m", "qserve.cli", "serve", str(llama), "--port", str(port), "--served-model-name",
           "tiny", "--tensor-parallel-size", "2", "--kv-cache-memory", "1MiB", "--max-model-len", "256",
           "--log-level", "info"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QSERVE_CPU_ACT_INT8": "0"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(proc, url, 180, lambda: "".join(lines))
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        out = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=12,
                                        temperature=0.0, extra_body={"ignore_eos": True})  # fmt: skip
        assert out.choices[0].text == expected
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=5, temperature=0.0)  # fmt: skip
        assert chat.choices[0].message.content is not None
        found = re.search(r"tensor parallel: 2 ranks \(workers (\d+)\)", "".join(lines))
        assert found, "".join(lines)
        worker = int(found.group(1))
        assert _alive(worker)
        os.kill(worker, signal.SIGKILL)
        start = time.monotonic()
        try:  # never a hang: 503 (engine dead), or the connection refused once the server has stopped
            client.with_options(timeout=10).completions.create(model="tiny", prompt="again", max_tokens=4)
            pytest.fail("a request after the worker died was answered")
        except openai.APIStatusError as exc:
            assert exc.status_code == 503
        except openai.APIConnectionError:
            pass
        assert proc.wait(15) != 0, "qserve serve must exit non-zero when a worker dies"
        assert time.monotonic() - start < 15
        assert "worker rank 1" in "".join(lines) and "SIGKILL" in "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
