"""Block pool: free-queue order, reference counts, prefix-cache publish/lookup/evict, copy-on-write."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qserve.serve.block_manager import (
    Block,
    BlockManager,
    FreeBlockQueue,
    extend_block_hashes,
    hash_block_tokens,
)


def test_free_queue_pops_in_order_and_unlinks_from_the_middle():
    blocks = [Block(i) for i in range(5)]
    queue = FreeBlockQueue(blocks)
    queue.remove(blocks[2])
    queue.remove(blocks[0])
    assert [b.block_id for b in queue] == [1, 3, 4] and len(queue) == 3
    queue.append(blocks[2])
    assert [queue.popleft().block_id for _ in range(4)] == [1, 3, 4, 2]
    assert len(queue) == 0
    with pytest.raises(RuntimeError, match="no free KV-cache block"):
        queue.popleft()
    with pytest.raises(RuntimeError, match="not in the free queue"):
        queue.remove(blocks[1])


def test_allocate_and_free_track_reference_counts():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = bm.allocate(3)
    assert a == [0, 1, 2] and bm.num_used_blocks == 3 and bm.usage == 0.75
    bm.hold(a[:2])  # a second holder, e.g. a forked sibling
    bm.free(a)
    assert [bm.ref_count(b) for b in a] == [1, 1, 0] and bm.num_free_blocks == 2
    bm.free(a[:2])
    assert bm.num_used_blocks == 0
    with pytest.raises(RuntimeError, match="freed more often"):
        bm.free([0])
    with pytest.raises(RuntimeError, match="asked for 5"):
        bm.allocate(5)
    assert bm.num_free_blocks == 4, "a refused allocation takes nothing"


def test_freed_tables_are_evicted_tail_first():
    bm = BlockManager(num_blocks=6, block_size=2)
    table = bm.allocate(3)  # [0, 1, 2]
    bm.free(table)
    # The table's last block is evicted first: leading blocks are the likeliest prefix hits.
    assert bm.free_block_ids() == [3, 4, 5, 2, 1, 0]
    assert bm.allocate(4) == [3, 4, 5, 2]


def test_hashes_chain_the_whole_prefix():
    same_block = [5, 6]
    assert hash_block_tokens(None, same_block) == hash_block_tokens(None, [5, 6])
    assert hash_block_tokens(hash_block_tokens(None, [1, 2]), same_block) != hash_block_tokens(
        hash_block_tokens(None, [3, 4]), same_block
    )
    assert hash_block_tokens(None, [1, 2]) != hash_block_tokens(None, [2, 1])
    hashes: list[bytes] = []
    extend_block_hashes(hashes, [1, 2, 3, 4, 5], block_size=2)
    assert len(hashes) == 2, "the partial block [5] has no hash"
    first = list(hashes)
    extend_block_hashes(hashes, [1, 2, 3, 4, 5, 6], block_size=2)
    assert hashes[:2] == first and hashes[2] == hash_block_tokens(first[1], [5, 6])


def test_lookup_returns_the_longest_cached_prefix():
    bm = BlockManager(num_blocks=8, block_size=2)
    hashes: list[bytes] = []
    extend_block_hashes(hashes, [1, 2, 3, 4, 5, 6], block_size=2)
    table = bm.allocate(3)
    bm.cache_block(table[0], hashes[0])
    bm.cache_block(table[2], hashes[2])  # not reachable: block 1 of the chain is missing
    assert bm.lookup(hashes) == [table[0]]
    bm.cache_block(table[1], hashes[1])
    assert bm.lookup(hashes) == table
    other: list[bytes] = []
    extend_block_hashes(other, [1, 2, 9, 9], block_size=2)
    assert bm.lookup(other) == [table[0]]


def test_cached_free_blocks_are_hits_until_evicted_lru():
    bm = BlockManager(num_blocks=3, block_size=1)
    hashes: list[bytes] = []
    extend_block_hashes(hashes, [7, 8], block_size=1)
    table = bm.allocate(2)
    for block_id, block_hash in zip(table, hashes, strict=True):
        bm.cache_block(block_id, block_hash)
    bm.free(table)
    assert bm.num_free_blocks == 3 and bm.lookup(hashes) == table, "freed, still cached"
    # Taking a hit back removes it from the free queue (O(1) unlink) and counts a holder.
    assert bm.num_unheld(table) == 2
    bm.hold(table[:1])
    assert bm.ref_count(table[0]) == 1 and table[0] not in bm.free_block_ids()
    bm.free(table[:1])
    # Free order now: [2 (never used), table[1], table[0]]; two allocations evict table[1] only.
    assert bm.allocate(2) == [2, table[1]]
    assert bm.block_hash(table[1]) is None and hashes[1] not in bm.cached_block_ids()
    assert bm.lookup(hashes) == [table[0]]


def test_a_hash_is_published_once():
    bm = BlockManager(num_blocks=4, block_size=2)
    h = hash_block_tokens(None, [1, 2])
    first, second = bm.allocate(2)
    bm.cache_block(first, h)
    bm.cache_block(second, h)  # same content computed twice: keep the first
    assert bm.cached_block_ids() == {h: first} and bm.block_hash(second) is None
    off = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    (b,) = off.allocate(1)
    off.cache_block(b, h)
    assert off.lookup([h]) == [] and off.cached_block_ids() == {}


def test_copy_on_write_only_copies_shared_blocks():
    bm = BlockManager(num_blocks=4, block_size=2)
    (b,) = bm.allocate(1)
    assert bm.copy_on_write(b) == b, "a private block is written in place"
    bm.hold([b])
    copy = bm.copy_on_write(b)
    assert copy != b and bm.ref_count(b) == 1 and bm.ref_count(copy) == 1
    assert bm.num_used_blocks == 2


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["alloc", "hold", "free", "cow", "cache"]), st.integers(0, 7)), max_size=60
    )
)
def test_random_operations_keep_the_free_queue_exact(ops):
    bm = BlockManager(num_blocks=8, block_size=2)
    refs = [0] * 8  # the model: how many holders each block has
    for op, arg in ops:
        held = [b for b in range(8) if refs[b]]
        if op == "alloc" and bm.can_allocate(arg % 3):
            for b in bm.allocate(arg % 3):
                assert refs[b] == 0
                refs[b] = 1
        elif op == "hold":
            bm.hold([arg])
            refs[arg] += 1
        elif op == "free" and held:
            b = held[arg % len(held)]
            bm.free([b])
            refs[b] -= 1
        elif op == "cow" and held and bm.can_allocate(1):
            b = held[arg % len(held)]
            new = bm.copy_on_write(b)
            if new != b:
                refs[b] -= 1
                refs[new] = 1
        elif op == "cache" and held:
            bm.cache_block(held[arg % len(held)], hash_block_tokens(None, [arg]))
        assert [bm.ref_count(b) for b in range(8)] == refs
        assert sorted(bm.free_block_ids()) == [b for b in range(8) if refs[b] == 0]
        assert bm.num_free_blocks == refs.count(0)
        for block_hash, block_id in bm.cached_block_ids().items():
            assert bm.block_hash(block_id) == block_hash
