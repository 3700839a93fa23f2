"""The model runner: owns the paged KV cache and turns a SchedulerOutput into sampled tokens.

One step = copy-on-write block copies, one forward pass over the flat mixed batch (prefill chunks and
decodes concatenated, no padding), logits only for the rows that sample, then the sampler.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from qserve.errors import ResourceError
from qserve.kernels import cpu_ext
from qserve.serve.config import check_block_size
from qserve.serve.model import AttentionMetadata, CausalLM, ModelConfig
from qserve.serve.outputs import ModelRunnerOutput, ScheduledChunk, SchedulerOutput
from qserve.serve.sampler import Sampler, SamplingState

DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Key + value for every layer: 2 * layers * block_size * kv_heads * head_dim * element size."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * element


def cpu_num_blocks(
    cfg: ModelConfig, block_size: int, dtype: torch.dtype, budget_bytes: int | None, max_needed_blocks: int
) -> int:
    """Blocks that fit `budget_bytes` (default 1 GiB), capped at what the scheduler could ever use."""
    budget = DEFAULT_CPU_KV_CACHE_BYTES if budget_bytes is None else budget_bytes
    per_block = kv_bytes_per_block(cfg, block_size, dtype)
    fit = budget // per_block
    if budget_bytes is not None and fit < 1:
        raise ResourceError(
            f"kv_cache_memory={budget_bytes} bytes holds no KV block ({per_block} bytes each); raise it"
        )
    # An explicit budget is honoured as given; the default is trimmed so small runs do not reserve 1 GiB.
    return int(fit) if budget_bytes is not None else max(1, min(int(fit), max_needed_blocks))


def cuda_num_blocks(
    model: CausalLM,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    utilization: float,
    profile_tokens: int,
) -> int:
    """Blocks that fit in `utilization` of the GPU after the weights and a profiled peak activation.

    The profile runs one forward of `profile_tokens` prompt tokens (the step budget) against a
    throwaway cache, measuring the activation peak the engine must leave free.
    """
    cfg = model.config
    blocks = math.ceil(profile_tokens / block_size)
    runner = ModelRunner(model, blocks, block_size, device, dtype, Sampler(device))
    torch.cuda.reset_peak_memory_stats(device)
    runner.profile_forward(profile_tokens)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - runner.kv_cache_bytes
    del runner
    torch.cuda.empty_cache()
    _, total = torch.cuda.mem_get_info(device)
    available = utilization * total - peak
    num = int(available // kv_bytes_per_block(cfg, block_size, dtype))
    if num < 1:
        raise ResourceError(
            f"gpu_memory_utilization={utilization} leaves no room for the KV cache: weights and activations "
            f"peak at {peak / 2**30:.2f} GiB of {total / 2**30:.2f} GiB; raise it or lower max_num_batched_tokens"
        )
    return num


@dataclass(frozen=True)
class StepBatch:
    input_ids: torch.Tensor  # int64 [num_tokens]
    positions: torch.Tensor  # int64 [num_tokens]
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # int64 [num_sampling_chunks]: last token of each chunk that samples
    sample_seq_ids: list[int]


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        sampler: Sampler,
    ) -> None:
        check_block_size(block_size, device.type)  # before cuda_num_blocks' profile runs a kernel
        cfg = model.config
        self.model = model
        self.block_size = block_size
        self.device = device
        self.sampler = sampler
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(cfg.num_layers)
        ]
        self.kv_cache_bytes = num_blocks * kv_bytes_per_block(cfg, block_size, dtype)
        if device.type == "cpu":
            cpu_ext.available()  # build or load the C++ kernels now (any dtype: the sampler uses them too),
            # not inside the first request
        self.graphs = None  # a cuda_graphs.DecodeGraphRunner once prepare_cuda captured decode graphs

    def prepare_cuda(
        self, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int, enforce_eager: bool
    ) -> None:
        """Start-up of the CUDA path: autotune the GEMMs for every row count the engine launches, then
        capture decode graphs per batch bucket unless `enforce_eager` (serve/cuda_graphs.py)."""
        if self.device.type != "cuda":
            return
        from qserve.kernels import FUSED_MAX_TOKENS
        from qserve.serve import cuda_graphs

        cuda_graphs.warm_up(self, cuda_graphs.warm_up_token_counts(max_num_batched_tokens, FUSED_MAX_TOKENS))
        if not enforce_eager:
            graphs = cuda_graphs.DecodeGraphRunner(
                self.model, self.kv_caches, self.block_size, max_num_seqs, max_model_len, self.device
            )
            self.graphs = graphs if graphs.capture_all() else None

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, states: Mapping[int, SamplingState]) -> ModelRunnerOutput:
        if not out.chunks:
            return ModelRunnerOutput(sampled={})
        self._copy_blocks(out.block_copies)
        batch = self._prepare(out.chunks)
        if self.graphs is not None and self.graphs.can_run(out.chunks):
            hidden = self.graphs.run(batch.input_ids, batch.positions, batch.meta)  # [bucket, hidden]
        else:
            hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta)
        if not batch.sample_seq_ids:
            return ModelRunnerOutput(sampled={})
        logits = self.model.compute_logits(hidden[batch.sample_rows])  # [num_sampling, vocab]
        tokens, logprobs = self.sampler(logits, [states[seq_id] for seq_id in batch.sample_seq_ids])
        return ModelRunnerOutput(
            sampled=dict(zip(batch.sample_seq_ids, tokens, strict=True)),
            logprobs={s: lp for s, lp in zip(batch.sample_seq_ids, logprobs, strict=True) if lp is not None},
        )

    @torch.inference_mode()
    def profile_forward(self, num_tokens: int) -> None:
        """One forward of a `num_tokens` prompt plus its logits, to measure the activation peak."""
        chunk = ScheduledChunk(
            0, (0,) * num_tokens, 0, tuple(range(math.ceil(num_tokens / self.block_size))), True
        )
        batch = self._prepare((chunk,))
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta)
        self.model.compute_logits(hidden[batch.sample_rows])

    def _copy_blocks(self, copies: tuple[tuple[int, int], ...]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for key_cache, value_cache in self.kv_caches:
            key_cache[dst] = key_cache[src]
            value_cache[dst] = value_cache[src]

    def _prepare(self, chunks: tuple[ScheduledChunk, ...]) -> StepBatch:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        sample_seq_ids: list[int] = []
        for c in chunks:
            end = c.start_pos + len(c.token_ids)
            input_ids.extend(c.token_ids)
            positions.extend(range(c.start_pos, end))
            blocks = c.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(c.start_pos, end))
            query_start_loc.append(len(input_ids))
            seq_lens.append(end)
            if c.sample:
                sample_rows.append(len(input_ids) - 1)
                sample_seq_ids.append(c.seq_id)
        width = max(len(c.block_ids) for c in chunks)
        # Padding entries are never read: attention stops at seq_lens.
        tables = [list(c.block_ids) + [0] * (width - len(c.block_ids)) for c in chunks]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            max_query_len=max(len(c.token_ids) for c in chunks),
        )
        return StepBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            meta=meta,
            sample_rows=torch.tensor(sample_rows, dtype=torch.int64, device=dev),
            sample_seq_ids=sample_seq_ids,
        )
