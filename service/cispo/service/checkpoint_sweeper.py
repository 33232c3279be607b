"""The sweeper: every `interval` seconds, expired checkpoints (a save's ttl_seconds) are deleted.

Each sweep is one operation queued in the pipeline (the lane of the set of runs), so it runs on
the engine thread between other operations, never during a load or a save; each checkpoint is
removed crash-safely (worker.checkpoint.remove_directory), a loaded export forgotten too, and
counted in `cispo_checkpoints_swept_total{kind}`.
"""

import asyncio
import logging
import time

from prometheus_client import CollectorRegistry, Counter

from cispo.service.pipeline import OperationPipeline
from cispo.worker import checkpoints
from cispo.worker.errors import StateNotFound
from cispo.worker.protocols import RunRegistry

log = logging.getLogger(__name__)


class CheckpointSweeper:
    """Deletes expired checkpoints of `runs` periodically, in `pipeline`'s order; an owned task."""

    def __init__(self, runs: RunRegistry, pipeline: OperationPipeline, registry: CollectorRegistry, interval: float):
        self._runs = runs
        self._pipeline = pipeline
        self._interval = interval
        self._task: asyncio.Task | None = None
        self.swept = Counter(
            "cispo_checkpoints_swept", "Expired checkpoints deleted by the sweeper.", ["kind"], registry=registry
        )

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._sweep_forever())

    async def stop(self) -> None:
        """Stop sweeping (a sweep already queued still runs, in its turn)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await asyncio.shield(await self._pipeline.submit(self.sweep))
            except Exception as exc:  # a broken group, a full disk: try again next time
                log.warning("checkpoint sweep failed: %s", exc)

    def sweep(self) -> int:
        """Delete every expired checkpoint now (on the engine thread); how many were."""
        done = 0
        for kind, name, owner in checkpoints.expired(self._runs.config, time.time()):
            try:
                self._runs.delete_checkpoint(kind, name, owner)
            except StateNotFound:  # gone meanwhile, or no longer readable: nothing to sweep
                continue
            except Exception as exc:  # one that cannot be deleted (EACCES, EBUSY) holds up no other
                log.warning("could not sweep expired %s '%s' of %s: %s", kind, name, owner or "no identity", exc)
                continue
            self.swept.labels(kind).inc()
            log.info("swept expired %s '%s' of %s", kind.replace("_", " "), name, owner or "no identity")
            done += 1
        return done
