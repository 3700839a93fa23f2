"""From sampled tokens to text: detokenization, stop strings and logprob decoding of one request.

The engine core deals in token ids only; what it learns about a sequence in one step is a `SeqUpdate`
(the new token ids, the sampled token's logprobs, the finish reason the scheduler gave it). A
`RequestState` turns those updates into the cumulative `RequestOutput` a caller sees: it detokenizes
incrementally (holding back an incomplete UTF-8 character), cuts the text at a stop string (holding back
any suffix that could still become one), and decodes the logprob tokens.

The same class runs in two places. In-process (`LLM`, the in-process `AsyncLLMEngine`) `LLMEngine`
applies each update as it postprocesses a step, and a stop string ends the sequence in the scheduler in
that same step. In the split server (serve/engine_core.py) the updates cross to the API process, which
applies them there, so detokenization never runs in the engine core's step loop; a stop string found
there is sent back to the core, which ends the sequence before its next step. The text and token ids
streamed are the same either way: tokens the core sampled after the stop (at most one step's) are dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from qserve.serve.detokenizer import IncrementalDetokenizer, find_stop_string, stop_holdback
from qserve.serve.outputs import TokenLogprobs
from qserve.serve.request_output import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from qserve.serve.sampling_params import SamplingParams


@dataclass(frozen=True)
class SeqUpdate:
    """What one step (or an abort) did to output sequence `index` of a request."""

    index: int
    new_token_ids: tuple[int, ...]
    logprobs: TokenLogprobs | None  # of the last new token, when the request asked for logprobs
    finish_reason: str | None  # as the scheduler set it (a stop string is found by the RequestState)
    stop_reason: int | str | None = None


@dataclass(frozen=True)
class CoreOutput:
    """The engine core's news about one request in one step: one update per touched sequence."""

    request_id: str
    updates: tuple[SeqUpdate, ...]
    first_token_time: float | None


class _SeqText:
    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.params = params
        self.detok = IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens)
        self.token_ids: list[int] = []
        self.cut: int | None = None  # text length after a stop string
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob: float | None = None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    @property
    def text(self) -> str:
        return self.detok.text if self.cut is None else self.detok.text[: self.cut]


class RequestState:
    """Text-side state of one request (all its `n` sequences); see the module docstring."""

    def __init__(
        self, tokenizer, request_id: str, prompt: str | None, prompt_token_ids: list[int],
        params: SamplingParams, arrival_time: float,
    ) -> None:  # fmt: skip
        self.tokenizer = tokenizer
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.arrival_time = arrival_time
        self.first_token_time: float | None = None
        self.seqs = [_SeqText(tokenizer, prompt_token_ids, params.for_sibling(i)) for i in range(params.n)]

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)

    def update(self, u: SeqUpdate) -> str | None:
        """Apply one sequence's update; returns the stop string that has just ended it, if one did (the
        caller must then end the sequence in the scheduler). Updates for a sequence that already ended
        here (on a stop string the core has not yet heard of) are dropped."""
        s = self.seqs[u.index]
        if s.finish_reason is not None:
            return None
        if u.finish_reason == "abort" and not u.new_token_ids:
            s.finish_reason = "abort"  # cut short: the text so far, nothing held back is flushed
            return None
        s.token_ids.extend(u.new_token_ids)
        if u.logprobs is not None and s.logprobs is not None and u.new_token_ids:
            s.logprobs.append(self._logprob_dict(u.new_token_ids[-1], u.logprobs))
            s.cumulative_logprob = (s.cumulative_logprob or 0.0) + u.logprobs.logprob
        s.finish_reason, s.stop_reason = u.finish_reason, u.stop_reason
        new_text = s.detok.step(u.new_token_ids)
        if u.finish_reason is not None:
            new_text += s.detok.flush()
        params = s.params
        if params.stop and s.cut is None and len(s.token_ids) >= params.min_tokens:
            hit = find_stop_string(s.detok.text, len(new_text), params.stop, params.include_stop_str_in_output)
            if hit is not None:
                s.cut = hit[1]
                s.finish_reason, s.stop_reason = "stop", hit[0]
                return hit[0]
        return None

    def abort(self) -> None:
        for s in self.seqs:
            if s.finish_reason is None:
                s.finish_reason = "abort"

    def _logprob_dict(self, token_id: int, lp: TokenLogprobs) -> dict[int, Logprob]:
        decode = self.tokenizer.decode
        entries = {tid: Logprob(val, rank + 1, decode([tid])) for rank, (tid, val) in enumerate(lp.top)}
        entries[token_id] = Logprob(lp.logprob, lp.rank, decode([token_id]))
        return entries

    def output(self) -> RequestOutput:
        completions = []
        for index, s in enumerate(self.seqs):
            text = s.text
            hold = stop_holdback(s.params.stop)
            if hold and s.finish_reason is None:  # a stop string may still complete: do not stream its prefix
                text = text[: max(0, len(text) - hold)]
            completions.append(CompletionOutput(
                index=index, text=text, token_ids=list(s.token_ids),
                cumulative_logprob=s.cumulative_logprob,
                logprobs=None if s.logprobs is None else list(s.logprobs),
                finish_reason=s.finish_reason, stop_reason=s.stop_reason,
            ))  # fmt: skip
        finished = self.finished
        metrics = RequestMetrics(self.arrival_time, self.first_token_time, time.time() if finished else None)
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, completions, finished, metrics)
