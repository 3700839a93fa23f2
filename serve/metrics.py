"""Engine-side statistics: queue sizes, KV-cache and prefix-cache use, token counters, latencies.

Latency samples are kept raw (the most recent `max_samples` of each kind, in seconds) so a consumer
can bucket them however its exporter wants; counters are cumulative since the engine started.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from qserve.serve.outputs import SchedulerStats


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # used blocks / total blocks, 0..1
    prefix_cache_queries: int  # tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens found
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    tokens_stored: int  # KV slot use = tokens_stored / slots_allocated
    slots_allocated: int
    requests_finished: dict[str, int] = field(default_factory=dict)  # finish reason -> count
    time_to_first_token: tuple[float, ...] = ()  # seconds, most recent samples
    inter_token_latency: tuple[float, ...] = ()
    e2e_latency: tuple[float, ...] = ()
    resident_weight_bytes: int = 0  # model weights held in memory (4-bit layers counted packed)

    @property
    def kv_slot_use(self) -> float:
        """Tokens stored / token slots allocated (1.0 = no slot wasted); 1.0 when nothing is allocated."""
        return self.tokens_stored / self.slots_allocated if self.slots_allocated else 1.0


@dataclass(frozen=True)
class MetricsUpdate:
    prompt_tokens: int
    generation_tokens: int
    finished: dict[str, int]
    ttft: list[float]
    itl: list[float]
    e2e: list[float]


class EngineMetrics:
    """Accumulates counters and latency samples; safe to snapshot from another thread."""

    def __init__(self, max_samples: int = 10_000) -> None:
        self._lock = threading.Lock()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: Counter[str] = Counter()
        self.ttft: deque[float] = deque(maxlen=max_samples)
        self.itl: deque[float] = deque(maxlen=max_samples)
        self.e2e: deque[float] = deque(maxlen=max_samples)
        self.resident_weight_bytes = 0  # set once by the engine after loading the model
        self._new: tuple[list[float], list[float], list[float]] | None = None  # see export()

    def on_first_token(self, num_prompt_tokens: int, ttft: float) -> None:
        with self._lock:
            self.prompt_tokens += num_prompt_tokens
            self.ttft.append(ttft)
            if self._new is not None:
                self._new[0].append(ttft)

    def on_tokens(self, count: int, inter_token: float | None) -> None:
        with self._lock:
            self.generation_tokens += count
            if inter_token is not None:
                self.itl.append(inter_token)
                if self._new is not None:
                    self._new[1].append(inter_token)

    def on_finished(self, reason: str, e2e: float) -> None:
        with self._lock:
            self.finished[reason] += 1
            self.e2e.append(e2e)
            if self._new is not None:
                self._new[2].append(e2e)

    def export(self) -> MetricsUpdate:
        """The counters, and the latency samples recorded since the previous export: what an engine
        core process sends the API process's mirror (`absorb`) so its `EngineStats` stay whole."""
        with self._lock:
            new, self._new = self._new or ([], [], []), ([], [], [])
            return MetricsUpdate(self.prompt_tokens, self.generation_tokens, dict(self.finished), *new)

    def absorb(self, update: MetricsUpdate) -> None:
        with self._lock:
            self.prompt_tokens, self.generation_tokens = update.prompt_tokens, update.generation_tokens
            self.finished = Counter(update.finished)
            self.ttft.extend(update.ttft)
            self.itl.extend(update.itl)
            self.e2e.extend(update.e2e)

    def snapshot(self, sched: SchedulerStats, num_running: int, num_waiting: int) -> EngineStats:
        with self._lock:
            return EngineStats(
                num_running=num_running,
                num_waiting=num_waiting,
                kv_cache_usage=sched.kv_cache_usage,
                prefix_cache_queries=sched.prefix_cache_queries,
                prefix_cache_hits=sched.prefix_cache_hits,
                num_preemptions=sched.num_preemptions,
                prompt_tokens_total=self.prompt_tokens,
                generation_tokens_total=self.generation_tokens,
                tokens_stored=sched.tokens_stored,
                slots_allocated=sched.slots_allocated,
                requests_finished=dict(self.finished),
                time_to_first_token=tuple(self.ttft),
                inter_token_latency=tuple(self.itl),
                e2e_latency=tuple(self.e2e),
                resident_weight_bytes=self.resident_weight_bytes,
            )


class StatsLogger:
    """vLLM's periodic stats line: average throughputs since the previous line, queue and KV-cache state.

    `line(stats)` is called every interval with a fresh `EngineStats`; it returns the line to log, or
    None when the engine was idle and the previous line already said so (an idle server logs one line,
    not one per interval).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._t = clock()
        self._prompt = 0
        self._generation = 0
        self._queries = 0
        self._hits = 0
        self._idle_logged = False

    def line(self, stats: EngineStats) -> str | None:
        now = self._clock()
        dt = max(now - self._t, 1e-9)
        prompt = stats.prompt_tokens_total - self._prompt
        generation = stats.generation_tokens_total - self._generation
        queries = stats.prefix_cache_queries - self._queries
        hits = stats.prefix_cache_hits - self._hits
        self._t = now
        self._prompt, self._generation = stats.prompt_tokens_total, stats.generation_tokens_total
        self._queries, self._hits = stats.prefix_cache_queries, stats.prefix_cache_hits
        idle = not (prompt or generation or stats.num_running or stats.num_waiting)
        if idle and self._idle_logged:
            return None
        self._idle_logged = idle
        hit_rate = f"{hits / queries:.1%}" if queries else "n/a"
        return (
            f"Avg prompt throughput: {prompt / dt:.1f} tokens/s, Avg generation throughput: "
            f"{generation / dt:.1f} tokens/s, Running: {stats.num_running} reqs, Waiting: {stats.num_waiting} "
            f"reqs, KV cache usage: {stats.kv_cache_usage:.1%}, Prefix cache hit rate: {hit_rate}"
        )
