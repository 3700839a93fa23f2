"""Continuous-batching scheduler in the vLLM v1 manner: one token budget per step, no prefill/decode phases.

Each sequence has `num_tokens` and `num_computed_tokens`; a step hands each sequence up to
`num_tokens - num_computed_tokens` tokens out of `max_num_batched_tokens`, so a decode (one token), a
chunk of a long prompt and a prefix-cache hit (computed tokens found in the cache) need no special case.
Running sequences are served first, decodes before partial prefills, then waiting ones in FCFS order.
`long_prefill_token_threshold` (vLLM's knob; 0 = off) caps the tokens any one sequence computes in a
step, so a long prompt takes several steps and leaves budget for the prompts queued behind it: their
first tokens need not wait for the whole long prefill. With it on, several prefills can be partial at
once; decodes still come first in every step. When blocks run out the newest running sequence is preempted by recompute: its blocks are freed and it
goes back to the front of the waiting queue to recompute its prompt and outputs later.
"""

from __future__ import annotations

from collections import deque

from qserve.serve.block_manager import BlockManager
from qserve.serve.config import CacheConfig, SchedulerConfig, check_fits
from qserve.serve.outputs import ModelRunnerOutput, ScheduledChunk, SchedulerOutput, SchedulerStats
from qserve.serve.sequence import FINISHED_STATUS, QueueFullError, Sequence, SequenceStatus

__all__ = ["QueueFullError", "Scheduler"]


class Scheduler:
    """Decides, step by step, which tokens of which sequences the runner computes, and owns their blocks."""

    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig) -> None:
        check_fits(scheduler_config, cache_config)
        self.config = scheduler_config
        self.cache_config = cache_config
        self.block_size = cache_config.block_size
        self.block_manager = BlockManager(
            cache_config.num_blocks, cache_config.block_size, cache_config.enable_prefix_caching
        )
        self._seqs: dict[int, Sequence] = {}  # every unfinished sequence
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []  # admission order: the last one is preempted first
        # n > 1: siblings wait, holding nothing, until their group head's prompt is computed.
        self._siblings: dict[int, list[Sequence]] = {}  # head seq_id -> pending siblings
        self._head_of: dict[int, int] = {}  # pending sibling seq_id -> head seq_id
        self._awaiting_update = False
        self._prefix_queries = 0
        self._prefix_hits = 0
        self._preemptions = 0

    # ---- requests in ------------------------------------------------------------------------------
    def add(self, seqs: list[Sequence]) -> None:
        """Queue one request: a single sequence, or n siblings sharing one prompt (seqs[0] is prefilled)."""
        if not seqs:
            raise ValueError("Scheduler.add: expected at least one sequence, found an empty list")
        head = seqs[0]
        ids = [s.seq_id for s in seqs]
        if len(set(ids)) != len(ids) or any(i in self._seqs for i in ids):
            raise ValueError(f"Scheduler.add: seq_ids {ids} repeat each other or an unfinished sequence's id")
        for seq in seqs:
            if seq.status is not SequenceStatus.WAITING or seq.num_output_tokens or seq.block_ids:
                raise ValueError(
                    f"Scheduler.add: {seq!r} is not a fresh sequence (status WAITING, no outputs, no blocks)"
                )
            if seq.prompt_token_ids != head.prompt_token_ids:
                raise ValueError(
                    f"Scheduler.add: sibling {seq.seq_id} has a different prompt from {head.seq_id}"
                )
        if len(seqs) > self.config.max_num_seqs:
            raise ValueError(
                f"Scheduler.add: n={len(seqs)} sequences can never run together with max_num_seqs="
                f"{self.config.max_num_seqs}; lower n or raise max_num_seqs"
            )
        # max_model_len <= cache slots (check_fits), so a prompt within it also fits the cache.
        prompt_len = head.num_prompt_tokens
        if prompt_len > self.config.max_model_len:
            raise ValueError(
                f"Scheduler.add: prompt of sequence {head.seq_id} has {prompt_len} tokens, more than "
                f"max_model_len={self.config.max_model_len}; shorten the prompt or raise max_model_len"
            )
        limit = self.config.max_waiting
        if limit is not None and self._num_queued() >= limit:
            raise QueueFullError(
                f"the waiting queue is full ({limit} requests waiting for a batch slot, max_waiting); "
                "retry later"
            )
        for seq in seqs:
            self._seqs[seq.seq_id] = seq
        self._waiting.append(head)
        if len(seqs) > 1:
            self._siblings[head.seq_id] = list(seqs[1:])
            for sib in seqs[1:]:
                self._head_of[sib.seq_id] = head.seq_id

    def finish(
        self, seq_id: int, reason: str = "stop", stop_reason: int | str | None = None
    ) -> Sequence | None:
        """End a sequence now (a stop string, a disconnect) and return its blocks. None if not unfinished."""
        if reason not in FINISHED_STATUS:
            raise ValueError(
                f"Scheduler.finish: reason expected one of {sorted(FINISHED_STATUS)}, found {reason!r}"
            )
        seq = self._seqs.get(seq_id)
        if seq is None:
            return None
        self._remove(seq)
        seq.set_finished(reason, stop_reason)
        return seq

    def abort(self, seq_id: int) -> Sequence | None:
        return self.finish(seq_id, "abort")

    # ---- one step ---------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        if self._awaiting_update:
            raise RuntimeError("Scheduler.schedule: the previous step's output was never passed to update()")
        budget = self.config.max_num_batched_tokens
        cap = self.config.long_prefill_token_threshold or budget  # most tokens of one sequence per step
        chunks: list[ScheduledChunk] = []
        copies: list[tuple[int, int]] = []
        preempted: list[int] = []
        scheduled: set[int] = set()
        # Decodes first, then partial prefills, each in admission order. Without a cap this is admission
        # order: a sequence is admitted only when the budget outlasts every running prefill, so at most
        # one prefill is unfinished and it is the newest.
        decodes = [s for s in self._running if s.num_tokens - s.num_computed_tokens <= 1]
        prefills = [s for s in self._running if s.num_tokens - s.num_computed_tokens > 1]
        for seq in decodes + prefills:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted as a victim earlier in this loop
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget, cap)
            while not self.block_manager.allocate_slots(seq, num_new, copies):
                victim = next(s for s in reversed(self._running) if s.seq_id not in scheduled)
                self._preempt(victim)
                preempted.append(victim.seq_id)
                if victim is seq:
                    break
            else:
                chunks.append(self._make_chunk(seq, num_new))
                scheduled.add(seq.seq_id)
                budget -= num_new
        # After a preemption the cache is full: admitting new work would only preempt again.
        while not preempted and self._waiting and budget > 0:
            seq = self._waiting[0]
            group = 1 + len(self._siblings.get(seq.seq_id, ()))
            if self._seats_taken() + group > self.config.max_num_seqs:
                break
            num_new = self._admit(seq, min(budget, cap))
            if num_new is None:
                break
            chunks.append(self._make_chunk(seq, num_new))
            budget -= num_new
        out = SchedulerOutput(
            chunks=tuple(chunks),
            num_batched_tokens=self.config.max_num_batched_tokens - budget,
            block_copies=tuple(copies),
            preempted_ids=tuple(preempted),
        )
        self._awaiting_update = bool(chunks)
        return out

    def update(self, out: SchedulerOutput, runner_out: ModelRunnerOutput) -> list[Sequence]:
        """Record a step's results; return the sequences that got a token or finished in it."""
        self._awaiting_update = False
        touched: list[Sequence] = []
        finished: list[Sequence] = []
        for chunk in out.chunks:
            seq = self._seqs.get(chunk.seq_id)
            if seq is None:  # aborted or finished while the step ran
                continue
            self.block_manager.publish_computed(seq, chunk.start_pos, chunk.context_len)
            if not chunk.sample:
                continue
            if seq.seq_id not in runner_out.sampled:
                raise RuntimeError(
                    f"ModelRunnerOutput.sampled: no token for sequence {seq.seq_id}, whose chunk had sample=True"
                )
            token_id = runner_out.sampled[seq.seq_id]
            seq.append_token(token_id)
            if seq.seq_id in self._siblings:
                self._fork_siblings(seq)
            stop = seq.stop.check(token_id, seq.num_output_tokens)
            if stop is None and seq.num_tokens >= self.config.max_model_len:
                stop = ("length", None)
            if stop is not None:
                seq.set_finished(*stop)
                finished.append(seq)
            touched.append(seq)
        if finished:
            done = {s.seq_id for s in finished}
            self._running = [s for s in self._running if s.seq_id not in done]
            for seq in finished:
                del self._seqs[seq.seq_id]
                self.block_manager.free_sequence(seq)
        return touched

    # ---- queries ----------------------------------------------------------------------------------
    def get(self, seq_id: int) -> Sequence | None:
        return self._seqs.get(seq_id)

    def has_unfinished(self) -> bool:
        return bool(self._seqs)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        """Unfinished sequences not running: queued, preempted, or siblings waiting for their prompt."""
        return len(self._seqs) - len(self._running)

    def sequences(self) -> list[Sequence]:
        """Every unfinished sequence, running or not."""
        return list(self._seqs.values())

    def running_sequences(self) -> list[Sequence]:
        """Running sequences in scheduling order; the last one is the next to be preempted."""
        return list(self._running)

    def stats(self) -> SchedulerStats:
        # Every held block is full except a sequence's last one (slots are handed out in order), so
        # only last blocks can have empty slots; a shared one is as full as its fullest holder made it.
        last_fill: dict[int, int] = {}
        for seq in self._running:
            if seq.block_ids:
                fill = seq.num_computed_tokens - (len(seq.block_ids) - 1) * self.block_size
                last_fill[seq.block_ids[-1]] = max(last_fill.get(seq.block_ids[-1], 0), fill)
        bm = self.block_manager
        slots = bm.num_used_blocks * self.block_size
        return SchedulerStats(
            kv_cache_usage=bm.usage,
            num_used_blocks=bm.num_used_blocks,
            num_free_blocks=bm.num_free_blocks,
            prefix_cache_queries=self._prefix_queries,
            prefix_cache_hits=self._prefix_hits,
            num_preemptions=self._preemptions,
            tokens_stored=slots - sum(self.block_size - fill for fill in last_fill.values()),
            slots_allocated=slots,
        )

    # ---- internals --------------------------------------------------------------------------------
    def _admit(self, seq: Sequence, budget: int) -> int | None:
        """Move the waiting head to running with its prefix-cache hits; None if its first chunk won't fit."""
        num_new = self.block_manager.allocate_prefill(seq, budget)
        if num_new is None:
            return None
        seq.status = SequenceStatus.RUNNING
        self._prefix_queries += seq.num_tokens
        self._prefix_hits += seq.num_computed_tokens
        self._waiting.popleft()
        self._running.append(seq)
        return num_new

    def _make_chunk(self, seq: Sequence, num_new: int) -> ScheduledChunk:
        start = seq.num_computed_tokens
        seq.num_computed_tokens = start + num_new
        return ScheduledChunk(
            seq_id=seq.seq_id,
            token_ids=tuple(seq.all_token_ids[start : start + num_new]),
            start_pos=start,
            block_ids=tuple(seq.block_ids),
            sample=seq.num_computed_tokens == seq.num_tokens,
        )

    def _preempt(self, seq: Sequence) -> None:
        self._running.remove(seq)
        self.block_manager.free_sequence(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self._waiting.appendleft(seq)
        self._preemptions += 1

    def _seats_taken(self) -> int:
        """Running sequences plus the siblings that running group heads will fork (max_num_seqs)."""
        reserved = sum(
            len(sibs)
            for head_id, sibs in self._siblings.items()
            if self._seqs[head_id].status is SequenceStatus.RUNNING
        )
        return len(self._running) + reserved

    def _num_queued(self) -> int:
        """Waiting requests that must wait for a batch slot (what max_waiting bounds).

        Those that free seats of max_num_seqs will take, in FCFS order, do not count: a burst at an
        idle engine fills the batch first, then the queue, so at most max_num_seqs + max_waiting
        requests are ever in the engine."""
        free = self.config.max_num_seqs - self._seats_taken()
        queued = 0
        for seq in self._waiting:
            group = 1 + len(self._siblings.get(seq.seq_id, ()))
            if queued == 0 and group <= free:
                free -= group
            else:
                queued += 1
        return queued

    def _fork_siblings(self, head: Sequence) -> None:
        """Siblings share the head's prompt blocks and each recompute the last prompt token to sample."""
        siblings = self._siblings.pop(head.seq_id)
        for sib in siblings:
            del self._head_of[sib.seq_id]
            self.block_manager.fork(head, sib)
            sib.status = SequenceStatus.RUNNING
        # Right behind the head, not at the end: they arrived with it (preemption order), and they
        # decode, so they must stay ahead of a prefill admitted in the head's last step (decode first).
        at = self._running.index(head) + 1
        self._running[at:at] = siblings

    def _remove(self, seq: Sequence) -> None:
        """Take an unfinished sequence out of every queue and return its blocks."""
        del self._seqs[seq.seq_id]
        head_id = self._head_of.pop(seq.seq_id, None)
        if head_id is not None:
            self._siblings[head_id].remove(seq)
            if not self._siblings[head_id]:
                del self._siblings[head_id]
            return
        if seq.status is SequenceStatus.RUNNING:
            self._running.remove(seq)
            self.block_manager.free_sequence(seq)
            position = 0
        else:
            position = self._waiting.index(seq)
            del self._waiting[position]
        # A group head leaving before its prompt was computed hands the prompt to its first sibling.
        siblings = self._siblings.pop(seq.seq_id, None)
        if siblings:
            new_head = siblings[0]
            del self._head_of[new_head.seq_id]
            if len(siblings) > 1:
                self._siblings[new_head.seq_id] = siblings[1:]
                for sib in siblings[1:]:
                    self._head_of[sib.seq_id] = new_head.seq_id
            self._waiting.insert(position, new_head)
