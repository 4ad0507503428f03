"""Which models' weights are on the volume, kept current while the bridge runs.

A model whose weights are missing is a loud warning, not a fatal error (``REQUIRE_MODELS`` names
the models whose absence must stop the start): the bridge serves the models that are there and
consumes only the queues whose job types it can run (:func:`bridge.weights.servable_queues`), so
the other queues' jobs stay in Redis; an enhanced WAN job without ``qwen_base`` runs on its original
prompt. :meth:`Availability.watch` re-inspects the folders every
``WEIGHTS_RECHECK_S`` (and ``POST /memory/load`` does it at once); when weights appear, the
queues they complete are opened without a restart (``on_change``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from bridge.settings import MODEL_NAMES, Settings
from bridge.weights import ModelWeights, degraded_job_types, inspect_weights, servable_queues

log = logging.getLogger(__name__)


class MissingRequiredModels(RuntimeError):
    """A model named in ``REQUIRE_MODELS`` has no weights."""


class Availability:
    """The last inspection of every model's weights, and what it allows."""

    def __init__(self, settings: Settings, on_change: Callable[[list[str]], Awaitable[None]] | None = None) -> None:
        self.settings = settings
        self.on_change = on_change
        self.found: dict[str, ModelWeights] = {}

    @property
    def present(self) -> set[str]:
        return {name for name, found in self.found.items() if found.present}

    @property
    def missing(self) -> dict[str, ModelWeights]:
        return {name: found for name, found in self.found.items() if not found.present}

    def queues(self) -> list[str]:
        """The queues whose every job type can run with the weights present."""
        return [queue for queue, lacking in servable_queues(self.present).items() if not lacking]

    def report(self) -> list[dict[str, object]]:
        """The missing models for ``/health``: where each was looked for, what is missing, the fix,
        and the queues left for other workers until it arrives."""
        paused = servable_queues(self.present)
        degraded = degraded_job_types(self.present)
        return [{**found.as_dict(), "queues_paused": sorted(q for q, lack in paused.items() if name in lack),
                 "jobs_without_it": degraded.get(name, [])}
                for name, found in sorted(self.missing.items())]

    def check(self, models: Iterable[str] = MODEL_NAMES) -> list[str]:
        """Inspect ``models`` again (blocking: file system); returns those that just appeared."""
        before = self.present
        self.found.update(inspect_weights(self.settings, models))
        return sorted(self.present - before)

    def check_start(self) -> None:
        """The first inspection: log each missing model loudly; raise for a required one."""
        self.check()
        for found in self.missing.values():
            log.warning("weights missing, not serving %s: %s", found.model, found.summary())
        required = [name for name in self.settings.require_models if name in self.missing]
        if required:
            raise MissingRequiredModels(
                "REQUIRE_MODELS: " + "; ".join(self.found[name].summary() for name in required))
        paused = {q: lack for q, lack in servable_queues(self.present).items() if lack}
        for queue, lacking in sorted(paused.items()):
            log.warning("not consuming %s until the weights of %s are present (its jobs stay queued)",
                        queue, ", ".join(lacking))
        for model, job_types in sorted(degraded_job_types(self.present).items()):
            log.warning("without %s, %s run on their original prompt (no enhancement)", model, ", ".join(job_types))

    async def recheck(self, models: Iterable[str] = MODEL_NAMES) -> list[str]:
        """:meth:`check` off the event loop; tells ``on_change`` about models that appeared."""
        appeared = await asyncio.to_thread(self.check, list(models))
        if appeared:
            log.warning("weights of %s appeared; serving them now", ", ".join(appeared))
            if self.on_change is not None:
                await self.on_change(appeared)
        return appeared

    async def watch(self) -> None:
        """Re-inspect the missing models every ``WEIGHTS_RECHECK_S`` until none is missing."""
        interval = self.settings.weights_recheck_s
        while self.missing and interval > 0:
            await asyncio.sleep(interval)
            try:
                await self.recheck(list(self.missing))
            except Exception:  # noqa: BLE001 - a failed look (volume hiccup) is retried next round
                log.exception("re-checking the weights failed")
