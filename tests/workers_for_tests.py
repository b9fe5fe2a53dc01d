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

    def _on_finished(self, request, sample) -> None:
        super()._on_finished(request, sample)
        marker = Path(self.cfg.run_dir) / "killed-a-worker"
        if self.stats["groups"] >= 2 and self._open and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
