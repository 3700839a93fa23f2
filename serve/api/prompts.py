"""From a validated request to what the engine takes: prompt token ids and SamplingParams.

Prompts are tokenized here, not in the engine, because the context-length rules need the token count
before anything is queued, and because chat prompts must be encoded without a second BOS (the template
already wrote the special tokens). The server calls these methods on its tokenizer thread, never on
the event loop (see `serving.OpenAIServing`).

A prompt whose text is so long that it cannot fit the context is refused by its size before it is
tokenized (tokenizing megabytes takes seconds): a token never stands for more than
`max_token_bytes` bytes of text (the longest text any single vocabulary token decodes to, plus one
byte for the word-boundary space a SentencePiece token loses when decoded alone), so text longer
than `max_model_len * max_token_bytes` UTF-8 bytes needs more than `max_model_len` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from qserve.serve.api.errors import APIError, bad_request
from qserve.serve.api.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from qserve.serve.api.tools import conversation as tools_conversation
from qserve.serve.api.tools import template_knows_tools
from qserve.serve.sampling_params import SamplingParams

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass(frozen=True)
class PromptInput:
    token_ids: list[int]
    text: str  # what `echo` returns; decoded from the ids for token-id prompts


def utf8_len(text: str) -> int:
    # JSON may carry lone surrogates (\ud800); count them as the 3 bytes they take, never raise.
    return len(text.encode("utf-8", "surrogatepass"))


def max_token_bytes(tokenizer) -> int:
    """The most UTF-8 bytes of text one token stands for: the longest single-token decode, + 1.

    The +1 is the word-boundary space a SentencePiece token ("\u2581word") drops when decoded alone;
    a byte-fallback or partial-UTF-8 token decodes alone to U+FFFD (3 bytes), more than the 1 byte it
    stands for, so the bound stays an upper one. About 0.3 s for a 49k-token vocabulary, once."""
    pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return max(utf8_len(p) for p in pieces) + 1


class PromptBuilder:
    """Tokenizes prompts and applies the model's limits (vocabulary, context length)."""

    def __init__(self, tokenizer, max_model_len: int, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.chat_template = chat_template
        self.vocab_size = len(tokenizer)
        self.max_token_bytes = max_token_bytes(tokenizer)
        self.max_prompt_bytes = max_model_len * self.max_token_bytes

    # ---- prompts ----------------------------------------------------------------------------

    def completion(self, req: CompletionRequest) -> list[PromptInput]:
        prompt = req.prompt
        if isinstance(prompt, str):
            items: list[str | list[int]] = [prompt]
        elif isinstance(prompt[0], int):
            items = [prompt]  # one token-id prompt
        else:
            items = list(prompt)
        for item in items:  # every prompt is checked before any is tokenized or decoded
            if isinstance(item, str):
                self.check_text_size(utf8_len(item), "prompt")
            else:
                self._check_prompt_len(len(item), "prompt")
                self.check_ids(item, "prompt")
        out = []
        for item in items:
            if isinstance(item, str):
                ids = self.tokenizer.encode(item, add_special_tokens=True)
                self._check_prompt_len(len(ids), "prompt")
                out.append(PromptInput(ids, item))
            else:
                out.append(PromptInput(list(item), self.tokenizer.decode(item)))
        return out

    def check_text_size(self, size: int, param: str) -> None:
        """Refuse text of `size` UTF-8 bytes that cannot fit the context, before tokenizing it."""
        if size > self.max_prompt_bytes:
            raise bad_request(
                f"'{param}' is {size} bytes of text; no text over {self.max_prompt_bytes} bytes fits this "
                f"model's maximum context length of {self.max_model_len} tokens (a token of this vocabulary "
                f"stands for at most {self.max_token_bytes} bytes), so it was refused without being "
                f"tokenized. Shorten '{param}'.",
                param,
                "context_length_exceeded",
            )

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool, tools=None) -> str:
        template = self.chat_template or getattr(self.tokenizer, "chat_template", None)
        native = template_knows_tools(template if isinstance(template, str) else None)
        conversation, tool_dicts = tools_conversation(messages, tools, native)
        if self.chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise bad_request(
                "This model's tokenizer has no chat template; restart the server with --chat-template FILE "
                "or use /v1/completions.",
                "messages",
                "chat_template_missing",
            )
        try:
            return self.tokenizer.apply_chat_template(
                conversation,
                chat_template=self.chat_template,
                tools=tool_dicts,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
            )
        except Exception as exc:  # jinja's raise_exception (e.g. roles must alternate) is the user's error
            raise bad_request(f"The chat template rejected the messages: {exc}", "messages") from exc

    def chat(self, req: ChatCompletionRequest) -> PromptInput:
        add_gen = True if req.add_generation_prompt is None else req.add_generation_prompt
        # The template only adds text around the messages: their size alone can already be too much.
        self.check_text_size(sum(utf8_len(m.text) for m in req.messages), "messages")
        text = self.render_chat(req.messages, add_gen, req.tools)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        self._check_prompt_len(len(ids), "messages")
        return PromptInput(ids, text)

    def check_ids(self, ids: list[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise bad_request(
                f"'{param}' has token id {bad[0]}, outside the vocabulary [0, {self.vocab_size}).", param
            )

    def _check_prompt_len(self, n: int, param: str) -> None:
        if n == 0:
            raise bad_request(f"'{param}' is empty after tokenization; send at least one token.", param)
        if n >= self.max_model_len:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens, but '{param}' has {n} "
                f"tokens (at least one more is needed to generate). Shorten '{param}'.",
                param,
                "context_length_exceeded",
            )

    # ---- sampling ---------------------------------------------------------------------------

    def max_tokens(
        self, prompts: list[PromptInput], requested: int | None, param: str, default: int | None
    ) -> int:
        """The output budget: the request's, checked against the context, else the default clipped to fit."""
        longest = max(len(p.token_ids) for p in prompts)
        room = self.max_model_len - longest
        if requested is None:
            return room if default is None else min(default, room)
        if requested > room:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens; the prompt has {longest} "
                f"tokens and {param}={requested} asks for {requested} more. Lower {param} to at most {room}.",
                param,
                "context_length_exceeded",
            )
        return requested

    def sampling_params(
        self, req: CompletionRequest | ChatCompletionRequest, max_tokens: int, logprobs: int | None
    ) -> SamplingParams:
        if req.stop_token_ids:
            self.check_ids(req.stop_token_ids, "stop_token_ids")
        if req.min_tokens is not None and req.min_tokens > max_tokens:
            raise bad_request(
                f"min_tokens ({req.min_tokens}) exceeds the output budget of {max_tokens} tokens.",
                "min_tokens",
            )
        given = {
            "n": req.n,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "top_k": req.top_k,
            "min_p": req.min_p,
            "repetition_penalty": req.repetition_penalty,
            "presence_penalty": req.presence_penalty,
            "frequency_penalty": req.frequency_penalty,
            "seed": req.seed,
            "stop_token_ids": tuple(req.stop_token_ids or ()),
            "ignore_eos": req.ignore_eos,
            "min_tokens": req.min_tokens,
            "skip_special_tokens": req.skip_special_tokens,
            "include_stop_str_in_output": req.include_stop_str_in_output,
        }
        # Unset fields keep SamplingParams' defaults (vLLM's), so the two stay in one place.
        kwargs = {k: v for k, v in given.items() if v is not None}
        try:
            return SamplingParams(
                **kwargs, stop=tuple(req.stop_list), max_tokens=max_tokens, logprobs=logprobs
            )
        except ValueError as exc:  # the request model should have caught it; never a 500 if not
            raise APIError(400, f"Invalid sampling parameters: {exc}", code="invalid_value") from exc
