"""The inline runtime: every component is an object in this process, driven by one asyncio loop.

Nothing runs in parallel: a synchronous method (a trainer step) holds the loop until it
returns, and rollout workers advance between decode steps. The schedule is therefore
reproducible, which is what tests and debugging want.
"""

from __future__ import annotations

import inspect
from typing import Any

from policyflow.runtime import WorkerDied


class InlineHandle:
    def __init__(self, obj: Any, name: str) -> None:
        self.obj, self.name = obj, name
        self._alive = True

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if not self._alive:
            raise WorkerDied(f"component {self.name!r} was killed")
        result = getattr(self.obj, method)(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        if not self._alive:  # killed while the call was running
            raise WorkerDied(f"component {self.name!r} was killed")
        return result

    @property
    def alive(self) -> bool:
        return self._alive

    def kill(self) -> None:
        self._alive = False
        close = getattr(self.obj, "close", None)
        if close is not None:
            close()


class InlineRuntime:
    name = "inline"

    def __init__(self) -> None:
        self.handles: list[InlineHandle] = []

    async def spawn(self, cls: type, *args: Any, name: str, cpus: float = 1, gpus: float = 0, **kwargs: Any) -> InlineHandle:
        handle = InlineHandle(cls(*args, **kwargs), name)
        self.handles.append(handle)
        return handle

    async def shutdown(self) -> None:
        for handle in self.handles:
            if handle.alive:
                handle.kill()
        self.handles.clear()
