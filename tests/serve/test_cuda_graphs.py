"""Decode CUDA graphs (serve/cuda_graphs.py) driven on CPU: the persistent-buffer path with capture
replaced by a direct call must give the eager path's outputs; a failed capture falls back to eager."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_checkpoints import single_thread, varied_model  # noqa: F401  (autouse fixture)

from qserve.errors import ConfigError
from qserve.serve import cuda_graphs
from qserve.serve.cuda_graphs import DecodeGraphRunner, direct_capture, graph_buckets, warm_up_token_counts
from qserve.serve.loader import load_model
from qserve.serve.outputs import ScheduledChunk, SchedulerOutput
from qserve.serve.runner import ModelRunner
from qserve.serve.sampler import Sampler, SamplingState
from qserve.serve.sampling_params import SamplingParams
from qserve.serve.sequence import Sequence, StopCriteria

CPU = torch.device("cpu")
BLOCK = 4
MAX_LEN = 64


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = varied_model(tmp_path_factory.mktemp("graphs"), "llama", num_key_value_heads=2)
    return load_model(path, CPU, torch.float32, max_positions=MAX_LEN, validate=False).model


def test_buckets():
    assert graph_buckets(1) == [1]
    assert graph_buckets(6) == [1, 2, 4, 6]
    assert graph_buckets(8) == [1, 2, 4, 8]
    assert graph_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert graph_buckets(64)[-3:] == [48, 56, 64]


def test_warm_up_covers_every_autotune_bucket():
    assert warm_up_token_counts(2048, 256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert warm_up_token_counts(100, 256) == [1, 2, 4, 8, 16, 32, 64]


def _runner(model, num_blocks=40):
    return ModelRunner(model, num_blocks, BLOCK, CPU, torch.float32, Sampler(CPU))


def _out(chunks) -> SchedulerOutput:
    return SchedulerOutput(chunks=chunks, num_batched_tokens=sum(len(c.token_ids) for c in chunks))


def _prefill(runners, prompts, tables):
    chunks = tuple(ScheduledChunk(i, tuple(p), 0, tables[i], False) for i, p in enumerate(prompts))
    for r in runners:
        r.execute(_out(chunks), {})


def _graph_matches_eager(model, eager, graphed, block: int, tol: float, exact_tokens: bool) -> None:
    """Five sequences decode in bucket 8 (three padding rows) for three steps: the graph's hidden
    states match the eager forward's, padding writes no KV, and the runner's hook samples alike."""
    gen = torch.Generator().manual_seed(0)
    lengths = [3, 9, 5, 12, 1]
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    per_seq = -(-32 // block)  # 32 slots each
    tables = [tuple(range(per_seq * i, per_seq * (i + 1))) for i in range(len(prompts))]
    _prefill((eager, graphed), prompts, tables)
    for i, (k, _v) in enumerate(graphed.kv_caches):  # both caches hold the same prefill
        torch.testing.assert_close(k, eager.kv_caches[i][0], rtol=0, atol=0)
    seqs = [Sequence(i, p, StopCriteria(max_tokens=8, eos_token_ids=frozenset()), 0.0)
            for i, p in enumerate(prompts)]  # fmt: skip
    states = {s.seq_id: SamplingState(s, SamplingParams(temperature=0.0, max_tokens=8), None) for s in seqs}
    tokens = [p[-1] for p in prompts]
    for step in range(3):
        chunks = tuple(
            ScheduledChunk(i, (tokens[i],), len(prompts[i]) + step, tables[i], True) for i in range(len(prompts))
        )
        batch = eager._prepare(chunks)
        with torch.inference_mode():
            want = model(batch.input_ids, batch.positions, eager.kv_caches, batch.meta)
            got = graphed.graphs.run(batch.input_ids, batch.positions, batch.meta)
        assert got.shape[0] == 8  # the bucket
        torch.testing.assert_close(got[: len(prompts)].float(), want.float(), rtol=tol, atol=tol)
        for i, (k, v) in enumerate(graphed.kv_caches):  # padding rows wrote nothing
            torch.testing.assert_close(k.float(), eager.kv_caches[i][0].float(), rtol=tol, atol=tol)
            torch.testing.assert_close(v.float(), eager.kv_caches[i][1].float(), rtol=tol, atol=tol)
        ran_eager = eager.execute(_out(chunks), states)
        ran_graph = graphed.execute(_out(chunks), states)  # through the runner's hook
        if exact_tokens:
            assert ran_graph.sampled == ran_eager.sampled
        tokens = [ran_eager.sampled[i] for i in range(len(prompts))]


def test_graph_path_matches_eager_with_padding(tiny_model):
    eager, graphed = _runner(tiny_model), _runner(tiny_model)
    graphed.graphs = DecodeGraphRunner(tiny_model, graphed.kv_caches, BLOCK, 8, MAX_LEN, CPU, capture=direct_capture)
    assert graphed.graphs.capture_all() and graphed.graphs.enabled
    _graph_matches_eager(tiny_model, eager, graphed, BLOCK, 1e-5, exact_tokens=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_cuda_graphs_match_eager(tmp_path):
    """On a GPU: start-up warm-up and real capture through prepare_cuda, then the same comparison."""
    cuda = torch.device("cuda")
    path = varied_model(tmp_path / "m", "llama", num_key_value_heads=2)
    model = load_model(path, cuda, torch.float16, max_positions=MAX_LEN, validate=False).model
    eager = ModelRunner(model, 16, 16, cuda, torch.float16, Sampler(cuda))
    graphed = ModelRunner(model, 16, 16, cuda, torch.float16, Sampler(cuda))
    graphed.prepare_cuda(8, 256, MAX_LEN, enforce_eager=False)
    assert graphed.graphs is not None and graphed.graphs.buckets == [1, 2, 4, 8]
    for k, v in graphed.kv_caches:  # the warm-up wrote into the first blocks; in place, as graphs read them
        k.zero_()
        v.zero_()
    _graph_matches_eager(model, eager, graphed, 16, 2e-2, exact_tokens=False)
    eager_only = ModelRunner(model, 16, 16, cuda, torch.float16, Sampler(cuda))
    eager_only.prepare_cuda(8, 256, MAX_LEN, enforce_eager=True)
    assert eager_only.graphs is None


def test_runner_uses_graphs_only_for_decode_batches_that_fit(tiny_model):
    runner = _runner(tiny_model)
    runner.graphs = DecodeGraphRunner(tiny_model, runner.kv_caches, BLOCK, 2, MAX_LEN, CPU, capture=direct_capture)
    runner.graphs.capture_all()
    calls = []
    real_run = runner.graphs.run
    runner.graphs.run = lambda *a: calls.append(a[0].shape[0]) or real_run(*a)
    _prefill((runner,), [[1, 2, 3], [4, 5]], [(0, 1), (2, 3)])  # prefill: eager
    assert calls == []
    decode = lambda n: tuple(ScheduledChunk(i, (7,), 3, ((0, 1), (2, 3), (4, 5))[i], False) for i in range(n))
    runner.execute(_out(decode(2)), {})
    assert calls == [2]
    runner.execute(_out(decode(3)), {})  # above the largest bucket: eager
    assert calls == [2]


def test_failed_capture_warns_and_runs_eager(tiny_model, caplog):
    def broken(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    runner = _runner(tiny_model)
    graphs = DecodeGraphRunner(tiny_model, runner.kv_caches, BLOCK, 4, MAX_LEN, CPU, capture=broken)
    with caplog.at_level(logging.WARNING, logger="qserve.serve.cuda_graphs"):
        assert graphs.capture_all() is False
    assert not graphs.enabled
    assert "CUDA graph capture failed (RuntimeError: operation not permitted" in caplog.text
    assert not graphs.can_run((ScheduledChunk(0, (1,), 0, (0,), True),))


def test_prepare_cuda_is_a_no_op_on_cpu(tiny_model, monkeypatch):
    monkeypatch.setattr(cuda_graphs, "warm_up", lambda *a: pytest.fail("warm-up ran on CPU"))
    runner = _runner(tiny_model)
    runner.prepare_cuda(8, 256, MAX_LEN, enforce_eager=False)
    assert runner.graphs is None


def test_warm_up_runs_one_forward_per_row_count(tiny_model, monkeypatch):
    runner = _runner(tiny_model, num_blocks=8)  # 32 slots: the 64-token forward cannot fit
    seen = []
    real = runner.model.forward
    monkeypatch.setattr(runner.model, "forward", lambda ids, *a: seen.append(ids.shape[0]) or real(ids, *a))
    cuda_graphs.warm_up(runner, [1, 2, 4, 8, 16, 32, 64])
    assert seen == [1, 2, 4, 8, 16, 32]


def test_cuda_block_size_is_refused_before_any_kernel_runs(tiny_model):
    with pytest.raises(ConfigError, match="block_size=24 is not supported on CUDA"):
        ModelRunner(tiny_model, 4, 24, torch.device("cuda"), torch.float16, Sampler(CPU))


def test_runner_passes_the_longest_chunk_to_attention(tiny_model):
    runner = _runner(tiny_model)
    batch = runner._prepare((ScheduledChunk(0, (1, 2, 3), 0, (0,), True), ScheduledChunk(1, (4,), 5, (1, 2), True)))
    assert batch.meta.max_query_len == 3


def test_enforce_eager_reaches_the_runner(tmp_path, monkeypatch):
    from qserve import LLM
    from qserve.serve.runner import ModelRunner as Runner

    seen = []
    monkeypatch.setattr(Runner, "prepare_cuda", lambda self, *a: seen.append(a))
    llm = LLM(str(varied_model(tmp_path / "m", "llama")), device="cpu", max_num_seqs=4, enforce_eager=True)
    assert llm.engine.args.enforce_eager is True
    assert seen == [(4, 2048, llm.engine.max_model_len, True)]


def test_enforce_eager_flag_and_config_key(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from qserve.commands import serve as serve_cmd
    from qserve.serve.api.config import ServeConfig

    seen = []
    monkeypatch.setattr(serve_cmd, "run_server", seen.append)
    result = CliRunner().invoke(serve_cmd.serve, ["/m", "--enforce-eager"], catch_exceptions=True)
    assert result.exit_code == 0, result.output
    assert seen[-1].engine_args().enforce_eager is True
    CliRunner().invoke(serve_cmd.serve, ["/m"], catch_exceptions=True)
    assert seen[-1].engine_args().enforce_eager is False  # graphs by default, as in vLLM
    assert ServeConfig.from_dict({"model": "/m", "enforce_eager": True}).enforce_eager is True
    with pytest.raises(ConfigError, match="enforce_eager: expected true or false"):
        ServeConfig.from_dict({"model": "/m", "enforce_eager": "yes"})
