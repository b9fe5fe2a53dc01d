"""A rollout worker that kills its own process with SIGKILL once per run, mid-generation (fault tests).

It lives in an importable module because the process runtime builds workers in fresh
interpreters, which import the class by name.
"""

import os
import signal
from pathlib import Path

from policyflow.workers import RolloutWorker


class DiesOnce(RolloutWorker):
    """After finishing two groups, while others are still being generated, SIGKILL itself (first worker to get there, once per run folder)."""

    def _group_done(self, group) -> None:
        super()._group_done(group)
        if self.stats["groups"] >= 2 and self._open and self._first_to_die():
            os.kill(os.getpid(), signal.SIGKILL)

    def _first_to_die(self) -> bool:
        """Create the run's marker file atomically: exactly one worker process succeeds."""
        try:
            os.close(os.open(Path(self.spec.folder) / "killed-a-worker", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True


class BreaksAfterTwoGroups(RolloutWorker):
    """Its engine raises (as a CUDA out-of-memory error would) once two groups are done."""

    def _group_done(self, group) -> None:
        super()._group_done(group)
        if self.stats["groups"] >= 2:
            raise MemoryError("simulated: the engine ran out of memory")


class AlwaysDead(RolloutWorker):
    """Looks dead to the pool at every poll (what a worker that crashes at start-up does)."""

    async def poll(self):
        from policyflow.runtime import WorkerDied

        raise WorkerDied("simulated: this worker died")


def _perturb(model) -> None:
    """Shift every floating weight by a fixed pattern: a hand-over that loads the wrong numbers."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(0.05 * torch.cos(torch.arange(p.numel(), dtype=p.dtype, device=p.device)).view_as(p))


class WrongWeightsAfterUpdate(RolloutWorker):
    """Each weight update loads the published weights, then runs slightly different ones (the start is right)."""

    def _load_latest(self, mode: str) -> None:
        super()._load_latest(mode)
        _perturb(self.engine.core.model)
        self.engine.core.backend.refresh()


class WrongWeightsFromStart(RolloutWorker):
    """Runs slightly different weights than published from the first version on."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _perturb(self.engine.core.model)
        self.engine.core.backend.refresh()
