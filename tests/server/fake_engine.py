"""A fake AsyncLLMEngine with the real one's interface, for testing the server without a model.

Tokens are a deterministic function of (prompt, seed, sample index, position), so tests can predict
them; a request holds `ceil(tokens / block_size)` pretend KV blocks while it lives, so a test can assert
that every block came back after disconnects and aborts.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass

from qserve.serve.request_output import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from qserve.serve.sequence import QueueFullError

FIRST_ORDINARY_ID = 3  # the tiny tokenizer's ids 0..2 are special


@dataclass(frozen=True)
class FakeStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens_total: int = 0  # read by the server's periodic stats line
    generation_tokens_total: int = 0


class FakeEngine:
    def __init__(
        self,
        tokenizer,
        *,
        delay: float = 0.0,
        max_running: int = 1000,
        max_waiting: int | None = None,
        max_model_len: int = 128,
        num_blocks: int = 100_000,
        block_size: int = 16,
    ) -> None:
        self.tokenizer = tokenizer
        self.model_name = "/models/fake"
        self.max_model_len = max_model_len
        self.quantization = None
        self.kv_cache_tokens = num_blocks * block_size
        self.delay = delay
        self.max_waiting = max_waiting
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.is_healthy = True
        self._slots = asyncio.Semaphore(max_running)
        self.waiting = 0
        self.running = 0
        self.used_blocks = 0
        self.live: set[str] = set()
        self.aborted: set[str] = set()
        self.finished: dict[str, str] = {}  # request id -> finish reason of sample 0
        self.calls: list[tuple[list[int], object, str]] = []
        self.shutdown_calls: list[bool] = []
        self.prefix_queries = 0

    # ---- the contract ---------------------------------------------------------------------------

    def stats(self) -> FakeStats:
        return FakeStats(
            num_running=self.running,
            num_waiting=self.waiting,
            kv_cache_usage=self.used_blocks / self.num_blocks,
            prefix_cache_queries=self.prefix_queries,
            prefix_cache_hits=self.prefix_queries // 2,
            num_preemptions=0,
        )

    async def abort(self, request_id: str) -> None:
        if request_id in self.live:
            self.aborted.add(request_id)

    async def shutdown(self, drain: bool = True) -> None:
        self.shutdown_calls.append(drain)

    def token(self, prompt: list[int], params, sample: int, position: int) -> int:
        base = params.seed if params.seed is not None else sum(prompt)
        if params.temperature > 0 and params.seed is None:
            base = random.getrandbits(32)
        mixed = (base * 1_000_003 + (sample + 1) * 7_919 + position * 104_729) % 2_147_483_647
        return FIRST_ORDINARY_ID + mixed % (len(self.tokenizer) - FIRST_ORDINARY_ID)

    async def generate(self, prompt: list[int] | str, params, request_id: str):
        if isinstance(prompt, str):
            prompt = self.tokenizer.encode(prompt)
        self.calls.append((list(prompt), params, request_id))
        if self.max_waiting is not None and self.waiting >= self.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests)")
        self.live.add(request_id)
        self.waiting += 1
        admitted = False
        blocks = 0
        try:
            await self._slots.acquire()
            admitted = True
            self.waiting -= 1
            self.running += 1
            self.prefix_queries += len(prompt)
            arrival = time.time()
            samples = [_Sample() for _ in range(params.n)]
            for position in range(params.max_tokens):
                await asyncio.sleep(self.delay)
                if request_id in self.aborted:
                    yield self._output(request_id, prompt, samples, arrival, abort=True)
                    return
                for j, s in enumerate(samples):
                    if s.reason is None:
                        self._advance(s, self.token(prompt, params, j, position), params)
                need = math.ceil((len(prompt) + position + 1) / self.block_size) * params.n
                self.used_blocks += need - blocks
                blocks = need
                out = self._output(request_id, prompt, samples, arrival)
                yield out
                if out.finished:
                    self.finished[request_id] = samples[0].reason
                    return
        finally:
            self.used_blocks -= blocks
            self.live.discard(request_id)
            if admitted:
                self.running -= 1
                self._slots.release()
            else:
                self.waiting -= 1

    # ---- helpers --------------------------------------------------------------------------------

    def _advance(self, s: _Sample, token_id: int, params) -> None:
        s.token_ids.append(token_id)
        s.logprobs.append(self._logprobs(token_id, params.logprobs))
        text = self.tokenizer.decode(s.token_ids, skip_special_tokens=params.skip_special_tokens)
        for stop in params.stop:
            at = text.find(stop)
            if at >= 0:
                s.text = text[: at + len(stop)] if params.include_stop_str_in_output else text[:at]
                s.reason, s.stop_reason = "stop", stop
                return
        if token_id in params.stop_token_ids:
            s.reason, s.stop_reason = "stop", token_id
        elif len(s.token_ids) >= params.max_tokens:
            s.reason = "length"
        # Like the real detokenizer, hold back a trailing partial UTF-8 character until it completes,
        # so the cumulative text only ever grows.
        s.text = text if s.reason else text.rstrip("\ufffd")

    def _logprobs(self, token_id: int, k: int | None) -> dict[int, Logprob]:
        if k is None:
            return {}
        # The sampled token is the most likely; alternatives follow with falling logprobs.
        entries = {token_id: Logprob(-0.5, 1, self.tokenizer.decode([token_id]))}
        for r in range(1, k):
            alt = FIRST_ORDINARY_ID + (token_id + r) % (len(self.tokenizer) - FIRST_ORDINARY_ID)
            entries.setdefault(alt, Logprob(-0.5 - r, r + 1, self.tokenizer.decode([alt])))
        return entries

    def _output(self, request_id, prompt, samples, arrival, abort: bool = False) -> RequestOutput:
        outs = [
            CompletionOutput(
                index=j,
                text=s.text,
                token_ids=list(s.token_ids),
                logprobs=list(s.logprobs),
                finish_reason="abort" if abort and s.reason is None else s.reason,
                stop_reason=s.stop_reason,
            )
            for j, s in enumerate(samples)
        ]
        finished = all(o.finish_reason is not None for o in outs)
        return RequestOutput(request_id, None, list(prompt), outs, finished, RequestMetrics(arrival))


class _Sample:
    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, Logprob]] = []
        self.text = ""
        self.reason: str | None = None
        self.stop_reason: int | str | None = None
