"""Continuous batching of Qwen sequences: one engine thread owns the model and runs a step loop.

Every step (docs/ARCHITECTURE.md, "Chat at scale"):

1. new sequences are admitted from the waiting queue while the batch has room (``max_batch``) and
   the padded KV of the batch stays within ``kv_tokens``;
2. admitted sequences are prefilled, batch-1, at most ``prefill_chunk`` prompt tokens in all per
   step, so a long prompt is spread over several steps and the running streams keep getting
   tokens in between; a prompt starts from the longest matching prefix in :class:`PrefixCache`
   (looked up as its prefill starts, so it may be one that an earlier sequence has just put);
3. a sequence whose prefill is done picks its first token and joins the batch as a row of
   :class:`~model_kit.kv_cache.BatchKV` (written in place, no re-padding of the batch), with an
   attention mask that hides the other rows' padding and per-sequence position ids, so a
   sequence's logits do not depend on what else is in the batch;
4. one decode forward for the whole batch; the tokens are picked for all rows at once where the
   settings allow (:meth:`BatchEngine._pick`), each sampled row with its own ``torch.Generator``
   (its seed); each token goes to its sequence's :class:`~model_kit.llm.TextStream` (stop
   strings, held-back UTF-8) and the delta is streamed (joined while the model is busy);
5. finished and cancelled sequences leave the batch (the last row moves into the freed slot);
   their prompt + reply KV goes to the prefix cache.

Deltas, final answers and errors are handed to a second thread, the courier, which sends them in
order and asks the server whether each held sequence's client is still there: in Triton's Python
backend each of those is a round trip to the server that blocks its caller (without the GIL), so
on the engine thread they stalled every step; on the courier the model computes meanwhile.

Why our own loop and not transformers' ``ContinuousBatchingManager`` (``generate_batch``): it
samples every request with one global seed and generator, so a request's ``seed`` could not give
the same text twice, and it has no per-request stop strings. The prefill KV is transformers'
``DynamicCache``, the batch's our own cache layer in its ``Cache`` (model_kit/kv_cache.py says
why), and the attention transformers' own (SDPA with the padding mask).

This module is plain torch + transformers; :mod:`model_kit.llm` wires it to Triton.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from model_kit.prefix_cache import BLOCK, PrefixCache

log = logging.getLogger("model_kit.batching")


#: Held sequences are asked about cancellation every ``CANCEL_CHECK_S`` (seconds), at most
#: ``CANCEL_CHECKS`` of them each time, in turn: a check is a round trip to the Triton server per
#: sequence (made by the courier thread, not the engine's), which with every held sequence asked
#: 20 times a second cost a busy model a quarter of its throughput (docs/ARCHITECTURE.md, "Chat at
#: scale"). One or two held sequences are each asked every 50 ms, 16 every 0.4 s, 64 every 1.6 s;
#: the bridge does not wait for this: it stops a stream with a stop request (:meth:`stop_request`).
CANCEL_CHECK_S = 0.05
CANCEL_CHECKS = 2


#: A shorter shared prefix (a chat template's first tokens) is prefilled again: not worth a copy.
#: (The prefix cache finds none shorter than its block anyway.)
MIN_REUSE = max(16, BLOCK)

#: Request ids stopped before their request came, remembered (the most recent) for when it does.
STOPS_REMEMBERED = 1024


class QueueFull(RuntimeError):
    """The queue in front of the model is full; the caller should try again later."""


@dataclass(frozen=True)
class Limits:
    """Bounds of one engine (settings: model_kit/llm.py ``engine_limits``)."""

    max_batch: int = 32  # sequences decoded together
    max_waiting: int = 64  # sequences admitted to the queue but not yet in the batch
    kv_tokens: int = 100_000  # padded KV positions of the batch (batch size x longest sequence)
    prefix_tokens: int = 32_000  # KV positions kept for prefix reuse
    prefill_chunk: int = 512  # prompt tokens prefilled per step
    # While more than ``stream_join_above`` sequences are held (running, prefilling or waiting), a
    # stream's deltas are sent at most every ``stream_interval_s`` (joined meanwhile; the first at
    # once): each response costs the server, the bridge and the client per-message work, which a
    # busy model's CPU is short of; below it (or at 0 s) every delta goes as soon as it is final.
    stream_interval_s: float = 0.1
    stream_join_above: int = 8


class Observer(Protocol):
    """What the engine reports (model_kit/llm.py turns it into Triton metrics)."""

    def first_token(self, seconds: float) -> None: ...
    def token_gap(self, seconds: float) -> None: ...
    def finished(self, input_tokens: int, output_tokens: int, reused_tokens: int) -> None: ...
    def occupancy(self, running: int, waiting: int) -> None: ...
    def prefix_lookup(self, hit: bool) -> None: ...


class NullObserver:
    def first_token(self, seconds: float) -> None: ...
    def token_gap(self, seconds: float) -> None: ...
    def finished(self, input_tokens: int, output_tokens: int, reused_tokens: int) -> None: ...
    def occupancy(self, running: int, waiting: int) -> None: ...
    def prefix_lookup(self, hit: bool) -> None: ...


@dataclass(eq=False)  # identity: sequences are kept in sets and lists by who they are
class Sequence:
    """One request in the engine. ``cancelled`` and the ``on_*`` callbacks run on the engine's
    courier thread, in order."""

    prompt_ids: list[int]
    params: Any  # model_kit.llm.SamplingParameters
    cancelled: Callable[[], bool]
    on_delta: Callable[[str], None] | None
    on_done: Callable[[Any], None]  # gets a model_kit.llm.Generation
    on_error: Callable[[Exception], None]
    # engine state
    budget: int = 0
    arrived: float = field(default_factory=time.monotonic)
    ids: list[int] = field(default_factory=list)  # prompt + generated
    produced: int = 0
    reused: int = 0  # prompt tokens whose KV came from the prefix cache
    prefilled: int = 0  # prompt tokens in ``cache``
    cache: Any = None  # batch-1 DynamicCache while prefilling
    last_token_at: float = 0.0
    text: Any = None
    rng: Any = None
    processors: Any = None
    reason: str | None = None
    unsent: str = ""  # final text not sent yet (``stream_interval_s``)
    sent_at: float = 0.0
    request_id: str = ""  # the client's id, for :meth:`BatchEngine.stop_request`
    # its client stopped it (a stop request, on the caller's thread) or went away (seen by the
    # courier): it leaves at the next step, cancelled
    ended_by_client: bool = False


class BatchEngine:
    """The step loop over a :class:`model_kit.llm.QwenEngine`'s model, on its own thread."""

    def __init__(self, engine: Any, limits: Limits, observer: Observer | None = None) -> None:
        self.engine = engine
        self.limits = limits
        self.observer = observer or NullObserver()
        self.prefix = PrefixCache(limits.prefix_tokens)
        self._lock = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._prefilling: list[Sequence] = []
        self._running: list[Sequence] = []  # rows of the batch KV, in order
        from model_kit.kv_cache import BatchKV  # noqa: PLC0415 - torch only in the model process

        self._kv = BatchKV(engine.model.config.num_hidden_layers, limits.max_batch, limits.kv_tokens)
        self._stopping = False
        self._stopped_early: OrderedDict[str, None] = OrderedDict()  # ids stopped before they came
        self._held: set[Sequence] = set()  # every sequence submitted and not answered yet
        self._unchecked: deque[Sequence] = deque()  # held ones the courier has yet to ask about (this turn)
        self._reported = (-1, -1)
        self._joining = False  # deltas joined over ``stream_interval_s`` this step
        # (callback, argument, its sequence) to send, in order; None ends the courier
        self._outbox: queue.SimpleQueue[tuple[Callable[[Any], None], Any, Sequence] | None] = queue.SimpleQueue()
        self._courier = threading.Thread(target=self._deliver, name="qwen-courier", daemon=True)
        self._courier.start()
        self._thread = threading.Thread(target=self._loop, name="qwen-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the caller's side
    def submit(self, seq: Sequence) -> None:
        """Queue ``seq``; :class:`QueueFull` when ``max_waiting`` sequences already wait."""
        with self._lock:
            if self._stopping:
                raise QueueFull("the model is shutting down")
            if len(self._waiting) >= self.limits.max_waiting:
                raise QueueFull(f"{len(self._waiting)} sequences already wait for the model")
            if seq.request_id and self._stopped_early.pop(seq.request_id, False) is None:
                seq.ended_by_client = True  # its client stopped it before it came
            self._waiting.append(seq)
            self._held.add(seq)
            self._lock.notify()
        self._report()

    def stop_request(self, request_id: str) -> bool:
        """End the sequences of ``request_id`` at the next step (each gets its final answer,
        ``cancelled``); False if none is held: the id is then remembered (the last
        ``STOPS_REMEMBERED``), and a request with it that comes later ends at once (a client may
        leave before its request reached the engine). The client's way to stop a stream without
        cancelling its gRPC call (docs/ARCHITECTURE.md, "Stopping a stream")."""
        if not request_id:
            return False
        with self._lock:
            # by id, not by looking through the lists: a sequence moving from prefill to the batch
            # is in neither for a moment (its first delta is sent in between)
            found = [seq for seq in self._held if seq.request_id == request_id]
            for seq in found:
                seq.ended_by_client = True
            if not found:
                self._stopped_early[request_id] = None
                while len(self._stopped_early) > STOPS_REMEMBERED:
                    self._stopped_early.popitem(last=False)
            self._lock.notify()
        return bool(found)

    def stop(self) -> None:
        """End the loop; every sequence still held gets its final answer (cancelled), sent
        before this returns."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join(timeout=30)
        self._courier.join(timeout=30)

    def counts(self) -> tuple[int, int]:
        return len(self._running) + len(self._prefilling), len(self._waiting)

    def _report(self) -> None:
        counts = self.counts()
        if counts != self._reported:  # a metric call only when it changed
            self._reported = counts
            self.observer.occupancy(*counts)

    # ------------------------------------------------------------------ the courier thread
    def _deliver(self) -> None:
        """Send what the engine hands over, in order, and every ``CANCEL_CHECK_S`` ask whether
        the clients of the held sequences are still there (the engine drops those that are not)."""
        checked_at = time.monotonic()
        while True:
            try:
                item = self._outbox.get(timeout=CANCEL_CHECK_S)
            except queue.Empty:
                item = ()
            if item is None:
                return
            if item:
                send, arg, seq = item
                try:
                    send(arg)
                except Exception as exc:  # noqa: BLE001 - the client is gone: the engine ends it
                    log.warning("sending a response failed: %s", exc)
                    seq.ended_by_client = True
            if time.monotonic() - checked_at >= CANCEL_CHECK_S:
                checked_at = time.monotonic()
                self._check_clients()

    def _check_clients(self) -> None:
        """Ask about the next ``CANCEL_CHECKS`` held sequences (all of them in turn)."""
        if not self._unchecked:
            with self._lock:
                self._unchecked = deque(self._held)
        asked = 0
        while self._unchecked and asked < CANCEL_CHECKS:
            seq = self._unchecked.popleft()
            if seq.ended_by_client or seq not in self._held:  # ending already, or answered
                continue
            asked += 1
            try:
                if seq.cancelled():
                    seq.ended_by_client = True
            except Exception as exc:  # noqa: BLE001 - the courier must go on sending
                log.warning("asking whether a request was cancelled failed: %s", exc)

    def _send(self, seq: Sequence, callback: Callable[[Any], None] | None, arg: Any) -> None:
        if callback is not None:
            self._outbox.put((callback, arg, seq))

    # ------------------------------------------------------------------ the engine thread
    def _loop(self) -> None:
        import torch  # noqa: PLC0415

        with torch.inference_mode():
            while True:
                with self._lock:
                    while not self._stopping and not (self._waiting or self._prefilling or self._running):
                        self._lock.wait()
                    if self._stopping:
                        break
                try:
                    self._step()
                except Exception as exc:  # noqa: BLE001 - every held sequence must get an answer
                    log.exception("engine step failed")
                    self._fail_all(_as_oom(exc))
        self._shutdown()

    def _step(self) -> None:
        self._drop_cancelled()
        self._admit()
        self._joining = sum(self.counts()) > self.limits.stream_join_above
        self._prefill()
        if self._running:
            self._decode()
        self._report()

    def _admit(self) -> None:
        with self._lock:
            while self._waiting and len(self._running) + len(self._prefilling) < self.limits.max_batch:
                seq = self._waiting[0]
                if (self._running or self._prefilling) and not self._kv_fits(seq):
                    break
                self._waiting.popleft()
                self._prefilling.append(seq)
                self._start(seq)

    def _kv_fits(self, new: Sequence) -> bool:
        """The batch's padded KV (rows x longest sequence, at its worst) with ``new`` in it."""
        members = [*self._running, *self._prefilling, new]
        longest = max(len(s.prompt_ids) + s.params.max_tokens for s in members)
        return len(members) * min(longest, self.engine.context) <= self.limits.kv_tokens

    def _start(self, seq: Sequence) -> None:
        import torch  # noqa: PLC0415

        from model_kit.llm import TextStream, _processors  # noqa: PLC0415

        seq.budget = min(seq.params.max_tokens, self.engine.context - len(seq.prompt_ids))
        seq.ids = list(seq.prompt_ids)
        seq.text = TextStream(self.engine.tokenizer, seq.params.stop)
        seed = seq.params.seed if seq.params.seed is not None else secrets.randbits(63)
        seq.rng = torch.Generator(device=self.engine.device).manual_seed(seed)
        seq.processors = _processors(seq.params)

    def _reuse(self, seq: Sequence) -> None:
        """Start ``seq`` from the longest prefix of its prompt in the prefix cache. Looked up when
        its prefill starts, not when it was admitted: a sequence admitted beside another with the
        same long prompt (users of one character card, a burst of turns) then finds the KV that the
        other's prefill has just put there."""
        # at least the last prompt token is run: its logits give the first new token
        reused, layers = self.prefix.longest(seq.prompt_ids[:-1])
        hit = layers is not None and reused >= MIN_REUSE
        self.observer.prefix_lookup(hit)
        if hit:
            seq.cache = _cache_of(layers)
            seq.prefilled = seq.reused = reused

    def _prefill(self) -> None:
        """Up to ``prefill_chunk`` prompt tokens in all, oldest sequence first."""
        budget = self.limits.prefill_chunk
        for seq in list(self._prefilling):
            if budget <= 0:
                break
            if seq.cache is None:
                self._reuse(seq)
            end = min(len(seq.prompt_ids), seq.prefilled + budget)
            try:
                logits = self._forward_one(seq, seq.prompt_ids[seq.prefilled : end])
            except Exception as exc:  # noqa: BLE001 - this sequence fails, the batch goes on
                self._prefilling.remove(seq)
                self._finish_error(seq, _as_oom(exc))
                continue
            budget -= end - seq.prefilled
            seq.prefilled = end
            if end == len(seq.prompt_ids):
                self._prefilling.remove(seq)
                self.prefix.put(seq.prompt_ids, _layers(seq.cache))  # shared by concurrent turns
                self.observer.first_token(time.monotonic() - seq.arrived)
                seq.last_token_at = time.monotonic()
                if self._take(seq, self._pick([seq], logits)[0]):
                    self._join(seq)

    def _forward_one(self, seq: Sequence, chunk: list[int]) -> Any:
        import torch  # noqa: PLC0415

        from transformers import DynamicCache  # noqa: PLC0415

        if seq.cache is None:
            seq.cache = DynamicCache()
        ids = torch.tensor([chunk], dtype=torch.long, device=self.engine.device)
        positions = torch.arange(seq.prefilled, seq.prefilled + len(chunk), device=self.engine.device).unsqueeze(0)
        logits, seq.cache = self.engine.forward(ids, seq.cache, position_ids=positions)
        return logits

    def _join(self, seq: Sequence) -> None:
        """Add a prefilled sequence's KV as a new row of the batch KV."""
        self._kv.add(_layers(seq.cache), reserve=seq.budget - seq.produced)
        seq.cache = None
        self._running.append(seq)

    def _decode(self) -> None:
        import torch  # noqa: PLC0415

        device = self.engine.device
        tokens = torch.tensor([[s.ids[-1]] for s in self._running], dtype=torch.long, device=device)
        positions = torch.tensor([[len(s.ids) - 1] for s in self._running], dtype=torch.long, device=device)
        mask = self._kv.prepare_step()
        logits, _ = self.engine.forward(tokens, self._kv.cache, attention_mask=mask, position_ids=positions)
        self._kv.advance()
        now = time.monotonic()
        # every running sequence got a token this step: one gap per step (one metric call, not
        # one per sequence), the longest of them (a sequence that just joined has a shorter one)
        self.observer.token_gap(now - min(s.last_token_at for s in self._running))
        leaving = []
        for row, (seq, token) in enumerate(zip(self._running, self._pick(self._running, logits))):
            seq.last_token_at = now
            if not self._take(seq, token):
                leaving.append(row)
        if leaving:
            self._leave(leaving)

    def _pick(self, seqs: list[Sequence], logits: Any) -> list[int]:
        """Each row's next token: the greedy rows in one argmax, the rows sampled with temperature,
        top-k and top-p in one pass (:func:`_sample_rows`), and rows with a repetition penalty
        (it reads each sequence's own tokens) through their own logits processors."""
        import torch  # noqa: PLC0415

        greedy = logits.argmax(dim=-1).tolist()
        tokens: list[int | None] = [greedy[i] if _plain_greedy(s.params) else None for i, s in enumerate(seqs)]
        rows = [i for i, s in enumerate(seqs) if tokens[i] is None and s.params.repetition_penalty == 1.0]
        if rows:
            for i, token in zip(rows, _sample_rows(logits[rows], [seqs[i] for i in rows])):
                tokens[i] = token
        for i, seq in enumerate(seqs):
            if tokens[i] is None:
                ids = torch.tensor([seq.ids], dtype=torch.long, device=logits.device)
                tokens[i] = int(self.engine.pick(logits[i : i + 1], ids, seq.processors, seq.rng,
                                                 seq.params.temperature).item())
        return tokens  # type: ignore[return-value]

    def _take(self, seq: Sequence, token_id: int) -> bool:
        """Add ``seq``'s next token; False when the sequence has ended (it got its final answer)."""
        from model_kit.llm import FINISH_LENGTH, FINISH_STOP  # noqa: PLC0415

        seq.produced += 1
        if token_id in self.engine.eos_ids:
            seq.reason = FINISH_STOP
        else:
            seq.ids.append(token_id)
            seq.text.add(token_id)
            if seq.text.stopped:
                seq.reason = FINISH_STOP
            elif seq.on_delta is not None and (piece := seq.text.delta()):
                seq.unsent += piece
                now = time.monotonic()
                if not self._joining or now - seq.sent_at >= self.limits.stream_interval_s:
                    piece, seq.unsent, seq.sent_at = seq.unsent, "", now
                    self._send(seq, seq.on_delta, piece)
        if seq.reason is None and seq.produced >= seq.budget:
            seq.reason = FINISH_LENGTH
        if seq.reason is None:
            return True
        self._finish(seq)
        return False

    def _drop_cancelled(self) -> None:
        """Sequences a stop request named or whose client went away (the courier asks) leave,
        wherever they are, with their final answer."""
        from model_kit.llm import FINISH_CANCELLED  # noqa: PLC0415

        with self._lock:
            queued = [s for s in self._waiting if s.ended_by_client]
            for seq in queued:
                self._waiting.remove(seq)
        prefilling = [s for s in self._prefilling if s.ended_by_client]
        for seq in prefilling:
            self._prefilling.remove(seq)
        for seq in queued + prefilling:
            seq.reason = FINISH_CANCELLED
            self._finish(seq)
        rows = [i for i, s in enumerate(self._running) if s.ended_by_client]
        for i in rows:
            self._running[i].reason = FINISH_CANCELLED
            self._finish(self._running[i])
        if rows:
            self._leave(rows)

    def _leave(self, rows: list[int]) -> None:
        """Drop batch rows (the last row moves into a freed slot, in the KV and in ``_running``)."""
        for i in sorted(rows, reverse=True):  # a higher row moved down is never one still to drop
            seq = self._running[i]
            if seq.reason != "cancelled":  # its prompt + reply, for the next turn of its conversation
                # the KV holds every token fed so far (the last one picked is not fed yet)
                self.prefix.put(seq.ids[: self._kv.lengths[i]], self._kv.row(i))
            self._kv.remove(i)
            self._running[i] = self._running[-1]
            self._running.pop()

    def _finish(self, seq: Sequence) -> None:
        from model_kit.llm import FINISH_LENGTH, FINISH_STOP, Generation  # noqa: PLC0415

        with self._lock:
            self._held.discard(seq)

        tail = seq.unsent + (seq.text.finish() if seq.text is not None else "")
        if seq.text is not None and seq.text.stopped and seq.reason == FINISH_LENGTH:
            seq.reason = FINISH_STOP  # a stop string in the last, pending piece
        text = seq.text.text if seq.text is not None else ""
        self.observer.finished(len(seq.prompt_ids), seq.produced, seq.reused)
        self._send(seq, seq.on_done, Generation(text, tail, seq.reason, len(seq.prompt_ids), seq.produced))

    def _finish_error(self, seq: Sequence, exc: Exception) -> None:
        with self._lock:
            self._held.discard(seq)
        self._send(seq, seq.on_error, exc)

    def _fail_all(self, exc: Exception) -> None:
        for seq in [*self._prefilling, *self._running]:
            self._finish_error(seq, exc)
        self._prefilling, self._running = [], []
        self._kv.clear()
        self.prefix.clear()  # its tensors may be what filled the memory

    def _shutdown(self) -> None:
        from model_kit.llm import FINISH_CANCELLED  # noqa: PLC0415

        with self._lock:
            held = [*self._waiting, *self._prefilling, *self._running]
            self._waiting.clear()
        self._prefilling, self._running = [], []
        for seq in held:
            seq.reason = FINISH_CANCELLED
            self._finish(seq)
        self._kv.clear()
        self.prefix.clear()
        self._outbox.put(None)  # the courier sends what is queued, then ends


def _plain_greedy(params: Any) -> bool:
    """Greedy with no logits processor: the argmax of the raw logits (as ``QwenEngine.pick``)."""
    return params.temperature == 0 and params.repetition_penalty == 1.0


def _sample_rows(logits: Any, seqs: list[Sequence]) -> list[int]:
    """Sampled tokens of rows whose settings are temperature, top-k and top-p: the arithmetic of
    transformers' warpers (``model_kit.llm._processors``) on all rows at once, then each row draws
    from its own generator, so a seed gives the same text in any batch (and as the warpers would)."""
    import torch  # noqa: PLC0415

    device = logits.device
    params = [s.params for s in seqs]
    scores = logits.float() / torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)[:, None]
    vocab = scores.shape[-1]
    if any(p.top_k for p in params):
        k = torch.tensor([min(p.top_k, vocab) if p.top_k else vocab for p in params], device=device)
        kth = scores.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if any(p.top_p < 1.0 for p in params):
        ordered, order = torch.sort(scores, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        # 1 - top_p rounded to float32 from Python's double, as the warper's comparison does
        limit = torch.tensor([1 - p.top_p for p in params], dtype=torch.float32, device=device)[:, None]
        drop = cumulative <= limit
        drop[:, -1:] = False  # the likeliest token always stays
        scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    probs = scores.softmax(dim=-1)
    return [int(torch.multinomial(probs[i], num_samples=1, generator=s.rng)[0]) for i, s in enumerate(seqs)]


def _layers(cache: Any) -> list[tuple[Any, Any]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache_of(layers: list[tuple[Any, Any]]) -> Any:
    from transformers import DynamicCache  # noqa: PLC0415

    return DynamicCache(ddp_cache_data=layers)


def _as_oom(exc: Exception) -> Exception:
    """An allocation failure reads "out of memory" (the bridge's OOM path)."""
    import torch  # noqa: PLC0415

    if isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc).lower():
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return RuntimeError(f"out of memory: {exc}")
    return exc
