"""LLMEngine: requests in, cumulative RequestOutputs out, one `step()` at a time.

A step is schedule (which tokens to compute), run (one forward over the mixed batch, sample), and
postprocess (append tokens and apply token stops in the scheduler, then detokenize, cut stop strings,
build outputs). The engine is single-threaded; `AsyncLLMEngine` drives it from a background thread.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qserve.errors import ConfigError
from qserve.serve.config import CacheConfig, SchedulerConfig
from qserve.serve.loader import eos_token_ids, load_model, read_json, resolve_device, resolve_dtype
from qserve.serve.metrics import EngineMetrics, EngineStats
from qserve.serve.output_processor import CoreOutput, RequestState, SeqUpdate
from qserve.serve.outputs import ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from qserve.serve.quant_linear import resident_weight_bytes
from qserve.serve.request_output import RequestOutput
from qserve.serve.runner import ModelRunner, cpu_num_blocks, cuda_num_blocks
from qserve.serve.sampler import Sampler, SamplingState
from qserve.serve.sampling_params import SamplingParams
from qserve.serve.scheduler import Scheduler
from qserve.serve.sequence import Sequence, StopCriteria
from qserve.serve.structured import StructuredOutputCompiler


@dataclass(frozen=True)
class EngineArgs:
    """Everything needed to build an engine; the keyword arguments of `LLM` and `AsyncLLMEngine`."""

    model: str
    dtype: str = "auto"
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes of KV cache on CPU; default 1 GiB, capped at what can be used
    gpu_memory_utilization: float = 0.9
    device: str = "auto"
    enable_prefix_caching: bool = True
    seed: int = 0
    validate: bool = True
    max_waiting: int | None = None  # bound of the waiting queue (the server's --max-queue)
    long_prefill_token_threshold: int = 0  # most tokens one sequence computes per step; 0 = no cap
    enforce_eager: bool = False  # CUDA: no decode CUDA graphs (serve/cuda_graphs.py)
    tensor_parallel_size: int = 1  # ranks the model is split over (serve/tensor_parallel.py); 1: one process


@dataclass
class _SeqTrack:
    """Core-side state of one output sequence (its text lives in the request's RequestState)."""

    seq: Sequence
    sampling: SamplingState
    index: int  # which of the request's n samples
    num_seen: int = 0  # output tokens already reported
    last_token_time: float | None = None


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    tracks: list[_SeqTrack] = field(default_factory=list)
    arrival_time: float = 0.0
    first_token_time: float | None = None
    text: RequestState | None = None  # None in a split engine core: the API process detokenizes

    @property
    def finished(self) -> bool:
        return all(t.seq.is_finished for t in self.tracks)


class LLMEngine:
    """`detokenize=False` makes an engine core (serve/engine_core.py): `step` and `abort` return
    token-level `CoreOutput`s and the caller turns them into text with a `RequestState`."""

    def __init__(self, args: EngineArgs, detokenize: bool = True) -> None:
        from transformers import AutoTokenizer

        from qserve.hub import resolve_model

        self.args = args
        self.detokenize = detokenize
        model_dir = Path(resolve_model(args.model))
        self.model_dir = model_dir
        hf_config = read_json(model_dir / "config.json")
        self.device = resolve_device(args.device)
        self.dtype = resolve_dtype(args.dtype, self.device, hf_config)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        # a sliding window is no limit: the attention kernels honour it (ModelConfig.layer_window)
        limit = hf_config.get("max_position_embeddings") or 2048
        if args.max_model_len is not None and args.max_model_len > limit:
            raise ConfigError(
                f"max_model_len={args.max_model_len} exceeds the model's limit of {limit} tokens "
                "(config.json max_position_embeddings); lower it"
            )
        self.max_model_len = int(args.max_model_len or limit)
        tp = args.tensor_parallel_size
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ConfigError(f"tensor_parallel_size: expected an integer >= 1, found {tp!r}")
        self.executor = None
        if tp == 1:
            loaded = load_model(model_dir, self.device, self.dtype, self.max_model_len, validate=args.validate)
            num_blocks = kv_cache_blocks(args, loaded.model, self.device, self.dtype, self.max_model_len)
            self.runner = build_runner(args, loaded.model, num_blocks, self.device, self.dtype, self.max_model_len)
        else:
            loaded, num_blocks = self._start_tensor_parallel(args, model_dir, hf_config)
        self.model_config, self.quantization = loaded.config, loaded.quant.method if loaded.quant else None
        self.resident_weight_bytes = resident_weight_bytes(loaded.model)
        logging.getLogger(__name__).info(
            "resident weight bytes: %d (%.1f MiB, %s on %s%s)", self.resident_weight_bytes,
            self.resident_weight_bytes / 2**20, self.quantization or str(self.dtype).removeprefix("torch."),
            self.device.type, f", rank 0 of {tp}" if tp > 1 else "",
        )  # fmt: skip
        cache_config = CacheConfig(args.block_size, num_blocks, args.enable_prefix_caching)
        sched_config = SchedulerConfig(
            args.max_num_seqs, args.max_num_batched_tokens, self.max_model_len, args.max_waiting,
            long_prefill_token_threshold=args.long_prefill_token_threshold,
        )  # fmt: skip
        self.scheduler = Scheduler(sched_config, cache_config)
        self.kv_cache_tokens = num_blocks * args.block_size
        self.eos_token_ids = eos_token_ids(model_dir, self.tokenizer)
        # Structured outputs: grammars compile lazily, cached; the server compiles them before add_request.
        self.structured = StructuredOutputCompiler(
            self.tokenizer, self.model_config.vocab_size, self.eos_token_ids
        )
        self.metrics = EngineMetrics()
        self.metrics.resident_weight_bytes = self.resident_weight_bytes
        self._requests: dict[str, _Request] = {}
        self._request_of: dict[int, str] = {}  # seq_id -> request_id
        self._states: dict[int, SamplingState] = {}  # what the runner's sampler reads
        self._tracks: dict[int, _SeqTrack] = {}
        self._seq_ids = itertools.count()

    def _start_tensor_parallel(self, args: EngineArgs, model_dir: Path, hf_config: dict):
        """Rank 0 of a tensor-parallel engine: check the split, start the workers, and load this rank's
        shard, size the KV cache and build the runner in step with them (serve/tensor_parallel.py)."""
        from dataclasses import replace

        from qserve.serve import tensor_parallel
        from qserve.serve.loader import read_quant_spec
        from qserve.serve.model import ModelConfig

        tensor_parallel.check_shardable(
            ModelConfig.from_hf(hf_config), read_quant_spec(model_dir, hf_config), args.tensor_parallel_size
        )
        worker_args = replace(args, model=str(model_dir), validate=False)
        self.executor = executor = tensor_parallel.TensorParallelExecutor(worker_args, self.device, self.max_model_len)
        try:
            loaded = load_model(model_dir, self.device, self.dtype, self.max_model_len, validate=args.validate,
                                shard=executor.shard)  # fmt: skip
            executor.wait_for("loaded")
            num_blocks = executor.agree_num_blocks(
                kv_cache_blocks(args, loaded.model, self.device, self.dtype, self.max_model_len)
            )
            self.runner = build_runner(args, loaded.model, num_blocks, self.device, self.dtype, self.max_model_len,
                                       make_runner_cls=executor.runner_class)  # fmt: skip
            executor.wait_for("ready")
        except BaseException:
            executor.close()
            raise
        return loaded, num_blocks

    def check_health(self) -> None:
        """Raise if the engine cannot run a step (a tensor-parallel worker has died)."""
        if self.executor is not None:
            self.executor.check()

    def close(self) -> None:
        """Stop the tensor-parallel workers (if any); the engine cannot step afterwards."""
        if self.executor is not None:
            self.executor.close()

    # ---- requests -----------------------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
        arrival_time: float | None = None, add_special_tokens: bool = True,
    ) -> None:  # fmt: skip
        """Tokenize and queue a request; raises ValueError for a bad prompt, QueueFullError when full.

        `add_special_tokens=False` for text that already carries them (a rendered chat template)."""
        params = params or SamplingParams()
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in flight; use a unique id")
        text = prompt if isinstance(prompt, str) else None
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=add_special_tokens).input_ids
        else:
            ids = [int(t) for t in prompt]
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(
                f"prompt token ids must lie in [0, {vocab}); found {[t for t in ids if not 0 <= t < vocab][:5]}"
            )
        req = _Request(request_id, text, ids, params, arrival_time=arrival_time or time.time())
        for index in range(params.n):
            sib = params.for_sibling(index)
            stop = StopCriteria(
                max_tokens=sib.max_tokens, min_tokens=sib.min_tokens, eos_token_ids=self.eos_token_ids,
                stop_token_ids=frozenset(sib.stop_token_ids), ignore_eos=sib.ignore_eos,
            )  # fmt: skip
            seq = Sequence(next(self._seq_ids), ids, stop, req.arrival_time)
            gen = None if sib.seed is None else torch.Generator(self.device).manual_seed(sib.seed)
            spec = sib.structured_outputs  # one matcher per sibling: each follows its own tokens
            state = SamplingState(seq, sib, gen, None if spec is None else self.structured.new_state(spec))
            req.tracks.append(_SeqTrack(seq, state, index))
        self.scheduler.add([t.seq for t in req.tracks])  # raises before any bookkeeping below
        if self.detokenize:
            req.text = RequestState(self.tokenizer, request_id, text, ids, params, req.arrival_time)
        self._requests[request_id] = req
        for t in req.tracks:
            self._request_of[t.seq.seq_id] = request_id
            self._states[t.seq.seq_id] = t.sampling
            self._tracks[t.seq.seq_id] = t

    def abort(self, request_id: str) -> RequestOutput | CoreOutput | None:
        """Stop a request now and free its blocks; returns its final output (None if unknown)."""
        req = self._requests.get(request_id)
        if req is None:
            return None
        updates = []
        for index, t in enumerate(req.tracks):
            if not t.seq.is_finished:
                if self.scheduler.abort(t.seq.seq_id) is None:
                    t.seq.set_finished("abort")
                updates.append(SeqUpdate(index, (), None, "abort"))
        if req.text is not None:
            req.text.abort()
        out = self._output(req, updates)
        self.metrics.on_finished("abort", time.time() - req.arrival_time)
        self._retire(req)
        return out

    def stop_sequence(self, request_id: str, index: int, stop: str) -> None:
        """End sequence `index` of a request on the stop string `stop` (found by the API process's
        detokenizer); the request leaves the engine once all its sequences have ended."""
        req = self._requests.get(request_id)
        if req is None or not 0 <= index < len(req.tracks):
            return
        seq = req.tracks[index].seq
        if not seq.is_finished and self.scheduler.finish(seq.seq_id, "stop", stop) is None:
            seq.set_finished("stop", stop)
        if req.finished:
            self.metrics.on_finished(_request_reason(req), time.time() - req.arrival_time)
            self._retire(req)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def request_ids(self) -> list[str]:
        return list(self._requests)

    def prompt_token_ids(self, request_id: str) -> list[int]:
        return self._requests[request_id].prompt_token_ids

    def stats(self) -> EngineStats:
        s = self.scheduler
        return self.metrics.snapshot(s.stats(), s.num_running, s.num_waiting)

    # ---- the step -----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput] | list[CoreOutput]:
        scheduled = self.scheduler.schedule()
        ran = self.runner.execute(scheduled, self._states)
        return self._postprocess(scheduled, ran)

    def _postprocess(self, scheduled: SchedulerOutput, ran: ModelRunnerOutput) -> list:
        now = time.time()
        touched: dict[str, list[SeqUpdate]] = {}
        for seq in self.scheduler.update(scheduled, ran):
            req = self._requests[self._request_of[seq.seq_id]]
            track = self._tracks[seq.seq_id]
            update = self._advance(req, track, ran.logprobs.get(seq.seq_id), now)
            touched.setdefault(req.request_id, []).append(update)
            if req.text is not None:
                stop = req.text.update(update)
                if stop is not None and self.scheduler.finish(seq.seq_id, "stop", stop) is None:
                    seq.set_finished("stop", stop)  # already ended on this token
        reqs = [self._requests[rid] for rid in touched]
        outputs = [self._output(req, touched[req.request_id]) for req in reqs]
        for req in reqs:
            if req.finished:
                self.metrics.on_finished(_request_reason(req), now - req.arrival_time)
                self._retire(req)
        return outputs

    def _advance(self, req: _Request, track: _SeqTrack, lp: TokenLogprobs | None, now: float) -> SeqUpdate:
        seq = track.seq
        new_ids = tuple(seq.output_token_ids[track.num_seen :])
        track.num_seen = seq.num_output_tokens
        if req.first_token_time is None:
            req.first_token_time = now
            if req.text is not None:
                req.text.first_token_time = now
            self.metrics.on_first_token(len(req.prompt_token_ids), now - req.arrival_time)
        gap = None if track.last_token_time is None else now - track.last_token_time
        self.metrics.on_tokens(len(new_ids), gap)
        track.last_token_time = now
        return SeqUpdate(track.index, new_ids, lp, seq.finish_reason, seq.stop_reason)

    def _output(self, req: _Request, updates: list[SeqUpdate]) -> RequestOutput | CoreOutput:
        if req.text is not None:
            return req.text.output()
        return CoreOutput(req.request_id, tuple(updates), req.first_token_time)

    def _retire(self, req: _Request) -> None:
        del self._requests[req.request_id]
        for t in req.tracks:
            self._request_of.pop(t.seq.seq_id, None)
            self._states.pop(t.seq.seq_id, None)
            self._tracks.pop(t.seq.seq_id, None)


def kv_cache_blocks(args: EngineArgs, model, device: torch.device, dtype: torch.dtype, max_model_len: int) -> int:
    """KV-cache blocks for `model` (one rank's shard under tensor parallelism: its own KV heads)."""
    if device.type == "cuda":
        profile = min(args.max_num_batched_tokens, max_model_len)
        return cuda_num_blocks(model, args.block_size, dtype, device, args.gpu_memory_utilization, profile)
    needed = args.max_num_seqs * math.ceil(max_model_len / args.block_size)
    return cpu_num_blocks(model.config, args.block_size, dtype, args.kv_cache_memory, needed)


def build_runner(args: EngineArgs, model, num_blocks: int, device: torch.device, dtype: torch.dtype,
                 max_model_len: int, make_runner_cls=None) -> ModelRunner:  # fmt: skip
    """The model runner with its KV cache; on CUDA its GEMMs autotuned and decode graphs captured
    (tensor parallelism runs eagerly: no graphs are captured around its collectives)."""
    cls = ModelRunner if make_runner_cls is None else make_runner_cls(ModelRunner)
    runner = cls(model, num_blocks, args.block_size, device, dtype, Sampler(device, args.seed))
    eager = args.enforce_eager or args.tensor_parallel_size > 1
    runner.prepare_cuda(args.max_num_seqs, args.max_num_batched_tokens, max_model_len, eager)
    return runner


def _request_reason(req: _Request) -> str:
    reasons = {t.seq.finish_reason for t in req.tracks}
    return "abort" if "abort" in reasons else "length" if "length" in reasons else "stop"
