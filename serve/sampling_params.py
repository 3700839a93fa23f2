"""Per-request sampling parameters, named and defaulted as in vLLM so callers can switch engines."""

from __future__ import annotations

from dataclasses import dataclass, replace

from qserve.serve.structured import StructuredOutputsParams

# Below this a temperature means greedy: dividing logits by ~0 would overflow (vLLM uses the same cut).
GREEDY_EPS = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    Penalties follow vLLM: `repetition_penalty` scales logits of every token seen in the prompt or the
    output (divide positive, multiply negative); `presence_penalty` / `frequency_penalty` subtract from
    logits of tokens in the output only (once / per occurrence). `top_k` 0 or -1 means off.
    `stop` strings are cut from the text (kept with `include_stop_str_in_output`); `stop_token_ids` end
    generation on that token, which is kept in `token_ids` but not rendered when it is special.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] | str | list[str] = ()
    stop_token_ids: tuple[int, ...] | list[int] = ()
    ignore_eos: bool = False
    max_tokens: int = 16
    min_tokens: int = 0
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Grammar-constrained output (JSON schema, JSON object, regex, choice, EBNF); see serve/structured.py.
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        # Normalise list/str inputs to tuples so the object stays hashable and immutable.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        self._check()

    def _check(self) -> None:
        _require(isinstance(self.n, int) and self.n >= 1, "n", "an integer >= 1", self.n)
        _require(self.temperature >= 0.0, "temperature", ">= 0 (0 means greedy)", self.temperature)
        _require(0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]", self.top_p)
        _require(isinstance(self.top_k, int) and self.top_k >= -1, "top_k", "-1, 0 (off) or >= 1", self.top_k)
        _require(0.0 <= self.min_p <= 1.0, "min_p", "in [0, 1]", self.min_p)
        _require(
            self.repetition_penalty > 0.0, "repetition_penalty", "> 0 (1 = off)", self.repetition_penalty
        )
        _require(
            -2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "in [-2, 2]", self.presence_penalty
        )
        _require(
            -2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "in [-2, 2]", self.frequency_penalty
        )
        _require(self.seed is None or isinstance(self.seed, int), "seed", "an integer or None", self.seed)
        _require(
            isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", ">= 1", self.max_tokens
        )
        _require(
            isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
            "min_tokens",
            f"in [0, max_tokens={self.max_tokens}]",
            self.min_tokens,
        )
        _require(
            self.logprobs is None or (isinstance(self.logprobs, int) and self.logprobs >= 0),
            "logprobs",
            "None or an integer >= 0",
            self.logprobs,
        )
        _require(all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings", self.stop)
        _require(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "ids >= 0", self.stop_token_ids)
        if self.structured_outputs is not None:
            _require(
                isinstance(self.structured_outputs, StructuredOutputsParams),
                "structured_outputs", "a StructuredOutputsParams", type(self.structured_outputs).__name__,
            )  # fmt: skip
            # A finished grammar allows only EOS: forbidding it (min_tokens) or generating past it
            # (ignore_eos) would leave no token to sample.
            _require(self.min_tokens == 0, "min_tokens", "0 with structured_outputs", self.min_tokens)
            _require(not self.ignore_eos, "ignore_eos", "False with structured_outputs", self.ignore_eos)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def uses_top_k(self) -> bool:
        return self.top_k > 0

    def for_sibling(self, index: int) -> SamplingParams:
        """The params of the `index`-th of n samples: a seeded request gives each sibling its own
        stream (seed + index, as vLLM does) so n > 1 does not return n identical completions."""
        if self.seed is None or index == 0:
            return self
        return replace(self, seed=self.seed + index)


def _require(ok: bool, field: str, expected: str, found: object) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{field} must be {expected}, got {found!r}")
