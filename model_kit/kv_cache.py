"""The decode batch's KV cache: one buffer per layer, written in place (docs/ARCHITECTURE.md,
"Chat at scale", the batch KV cache).

Each layer's keys and values live in a preallocated ``[row slots, kv heads, columns, head dim]``
tensor. Every row's KV ends at the same column ``end``, where the batch writes its next token,
so a row of ``n`` tokens holds columns ``[end - n, end)`` and the attention window is the view
``[end - longest row, end + 1)``: a decode step copies one column per layer and attends over a
view, with no ``torch.cat`` of the whole cache; a sequence joins by one copy into a free row slot
(left of ``end`` there is room for the longest prompt), and leaves by moving the last row into its
slot. The buffer is reallocated only when it runs out of row slots (their number doubles) or
columns (right of ``end`` there is room for what the rows may still generate), so rarely.

Why a layer class of our own (transformers' ``CacheLayerMixin``) and not ``StaticLayer``:
``StaticLayer`` returns its whole preallocated length to attention on every step and writes
every row at one shared position counted from the start, so it cannot hold rows of different
lengths right-aligned, drop a row, or attend over only the live window; ``DynamicLayer`` grows by
``torch.cat``, a copy of the whole cache per layer per step. The container is transformers'
``Cache``, so the model's forward uses it as any other cache.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

#: Spare columns right of ``end`` after a reallocation: at least this many, else twice as many as
#: the rows can still grow (their ``max_tokens``): ``end`` moves a column per step, and with room
#: for only the rows' growth every sequence joining a few steps later needed a new buffer (a copy
#: of the whole batch's KV into freshly faulted-in memory each time: most of a join's cost).
MIN_SPARE = 64


class _WindowLayer(CacheLayerMixin):
    """One model layer's view of :class:`BatchKV`: writes the step's keys/values at ``end`` and
    returns the live window."""

    is_sliding = False

    def __init__(self, batch: BatchKV, index: int) -> None:
        super().__init__()
        self._batch, self._index = batch, index
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None  # the buffers are :class:`BatchKV`'s, allocated when rows join

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self._batch.write(self._index, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._batch.window + query_length, 0

    def get_seq_length(self) -> int:
        return self._batch.window

    def get_max_length(self) -> int:
        return -1


class BatchKV:
    """The KV of the rows of the running batch (see the module's docstring)."""

    def __init__(self, layers: int, max_rows: int, max_positions: int) -> None:
        self.max_rows = max_rows
        self.max_positions = max_positions  # spare row slots are allocated within this many positions
        self.cache = Cache(layers=[_WindowLayer(self, i) for i in range(layers)])
        self.lengths: list[int] = []  # tokens of each row (its KV ends at ``end``)
        self._finals: list[int] = []  # the most tokens each row can reach
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        # each row's additive attention mask over the buffers' columns: the dtype's minimum left of
        # the row's first token, 0 from it on; a row's first column stays where it is while the row
        # grows (``end`` and its length move together), so a step's mask is a view of this
        self._mask = torch.empty(0)
        self._end = 0

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def window(self) -> int:
        """Columns the next step attends to before its own token: the longest row."""
        return max(self.lengths, default=0)

    # ------------------------------------------------------------------ rows
    def add(self, layers: list[tuple[torch.Tensor, torch.Tensor]], reserve: int) -> int:
        """A new row from a batch-1 cache's per-layer ``(keys, values)`` that will grow by
        ``reserve`` tokens at most; returns its row index."""
        length = layers[0][0].shape[-2]
        self._shapes = ([(k.shape, k.dtype, k.device) for k, _ in layers], [(v.shape, v.dtype, v.device) for _, v in layers])
        no_slot = not self._keys or self.rows == self._keys[0].shape[0]
        if no_slot or length > self._end or self._end + reserve > self._keys[0].shape[-2]:
            self._reallocate(rows=self.rows + 1, left=max(length, self.window), joining=length + reserve)
        self._finals.append(length + reserve)
        row, start = self.rows, self._end - length
        for buffer, (keys, values) in zip(zip(self._keys, self._values), layers):
            buffer[0][row, :, start : self._end].copy_(keys[0])
            buffer[1][row, :, start : self._end].copy_(values[0])
            # padding may be attended to (masked): it must hold no NaN or inf from unused memory
            buffer[0][row, :, :start].zero_()
            buffer[1][row, :, :start].zero_()
        self._mask[row, :start] = torch.finfo(self._mask.dtype).min
        self._mask[row, start:] = 0
        self.lengths.append(length)
        return row

    def remove(self, row: int) -> None:
        """Drop ``row``; the last row moves into its slot (the caller reorders its list the same way)."""
        last = self.rows - 1
        if row != last:
            start = self._end - self.lengths[last]
            for buffer in (*self._keys, *self._values):
                buffer[row, :, start : self._end].copy_(buffer[last, :, start : self._end])
            self._mask[row].copy_(self._mask[last])
            self.lengths[row] = self.lengths[last]
            self._finals[row] = self._finals[last]
        self.lengths.pop()
        self._finals.pop()
        if not self.lengths:
            self.clear()

    def row(self, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Views of ``row``'s KV, ``[1, heads, tokens, dim]`` per layer (copy them to keep them)."""
        start = self._end - self.lengths[row]
        return [(k[row : row + 1, :, start : self._end], v[row : row + 1, :, start : self._end])
                for k, v in zip(self._keys, self._values)]

    # ------------------------------------------------------------------ a decode step
    def prepare_step(self) -> torch.Tensor:
        """Room for one more column; the step's attention mask, ``[rows, 1, 1, window + 1]``,
        additive (0 where a row has a token, the dtype's minimum on its padding): a view of the
        rows' masks, nothing built per step. A 4D mask goes to SDPA as it is: transformers builds
        none (its own would be boolean, which CPU SDPA handles a quarter slower than an additive one)."""
        if self._end >= self._keys[0].shape[-2]:  # only if a row outgrew its reserve
            self._reallocate(rows=self.rows, left=self.window)
        window = self.window + 1
        return self._mask[: self.rows, self._end + 1 - window : self._end + 1][:, None, None, :]

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's update for ``layer``: this step's column written at ``end``, the window returned."""
        rows, new = self.rows, keys.shape[-2]
        end = self._end + new
        self._keys[layer][:rows, :, self._end : end].copy_(keys)
        self._values[layer][:rows, :, self._end : end].copy_(values)
        start = self._end - self.window
        return self._keys[layer][:rows, :, start:end], self._values[layer][:rows, :, start:end]

    def advance(self) -> None:
        """After the step's forward: every row has one more token."""
        self._end += 1
        self.lengths = [n + 1 for n in self.lengths]

    # ------------------------------------------------------------------ memory
    def _reallocate(self, rows: int, left: int, joining: int = 0) -> None:
        """New buffers for at least ``rows`` rows with ``left`` columns before ``end`` and after it
        as many as the rows (and a row ``joining`` with this many tokens at most) can still
        grow; the live rows are copied over. Row slots double when they run out (fewer
        reallocations as sequences join), within ``max_rows`` and, beyond the rows needed,
        within ``max_positions``."""
        old_keys, old_values, old_end, window = self._keys, self._values, self._end, self.window
        growth = max([final - length for final, length in zip(self._finals, self.lengths)] + [joining - left, 1])
        columns = left + max(MIN_SPARE, 2 * growth)
        have = old_keys[0].shape[0] if old_keys else 0
        slots = have
        if rows > have:
            slots = max(rows, min(self.max_rows, 2 * have, self.max_positions // columns))
        # not zeroed (a page-faulting memset of the whole buffer cost more than the copy): columns
        # right of ``end`` are written before they are read, and a row's padding is zeroed here
        # and in :meth:`add`
        self._keys = [torch.empty((slots, *shape[1:2], columns, *shape[3:]), dtype=dtype, device=device)
                      for shape, dtype, device in self._shapes[0]]
        self._values = [torch.empty((slots, *shape[1:2], columns, *shape[3:]), dtype=dtype, device=device)
                        for shape, dtype, device in self._shapes[1]]
        self._end = left
        for new, old in zip((*self._keys, *self._values), (*old_keys, *old_values)):
            new[: self.rows, :, left - window : left].copy_(old[: self.rows, :, old_end - window : old_end])
            new[: self.rows, :, : left - window].zero_()
        dtype, device = self._shapes[0][0][1:]
        starts = left - torch.tensor(self.lengths, dtype=torch.long, device=device)
        self._mask = torch.zeros((slots, columns), dtype=dtype, device=device)
        self._mask[: self.rows].masked_fill_(torch.arange(columns, device=device) < starts[:, None],
                                             torch.finfo(dtype).min)

    def clear(self) -> None:
        """Every row gone (a failed step, the engine stopping); the buffers are freed."""
        self.lengths, self._finals, self._keys, self._values, self._end = [], [], [], [], 0
        self._mask = torch.empty(0)
