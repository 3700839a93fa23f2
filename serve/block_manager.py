"""Paged KV-cache blocks: O(1) allocate/free, reference counts, prefix caching, copy-on-write.

Every block is either held (ref_count > 0) or in the free queue. A free block may still carry the hash
of the full block of tokens whose KV it holds: a later sequence with the same prefix takes it back
out of the queue instead of recomputing (a prefix-cache hit). Allocation pops the queue head, so the
least recently freed cached block is evicted first (LRU), and eviction forgets its hash.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qserve.serve.sequence import Sequence as Seq

BlockHash = bytes


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def hash_block_tokens(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Hash of a full block chained to the hash of the block before it.

    Chaining makes equal hashes mean equal whole prefixes, not just equal blocks. blake2b is stable
    across processes (Python's `hash` is salted for some types) and 128 bits make collisions moot.
    """
    h = hashlib.blake2b(digest_size=16)
    if parent is not None:
        h.update(parent)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def extend_block_hashes(hashes: list[BlockHash], token_ids: Sequence[int], block_size: int) -> None:
    """Append hashes for the blocks of `token_ids` that became full since `hashes` was last extended."""
    for i in range(len(hashes), len(token_ids) // block_size):
        parent = hashes[i - 1] if i else None
        hashes.append(hash_block_tokens(parent, token_ids[i * block_size : (i + 1) * block_size]))


class Block:
    """One block of KV slots; `prev`/`next` link it into the free queue while nobody holds it."""

    __slots__ = ("block_hash", "block_id", "next", "prev", "ref_count")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: BlockHash | None = None
        self.prev: Block | None = None
        self.next: Block | None = None


class FreeBlockQueue:
    """Doubly linked list of free blocks: pop from the head, append at the tail, unlink from the middle.

    A deque would make taking a cached block back out (a prefix hit) O(n); links make it O(1).
    """

    def __init__(self, blocks: Iterable[Block]) -> None:
        # Sentinels remove every empty-list special case from append/remove.
        self._head = Block(-1)
        self._tail = Block(-1)
        self._head.next = self._tail
        self._tail.prev = self._head
        self._len = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def append(self, block: Block) -> None:
        last = self._tail.prev
        assert last is not None
        block.prev, block.next = last, self._tail
        last.next = block
        self._tail.prev = block
        self._len += 1

    def remove(self, block: Block) -> None:
        if block.prev is None or block.next is None:
            raise RuntimeError(f"block {block.block_id} is not in the free queue")
        block.prev.next = block.next
        block.next.prev = block.prev
        block.prev = block.next = None
        self._len -= 1

    def popleft(self) -> Block:
        first = self._head.next
        if first is None or first is self._tail:
            raise RuntimeError("no free KV-cache block left; the scheduler must check before allocating")
        self.remove(first)
        return first

    def __iter__(self) -> Iterator[Block]:
        node = self._head.next
        while node is not None and node is not self._tail:
            yield node
            node = node.next


class BlockManager:
    """Owns every block's reference count, the free queue and the prefix-cache table (hash -> block).

    The block-level methods (allocate / hold / free / copy_on_write / cache_block) keep the counts; the
    sequence-level ones below them decide which blocks a sequence needs for a step.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [Block(i) for i in range(num_blocks)]
        self._free = FreeBlockQueue(self._blocks)
        self._cached: dict[BlockHash, Block] = {}

    # ---- accounting -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_count

    def block_hash(self, block_id: int) -> BlockHash | None:
        return self._blocks[block_id].block_hash

    def free_block_ids(self) -> list[int]:
        """Free queue order, next-to-evict first (for tests and debugging; O(num_free))."""
        return [block.block_id for block in self._free]

    def cached_block_ids(self) -> dict[BlockHash, int]:
        return {h: block.block_id for h, block in self._cached.items()}

    # ---- prefix cache -----------------------------------------------------------------------------
    def lookup(self, block_hashes: Sequence[BlockHash]) -> list[int]:
        """Blocks holding the longest cached prefix of `block_hashes` (reference counts unchanged)."""
        hits: list[int] = []
        if not self.enable_prefix_caching:
            return hits
        for block_hash in block_hashes:
            block = self._cached.get(block_hash)
            if block is None:
                break
            hits.append(block.block_id)
        return hits

    def num_unheld(self, block_ids: Iterable[int]) -> int:
        """How many of `block_ids` sit in the free queue, i.e. cost a free block to take."""
        return sum(1 for b in block_ids if self._blocks[b].ref_count == 0)

    def cache_block(self, block_id: int, block_hash: BlockHash) -> None:
        """Publish a full, computed block under its chained hash so later prefixes can reuse it.

        A second block with the same content (computed by a sequence admitted before the first was
        published, or a copy-on-write copy) stays unpublished: one block per hash is enough.
        """
        if not self.enable_prefix_caching:
            return
        block = self._blocks[block_id]
        if block.block_hash is None and block_hash not in self._cached:
            block.block_hash = block_hash
            self._cached[block_hash] = block

    # ---- holding and releasing --------------------------------------------------------------------
    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` fresh blocks (ref_count 1), evicting the least recently freed cached ones."""
        if num_blocks > len(self._free):
            raise RuntimeError(f"asked for {num_blocks} KV-cache blocks, only {len(self._free)} free")
        taken = []
        for _ in range(num_blocks):
            block = self._free.popleft()
            if block.block_hash is not None:
                del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_count = 1
            taken.append(block.block_id)
        return taken

    def hold(self, block_ids: Iterable[int]) -> None:
        """One more reference to each block: a prefix-cache hit, or a sibling forked from a prompt."""
        for block_id in block_ids:
            block = self._blocks[block_id]
            if block.ref_count == 0:
                self._free.remove(block)
            block.ref_count += 1

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference to each block of a block table; unheld blocks rejoin the free queue.

        Tail blocks are queued first so they are evicted first: a prefix's leading blocks are the
        ones other requests are likeliest to share.
        """
        for block_id in reversed(block_ids):
            block = self._blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block_id} freed more often than it was held")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free.append(block)

    def copy_on_write(self, block_id: int) -> int:
        """A block the caller may write into: `block_id` itself if unshared, else a fresh private block.

        The caller must copy the KV of `block_id` into the returned block before writing.
        """
        block = self._blocks[block_id]
        if block.ref_count == 1:
            return block_id
        (new_id,) = self.allocate(1)
        block.ref_count -= 1  # still >= 1: the other holders keep it
        return new_id

    # ---- per sequence -----------------------------------------------------------------------------
    def allocate_prefill(self, seq: Seq, budget: int) -> int | None:
        """Give a block-less sequence its cached prefix plus slots for up to `budget` more tokens.

        Sets `block_ids` and `num_computed_tokens` (= tokens found cached) and returns how many tokens
        to compute now, or None, changing nothing, when the free blocks don't suffice.
        """
        hits: list[int] = []
        if self.enable_prefix_caching:
            extend_block_hashes(seq.block_hashes, seq.all_token_ids, self.block_size)
            # The last token is always computed: its logits are what the next token is sampled from.
            hits = self.lookup(seq.block_hashes[: (seq.num_tokens - 1) // self.block_size])
        num_hit_tokens = len(hits) * self.block_size
        num_new = min(seq.num_tokens - num_hit_tokens, budget)
        grow = _cdiv(num_hit_tokens + num_new, self.block_size) - len(hits)
        if not self.can_allocate(self.num_unheld(hits) + grow):
            return None
        self.hold(hits)
        seq.block_ids = hits + self.allocate(grow)
        seq.num_computed_tokens = num_hit_tokens
        return num_new

    def allocate_slots(self, seq: Seq, num_new: int, copies: list[tuple[int, int]]) -> bool:
        """Make the next `num_new` positions of `seq` writable: new blocks, and private copies of shared
        blocks it would write into (appended to `copies` as (src, dst)). False, changing nothing, if
        the free blocks don't suffice.
        """
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
        num_needed = _cdiv(end, self.block_size)
        grow = max(0, num_needed - len(seq.block_ids))
        # Shared blocks get written only after a fork (the head's first decode and each sibling's
        # recompute land in the prompt's last block); prefix hits end before the first computed position.
        shared = [
            i
            for i in range(start // self.block_size, min(num_needed, len(seq.block_ids)))
            if self._blocks[seq.block_ids[i]].ref_count > 1
        ]
        if not self.can_allocate(grow + len(shared)):
            return False
        for i in shared:
            src = seq.block_ids[i]
            seq.block_ids[i] = self.copy_on_write(src)
            copies.append((src, seq.block_ids[i]))
        seq.block_ids.extend(self.allocate(grow))
        return True

    def publish_computed(self, seq: Seq, start: int, end: int) -> None:
        """Offer the blocks that positions [start, end) filled to the prefix cache, once their KV is written."""
        if not self.enable_prefix_caching:
            return
        extend_block_hashes(seq.block_hashes, seq.all_token_ids, self.block_size)
        for i in range(start // self.block_size, end // self.block_size):
            self.cache_block(seq.block_ids[i], seq.block_hashes[i])

    def fork(self, head: Seq, sibling: Seq) -> None:
        """Share the head's prompt blocks with a sibling, which recomputes the last prompt token to sample.

        Recomputing that token makes the sibling write into the shared last block, so `allocate_slots`
        gives it a private copy then; the blocks before it stay shared for good.
        """
        prompt_len = head.num_prompt_tokens
        sibling.block_ids = head.block_ids[: _cdiv(prompt_len, self.block_size)]
        self.hold(sibling.block_ids)
        sibling.block_hashes = head.block_hashes[: prompt_len // self.block_size]
        sibling.num_computed_tokens = prompt_len - 1

    def free_sequence(self, seq: Seq) -> None:
        self.free(seq.block_ids)
        seq.block_ids = []
