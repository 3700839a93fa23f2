"""The engine end to end on tiny random models: exactness against transformers, stops, n > 1, logprobs."""

from __future__ import annotations

import asyncio
import json
import shutil
from functools import cache

import pytest
import torch
from tiny_checkpoints import (
    quantize_checkpoint,
    single_thread,  # noqa: F401  (autouse fixture: one torch thread)
    varied_model,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from qserve.serve.async_engine import EngineDeadError
from qserve.serve.engine import EngineArgs, LLMEngine
from qserve.serve.llm import LLM
from qserve.serve.sampling_params import SamplingParams

PROMPTS = [
    "The capital of France is",
    "A paged key-value cache stores attention state in fixed-size blocks. The quick brown fox",
    "0123",
    "Héllo wörld, naïve café, 東京 🙂",
    "Quantization maps weights to a few bits; calibration data decides which errors matter.",
]
# 2 layers x (K, V) x 4 slots x 2 kv heads x 16 dims x 4 bytes: one block of the tiny model.
BLOCK_BYTES = 2 * 2 * 4 * 2 * 16 * 4


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return varied_model(tmp_path_factory.mktemp("llama") / "m", "llama")


@cache
def _hf(model_dir: str):
    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32
    ), AutoTokenizer.from_pretrained(model_dir)


def hf_greedy(model_dir, prompt: str, max_new_tokens: int) -> list[int]:
    model, tok = _hf(str(model_dir))
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(
        ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, ids.shape[1] :].tolist()


def small_llm(model_dir, num_blocks: int = 24, **kwargs) -> LLM:
    """Block size 4, a step budget of 16 tokens (chunked prefill) and a cache too small for the batch."""
    kwargs = {"max_model_len": 96, "max_num_seqs": 8, "max_num_batched_tokens": 16, "block_size": 4,
              "kv_cache_memory": num_blocks * BLOCK_BYTES, "validate": False, **kwargs}  # fmt: skip
    return LLM(str(model_dir), **kwargs)


def greedy(max_tokens: int = 24, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def assert_matches_hf(llm: LLM, model_dir, reference_dir=None) -> None:
    outs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        expected = hf_greedy(reference_dir or model_dir, prompt, 24)
        assert len(set(expected)) > 3, "degenerate reference: the test would prove little"
        assert out.outputs[0].token_ids == expected, prompt
        assert out.outputs[0].finish_reason == "length"
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0  # the cache was too small for all prompts: recompute happened
    assert stats.num_running == stats.num_waiting == 0 and stats.kv_cache_usage == 0.0


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_greedy_matches_transformers_with_preemption_and_chunked_prefill(tmp_path, llama, family):
    model_dir = llama if family == "llama" else varied_model(tmp_path / family, family)
    assert_matches_hf(small_llm(model_dir), model_dir)


@pytest.mark.parametrize(("method", "act_order"), [("gptq", True), ("awq", False)])
def test_greedy_on_quantized_checkpoint_matches_dequantized_transformers(tmp_path, llama, method, act_order):
    qdir, dense_dir = quantize_checkpoint(llama, tmp_path / "q", method, act_order=act_order)
    llm = small_llm(qdir)
    assert llm.engine.quantization == method
    assert_matches_hf(llm, qdir, dense_dir)


def test_seeded_sampling_is_reproducible_in_any_batch(llama):
    llm = small_llm(llama, num_blocks=64)
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, seed=1234, max_tokens=20, ignore_eos=True)
    alone = llm.generate([PROMPTS[1]], params, use_tqdm=False)[0].outputs[0].token_ids
    others = [
        SamplingParams(temperature=0.8, seed=7, max_tokens=12),
        SamplingParams(temperature=1.0, max_tokens=30),
    ]
    mixed = llm.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2]], [others[0], params, others[1]], use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone
    other_seed = SamplingParams(
        temperature=1.0, top_p=0.95, top_k=50, seed=99, max_tokens=20, ignore_eos=True
    )
    assert llm.generate([PROMPTS[1]], other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_stop_strings_cut_exactly(llama):
    llm = small_llm(llama, num_blocks=64)
    full = llm.generate([PROMPTS[0]], greedy(), use_tqdm=False)[0].outputs[0]
    assert full.text == llm.get_tokenizer().decode(full.token_ids)  # incremental == one-shot decode
    stop = full.text[6:9]
    cut = full.text.index(stop)
    for include, expected in ((False, full.text[:cut]), (True, full.text[: cut + len(stop)])):
        out = llm.generate([PROMPTS[0]], greedy(stop=[stop, "never-there"], include_stop_str_in_output=include),
                           use_tqdm=False)[0].outputs[0]  # fmt: skip
        assert out.text == expected
        assert (out.finish_reason, out.stop_reason) == ("stop", stop)
        assert out.token_ids == full.token_ids[: len(out.token_ids)] and len(out.token_ids) < len(
            full.token_ids
        )


def test_stop_token_ids_eos_min_tokens_ignore_eos_max_tokens(tmp_path, llama):
    llm = small_llm(llama, num_blocks=64)
    tokens = llm.generate([PROMPTS[1]], greedy(30), use_tqdm=False)[0].outputs[0].token_ids
    stop_id = tokens[4]
    j = tokens.index(stop_id)
    out = llm.generate([PROMPTS[1]], greedy(30, stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    assert (out.token_ids, out.finish_reason, out.stop_reason) == (tokens[: j + 1], "stop", stop_id)
    # Make that token the model's EOS: generation stops on it unless ignore_eos; min_tokens defers it.
    eos_dir = tmp_path / "eos"
    shutil.copytree(llama, eos_dir)
    (eos_dir / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [stop_id], "pad_token_id": 0})
    )
    llm = small_llm(eos_dir, num_blocks=64)
    plain = SamplingParams(temperature=0.0, max_tokens=30)
    out = llm.generate([PROMPTS[1]], plain, use_tqdm=False)[0].outputs[0]
    assert (out.token_ids, out.finish_reason, out.stop_reason) == (tokens[: j + 1], "stop", None)
    out = llm.generate([PROMPTS[1]], greedy(30), use_tqdm=False)[0].outputs[0]
    assert (out.token_ids, out.finish_reason) == (tokens, "length")
    min_tokens = j + 3
    out = llm.generate([PROMPTS[1]], SamplingParams(temperature=0.0, max_tokens=30, min_tokens=min_tokens),
                       use_tqdm=False)[0].outputs[0]  # fmt: skip
    assert len(out.token_ids) >= min_tokens and stop_id not in out.token_ids[:min_tokens]
    out = llm.generate([PROMPTS[1]], greedy(7), use_tqdm=False)[0].outputs[0]
    assert (len(out.token_ids), out.finish_reason) == (7, "length")


def test_n_siblings_share_prompt_blocks(llama):
    engine = LLMEngine(EngineArgs(str(llama), max_model_len=64, block_size=4, device="cpu", validate=False))
    prompt = list(range(40, 52))  # 12 tokens: 3 full blocks of 4
    engine.add_request(
        "r", prompt, SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=16, ignore_eos=True)
    )
    seqs = [t.seq for t in engine._requests["r"].tracks]
    while not all(s.block_ids for s in seqs):
        engine.step()
    manager = engine.scheduler.block_manager
    shared = seqs[0].block_ids[:2]  # the last prompt block is copied on write: each sibling recomputes it
    assert all(s.block_ids[:2] == shared for s in seqs)
    assert [manager.ref_count(b) for b in shared] == [3, 3]
    final = None
    while engine.has_unfinished():
        final = next((o for o in engine.step() if o.finished), final)
    texts = [tuple(c.token_ids) for c in final.outputs]
    assert len(final.outputs) == 3 and len(set(texts)) == 3  # siblings seeded seed + index: all differ
    assert manager.num_used_blocks == 0


def test_logprobs_match_transformers(llama):
    llm = small_llm(llama, num_blocks=64)
    out = llm.generate([PROMPTS[0]], greedy(8, logprobs=3), use_tqdm=False)[0].outputs[0]
    model, tok = _hf(str(llama))
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    ref = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)  # fmt: skip
    total = 0.0
    for token, entry, logits in zip(out.token_ids, out.logprobs, ref.logits, strict=True):
        expected = torch.log_softmax(logits[0].float(), dim=-1)
        top = expected.topk(3)
        assert list(entry)[:3] == top.indices.tolist()  # top-3 in order, then the sampled token
        for tid, lp in entry.items():
            assert lp.logprob == pytest.approx(expected[tid].item(), abs=1e-4)
        assert entry[token].rank == 1  # greedy picks the most likely token
        total += entry[token].logprob
    assert out.cumulative_logprob == pytest.approx(total)


def test_abort_returns_every_block(llama):
    engine = LLMEngine(EngineArgs(str(llama), max_model_len=64, block_size=4, device="cpu", validate=False))
    engine.add_request("a", PROMPTS[1], greedy(40))
    engine.add_request("b", PROMPTS[0], SamplingParams(n=2, temperature=1.0, max_tokens=40))
    for _ in range(3):
        engine.step()
    assert engine.scheduler.block_manager.num_used_blocks > 0
    final = engine.abort("b")
    assert final.finished and {c.finish_reason for c in final.outputs} == {"abort"}
    engine.abort("a")
    assert not engine.has_unfinished() and engine.scheduler.block_manager.num_used_blocks == 0
    assert engine.stats().requests_finished == {"abort": 2}
    assert engine.abort("a") is None  # unknown by now


# ---- AsyncLLMEngine ---------------------------------------------------------------------------------


def _async_engine(model_dir, **kwargs):
    from qserve.serve.async_engine import AsyncLLMEngine

    return AsyncLLMEngine(model=str(model_dir), max_model_len=96, block_size=4, device="cpu", validate=False, **kwargs)


async def until(condition, timeout: float = 30.0) -> None:
    """Poll `condition` (state the engine thread updates) instead of sleeping a guessed time."""

    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout)


def test_async_stream_is_cumulative_and_matches_offline(llama):
    async def main():
        engine = _async_engine(llama)
        outs = [o async for o in engine.generate(PROMPTS[0], greedy(10), "r1")]
        await engine.shutdown()
        return engine, outs

    engine, outs = asyncio.run(main())
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    assert lengths == list(range(1, 11)) and [o.finished for o in outs] == [False] * 9 + [True]
    assert outs[-1].outputs[0].token_ids == hf_greedy(llama, PROMPTS[0], 10)
    assert all(outs[-1].outputs[0].text.startswith(o.outputs[0].text) for o in outs)
    assert engine.stats().generation_tokens_total == 10 and len(engine.stats().time_to_first_token) == 1
    assert not engine.is_healthy  # stopped by shutdown


def test_async_cancelled_consumer_aborts_and_frees_blocks(llama):
    async def main():
        engine = _async_engine(llama)
        stream = engine.generate(PROMPTS[1], greedy(50), "r1")
        async for out in stream:
            if len(out.outputs[0].token_ids) == 2:
                break
        await stream.aclose()  # what a client disconnect does to the server's iterator
        await until(lambda: engine.stats().requests_finished.get("abort") == 1)
        stats = engine.stats()
        used = engine.engine.scheduler.block_manager.num_used_blocks
        await engine.shutdown()
        return stats, used

    stats, used = asyncio.run(main())
    assert stats.requests_finished == {"abort": 1} and stats.num_running == 0 and used == 0


def test_async_queue_bound_raises_queue_full(llama):
    from qserve.serve.async_engine import QueueFullError

    async def consume(engine, rid):
        return [o async for o in engine.generate(PROMPTS[0], greedy(60), rid)][-1]

    async def main():
        engine = _async_engine(llama, max_num_seqs=1, max_num_batched_tokens=16, max_waiting=1)
        first = asyncio.create_task(consume(engine, "a"))
        await until(lambda: engine.stats().num_running == 1)
        second = asyncio.create_task(consume(engine, "b"))  # max_num_seqs=1: b waits behind a
        await until(lambda: engine.stats().num_waiting == 1)
        with pytest.raises(QueueFullError):
            await consume(engine, "c")
        results = await asyncio.gather(first, second)
        await engine.shutdown()
        return results

    assert [r.outputs[0].finish_reason for r in asyncio.run(main())] == ["length", "length"]


def test_async_engine_death_is_reported(llama):
    async def main():
        engine = _async_engine(llama)

        def broken(*args):
            raise RuntimeError("kernel exploded")

        engine.engine.runner.execute = broken
        with pytest.raises(EngineDeadError, match="kernel exploded"):
            async for _ in engine.generate(PROMPTS[0], greedy(5), "r1"):
                pass
        healthy = engine.is_healthy
        with pytest.raises(EngineDeadError):
            async for _ in engine.generate(PROMPTS[0], greedy(5), "r2"):
                pass
        return healthy

    assert asyncio.run(main()) is False
