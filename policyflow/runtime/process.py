"""The process runtime: each component in its own OS process on this machine, no external service.

Processes start with the `spawn` method (a fresh interpreter: safe with torch threads and
CUDA). Calls and results are pickled over a duplex pipe, `(call_id, method, args, kwargs)`
one way and `(call_id, ok, value)` back; a reader thread on each side hands messages to the
asyncio loop, so a component serves many calls at once (a rollout worker keeps decoding
while it takes new groups). Weights do not go through the pipe: the trainer publishes them
as safetensors files (`weights.FileSnapshotStore`) and workers read them.

Faults: when a component's process dies (SIGKILL, crash, out of memory) its pipe closes, and
every pending and later call fails with `WorkerDied`. Exceptions raised by a component
travel back as themselves when they can be pickled (so a bad model path is the same
one-line `ModelLoadError` as in one process), otherwise as `RemoteError` with the traceback.
"""

from __future__ import annotations

import asyncio
import inspect
import multiprocessing as mp
import os
import pickle
import signal
import threading
import traceback
from typing import Any

from policyflow.runtime import RemoteError, WorkerDied

_READY = 0  # call id of the start-up message
_STOP = b"stop"  # the parent's last message: finish and exit (not a pickle, so never a call)


def _dumps_error(err: BaseException) -> bytes:
    try:
        blob = pickle.dumps(err)
        pickle.loads(blob)
        return blob
    except Exception:
        text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        return pickle.dumps(RemoteError(f"{type(err).__name__}: {err}\n{text}"))


def _serve(conn, cls: type, args: tuple, kwargs: dict, threads: int) -> None:
    """Child process: build the component, then answer calls until the parent closes the pipe."""
    import torch
    from tqdm import tqdm

    for signum in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C and a scheduler's SIGTERM are the parent's to handle: it stops its components
        signal.signal(signum, signal.SIG_IGN)
    torch.set_num_threads(max(1, threads))
    # tqdm's default lock is a multiprocessing semaphore that is never released, and the
    # resource tracker warns about it at exit; progress bars in one process need a thread lock.
    tqdm.set_lock(threading.RLock())
    try:
        obj = cls(*args, **kwargs)
    except BaseException as err:  # reported to the parent, which raises it
        conn.send_bytes(pickle.dumps((_READY, False, _dumps_error(err))))
        return
    conn.send_bytes(pickle.dumps((_READY, True, os.getpid())))
    asyncio.run(_answer_calls(conn, obj))


async def _answer_calls(conn, obj: Any) -> None:
    loop = asyncio.get_running_loop()
    closed = asyncio.Event()
    tasks: set[asyncio.Task] = set()

    async def run(call_id: int, method: str, args: tuple, kwargs: dict) -> None:
        try:
            result = getattr(obj, method)(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
            reply = pickle.dumps((call_id, True, result))
        except BaseException as err:
            reply = pickle.dumps((call_id, False, _dumps_error(err)))
        try:
            conn.send_bytes(reply)
        except OSError:  # the parent is gone
            closed.set()

    def start(message: bytes) -> None:
        task = loop.create_task(run(*pickle.loads(message)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def read() -> None:
        while True:
            try:
                message = conn.recv_bytes()
            except (EOFError, OSError):
                message = _STOP
            if message == _STOP:
                loop.call_soon_threadsafe(closed.set)
                return
            loop.call_soon_threadsafe(start, message)

    threading.Thread(target=read, daemon=True, name="policyflow-reader").start()
    await closed.wait()
    close = getattr(obj, "close", None)
    if close is not None:
        close()


class ProcessHandle:
    """The parent's end of one component process."""

    def __init__(self, name: str, process, conn) -> None:
        self.name, self.process, self.conn = name, process, conn
        self.pid: int | None = None
        self._next_id = _READY + 1
        self._pending: dict[int, asyncio.Future] = {}
        self._dead = False
        self._loop = asyncio.get_running_loop()
        self._ready: asyncio.Future = self._loop.create_future()
        self._pending[_READY] = self._ready
        threading.Thread(target=self._read, daemon=True, name=f"policyflow-{name}").start()

    async def wait_ready(self) -> None:
        try:
            self.pid = await self._ready
        except WorkerDied as err:
            raise WorkerDied(
                f"{err} before it was ready. The process runtime starts components with the 'spawn' method, "
                "which imports your main module again: a script that starts training at module level must do so "
                "under `if __name__ == '__main__':` (the traceback above, from the child, says more)"
            ) from None

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self._dead:
            raise self._death()
        call_id, self._next_id = self._next_id, self._next_id + 1
        future = self._loop.create_future()
        self._pending[call_id] = future
        try:
            self.conn.send_bytes(pickle.dumps((call_id, method, args, kwargs)))
        except OSError:
            self._pending.pop(call_id, None)
            self._on_exit()
            raise self._death() from None
        return await future

    @property
    def alive(self) -> bool:
        return not self._dead and self.process.is_alive()

    def kill(self) -> None:
        if self.process.pid is not None and self.process.is_alive():
            os.kill(self.process.pid, signal.SIGKILL)

    async def close(self, timeout: float = 5.0) -> None:
        """Ask the child to finish and exit; kill it if it has not within `timeout`; close the pipe."""
        self._dead = True
        try:
            self.conn.send_bytes(_STOP)
        except OSError:  # already gone
            pass
        await asyncio.to_thread(self.process.join, timeout)
        if self.process.is_alive():
            self.kill()
            await asyncio.to_thread(self.process.join, timeout)
        self.conn.close()

    # -- reader thread and loop callbacks ----------------------------------------------------
    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv_bytes()
            except (EOFError, OSError, TypeError):  # TypeError: the pipe was closed under the read
                self._post(self._on_exit)
                return
            self._post(self._deliver, message)

    def _post(self, callback, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody waits for this any more
            pass

    def _deliver(self, message: bytes) -> None:
        call_id, ok, value = pickle.loads(message)
        future = self._pending.pop(call_id, None)
        if future is None or future.done():
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(pickle.loads(value))

    def _on_exit(self) -> None:
        self._dead = True
        if not self._pending:
            return
        death = self._death()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(death)
        self._pending.clear()

    def _death(self) -> WorkerDied:
        self.process.join(timeout=0.2)  # the pipe closed: the exit code follows within moments
        code = self.process.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return WorkerDied(f"component {self.name!r} (pid {self.process.pid}) died: {how}")


class ProcessRuntime:
    name = "process"

    def __init__(self) -> None:
        self._context = mp.get_context("spawn")
        self.handles: list[ProcessHandle] = []

    async def spawn(self, cls: type, *args: Any, name: str, cpus: float = 1, gpus: float = 0, **kwargs: Any) -> ProcessHandle:
        parent, child = self._context.Pipe(duplex=True)
        process = self._context.Process(target=_serve, args=(child, cls, args, kwargs, int(cpus)), name=f"policyflow-{name}", daemon=True)
        process.start()
        child.close()
        handle = ProcessHandle(name, process, parent)
        self.handles.append(handle)
        await handle.wait_ready()
        return handle

    async def shutdown(self) -> None:
        handles, self.handles = self.handles, []
        await asyncio.gather(*(h.close() for h in handles))
