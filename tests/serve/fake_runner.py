"""A torch-free stand-in for the model runner, and the invariants every scheduler step must keep.

The fake model is built so that a scheduler bug shows up as a wrong token. The "KV" stored at position
p is a chained hash of the tokens 0..p, computed from the previous position's stored KV (as attention
reads cached context); the sampled token hashes the KV of EVERY context position plus the seq_id (so n > 1
siblings diverge, like seeded sampling). A wrong prefix hit, a missing copy-on-write, a stale block or a
bad recompute after preemption therefore changes later tokens, and `reference_tokens` (the same model
run without any cache) gives the tokens a correct engine must produce.
"""

from __future__ import annotations

from collections import Counter

from qserve.serve.outputs import ModelRunnerOutput, SchedulerOutput
from qserve.serve.scheduler import Scheduler
from qserve.serve.sequence import SequenceStatus

VOCAB = 32
EOS = 0
_MASK = (1 << 64) - 1
_ROOT = 0x243F6A8885A308D3


def _mix(a: int, b: int) -> int:
    # splitmix64 finaliser over a combination of the two inputs: cheap, deterministic across runs.
    z = (a ^ (b * 0x9E3779B97F4A7C15)) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def kv_states(token_ids: list[int]) -> list[int]:
    states, state = [], _ROOT
    for token in token_ids:
        state = _mix(state, token)
        states.append(state)
    return states


def sample_token(context_states: list[int], seq_id: int) -> int:
    acc = _mix(_ROOT, seq_id)
    for state in context_states:
        acc = _mix(acc, state)
    return acc % VOCAB


def reference_tokens(prompt: list[int], seq_id: int, num_tokens: int) -> list[int]:
    """What the fake model generates for `prompt` with no KV cache at all."""
    tokens, out = list(prompt), []
    for _ in range(num_tokens):
        out.append(sample_token(kv_states(tokens), seq_id))
        tokens.append(out[-1])
    return out


class FakeRunner:
    """Executes a SchedulerOutput against a fake paged KV cache, checking what a real runner relies on."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.block_size = scheduler.block_size
        self.kv: list[int | None] = [None] * (scheduler.cache_config.num_blocks * self.block_size)
        self.computed_tokens = 0

    def _slot(self, block_ids: tuple[int, ...], pos: int) -> int:
        return block_ids[pos // self.block_size] * self.block_size + pos % self.block_size

    def run(self, out: SchedulerOutput) -> ModelRunnerOutput:
        bs, bm = self.block_size, self.scheduler.block_manager
        for src, dst in out.block_copies:
            assert bm.ref_count(dst) == 1, f"copy-on-write target {dst} is shared"
            self.kv[dst * bs : (dst + 1) * bs] = self.kv[src * bs : (src + 1) * bs]
        written: set[int] = set()
        sampled: dict[int, int] = {}
        for chunk in out.chunks:
            assert chunk.token_ids, "empty chunk"
            context = [self.kv[self._slot(chunk.block_ids, p)] for p in range(chunk.start_pos)]
            assert None not in context, f"seq {chunk.seq_id} reads a never-written slot"
            state = context[-1] if context else _ROOT
            for i, token in enumerate(chunk.token_ids):
                slot = self._slot(chunk.block_ids, chunk.start_pos + i)
                block = slot // bs
                assert bm.ref_count(block) == 1, f"seq {chunk.seq_id} writes into shared block {block}"
                assert slot not in written, f"slot {slot} written twice in one step"
                written.add(slot)
                state = _mix(state, token)
                self.kv[slot] = state
                context.append(state)
            self.computed_tokens += chunk.num_tokens
            if chunk.sample:
                sampled[chunk.seq_id] = sample_token(context, chunk.seq_id)
        return ModelRunnerOutput(sampled=sampled)


def check_output(sched: Scheduler, out: SchedulerOutput) -> None:
    """Per-step rules: the token budget, one chunk per sequence, block tables that cover the chunk."""
    cfg = sched.config
    assert out.num_batched_tokens == sum(c.num_tokens for c in out.chunks) <= cfg.max_num_batched_tokens
    if cfg.long_prefill_token_threshold:
        assert all(c.num_tokens <= cfg.long_prefill_token_threshold for c in out.chunks), out.chunks
    ids = [c.seq_id for c in out.chunks]
    assert len(ids) == len(set(ids)), f"a sequence got two chunks: {ids}"
    assert sched.num_running <= cfg.max_num_seqs
    for chunk in out.chunks:
        seq = sched.get(chunk.seq_id)
        assert seq is not None and seq.status is SequenceStatus.RUNNING
        assert chunk.context_len == seq.num_computed_tokens <= seq.num_tokens
        assert chunk.sample == (chunk.context_len == seq.num_tokens)
        assert tuple(seq.all_token_ids[chunk.start_pos : chunk.context_len]) == chunk.token_ids
        assert len(chunk.block_ids) * sched.block_size >= chunk.context_len


def check_invariants(sched: Scheduler) -> None:
    """No block leaked or double-owned; the free queue and the prefix-cache table are consistent."""
    bm = sched.block_manager
    held: Counter[int] = Counter()
    for seq in sched.sequences():
        assert not seq.is_finished
        assert len(set(seq.block_ids)) == len(seq.block_ids), f"{seq!r} holds a block twice"
        held.update(seq.block_ids)
        if seq.status is SequenceStatus.WAITING:
            assert not seq.block_ids and seq.num_computed_tokens == 0, f"waiting {seq!r} holds blocks"
        else:
            needed = -(-seq.num_computed_tokens // sched.block_size)
            assert needed <= len(seq.block_ids) <= -(-seq.num_tokens // sched.block_size), repr(seq)
    for block_id in range(bm.num_blocks):
        assert bm.ref_count(block_id) == held[block_id], (
            f"block {block_id}: ref_count {bm.ref_count(block_id)}, held by {held[block_id]} sequences"
        )
    free = bm.free_block_ids()
    assert len(free) == len(set(free)) == bm.num_free_blocks
    assert set(free) == {b for b in range(bm.num_blocks) if held[b] == 0}
    assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
    assert bm.num_used_blocks == len(held)
    for block_hash, block_id in bm.cached_block_ids().items():
        assert bm.block_hash(block_id) == block_hash
    assert sched.num_running + sched.num_waiting == len(sched.sequences())
    # tokens_stored by its definition: each held block counts once, as full as its fullest holder.
    filled: dict[int, int] = {}
    for seq in sched.sequences():
        for i, block_id in enumerate(seq.block_ids):
            n = min(sched.block_size, seq.num_computed_tokens - i * sched.block_size)
            filled[block_id] = max(filled.get(block_id, 0), n)
    stats = sched.stats()
    assert (stats.tokens_stored, stats.slots_allocated) == (
        sum(filled.values()),
        len(held) * sched.block_size,
    )
    assert sched.num_running <= sched.config.max_num_seqs
    # Decode-first: without a per-sequence cap, only the newest running sequence may still have prompt
    # left to prefill (with one, several may; Driver.step checks that decodes are scheduled first).
    running = sched.running_sequences()
    assert {s.seq_id for s in running} == {
        s.seq_id for s in sched.sequences() if s.status is SequenceStatus.RUNNING
    }
    if not sched.config.long_prefill_token_threshold:
        assert all(s.num_tokens - s.num_computed_tokens <= 1 for s in running[:-1]), running


def check_decode_first(before: dict[int, int], out: SchedulerOutput) -> None:
    """`before`: tokens left to compute of each running sequence as the step was scheduled. Every
    running decode is scheduled, ahead of every prefill chunk, unless the step was cut short by a
    preemption (then the cache, not the order, decided)."""
    kinds = ["decode" if before.get(c.seq_id) == 1 else "prefill" for c in out.chunks]
    assert kinds == sorted(kinds), f"a prefill chunk was scheduled before a decode: {out.chunks}"
    if not out.preempted_ids:
        scheduled = {c.seq_id for c in out.chunks}
        assert all(seq_id in scheduled for seq_id, left in before.items() if left == 1), out.chunks


class Driver:
    """schedule -> fake run -> update, checking every rule around each step."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.runner = FakeRunner(sched)
        self.outputs: list[SchedulerOutput] = []

    def step(self) -> list:
        before = {s.seq_id: s.num_tokens - s.num_computed_tokens for s in self.sched.running_sequences()}
        out = self.sched.schedule()
        check_output(self.sched, out)
        check_decode_first(before, out)
        check_invariants(self.sched)
        self.outputs.append(out)
        done = self.sched.update(out, self.runner.run(out))
        check_invariants(self.sched)
        return done

    def run_to_completion(self, max_steps: int = 10_000) -> int:
        steps = 0
        while self.sched.has_unfinished():
            assert steps < max_steps, "scheduler stalled"
            self.step()
            assert self.outputs[-1].chunks, "a step with unfinished work scheduled nothing"
            steps += 1
        return steps
