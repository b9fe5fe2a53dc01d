"""Run untrusted Python in a sandbox: `run_python(source) -> ExecResult`, and `run_python_async`.

The rule: model-written code runs in fresh Linux namespaces made by `unshare` (util-linux, on
every stock Linux: no service, no setuid helper, no root needed) and is gone, with all it
started, when the call returns. Never `exec` it in a trainer or engine process (DESIGN.md §6).

- Network: a new network namespace, loopback down; nothing is reachable, not even 127.0.0.1.
- Files: a new mount namespace, `pivot_root`ed into an empty tmpfs with read-only nosuid binds of
  /usr (/bin, /lib... or their symlinks), the Python prefix, /etc/ld.so.cache and localtime, five
  /dev nodes and the `packages` asked for. The host's tree (home, /work, /root, its /tmp) is
  gone. Only /tmp is writable: the working directory, a private tmpfs of `disk_mb`, 8192 inodes.
- Environment: PATH, LANG/LC_ALL, HOME, TMPDIR, USER and one-thread BLAS settings only.
- Processes: new pid (own /proc), IPC and UTS namespaces; pid 1 is our supervisor (`_BOOT`).
- Limits, per process (`setrlimit`): address space, CPU seconds, processes, file size, open
  files, no core. `max_output_bytes` are kept per stream; past that the run is stopped.
- Teardown: when a pid namespace's pid 1 dies the kernel kills all its processes (ignored
  SIGTERM, double forks, `setsid` do not help). pid 1 exits as soon as the code's main process
  does, or the caller SIGKILLs it at the deadline; `unshare` reaps it only once all others are
  gone, and `run_python` returns only after that. A caller that dies, even by SIGKILL, closes
  the status pipe: pid 1 sees POLLERR on its end and exits (PR_SET_PDEATHSIG would need a
  `preexec_fn`, a full fork of a caller holding a model, and fires when the forking *thread*
  ends). pid 1 also stops the run itself at the deadline + 1 s.

Why the limits hold for root (exempt from RLIMIT_NPROC as uid 0, even in a user namespace that
maps it to itself): as root there is no user namespace; pid 1 (root) builds the tree and the
code's process takes a uid of its own, 2**30 + pid 1's host pid (unique among live sandboxes),
which drops every capability, then sets no_new_privs: RLIMIT_NPROC applies, per sandbox, and the
code has no privilege on the host. (Dropping to uid 65534 before `unshare --user` fails where
Python lives in a directory others cannot enter, /root/.pyenv here.) Other users get `unshare
--user --map-root-user`; the code keeps that uid (not 0 on the host, so RLIMIT_NPROC applies,
per user namespace since Linux 5.14), drops its capabilities and sets no_new_privs.

Not bounded: memory summed over processes (at most `max_processes` x `memory_mb`; that needs a
cgroup). Where namespaces are refused, calls raise `SandboxUnavailable` saying how to fix it;
`isolation="none"` opts into a plain process with the same rlimits (warned once per process).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import importlib.util
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"
Isolation = Literal["namespaces", "none"]
Stopped = Literal["timeout", "cpu", "memory", "output_limit"]
_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": "/tmp", "TMPDIR": "/tmp",
        "USER": "sandbox", "LOGNAME": "sandbox", "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache", "/etc/localtime",
           "/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
_SITE = "/opt/site"  # where `packages` given by name are mounted (and put on sys.path)
_GRACE_S = 5.0  # the most we wait for a killed sandbox's pipes to close
_FIX = ("the code sandbox needs Linux namespaces: as root, CAP_SYS_ADMIN; otherwise unprivileged user namespaces "
        "(sysctl user.max_user_namespaces > 0, kernel.unprivileged_userns_clone=1 on older Debian/Ubuntu, "
        "kernel.apparmor_restrict_unprivileged_userns=0 on Ubuntu >= 23.10) and util-linux >= 2.32; in Docker run with "
        "--security-opt seccomp=unconfined --security-opt apparmor=unconfined (as root also --cap-add SYS_ADMIN); "
        "or accept no isolation with isolation='none'")
_log = logging.getLogger("policyflow")


class SandboxUnavailable(RuntimeError):
    """This machine cannot build the sandbox (the message says why and how to fix it)."""


@dataclass(frozen=True)
class ExecResult:
    """What one run printed and how it ended."""

    stdout: str  # at most `max_output_bytes` of it, decoded as UTF-8 (bad bytes replaced)
    stderr: str
    exit_code: int | None  # the main process's exit status (-N: killed by signal N); None when we stopped it
    timed_out: bool  # the wall-clock or the CPU-time limit was reached
    stopped: Stopped | None  # why the run was cut short; None when it ended by itself
    wall_s: float  # seconds from start to teardown, sandbox set-up included

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.stopped is None


def run_python(source: str, *, timeout_s: float = 5.0, memory_mb: int = 512, cpu_s: float | None = None,
               disk_mb: int = 64, max_processes: int = 32, max_open_files: int = 128, max_output_bytes: int = 64 * 1024,
               packages: Sequence[str] = (), isolation: Isolation = "namespaces") -> ExecResult:
    """Run `source` as `python main.py` in a fresh sandbox and return what it printed.

    `timeout_s` bounds the wall clock (set-up included) and `cpu_s` (default `timeout_s`) the
    CPU time of each process; `memory_mb` the address space of each process; `disk_mb` the
    private /tmp (and any one file); `max_output_bytes` each of stdout and stderr. `packages`:
    importable names (mounted read-only from this interpreter's install; list dependencies too,
    e.g. ("sympy", "mpmath")) or directories (mounted read-only at the same path, on sys.path).
    Blocks the calling thread only; coroutines await `run_python_async` (same arguments).
    """
    run = run_python_async(
        source, timeout_s=timeout_s, memory_mb=memory_mb, cpu_s=cpu_s, disk_mb=disk_mb, max_processes=max_processes,
        max_open_files=max_open_files, max_output_bytes=max_output_bytes, packages=packages, isolation=isolation)
    if not _in_event_loop():
        return asyncio.run(run)
    with concurrent.futures.ThreadPoolExecutor(1) as thread:  # called from a coroutine: its own loop, elsewhere
        return thread.submit(asyncio.run, run).result()


async def run_python_async(source: str, *, timeout_s: float = 5.0, memory_mb: int = 512, cpu_s: float | None = None,
                           disk_mb: int = 64, max_processes: int = 32, max_open_files: int = 128,
                           max_output_bytes: int = 64 * 1024, packages: Sequence[str] = (),
                           isolation: Isolation = "namespaces") -> ExecResult:
    """`run_python` for coroutines: the event loop never waits on the sandbox. Cancelling the
    call kills the sandbox, and waits until it is gone, before the cancellation propagates."""
    try:  # before anything is spawned: text Python cannot write as UTF-8 (a lone surrogate) never starts a sandbox
        data = source.encode()
    except UnicodeEncodeError as err:
        raise ValueError(f"the code cannot be run: it is not valid UTF-8 text ({err.reason} at character {err.start})") from None
    cpu = int(-(-(cpu_s or timeout_s) // 1))  # whole seconds, rounded up
    limits = {"RLIMIT_AS": [int(memory_mb) << 20] * 2, "RLIMIT_CPU": [cpu, cpu + 1], "RLIMIT_NPROC": [max_processes] * 2,
              "RLIMIT_FSIZE": [int(disk_mb) << 20] * 2, "RLIMIT_NOFILE": [max_open_files] * 2, "RLIMIT_CORE": [0, 0]}
    binds, links, sys_path = _mounts(tuple(packages))
    mode = "none" if isolation == "none" else "root" if os.geteuid() == 0 else "user"
    if mode == "none":
        _warn_unisolated()
    workdir = tempfile.mkdtemp(prefix="policyflow-code-") if mode == "none" else "/tmp"
    status_r, status_w = os.pipe()
    config = {"mode": mode, "status_fd": status_w, "binds": binds, "links": links, "sys_path": sys_path,
              "workdir": workdir, "disk_mb": disk_mb, "limits": limits, "deadline_s": timeout_s + 1.0}
    argv = [os.path.realpath(sys.executable), "-I", "-S", "-c", _BOOT, repr(config)]
    if mode != "none":
        userns = ["--user", "--map-root-user"] if mode == "user" else []
        argv = [UNSHARE, *userns, "--mount", "--pid", "--net", "--ipc", "--uts", "--kill-child", "--", *argv]
    start = time.monotonic()
    try:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                pass_fds=(status_w,), env={**_ENV, "HOME": workdir, "TMPDIR": workdir}, cwd=workdir, start_new_session=True)
        except (FileNotFoundError, PermissionError) as e:
            raise SandboxUnavailable(f"code sandbox unavailable: {e.filename}: {e.strerror} (util-linux); {_FIX}") from None
        finally:
            os.close(status_w)
        run = _Run(proc, mode, status_r, max_output_bytes, data)
        stopped = await run.wait(start + timeout_s)
        return run.result(stopped, time.monotonic() - start)
    finally:
        os.close(status_r)
        if mode == "none":
            shutil.rmtree(workdir, ignore_errors=True)


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class _Run:
    """The caller's side of one sandbox: feeds the source, reads capped output and the status pipe."""

    def __init__(self, proc: asyncio.subprocess.Process, mode: str, status_fd: int, cap: int, source: bytes):
        self.proc, self.mode, self.status_fd, self.cap, self.killed = proc, mode, status_fd, cap, False
        self.out, self.err, self.status = bytearray(), bytearray(), bytearray()
        os.set_blocking(status_fd, False)  # a few short lines: read when needed, never waited on
        self.flooded = asyncio.Event()
        self.io = [asyncio.ensure_future(c) for c in (
            self._capture(proc.stdout, self.out), self._capture(proc.stderr, self.err), self._feed(source))]

    async def wait(self, deadline: float) -> Stopped | None:
        """Wait for the end, the deadline or an output flood; the sandbox is gone when this returns."""
        exited = asyncio.ensure_future(self.proc.wait())  # asyncio's wait() also waits for EOF on our pipes
        flooded = asyncio.ensure_future(self.flooded.wait())
        try:
            done, _ = await asyncio.wait({exited, flooded}, timeout=max(0.0, deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
            stopped = None if exited in done else "output_limit" if flooded in done else "timeout"
        finally:  # also when our caller is cancelled: kill the tree before the cancellation goes on
            flooded.cancel()
            if not exited.done():
                self._kill()
                if not (await asyncio.wait({exited}, timeout=_GRACE_S))[0]:
                    self.proc.kill()  # only isolation="none" gets here: an escaped daemon holds our pipes
                    await asyncio.wait({exited}, timeout=_GRACE_S)
            _, pending = await asyncio.wait(self.io, timeout=_GRACE_S)
            for task in [*pending, exited]:
                task.cancel()
        return stopped

    def result(self, stopped: Stopped | None, wall_s: float) -> ExecResult:
        self._read_status()
        lines = self.status.decode(errors="replace").splitlines()
        if not any(line.startswith("pid ") for line in lines) and stopped != "timeout":  # pid 1 never got going
            said = next((line[6:] for line in lines if line.startswith("error ")), None)
            said = said or next(iter(self.err.decode(errors="replace").strip().splitlines()), f"exit status {self.proc.returncode}")
            raise SandboxUnavailable(f"code sandbox unavailable: {said}; {_FIX}")
        code = next((int(line[5:]) for line in lines if line.startswith("exit ")), None)
        memory = code == 1 and self.err.rstrip().rsplit(b"\n", 1)[-1].startswith(b"MemoryError")  # its traceback's last line
        if stopped is None:
            stopped = "timeout" if "timeout" in lines else "memory" if memory else "cpu" if code == -signal.SIGXCPU else None
        if stopped in ("timeout", "output_limit"):
            code = None
        err = bytes(self.err)
        if self.killed:  # unshare says it could not re-raise its child's SIGKILL; it writes last, so cut it
            err = re.sub(rb"unshare: [^\n]*\n?\Z", b"", err)
        out, err = (bytes(b).decode("utf-8", errors="replace") for b in (self.out, err))
        return ExecResult(out, err, code, stopped in ("timeout", "cpu"), stopped, wall_s)

    async def _capture(self, stream: asyncio.StreamReader, into: bytearray) -> None:
        while chunk := await stream.read(1 << 16):  # to EOF, which proc.wait() waits for
            room = self.cap - len(into)
            into += chunk[:room]
            if len(chunk) > room:
                self.flooded.set()  # the rest is read and dropped until the sandbox is killed

    def _read_status(self) -> None:
        try:
            while chunk := os.read(self.status_fd, 4096):
                self.status += chunk
        except BlockingIOError:  # nothing more yet
            pass

    async def _feed(self, source: bytes) -> None:
        try:
            self.proc.stdin.write(source)
            await self.proc.stdin.drain()
            self.proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _kill(self) -> None:
        """SIGKILL pid 1 (the namespace dies with it, then `unshare` reaps it), or the process group."""
        if self.mode == "none":
            os.killpg(self.proc.pid, signal.SIGKILL)  # not reaped yet, so the group id is still ours
            return
        self._read_status()
        match = re.search(rb"^pid (\d+)$", bytes(self.status), re.M)  # written before the code starts
        pidfd = _pidfd_of_child(int(match[1]), self.proc.pid) if match else None
        if pidfd is None:  # no code started yet, or no pidfds (Linux < 5.3): --kill-child passes it on
            self.proc.kill()
            return
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        os.close(pidfd)
        self.killed = True


def _pidfd_of_child(pid: int, parent: int) -> int | None:
    """A pidfd of `pid` if it is `parent`'s child (checked after opening it: the pidfd pins the process)."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            if f"\nPPid:\t{parent}\n" in f.read():
                return fd
    except OSError:
        pass
    os.close(fd)
    return None


@functools.cache
def _mounts(packages: tuple[str, ...]) -> tuple[list[list[str]], list[list[str]], list[str]]:
    """(binds [host path, sandbox path], symlinks [path, target], extra sys.path) for these packages."""
    binds = [[p, p] for p in _SYSTEM if os.path.exists(p) and not os.path.islink(p)]
    links = [[p, os.readlink(p)] for p in _SYSTEM if os.path.islink(p)]
    for path in (sys.base_prefix, sys.base_exec_prefix, os.path.dirname(os.path.realpath(sys.executable))):
        path = os.path.realpath(path)
        if not any(path == d or path.startswith(d + "/") for d, _ in binds):
            binds.append([path, path])
    sys_path: list[str] = []
    for name in packages:
        if os.sep in name:
            path = os.path.realpath(name)
            if not os.path.isdir(path):
                raise ValueError(f"package directory {name!r} does not exist")
            binds.append([path, path])
            sys_path.append(path)
        else:
            binds += [[p, f"{_SITE}/{os.path.basename(p)}"] for p in _package_files(name)]
            sys_path += [_SITE] if _SITE not in sys_path else []
    return binds, links, sys_path


def _package_files(name: str) -> list[str]:
    """The files of an importable top-level package: itself, its `.libs` and its `.dist-info`."""
    spec = importlib.util.find_spec(name) if "." not in name else None
    places = list(spec.submodule_search_locations or ([spec.origin] if spec.has_location else [])) if spec else []
    if len(places) != 1:
        raise ValueError(f"package {name!r} is not importable here from one place; pass its directory instead")
    main = places[0]
    norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()  # noqa: E731
    extra = [f for f in os.listdir(os.path.dirname(main))
             if f == f"{name}.libs" or (f.endswith(".dist-info") and norm(f).startswith(norm(name) + "_"))]
    return [main, *(os.path.join(os.path.dirname(main), f) for f in extra)]


@functools.cache
def _warn_unisolated() -> None:
    _log.warning("tools.code: isolation='none': model code runs as a plain subprocess with rlimits only; "
                 "it can read your files, use the network and leave processes behind")


# The program run inside, as `python -I -S -c _BOOT <config>`: pid 1 of the new namespaces. It
# builds the file tree, forks the code's process and supervises it. What it tells the caller, one
# line each on the status pipe: "pid <its host pid>", "error <why>" (set-up failed), "exit <status>"
# (of the code's main process), "timeout" (its own deadline).
_BOOT = r'''
import _signal as signal, ctypes, os, resource, select, sys, time  # (signal would import enum: 5 ms)
cfg = eval(sys.argv[1], {"__builtins__": {}})  # a literal from run_python_async (json costs 7 ms to import)
STATUS, libc = cfg["status_fd"], ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
ATIME = {1024: 1024, 2048: 2048, 4096: 1 << 21}  # statvfs ST_NOATIME, ST_NODIRATIME, ST_RELATIME -> MS_ flags


def report(line):
    os.write(STATUS, (line + "\n").encode())  # EPIPE only when the caller is gone: then we die, as we should


def call(ret, what):
    if ret != 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")


def mount(src, dst, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    call(libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)), f"mount {dst}")


def build_root(new):
    """A tmpfs root of read-only binds, a private /tmp and our own /proc; then pivot into it."""
    sources = [os.open(src, os.O_PATH | os.O_CLOEXEC) for src, _ in cfg["binds"]]  # before any mount hides them
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("sandbox", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    for d in ("proc", "tmp", "dev", "etc", ".old"):
        os.mkdir(f"{new}/{d}")
    for path, target in cfg["links"]:
        os.makedirs(os.path.dirname(new + path), exist_ok=True)
        os.symlink(target, new + path)
    for fd, (_, dst) in zip(sources, cfg["binds"]):
        is_dir = os.path.isdir(f"/proc/self/fd/{fd}")
        os.makedirs(new + dst if is_dir else os.path.dirname(new + dst), exist_ok=True)
        if not is_dir:
            open(new + dst, "w").close()
        mount(f"/proc/self/fd/{fd}", new + dst, None, MS_BIND | MS_REC)
        os.close(fd)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2"), ("shm", "/tmp")):
        os.symlink(target, f"{new}/dev/{name}")
    owner = f",uid={cfg['uid']},gid={cfg['uid']}" if "uid" in cfg else ""
    mount("sandbox", f"{new}/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['disk_mb']}m,nr_inodes=8192,mode=700{owner}")
    with open("/proc/self/mountinfo") as f:  # every bind, and every mount under it: read-only, keeping locked flags
        rows = [line.split() for line in f]
    # Only mounts in our own tree: those the host already had under `new` are hidden by our tmpfs but
    # still listed (and cannot be reached to remount). Our tmpfs is the last mount listed at `new`.
    ours = {[r[0] for r in rows if r[4] == new][-1]}
    for r in rows:
        if r[1] in ours:
            ours.add(r[0])
    points = [r[4].encode().decode("unicode_escape") for r in rows if r[0] in ours]
    for point in (p for p in points if p.startswith(new + "/") and p != f"{new}/tmp"):
        flags = os.statvfs(point).f_flag
        keep = (flags & (MS_NOSUID | MS_NODEV | MS_NOEXEC)) | sum(ms for st, ms in ATIME.items() if flags & st)
        mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | keep)
    try:
        mount("proc", f"{new}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError:
        pass  # refused (a container's masked /proc): /proc stays empty, which hides even more
    os.chdir(new)
    call(libc.pivot_root(b".", b".old"), "pivot_root")
    call(libc.umount2(b"/.old", 2), "umount the old root")  # MNT_DETACH
    os.rmdir("/.old")
    mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    libc.sethostname(b"sandbox", 7)


def drop_privileges():
    if cfg["mode"] == "root":  # a uid of our own: RLIMIT_NPROC applies, counted per sandbox
        os.setgroups([])
        os.setresgid(cfg["uid"], cfg["uid"], cfg["uid"])
        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])  # clears every capability
        libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: the code may read its own /proc entries
    elif cfg["mode"] == "user":  # root of our user namespace: drop its capabilities
        call(libc.capset((ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()), "capset")
    call(libc.prctl(38, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")


def run_code():
    """The code's process: privileges, limits, then `python main.py`; never returns."""
    import builtins, site, types
    os.close(STATUS)  # the code must not write our status lines
    signal.signal(signal.SIGINT, signal.default_int_handler)
    drop_privileges()
    for name, (soft, hard) in cfg["limits"].items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    os.chdir(cfg["workdir"])
    source, path = sys.stdin.buffer.read(), os.path.join(cfg["workdir"], "main.py")
    with open(path, "wb") as f:
        f.write(source)
    site.setquit()
    sys.argv, sys.dont_write_bytecode, sys.path = [path], True, [cfg["workdir"], *sys.path, *cfg["sys_path"]]
    main = sys.modules["__main__"] = types.ModuleType("__main__")
    main.__file__, main.__builtins__ = path, builtins
    try:
        exec(compile(source, path, "exec"), vars(main))
        status = 0
    except SystemExit as e:  # sys.exit(), sys.exit(3), sys.exit("message")
        status = e.code & 0xFF if isinstance(e.code, int) else 0 if e.code is None else 1
        if status == 1 and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except BaseException as e:  # printed as `python main.py` would, without this frame
        import traceback  # only now: it costs 9 ms to import
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        status = 1
    os._exit(finish(status))


def finish(status):
    """Interpreter exit as the code sees it (threads joined, atexit run, output flushed), without the
    rest of the teardown: in a forked process that costs ~6 ms, and the sandbox goes anyway."""
    if "threading" in sys.modules:
        sys.modules["threading"]._shutdown()
    __import__("atexit")._run_exitfuncs()  # (it reports and swallows the handlers' exceptions)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            status = status or 120  # as Python does when it cannot flush
    return status


def supervise(child):
    """Wait for the code's main process, reaping orphans; stop at the deadline or when the caller is gone."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    poller = select.poll()
    poller.register(wake_r, select.POLLIN)
    poller.register(STATUS, 0)  # POLLERR once the caller's read end is closed
    deadline = time.monotonic() + cfg["deadline_s"]
    while True:
        while (info := os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)) is not None:
            if info.si_pid == child:
                return "exit %d" % os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
            os.waitpid(info.si_pid, 0)  # an orphan of the code: it stops counting as a process
        if time.monotonic() >= deadline:
            return "timeout"
        for fd, _ in poller.poll((deadline - time.monotonic()) * 1000):
            if fd == STATUS:
                return None
            os.read(wake_r, 512)


def main():
    try:
        pid = os.getpid()
        if cfg["mode"] != "none":
            pid = int(os.readlink("/proc/self"))  # our host pid: the host's /proc is still mounted
            if cfg["mode"] == "root":
                cfg["uid"] = (1 << 30) + pid
            build_root("/tmp")
        libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: the code cannot ptrace its supervisor
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        report(f"pid {pid}")
        child = os.fork()
    except Exception as e:
        report(f"error {type(e).__name__}: {e}")
        os._exit(125)
    if child == 0:
        try:
            run_code()  # never returns
        except BaseException:  # our own set-up failed in the code's process
            __import__("traceback").print_exc()
        os._exit(125)
    outcome = supervise(child)
    if outcome:
        report(outcome)
    if cfg["mode"] == "none":
        os.killpg(0, signal.SIGKILL)  # without a pid namespace, our process group is all we can reach
    os._exit(0)  # pid 1: the kernel kills every process of the namespace


main()
'''
