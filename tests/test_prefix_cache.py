"""The prefix cache's block-chain index (model_kit/prefix_cache.py): the longest shared prefix
(to within a block) among many entries, the KV of exactly that prefix, prefixes of a new entry
dropped, least recently used entries out first and gone from the index. Each entry's "KV" here
holds its own token ids, so a lookup's KV shows which tokens it covers."""

from __future__ import annotations

import random

import torch

from model_kit.prefix_cache import BLOCK, PrefixCache


def _kv(ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    column = torch.tensor(ids, dtype=torch.float32).view(1, 1, -1, 1)
    return [(column, -column), (column * 2, column)]  # two layers


def _reused_ids(layers) -> list[int]:
    return [int(x) for x in layers[0][0].flatten().tolist()]


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_the_longest_shared_prefix_among_hundreds_of_entries_and_its_kv() -> None:
    random.seed(7)
    template = [random.randrange(1000) for _ in range(40)]  # every prompt's chat template
    cache = PrefixCache(capacity=10**6)
    stored = []
    for i in range(400):
        ids = template + [i] + [random.randrange(1000) for _ in range(random.randint(0, 200))]
        cache.put(ids, _kv(ids))
        stored.append(ids)
    assert len(cache) == 400
    for _ in range(50):
        base = random.choice(stored)
        prompt = base[: random.randint(0, len(base))] + [random.randrange(1000, 2000) for _ in range(30)]
        shared, layers = cache.longest(prompt)
        best = max(_common(prompt, s) for s in stored)
        if best < BLOCK:
            assert (shared, layers) == (0, None)
            continue
        assert best - BLOCK < shared <= best
        assert _reused_ids(layers) == prompt[:shared]  # the KV of exactly the shared tokens
        assert layers[1][1].shape[-2] == shared


def test_a_match_shorter_than_a_block_is_none() -> None:
    cache = PrefixCache(capacity=1000)
    ids = list(range(50))
    cache.put(ids, _kv(ids))
    assert cache.longest(list(range(BLOCK - 1)) + [999] * 20) == (0, None)
    shared, _ = cache.longest(list(range(BLOCK)) + [999] * 20)
    assert shared == BLOCK


def test_a_stored_prefix_of_a_new_entry_goes_and_the_longer_one_serves() -> None:
    cache = PrefixCache(capacity=10_000)
    turn_1 = list(range(100, 170))  # prompt of turn 1 (not a whole number of blocks)
    cache.put(turn_1, _kv(turn_1))
    with_reply = turn_1 + list(range(500, 540))
    cache.put(with_reply, _kv(with_reply))
    assert len(cache) == 1
    turn_2 = with_reply + [7, 8, 9]
    shared, layers = cache.longest(turn_2)
    assert shared == len(with_reply) and _reused_ids(layers) == with_reply


def test_least_recently_used_entries_leave_first_and_leave_the_index() -> None:
    cache = PrefixCache(capacity=300)
    a, b, c = ([k] * 100 for k in (1, 2, 3))
    cache.put(a, _kv(a))
    cache.put(b, _kv(b))
    assert cache.longest(a + [9])[0] == 100  # a used: b is now the least recent
    cache.put(c, _kv(c))
    cache.put([4] * 50, _kv([4] * 50))  # over capacity: b goes
    assert cache.longest(b)[1] is None
    assert cache.longest(a)[0] == 100 and cache.longest(c)[0] == 100
    cache.clear()
    assert len(cache) == 0 and cache.longest(a) == (0, None)
