"""One generated sequence: its tokens, how many of them have KV in the cache, and when it stops."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

from qserve.errors import ResourceError


class QueueFullError(ResourceError):
    """The waiting queue is at `max_waiting`; the caller should retry later (HTTP 503 / 429)."""


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
}
FINISHED_STATUS = {reason: status for status, reason in _FINISH_REASONS.items()}


@dataclass(frozen=True)
class StopCriteria:
    """Token-level stop rules the scheduler applies; stop strings are the runtime's job (it detokenizes).

    As in vLLM, neither EOS nor `stop_token_ids` can end a sequence before `min_tokens` outputs.
    """

    max_tokens: int
    min_tokens: int = 0
    eos_token_ids: frozenset[int] = frozenset()
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # Accept any iterable of ids; store frozensets so membership tests are O(1) and the object hashable.
        object.__setattr__(self, "eos_token_ids", frozenset(int(t) for t in self.eos_token_ids))
        object.__setattr__(self, "stop_token_ids", frozenset(int(t) for t in self.stop_token_ids))
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"StopCriteria.max_tokens: expected an integer >= 1, found {self.max_tokens!r}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"StopCriteria.min_tokens: expected 0 <= min_tokens <= max_tokens ({self.max_tokens}), "
                f"found {self.min_tokens!r}"
            )

    def check(self, token_id: int, num_output_tokens: int) -> tuple[str, int | None] | None:
        """(finish_reason, stop_reason) if `token_id`, the `num_output_tokens`-th output, ends the sequence."""
        if num_output_tokens >= self.min_tokens:
            if not self.ignore_eos and token_id in self.eos_token_ids:
                return "stop", None
            if token_id in self.stop_token_ids:
                return "stop", token_id
        if num_output_tokens >= self.max_tokens:
            return "length", None
        return None


class Sequence:
    """Token history plus KV-cache bookkeeping of one output stream (a request with n > 1 has n of them).

    `num_computed_tokens` counts tokens whose KV is in the blocks of `block_ids` (or will be once the
    step scheduling them has run); the last token is never computed before it is sampled from, so a
    sequence that is ready to decode has `num_tokens - num_computed_tokens == 1`.
    `arrival_time` is wall-clock (`time.time()`), as in vLLM's request metrics.
    """

    def __init__(
        self,
        seq_id: int,
        prompt_token_ids: list[int],
        stop: StopCriteria,
        arrival_time: float | None = None,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError(
                f"Sequence {seq_id}: prompt_token_ids is empty; a prompt needs at least one token"
            )
        self.seq_id = seq_id
        self.prompt_token_ids = [int(t) for t in prompt_token_ids]
        self.output_token_ids: list[int] = []
        self.stop = stop
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        # Chained hashes of the full blocks of the token history, extended as blocks fill (prefix caching).
        self.block_hashes: list[bytes] = []
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self._token_ids = list(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt then outputs. The scheduler's own list: read it, don't mutate it."""
        return self._token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self._token_ids.append(token_id)

    def set_finished(self, reason: str, stop_reason: int | str | None = None) -> None:
        if reason not in FINISHED_STATUS:
            raise ValueError(f"finish reason: expected one of {sorted(FINISHED_STATUS)}, found {reason!r}")
        self.status = FINISHED_STATUS[reason]
        self.finish_reason = reason
        self.stop_reason = stop_reason

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, status={self.status.name}, tokens={self.num_prompt_tokens}+"
            f"{self.num_output_tokens}, computed={self.num_computed_tokens}, blocks={self.block_ids})"
        )
