"""Tensor parallelism: one model split across N processes (`tensor_parallel_size`), Megatron style.

**Sharding** (`check_shardable`, `shard_linear`). Per decoder layer the fused q/k/v and gate/up Linears
are column-parallel: rank r keeps its slice of the output features (its q heads, its KV heads, its slice
of the intermediate size), so attention and the MLP's activation run on local data with no exchange.
o_proj and down_proj are row-parallel: rank r keeps the input features that match its column slice,
computes a partial product and one all-reduce (sum) per layer per Linear gives every rank the full
output; a row-parallel bias is added once, after the reduction. KV heads are split across ranks; with
fewer KV heads than ranks each KV head is replicated on N / num_kv_heads ranks (N must then be a multiple
of num_kv_heads, so that a rank's q heads share one KV head). Each rank's paged KV cache holds only its
own KV heads: the model a rank builds has the local head counts in its `ModelConfig`, and the runner
sizes the cache from that.

Packed 4-bit checkpoints (GPTQ v1/v2 sym/asym, act-order; AWQ GEMM) are sharded in their logical form
(kernels/packing.py unpacks the codes, zero points, scales and g_idx; the slice is packed again in the
checkpoint's own layout), so the shard is exact whatever the layout packs along: column shards cut the
output features (the packed dim of AWQ's qweight and of both formats' qzeros), row shards cut the input
features (the packed dim of GPTQ's qweight). A row shard keeps exactly the groups its input rows use:
without act-order these are whole groups (the shard must start and end on a group boundary); with
act-order the shard's g_idx is remapped onto the groups its rows reference (as vLLM keeps the full
scales). The CPU's resident 4-bit layout needs every group to hold `group_size` rows. For
down_proj the engine chooses which intermediate channels a rank owns (`mlp_channels`): the channels of
whole act-order groups, gate/up sharded to the same channels (a consistent permutation of the
intermediate dim leaves the MLP unchanged), so the shard stays packed. o_proj's inputs are fixed by
the rank's heads, so an act-order o_proj shard holds part of every group: on the CPU it is dequantized
at load (logged), still exact; CUDA's fused kernel reads any g_idx.

Embeddings and the LM head are replicated: for the models this engine serves the vocabulary
projection of the few sampled rows costs far less than the extra all-gather (or all-reduce) per step a
vocab-parallel head needs, and every rank already has the final hidden states after the last
all-reduce.

Mixture-of-experts blocks (`ParallelSparseMoE`) are sharded per expert's intermediate dimension, not expert
parallel: every rank holds every expert's slice (gate/up column-parallel, down row-parallel, act-order
experts by whole groups as the dense down_proj), the router is replicated, so every rank routes each
token to the same experts, and the partial outputs of the routed experts (and of a shared expert,
sharded the same way) are summed by one all-reduce per block. An expert's down_proj therefore has no
all-reduce of its own. Unlike expert parallelism, no rank is idle when routing is unbalanced and no
token is exchanged; an expert's intermediate size must divide by N.

**Execution** (`TensorParallelExecutor`, `worker_main`). Rank 0 is the engine's own process: it keeps the
scheduler, block manager and sampler. It starts N - 1 worker processes (fresh interpreters,
`python -m qserve.serve.tp_worker`, so that a daemonic engine-core process can start them too), joins a
torch.distributed process group with them (gloo on CPU; NCCL for the all-reduces on CUDA, with a gloo
group beside it for the step's inputs) and, each step, wakes the workers through their command pipe and
broadcasts the step's scheduled chunks and block copies; every rank builds the same flat batch and runs
the forward; rank 0 alone computes logits and samples. Each rank runs on its share of the torch
threads (torch.get_num_threads() // N, at least 1).

Failure. A worker that dies (even by SIGKILL) closes its sockets: the collective rank 0 is in fails at
once ("Connection closed by peer"), and before every step rank 0 polls the workers' processes, so the
engine raises `TensorParallelError` naming the rank, pid and exit status within a step; the server's
engine core then dies and `qserve serve` answers 503 and exits non-zero. An idle engine core checks the
workers each second. The process group's timeout (QSERVE_TP_TIMEOUT_S, default 600 s) bounds a wait on
a worker that hangs without dying. Workers exit when rank 0 closes their pipe (engine closed, garbage
collected, interpreter exit, or rank 0 killed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

import torch
from torch import nn

from qserve.errors import ConfigError, QserveError
from qserve.kernels import packing
from qserve.serve.model import SparseMoE

log = logging.getLogger(__name__)

_POLL_S = 0.2  # how often start-up waits look at the workers' processes
_STOP_WAIT_S = 5.0  # how long close() waits for a worker to exit before killing it


class TensorParallelError(QserveError):
    """A tensor-parallel worker died or failed; the engine cannot continue."""


# ---- sharding -----------------------------------------------------------------------------------------


def _valid_sizes(ok, limit: int) -> str:
    sizes = [n for n in range(1, limit + 1) if ok(n)]
    return ", ".join(map(str, sizes)) if sizes else "1"


def check_shardable(cfg, quant, n: int) -> None:
    """Refuse, before any weight is read, a model that cannot be split over `n` ranks (ConfigError
    naming the layer and the sizes that work). `cfg` is the full model's ModelConfig, `quant` its
    QuantSpec or None."""
    if n == 1:
        return
    limit = max(cfg.num_heads, 1)

    def fail(layer: str, why: str, ok) -> None:
        raise ConfigError(
            f"tensor_parallel_size={n}: {layer}: {why}; valid tensor_parallel_size values for this model: "
            f"{_valid_sizes(ok, limit)}"
        )

    # the MLP's intermediate sizes: the dense MLP's, or each routed expert's and the shared expert's
    if cfg.num_experts:
        experts = f"mlp.experts (gate/up/down of each of the {cfg.num_experts} experts)"
        mlps = [(experts, cfg.expert_intermediate_size)]
        if cfg.shared_expert_intermediate_size:
            mlps.append(("mlp.shared_expert (gate/up/down)", cfg.shared_expert_intermediate_size))
    else:
        mlps = [("mlp.gate_up_proj / mlp.down_proj", cfg.intermediate_size)]

    def heads_ok(k: int) -> bool:
        kv = cfg.num_kv_heads
        return cfg.num_heads % k == 0 and (kv % k == 0 if kv >= k else k % kv == 0)

    def rows_ok(k: int, in_features: int) -> bool:
        if in_features % k:
            return False
        if quant is None:
            return True
        local = in_features // k
        if local % (32 // quant.bits):  # GPTQ packs 32 / bits input rows per int32
            return False
        if quant.group_size in (-1, None) or (quant.method == "gptq" and quant.desc_act):
            return True  # one group, or act-order: the shard's g_idx is remapped
        return local % quant.group_size == 0

    def cols_ok(k: int) -> bool:
        if not heads_ok(k) or any(size % k for _, size in mlps):
            return False
        if quant is None:
            return True
        per_word = 32 // quant.bits  # qzeros (and AWQ's qweight) pack the output features
        outs = [cfg.num_heads // k * cfg.head_dim, max(cfg.num_kv_heads // k, 1) * cfg.head_dim,
                *(size // k for _, size in mlps)]  # fmt: skip
        return all(o % per_word == 0 for o in outs)

    q_size = cfg.num_heads * cfg.head_dim
    all_ok = lambda k: (heads_ok(k) and cols_ok(k) and rows_ok(k, q_size)
                        and all(rows_ok(k, size) for _, size in mlps))  # fmt: skip
    if not heads_ok(n):
        fail("self_attn", f"{cfg.num_heads} attention heads / {cfg.num_kv_heads} KV heads do not split evenly "
             "over the ranks (the heads must divide by N; the KV heads by N, or N by the KV heads)", all_ok)  # fmt: skip
    for layer, size in mlps:
        if size % n:
            fail(layer, f"intermediate_size={size} does not divide by {n}", all_ok)
    if not cols_ok(n):
        fail("self_attn.qkv / " + ", ".join(layer for layer, _ in mlps), f"a rank's output features are not a "
             f"multiple of the {32 // quant.bits} a packed word holds", all_ok)  # fmt: skip
    group = "" if quant is None else f" (group_size={quant.group_size})"
    if not rows_ok(n, q_size):
        fail("self_attn.o_proj", f"its {q_size} input features split into {q_size // n} per rank, which is not "
             f"a whole number of quantization groups{group}", all_ok)  # fmt: skip
    for layer, size in mlps:
        if not rows_ok(n, size):
            fail(layer, f"down_proj's {size} input features split into {size // n} per rank, which is not a "
                 f"whole number of quantization groups{group}", all_ok)  # fmt: skip


def local_config(cfg, n: int):
    """The ModelConfig one rank builds: its q heads, its KV heads (at least one) and its intermediate slices."""
    if n == 1:
        return cfg
    return dataclasses.replace(
        cfg, num_heads=cfg.num_heads // n, num_kv_heads=max(cfg.num_kv_heads // n, 1),
        intermediate_size=cfg.intermediate_size // n, expert_intermediate_size=cfg.expert_intermediate_size // n,
        shared_expert_intermediate_size=cfg.shared_expert_intermediate_size // n,
    )  # fmt: skip


def mlp_config(cfg, intermediate_size: int):
    """`cfg` as `shard_linear` reads it for one MLP of `intermediate_size` (a routed or shared expert)."""
    return dataclasses.replace(cfg, intermediate_size=intermediate_size)


def _ranges(cfg, rank: int, n: int) -> dict[str, tuple[int, int]]:
    """Output-feature ranges of rank `rank` in the q, k (= v) and gate (= up) projections."""
    d = cfg.head_dim
    hl = cfg.num_heads // n
    q = (rank * hl * d, (rank + 1) * hl * d)
    if cfg.num_kv_heads >= n:
        kl = cfg.num_kv_heads // n
        k = (rank * kl * d, (rank + 1) * kl * d)
    else:  # replicated: the KV head of this rank's q heads
        head = (rank * hl) // (cfg.num_heads // cfg.num_kv_heads)
        k = (head * d, (head + 1) * d)
    il = cfg.intermediate_size // n
    return {"q": q, "k": k, "mlp": (rank * il, (rank + 1) * il)}


def _unpack(p, spec) -> packing.QuantizedWeight:
    if spec.method == "awq":
        return packing.unpack_awq(p.qweight, p.qzeros, p.scales, spec.group_size)
    return packing.unpack_gptq(p.qweight, p.qzeros, p.scales, p.g_idx, spec.bits, spec.group_size,
                               spec.checkpoint_format)  # fmt: skip


def _pack(qw: packing.QuantizedWeight, spec):
    from qserve.kernels import g_idx_is_trivial
    from qserve.serve.quant_linear import PackedLinear

    if spec.method == "awq":
        a = packing.pack_awq(qw)
        return PackedLinear(a.qweight, a.qzeros, qw.scales.contiguous(), None)
    g = packing.pack_gptq(qw, spec.checkpoint_format)
    g_idx = None if g_idx_is_trivial(g.g_idx, spec.group_size) else g.g_idx
    return PackedLinear(g.qweight.contiguous(), g.qzeros.contiguous(), qw.scales.contiguous(), g_idx)


def _select_outputs(part, index: torch.Tensor, spec):
    """The output features `index` of one checkpoint Linear (dense [out, in] or packed)."""
    if isinstance(part, torch.Tensor):
        return part.index_select(0, index).contiguous()
    qw = _unpack(part, spec)
    sub = packing.QuantizedWeight(
        qw.intweight.index_select(0, index), qw.scales.index_select(1, index), qw.zeros.index_select(1, index),
        qw.g_idx, qw.bits, qw.group_size,
    )  # fmt: skip
    return _pack(sub, spec)


def _select_inputs(part, index: torch.Tensor, spec):
    """The input features `index` (ascending) of one checkpoint Linear, with exactly the groups they use."""
    if isinstance(part, torch.Tensor):
        return part.index_select(1, index).contiguous()
    qw = _unpack(part, spec)
    g = qw.g_idx.index_select(0, index).to(torch.int64)
    used = torch.unique(g)  # sorted
    sub = packing.QuantizedWeight(
        qw.intweight.index_select(1, index).contiguous(), qw.scales.index_select(0, used),
        qw.zeros.index_select(0, used), torch.searchsorted(used, g).to(torch.int32), qw.bits, qw.group_size,
    )  # fmt: skip
    return _pack(sub, spec)


def mlp_channels(down_part, rank: int, n: int) -> torch.Tensor | None:
    """Rank `rank`'s intermediate channels when down_proj has act-order groups: the channels of groups
    [rank G / N, (rank + 1) G / N), ascending, so that its down_proj shard holds whole groups (the CPU's
    4-bit layout can then keep it packed); gate/up take the same channels, which leaves the MLP's output
    unchanged. None (contiguous slices) for dense or contiguous-group layers, or groups that do not split."""
    g_idx = getattr(down_part, "g_idx", None)
    if g_idx is None:
        return None
    g = g_idx.to(torch.int64)
    num = int(g.max()) + 1
    counts = torch.bincount(g, minlength=num)
    if num % n or not bool((counts == counts[0]).all()):
        return None
    per = num // n
    return torch.nonzero((g >= rank * per) & (g < (rank + 1) * per)).flatten()


def _arange(lo: int, hi: int) -> torch.Tensor:
    return torch.arange(lo, hi, dtype=torch.int64)


def shard_linear(kind: str, parts: list, biases: list, cfg, spec, rank: int, n: int,
                 channels: torch.Tensor | None = None):  # fmt: skip
    """(parts, biases) of rank `rank` for one engine Linear built from checkpoint `parts`.

    kind: "qkv" / "gate_up" (column-parallel; q|k|v or gate|up as separate parts or fused in one) or
    "o" / "down" (row-parallel: the biases are returned whole, to be added after the all-reduce).
    `channels`: the MLP's intermediate channels of this rank (`mlp_channels`) instead of a contiguous slice."""
    r = _ranges(cfg, rank, n)
    mlp = _arange(*r["mlp"]) if channels is None else channels
    if kind in ("o", "down"):
        index = _arange(*r["q"]) if kind == "o" else mlp
        return [_select_inputs(p, index, spec) for p in parts], biases
    if kind == "qkv":
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        segments = [(0, _arange(*r["q"])), (q_size, _arange(*r["k"])), (q_size + kv_size, _arange(*r["k"]))]
    elif kind == "gate_up":
        segments = [(0, mlp), (cfg.intermediate_size, mlp)]
    else:
        raise ValueError(f"unknown Linear kind {kind!r}")
    if len(parts) == len(segments):  # one checkpoint Linear per segment
        indexes = [index for _, index in segments]
    elif len(parts) == 1:  # fused in the checkpoint (Phi-3's qkv_proj / gate_up_proj)
        indexes = [torch.cat([off + index for off, index in segments])]
    else:
        raise ValueError(f"{kind}: {len(parts)} checkpoint Linears, expected 1 or {len(segments)}")
    new_parts = [_select_outputs(p, i, spec) for p, i in zip(parts, indexes, strict=True)]
    new_biases = [None if b is None else b.index_select(0, i) for b, i in zip(biases, indexes, strict=True)]
    return new_parts, new_biases


class RowParallelLinear(nn.Module):
    """A row-parallel Linear: the local partial product, one all-reduce (sum), then the bias."""

    def __init__(self, inner: nn.Module, bias: torch.Tensor | None, comm: Communicator) -> None:
        super().__init__()
        self.inner = inner
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        self.comm.all_reduce(y)
        return y if self.bias is None else y + self.bias


class ParallelSparseMoE(SparseMoE):
    """A rank's MoE block: the replicated router, every expert's (and the shared expert's) intermediate
    slice, and one all-reduce of the block's output. Each rank routes the same tokens to the same
    experts (the router and its input are the same on every rank) and sums its experts' partial
    down_proj products; the routing weights and the shared expert's sigmoid gate scale those partial
    sums, so the reduced sum is the whole block's output."""

    def __init__(self, cfg, experts: list[nn.Module], shared_expert: nn.Module | None, comm: Communicator):
        super().__init__(cfg, experts, shared_expert)
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        self.comm.all_reduce(y)
        return y


# ---- communication ----------------------------------------------------------------------------------


def _timeout() -> datetime.timedelta:
    raw = os.environ.get("QSERVE_TP_TIMEOUT_S", "600")
    try:
        seconds = float(raw)
    except ValueError:
        raise ConfigError(f"QSERVE_TP_TIMEOUT_S={raw!r}: expected a number of seconds") from None
    return datetime.timedelta(seconds=seconds)


class Communicator:
    """One rank's process groups: `cpu` (gloo) carries the step's inputs; `device` (gloo on CPU, NCCL on
    CUDA) carries the all-reduces. No global torch.distributed state: several engines may coexist."""

    def __init__(self, store_path: str, rank: int, world_size: int, device: torch.device) -> None:
        import torch.distributed as dist

        self.rank, self.world_size = rank, world_size
        timeout = _timeout()
        store = dist.FileStore(store_path, world_size)
        self.cpu = dist.ProcessGroupGloo(dist.PrefixStore("cpu", store), rank, world_size, timeout)
        if device.type == "cuda":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.device = dist.ProcessGroupNCCL(dist.PrefixStore("nccl", store), rank, world_size, opts)
        else:
            self.device = self.cpu

    def all_reduce(self, t: torch.Tensor) -> None:
        self.device.allreduce([t]).wait()

    def min_int(self, value: int) -> int:
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self.cpu.allreduce([t], opts).wait()
        return int(t.item())

    def broadcast_object(self, obj=None):
        """Rank 0's `obj` on every rank (pickled; a length, then the bytes)."""
        if self.rank == 0:
            data = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=5)), dtype=torch.uint8)
            size = torch.tensor([data.numel()], dtype=torch.int64)
        else:
            size = torch.zeros(1, dtype=torch.int64)
        self.cpu.broadcast([size], _root0()).wait()
        if self.rank != 0:
            data = torch.empty(int(size.item()), dtype=torch.uint8)
        self.cpu.broadcast([data], _root0()).wait()
        return obj if self.rank == 0 else pickle.loads(data.numpy().tobytes())


def _root0():
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    return opts


@dataclass(frozen=True)
class ShardInfo:
    """What the loader needs to build one rank's shard of the model."""

    rank: int
    world_size: int
    comm: Communicator


# ---- the runner of each rank --------------------------------------------------------------------------


def make_runner(base_cls, comm: Communicator, workers: _Workers | None):
    """A ModelRunner subclass whose step first sends (rank 0) or receives (workers) the step's inputs."""

    class TensorParallelRunner(base_cls):
        @torch.inference_mode()
        def execute(self, out, states):
            from qserve.serve.outputs import ModelRunnerOutput

            if not out.chunks:
                return ModelRunnerOutput(sampled={})
            workers.wake()
            try:
                comm.broadcast_object((out.block_copies, out.chunks))
                hidden = self._forward(out.block_copies, out.chunks)
            except RuntimeError as exc:  # a collective failed: name the worker that is gone
                raise workers.failure(exc) from exc
            batch = self._last_batch
            if not batch.sample_seq_ids:
                return ModelRunnerOutput(sampled={})
            logits = self.model.compute_logits(hidden[batch.sample_rows])
            tokens, logprobs = self.sampler(logits, [states[s] for s in batch.sample_seq_ids])
            return ModelRunnerOutput(
                sampled=dict(zip(batch.sample_seq_ids, tokens, strict=True)),
                logprobs={s: lp for s, lp in zip(batch.sample_seq_ids, logprobs, strict=True) if lp is not None},
            )

        @torch.inference_mode()
        def worker_step(self) -> None:
            block_copies, chunks = comm.broadcast_object()
            self._forward(block_copies, chunks)

        def _forward(self, block_copies, chunks) -> torch.Tensor:
            self._copy_blocks(block_copies)
            batch = self._prepare(chunks)
            self._last_batch = batch
            return self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta)

    return TensorParallelRunner


# ---- rank 0: the workers ------------------------------------------------------------------------------


class _Workers:
    """The worker processes and their pipes; holds no reference to the engine, so the engine can be
    garbage collected and a weakref.finalize can still stop the workers."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.cmd: list[Connection] = []  # rank 0 -> worker
        self.status: list[Connection] = []  # worker -> rank 0
        self.store_dir: str | None = None
        self.dead: TensorParallelError | None = None
        self.closed = False

    def check(self) -> None:
        if self.dead is not None:
            raise self.dead
        if self.closed:
            raise TensorParallelError("the engine was closed (its tensor-parallel workers have stopped)")
        for rank, proc in enumerate(self.procs, start=1):
            code = proc.poll()
            if code is not None:
                reported = self._reported_failure(rank)
                if reported is not None:  # the worker said why before it exited
                    raise _worker_failure(rank, reported)
                self.dead = TensorParallelError(
                    f"tensor-parallel worker rank {rank} (pid {proc.pid}) {_how(code)}; the engine cannot "
                    "continue (its shard of the model and KV cache are gone); restart the engine"
                )
                raise self.dead

    def _reported_failure(self, rank: int) -> BaseException | None:
        conn = self.status[rank - 1]
        try:
            while conn.poll():
                msg = conn.recv()
                if msg[0] == "failed":
                    return msg[1]
        except (EOFError, OSError):
            pass
        return None

    def wake(self) -> None:
        self.check()
        for rank, conn in enumerate(self.cmd, start=1):
            try:
                conn.send_bytes(b"s")
            except OSError as exc:
                self._settle()
                self.check()
                raise TensorParallelError(f"tensor-parallel worker rank {rank} is unreachable: {exc}") from exc

    def _settle(self) -> None:
        """Give a worker whose sockets just closed a moment to be reaped, so its exit status is known."""
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and all(p.poll() is None for p in self.procs):
            time.sleep(0.02)

    def failure(self, exc: BaseException) -> TensorParallelError:
        self._settle()
        try:
            self.check()
        except TensorParallelError as dead:
            return dead
        self.dead = TensorParallelError(f"a tensor-parallel collective failed: {exc}")
        return self.dead

    def wait_for(self, stage: str) -> None:
        """Block until every worker has reported `stage`; raise its error if one fails or dies."""
        pending = dict(enumerate(self.status, start=1))
        while pending:
            ready = wait(list(pending.values()), timeout=_POLL_S)
            for rank, conn in list(pending.items()):
                if conn not in ready:
                    continue
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    self._settle()
                    self.check()
                    raise TensorParallelError(f"tensor-parallel worker rank {rank} closed its pipe") from None
                if msg[0] == "failed":
                    raise _worker_failure(rank, msg[1])
                if msg[0] != stage:
                    raise TensorParallelError(f"worker rank {rank} sent {msg[0]!r} while {stage!r} was expected")
                del pending[rank]
            self.check()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for conn in self.cmd:
            with contextlib.suppress(OSError):
                conn.send_bytes(b"q")
        deadline = time.monotonic() + _STOP_WAIT_S
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for conn in (*self.cmd, *self.status):
            conn.close()
        if self.store_dir:
            import shutil

            shutil.rmtree(self.store_dir, ignore_errors=True)


def _worker_failure(rank: int, exc: BaseException) -> BaseException:
    """What a worker that failed to start reported: the project's own errors (a ConfigError, a
    CheckpointError) as they are, anything else as a TensorParallelError naming the rank."""
    if isinstance(exc, QserveError):
        return exc
    return TensorParallelError(f"tensor-parallel worker rank {rank} failed to start: {type(exc).__name__}: {exc} "
                               "(its log above has the traceback)")  # fmt: skip


def _how(code: int) -> str:
    if code < 0:
        import signal

        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class TensorParallelExecutor:
    """Rank 0's side: starts the workers, joins the process group, and drives the workers' start-up
    in step with the engine's own (load, KV-cache size, runner)."""

    def __init__(self, args, device: torch.device, max_model_len: int) -> None:
        n = args.tensor_parallel_size
        self.world_size = n
        self.device = device
        self._threads_before = torch.get_num_threads()
        threads = max(1, self._threads_before // n)
        self.threads = threads
        self._workers = workers = _Workers()
        self._finalizer = weakref.finalize(self, workers.close)
        workers.store_dir = tempfile.mkdtemp(prefix="qserve-tp-")
        store_path = os.path.join(workers.store_dir, "store")
        try:
            for rank in range(1, n):
                self._start_worker(args, rank, n, store_path, threads, max_model_len)
            torch.set_num_threads(threads)
            log.info("tensor parallel: %d ranks (workers %s), %d torch thread(s) each", n,
                     ", ".join(str(p.pid) for p in workers.procs), threads)  # fmt: skip
            self.comm = self._join(store_path, n)
            self.shard = ShardInfo(0, n, self.comm)
        except BaseException:
            self.close()
            raise

    def _start_worker(self, args, rank: int, n: int, store_path: str, threads: int, max_model_len: int) -> None:
        cmd_r, cmd_w = os.pipe()
        st_r, st_w = os.pipe()
        env = dict(os.environ)
        proc = subprocess.Popen(
            [sys.executable, "-m", "qserve.serve.tp_worker", str(cmd_r), str(st_w)],
            pass_fds=(cmd_r, st_w), env=env, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(cmd_r)
        os.close(st_w)
        cmd = Connection(cmd_w, readable=False)
        self._workers.procs.append(proc)
        self._workers.cmd.append(cmd)
        self._workers.status.append(Connection(st_r, writable=False))
        level = logging.getLogger().getEffectiveLevel()
        cmd.send((args, rank, n, store_path, threads, max_model_len, str(self.device), level))

    def _join(self, store_path: str, n: int) -> Communicator:
        """The process group, built in a helper thread so that a worker dying before it joins is an
        error now, not after the rendezvous timeout."""
        box: dict = {}

        def build() -> None:
            try:
                box["comm"] = Communicator(store_path, 0, n, self.device)
            except BaseException as exc:
                box["error"] = exc

        thread = threading.Thread(target=build, name="qserve-tp-join", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(_POLL_S)
            self._workers.check()  # (a worker's status messages are left for wait_for)
        if "error" in box:
            raise TensorParallelError(f"tensor-parallel process group: {box['error']}") from box["error"]
        return box["comm"]

    def wait_for(self, stage: str) -> None:
        self._workers.wait_for(stage)

    def agree_num_blocks(self, num_blocks: int) -> int:
        """The KV-cache blocks every rank can hold (the smallest any rank computed)."""
        self._workers.check()
        return self.comm.min_int(num_blocks)

    def runner_class(self, base_cls):
        return make_runner(base_cls, self.comm, self._workers)

    def check(self) -> None:
        self._workers.check()

    def close(self) -> None:
        self._finalizer()
        torch.set_num_threads(self._threads_before)


# ---- a worker ---------------------------------------------------------------------------------------------


def worker_main(cmd_fd: int, status_fd: int) -> int:
    """A worker's process: build this rank's shard and KV cache in step with rank 0, then run a forward
    each time rank 0 wakes it; exit when rank 0 says so or closes the pipe."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group: rank 0 decides
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    cmd = Connection(cmd_fd, writable=False)
    status = Connection(status_fd, readable=False)
    try:
        args, rank, n, store_path, threads, max_model_len, device_name, level = cmd.recv()
    except EOFError:
        return 0
    logging.basicConfig(level=level, format=f"%(levelname)s %(asctime)s tp-rank{rank} %(name)s: %(message)s",
                        datefmt="%m-%d %H:%M:%S")  # fmt: skip
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    try:
        from pathlib import Path

        from qserve.serve.engine import build_runner, kv_cache_blocks
        from qserve.serve.loader import load_model, read_json, resolve_dtype

        comm = Communicator(store_path, rank, n, device)
        model_dir = Path(args.model)
        dtype = resolve_dtype(args.dtype, device, read_json(model_dir / "config.json"))
        loaded = load_model(model_dir, device, dtype, max_model_len, validate=False,
                            shard=ShardInfo(rank, n, comm))  # fmt: skip
        status.send(("loaded",))
        num_blocks = comm.min_int(kv_cache_blocks(args, loaded.model, device, dtype, max_model_len))
        runner = build_runner(args, loaded.model, num_blocks, device, dtype, max_model_len,
                              make_runner_cls=lambda base: make_runner(base, comm, None))  # fmt: skip
        status.send(("ready",))
    except BaseException as exc:
        log.exception("tensor-parallel worker rank %d could not start", rank)
        with contextlib.suppress(OSError):
            status.send(("failed", _portable(exc)))
        return 1
    while True:
        try:
            what = cmd.recv_bytes()
        except (EOFError, OSError):
            return 0  # rank 0 is gone
        if what == b"q":
            return 0
        try:
            runner.worker_step()
        except RuntimeError as exc:
            log.error("tensor-parallel worker rank %d: a step failed: %s", rank, exc)
            return 1


def _portable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        kind = ConfigError if isinstance(exc, ConfigError) else TensorParallelError
        return kind(f"{type(exc).__name__}: {exc}")
