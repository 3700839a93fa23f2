"""Engine-core configuration: frozen dataclasses, invariants checked on construction, no I/O.

The runtime computes `CacheConfig.num_blocks` from its memory budget; these classes only hold the
numbers and refuse combinations the scheduler cannot honour.
"""

from __future__ import annotations

from dataclasses import dataclass

from qserve.errors import ConfigError


def _require_int(owner: str, name: str, value: object, minimum: int) -> None:
    # bool is an int subclass; `block_size=True` is a typo, not a block size of 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{owner}.{name}: expected an integer >= {minimum}, found {value!r}")


@dataclass(frozen=True)
class CacheConfig:
    """Shape of the paged KV cache, in blocks of `block_size` token slots."""

    block_size: int = 16
    num_blocks: int = 256
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _require_int("CacheConfig", "block_size", self.block_size, 1)
        _require_int("CacheConfig", "num_blocks", self.num_blocks, 1)
        if not isinstance(self.enable_prefix_caching, bool):
            raise ConfigError(
                f"CacheConfig.enable_prefix_caching: expected True or False, found {self.enable_prefix_caching!r}"
            )

    @property
    def num_slots(self) -> int:
        """Token capacity of the whole cache."""
        return self.block_size * self.num_blocks


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step limits: sequences in flight, tokens computed per step, sequence length, queue depth.

    `max_waiting=None` leaves the waiting queue unbounded; a bound makes `Scheduler.add` raise
    `QueueFullError` so a server can shed load instead of queueing without limit.
    `long_prefill_token_threshold` caps the tokens one sequence computes per step (0 = no cap).
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    max_waiting: int | None = None
    long_prefill_token_threshold: int = 0

    def __post_init__(self) -> None:
        _require_int("SchedulerConfig", "max_num_seqs", self.max_num_seqs, 1)
        _require_int("SchedulerConfig", "max_num_batched_tokens", self.max_num_batched_tokens, 1)
        _require_int("SchedulerConfig", "max_model_len", self.max_model_len, 1)
        if self.max_waiting is not None:
            _require_int("SchedulerConfig", "max_waiting", self.max_waiting, 1)
        _require_int("SchedulerConfig", "long_prefill_token_threshold", self.long_prefill_token_threshold, 0)
        # Every running sequence needs one token of budget to decode; a smaller budget would leave
        # the newest running sequences unscheduled step after step.
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError(
                f"SchedulerConfig.max_num_batched_tokens: expected >= max_num_seqs ({self.max_num_seqs}) so every "
                f"running sequence can decode each step, found {self.max_num_batched_tokens}; "
                "raise max_num_batched_tokens or lower max_num_seqs"
            )


# Cache block sizes the CUDA attention kernels accept (kernels/triton_attention.py BLOCK_SIZES: a
# key's block is found with a shift and a mask). The CPU paths take any size.
CUDA_BLOCK_SIZES = (8, 16, 32, 64, 128)


def check_block_size(block_size: int, device_type: str) -> None:
    """Refuse, at start-up, a block size the CUDA kernels would reject at the first forward."""
    if device_type == "cuda" and block_size not in CUDA_BLOCK_SIZES:
        raise ConfigError(
            f"block_size={block_size} is not supported on CUDA: the paged-attention kernels accept "
            f"{', '.join(map(str, CUDA_BLOCK_SIZES))}; pass --block-size with one of them (16 is the default)"
        )


def check_fits(scheduler_config: SchedulerConfig, cache_config: CacheConfig) -> None:
    """Refuse a cache that cannot hold one sequence of `max_model_len` tokens.

    A sequence that outgrows the whole cache can never be scheduled again once preempted, so the
    engine would spin forever; vLLM refuses the same configuration at start-up.
    """
    if scheduler_config.max_model_len > cache_config.num_slots:
        raise ConfigError(
            f"SchedulerConfig.max_model_len: expected <= the KV cache's {cache_config.num_slots} token slots "
            f"({cache_config.num_blocks} blocks x {cache_config.block_size}), found {scheduler_config.max_model_len}; "
            "give the KV cache more memory or lower max_model_len"
        )
