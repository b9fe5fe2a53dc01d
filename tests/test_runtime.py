"""The process runtime on its own: calls, concurrent calls, errors carried back as themselves,
a killed component, and a clean stop (the child exits by itself, code 0)."""

import asyncio
import os

import pytest

from policyflow.model import ModelLoadError
from policyflow.runtime import WorkerDied
from policyflow.runtime.process import ProcessRuntime


class Echo:
    def __init__(self, fail: bool = False) -> None:
        if fail:
            raise ModelLoadError("model path 'nowhere' does not exist")
        self.closed = False

    def add(self, a: int, b: int) -> int:
        return a + b

    async def later(self, seconds: float) -> int:
        await asyncio.sleep(seconds)
        return os.getpid()

    def boom(self) -> None:
        raise KeyError("no such key")


def test_process_runtime_calls_errors_death_and_clean_stop() -> None:
    async def scenario():
        runtime = ProcessRuntime()
        echo = await runtime.spawn(Echo, name="echo")
        assert echo.pid != os.getpid() and await echo.call("add", 2, 3) == 5
        # A slow call does not block a quick one: the component serves calls concurrently.
        slow = asyncio.ensure_future(echo.call("later", 0.3))
        assert await echo.call("add", 1, 1) == 2 and not slow.done()
        assert await slow == echo.pid
        with pytest.raises(KeyError, match="no such key"):
            await echo.call("boom")
        with pytest.raises(ModelLoadError, match="does not exist"):  # the same one-line error as in one process
            await runtime.spawn(Echo, fail=True, name="bad")
        victim = await runtime.spawn(Echo, name="victim")
        pending = asyncio.ensure_future(victim.call("later", 30))
        await asyncio.sleep(0.1)
        victim.kill()
        with pytest.raises(WorkerDied, match="killed by signal 9"):
            await pending
        with pytest.raises(WorkerDied):
            await victim.call("add", 1, 1)
        await runtime.shutdown()
        return echo.process.exitcode

    assert asyncio.run(scenario()) == 0  # asked to stop, it exited by itself (not killed after the timeout)
