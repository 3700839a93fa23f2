"""The offline API, shaped like vLLM's: `LLM(model).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from qserve.serve.engine import EngineArgs, LLMEngine
from qserve.serve.request_output import RequestOutput
from qserve.serve.sampling_params import SamplingParams

Message = dict[str, str]


class LLM:
    """Load a model once and run batches of prompts through the continuous-batching engine."""

    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        max_model_len: int | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        block_size: int = 16,
        kv_cache_memory: int | None = None,
        gpu_memory_utilization: float = 0.9,
        device: str = "auto",
        enable_prefix_caching: bool = True,
        seed: int = 0,
        validate: bool = True,
        enforce_eager: bool = False,
        long_prefill_token_threshold: int = 0,
        tensor_parallel_size: int = 1,
    ) -> None:
        args = EngineArgs(
            model=str(model), dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, block_size=block_size, kv_cache_memory=kv_cache_memory,
            gpu_memory_utilization=gpu_memory_utilization, device=device,
            enable_prefix_caching=enable_prefix_caching, seed=seed, validate=validate,
            enforce_eager=enforce_eager, long_prefill_token_threshold=long_prefill_token_threshold,
            tensor_parallel_size=tensor_parallel_size,
        )  # fmt: skip
        self.engine = LLMEngine(args)
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the engine's tensor-parallel workers now (they also stop when the LLM is garbage
        collected or the interpreter exits); a closed LLM cannot generate."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[str] | list[int] | list[list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """One finished RequestOutput per prompt, in prompt order. A list of ints is one token prompt."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self._run([(p, True) for p in prompts], sampling_params, use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        chat_template: str | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Render each conversation with the tokenizer's chat template (or `chat_template`) plus the
        assistant prompt, then generate; the rendered text already holds its special tokens."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.engine.tokenizer
        rendered = [
            tok.apply_chat_template(
                conv, tokenize=False, add_generation_prompt=True, chat_template=chat_template
            )
            for conv in conversations
        ]
        return self._run([(text, False) for text in rendered], sampling_params, use_tqdm)

    def _run(self, prompts, sampling_params, use_tqdm: bool) -> list[RequestOutput]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(
                    f"got {len(params)} SamplingParams for {len(prompts)} prompts; pass one or one each"
                )
        ids = [str(next(self._ids)) for _ in prompts]
        done: dict[str, RequestOutput] = {}
        try:
            for rid, (prompt, special), p in zip(ids, prompts, params, strict=True):
                self.engine.add_request(rid, prompt, p, add_special_tokens=special)
            with _progress(len(ids), use_tqdm) as bar:
                while self.engine.has_unfinished():
                    for out in self.engine.step():
                        if out.finished:
                            done[out.request_id] = out
                            bar.update(1)
        finally:  # an error or Ctrl-C must not leave requests holding KV blocks in the engine
            for rid in ids:
                if rid not in done:
                    self.engine.abort(rid)
        return [done[rid] for rid in ids]


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Processed prompts", disable=not enabled, dynamic_ncols=True)
