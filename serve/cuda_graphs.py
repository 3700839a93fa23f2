"""CUDA graphs for decode steps, and the start-up warm-up that autotunes the GEMMs (the CUDA path).

A decode step of a small model is dominated by launch overhead: hundreds of small kernels whose
launches cost more CPU time than their GPU time. As vLLM does, the engine captures the decoder forward
once per batch-size bucket at start-up, over persistent input buffers, and replays the graph per step:

  - buckets: 1, 2, 4, 8, then multiples of 8 up to max_num_seqs; a decode batch of n sequences runs
    in the smallest bucket >= n, its extra rows padding (slot -1: no KV write; context 1: finite);
  - inputs (token ids, positions, slot mapping, block tables, context lengths) are copied into the
    persistent buffers, the graph replays, and the bucket's persistent output holds the hidden states;
  - prefill and mixed batches, and decode batches above the largest bucket, run eagerly;
  - `enforce_eager=True` turns graphs off; a capture that fails logs a warning and the engine runs
    eagerly, it never fails to start.

Before capture, `warm_up` runs one eager forward per GEMM row count the engine can launch (powers of
two up to the fused kernel's limit, which are the autotuner's M buckets) so Triton's autotuning happens
at start-up, never while a request waits.

The bookkeeping is device-independent: `DecodeGraphRunner(capture=direct_capture)` drives the same
persistent-buffer path on CPU with capture replaced by a direct call (tests).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from qserve.serve.model import AttentionMetadata, CausalLM
from qserve.serve.outputs import ScheduledChunk

log = logging.getLogger(__name__)

# capture(fn) -> (replay, out): after replay(), `out` holds what fn() computes from the current
# contents of the persistent buffers.
Capture = Callable[[Callable[[], torch.Tensor]], tuple[Callable[[], None], torch.Tensor]]


def graph_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes that get a graph: 1, 2, 4, 8, 16, 24, ... up to max_num_seqs (included)."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs]
    sizes += list(range(8, max_num_seqs, 8))
    return sorted(set(sizes) | {max_num_seqs})


def warm_up_token_counts(max_num_batched_tokens: int, fused_max_tokens: int) -> list[int]:
    """Row counts whose forwards cover every autotune key of the fused GEMM: its key holds
    next_power_of_2(rows), and rows above `fused_max_tokens` take the untuned dequantize path."""
    top = min(max_num_batched_tokens, fused_max_tokens)
    return [1 << i for i in range(int(math.log2(top)) + 1)] if top >= 1 else []


def cuda_capture(pool=None) -> Capture:
    """Capture with torch.cuda.graph, sharing one memory pool across buckets."""

    def capture(fn):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = fn()
        return graph.replay, out

    return capture


def direct_capture(fn):
    """Capture replaced by a direct call: replay recomputes fn() into the same output tensor."""
    out = fn()

    def replay():
        out.copy_(fn())

    return replay, out


class DecodeGraphRunner:
    """Decode-only steps of one model through per-bucket graphs over persistent input buffers."""

    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        max_num_seqs: int,
        max_model_len: int,
        device: torch.device,
        capture: Capture | None = None,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.buckets = graph_buckets(max_num_seqs)
        self.max_blocks = math.ceil(max_model_len / block_size)
        self._capture = capture if capture is not None else cuda_capture(
            torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        )
        n = self.buckets[-1]
        i64, i32 = torch.int64, torch.int32
        self.input_ids = torch.zeros(n, dtype=i64, device=device)
        self.positions = torch.zeros(n, dtype=i64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=i64, device=device)
        self.block_tables = torch.zeros((n, self.max_blocks), dtype=i32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=i32, device=device)  # one token per sequence
        self.seq_lens = torch.ones(n, dtype=i32, device=device)
        self._replays: dict[int, tuple[Callable[[], None], torch.Tensor]] = {}
        self.enabled = False

    def _forward(self, bucket: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:bucket],
            block_tables=self.block_tables[:bucket],
            query_start_loc=self.query_start_loc[: bucket + 1],
            seq_lens=self.seq_lens[:bucket],
            max_query_len=1,
        )
        return self.model(self.input_ids[:bucket], self.positions[:bucket], self.kv_caches, meta)

    @torch.inference_mode()
    def capture_all(self) -> bool:
        """Warm up and capture every bucket, largest first (smaller graphs reuse the pool's memory).
        On any failure: a warning, no graphs, and the engine runs eagerly. Returns whether enabled."""
        self._reset_padding(0)
        try:
            for bucket in reversed(self.buckets):
                self._forward(bucket)  # eager first: autotuning and lazy allocations happen here
                self._replays[bucket] = self._capture(lambda b=bucket: self._forward(b))
        except Exception as e:  # a failed capture must never stop the engine
            log.warning("CUDA graph capture failed (%s: %s); decode runs eagerly", type(e).__name__, e)
            self._replays.clear()
            self.enabled = False
            return False
        self.enabled = True
        return True

    def bucket_for(self, num_seqs: int) -> int | None:
        for b in self.buckets:
            if b >= num_seqs:
                return b
        return None

    def _reset_padding(self, start: int) -> None:
        self.slot_mapping[start:] = -1  # padding rows write no KV
        self.seq_lens[start:] = 1  # and attend to one (harmless) key: their outputs are discarded
        self.input_ids[start:] = 0
        self.positions[start:] = 0

    def can_run(self, chunks: tuple[ScheduledChunk, ...]) -> bool:
        return (
            self.enabled
            and len(chunks) <= self.buckets[-1]
            and all(len(c.token_ids) == 1 for c in chunks)
        )

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [bucket, hidden] of a decode batch (rows past len(input_ids) are padding);
        inputs as the runner prepared them (one token per sequence)."""
        n = input_ids.shape[0]
        bucket = self.bucket_for(n)
        if bucket is None or bucket not in self._replays:
            raise ValueError(f"no captured graph for a decode batch of {n} sequences (buckets {self.buckets})")
        width = meta.block_tables.shape[1]
        if width > self.max_blocks:
            raise ValueError(f"block table width {width} exceeds the captured {self.max_blocks} blocks")
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.block_tables[:n, :width].copy_(meta.block_tables)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self._reset_padding(n)
        replay, out = self._replays[bucket]
        replay()
        return out


@torch.inference_mode()
def warm_up(runner, token_counts: list[int]) -> None:
    """One eager forward per row count (a one-sequence prefill chunk over the cache's first blocks,
    which hold nothing yet), so every GEMM autotune key is tuned before the first request."""
    capacity = runner.kv_caches[0][0].shape[0] * runner.block_size
    for n in token_counts:
        if n > capacity:
            break
        blocks = tuple(range(math.ceil(n / runner.block_size)))
        batch = runner._prepare((ScheduledChunk(0, (0,) * n, 0, blocks, True),))
        runner.model(batch.input_ids, batch.positions, runner.kv_caches, batch.meta)
