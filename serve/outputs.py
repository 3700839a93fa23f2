"""The whole contract between the scheduler and the model runner: what to compute, and what was sampled.

One step is `out = scheduler.schedule()`, `runner_out = runner.run(out)`, `scheduler.update(out, runner_out)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ScheduledChunk:
    """Tokens of one sequence to push through the model this step.

    A prefill chunk is a run of prompt (or, after preemption, prompt + output) tokens; a decode is the
    one last token. Token `token_ids[i]` sits at position `start_pos + i` and its KV goes to slot
    `block_ids[(start_pos + i) // block_size] * block_size + (start_pos + i) % block_size`.
    """

    seq_id: int
    token_ids: tuple[int, ...]
    start_pos: int  # num_computed_tokens before this step
    block_ids: tuple[int, ...]  # the sequence's whole block table after this step's allocation
    sample: bool  # the chunk reaches the last known token: sample the next one from its logits

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        """Tokens the chunk's last query attends to (cached context + this chunk)."""
        return self.start_pos + len(self.token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]
    num_batched_tokens: int
    # (src, dst) block copies the runner performs in every layer's KV cache BEFORE running the step:
    # a sequence about to write into a block it shares gets a private copy first (copy-on-write).
    block_copies: tuple[tuple[int, int], ...] = ()
    preempted_ids: tuple[int, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probability of the sampled token, its rank (1 = most likely), and the top-k alternatives."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token_id, logprob), most likely first
    rank: int | None = None


@dataclass(frozen=True)
class ModelRunnerOutput:
    sampled: dict[int, int]  # seq_id -> sampled token id, for exactly the chunks with sample=True
    logprobs: dict[int, TokenLogprobs] = field(default_factory=dict)


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot for metrics. `tokens_stored / slots_allocated` is KV-cache slot use (1.0 = no waste)."""

    kv_cache_usage: float  # used blocks / total blocks
    num_used_blocks: int
    num_free_blocks: int  # includes cached blocks no sequence holds (evictable)
    prefix_cache_queries: int  # tokens looked up in the prefix cache on (re-)admitting sequences
    prefix_cache_hits: int  # of those, tokens found cached (their compute skipped)
    num_preemptions: int
    tokens_stored: int  # distinct token slots holding KV in used blocks
    slots_allocated: int  # used blocks x block_size
