"""KV of recent prompts (and replies) for prefix reuse (docs/ARCHITECTURE.md, "Chat at scale").

Entries are token-id sequences with their per-layer KV, least recently used out first, at most
``capacity`` positions in all. A lookup finds an entry sharing the longest prefix with a prompt
through an index of **block chains**, as vLLM's prefix caching does: the ids are cut into blocks
of ``BLOCK`` tokens, and block ``k``'s chain hash is the hash of block ``k - 1``'s chain hash and
block ``k``'s ids, so equal chain hashes mean equal prefixes of ``k`` blocks. A lookup walks the
prompt's chain as deep as the index knows it (a dict lookup per block), then extends the match
token by token within the next block on one entry that shares those blocks. Comparing the prompt
with every entry instead cost a Python loop over the shared chat-template prefix per entry: with
hundreds of entries (a tiny model's KV is small, so its share of memory holds thousands of
prompts) a lookup took milliseconds on the engine thread, once per prompt and per finished turn.

A match found this way is the longest to within a block: of the entries sharing the prompt's
deepest known block, one is extended (at most ``BLOCK - 1`` tokens fewer reused than the best).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterator

#: Tokens per block of the chain index.
BLOCK = 16

Layers = list[tuple[Any, Any]]  # per layer (keys, values), [1, heads, tokens, dim]


def _chain(ids: tuple[int, ...] | list[int]) -> Iterator[int]:
    """The chain hashes of ``ids``' full blocks, in order (a lookup stops at the first unknown)."""
    previous = 0
    for start in range(0, len(ids) - BLOCK + 1, BLOCK):
        previous = hash((previous, tuple(ids[start : start + BLOCK])))
        yield previous


def _last(chain: list[int]) -> int:
    """The ``_ending`` index's key of an entry: its last full block's chain hash, 0 for none."""
    return chain[-1] if chain else 0


class PrefixCache:
    """LRU entries of token ids with their KV; :meth:`longest` finds the longest shared prefix."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[int, ...], Layers] = OrderedDict()
        self._chains: dict[tuple[int, ...], list[int]] = {}
        # chain hash of k blocks -> entries whose first k blocks it is
        self._through: dict[int, set[tuple[int, ...]]] = {}
        # chain hash of an entry's last full block (0: none) -> entries with no further full block
        self._ending: dict[int, set[tuple[int, ...]]] = {}
        self._size = 0

    def __len__(self) -> int:
        return len(self._entries)

    def longest(self, ids: list[int]) -> tuple[int, Layers | None]:
        """The most of ``ids``' first tokens some entry starts with, and views of that entry's KV
        for them (a match shorter than one block counts as none)."""
        depth, candidates = 0, None
        for h in _chain(ids):
            found = self._through.get(h)
            if not found:
                break
            depth, candidates = depth + 1, found
        if not candidates:
            return 0, None
        key = next(iter(candidates))
        shared = depth * BLOCK
        if key[:shared] != tuple(ids[:shared]):  # a hash collision: ids differ after all
            return 0, None
        limit = min(len(key), len(ids))
        while shared < limit and key[shared] == ids[shared]:
            shared += 1
        self._entries.move_to_end(key)
        return shared, [(k[:, :, :shared], v[:, :, :shared]) for k, v in self._entries[key]]

    def put(self, ids: list[int], layers: Layers) -> None:
        """Keep a copy of ``layers`` (the KV of ``ids``); entries that are prefixes of ``ids`` go."""
        size = len(ids)
        if size == 0 or size > self.capacity:
            return
        key = tuple(ids)
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        chain = list(_chain(key))
        for known in [0, *chain]:  # stored prefixes of this one add nothing
            for other in list(self._ending.get(known, ())):
                if len(other) <= size and key[: len(other)] == other:
                    self._drop(other)
        while self._entries and self._size + size > self.capacity:
            self._drop(next(iter(self._entries)))
        self._entries[key] = [(k.clone(), v.clone()) for k, v in layers]
        self._chains[key] = chain
        for h in chain:
            self._through.setdefault(h, set()).add(key)
        self._ending.setdefault(_last(chain), set()).add(key)
        self._size += size

    def _drop(self, key: tuple[int, ...]) -> None:
        del self._entries[key]
        chain = self._chains.pop(key)
        for h in chain:
            self._discard(self._through, h, key)
        self._discard(self._ending, _last(chain), key)
        self._size -= len(key)

    @staticmethod
    def _discard(index: dict[int, set[tuple[int, ...]]], h: int, key: tuple[int, ...]) -> None:
        keys = index[h]
        keys.discard(key)
        if not keys:
            del index[h]

    def clear(self) -> None:
        self._entries.clear()
        self._chains.clear()
        self._through.clear()
        self._ending.clear()
        self._size = 0
