"""The runtime seam (DESIGN.md §5): where components run, never what they do.

Components (rollout worker, trainer) are plain classes whose methods may be `async`; they are
usable and testable with no runtime at all. A runtime only places them and carries calls:

    runtime = make_runtime("process")
    trainer = await runtime.spawn(TrainerWorker, spec, store, name="trainer", cpus=1)
    metrics = await trainer.call("train_step", groups)
    await runtime.shutdown()

* `inline` — one asyncio loop in this process (tests, notebooks, single-GPU debugging).
* `process` — one OS process per component on this machine; arguments and results are
  pickled over a pipe, weights travel through the snapshot store (safetensors files).
* `ray` — later (many machines); the only module that will import ray.

A component that dies (a crashed or killed process) fails its pending and later calls with
`WorkerDied`; the caller decides what to reissue (see `pool.py`).
"""

from __future__ import annotations

from typing import Any, Protocol


class WorkerDied(RuntimeError):
    """The component's process is gone (killed, crashed or out of memory); its calls will not return."""


class RemoteError(RuntimeError):
    """A component raised an exception that could not be carried back as itself."""


class Handle(Protocol):
    name: str

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run `method(*args, **kwargs)` on the component (awaiting it if it is a coroutine)."""
        ...

    @property
    def alive(self) -> bool: ...

    def kill(self) -> None:
        """Stop the component at once (a fault, as SIGKILL would); its calls fail with WorkerDied."""
        ...


class Runtime(Protocol):
    name: str

    async def spawn(self, cls: type, *args: Any, name: str, cpus: float = 1, gpus: float = 0, **kwargs: Any) -> Handle:
        """Build `cls(*args, **kwargs)` somewhere and return a handle once it is ready."""
        ...

    async def shutdown(self) -> None:
        """Stop every component this runtime spawned."""
        ...


def make_runtime(name: str) -> Runtime:
    """The runtime named by `pipeline.runtime`."""
    if name == "inline":
        from policyflow.runtime.inline import InlineRuntime

        return InlineRuntime()
    if name == "process":
        from policyflow.runtime.process import ProcessRuntime

        return ProcessRuntime()
    raise ValueError(f"pipeline.runtime={name!r}; allowed: inline, process")
