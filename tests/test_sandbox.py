"""The code sandbox (policyflow.tools.code), attacked for real.

Each attack of `attacks()` runs in the real sandbox (unshare, no mocks) twice: as the user
running pytest (root on CI and these machines: `test_attack`) and as an unprivileged user (uid
65534: `test_attacks_as_unprivileged_user`, one subprocess running them all). CHECKS holds the
assertions both share. Leftover processes are found by scanning the host's /proc for a marker
that the attack puts in the argv of everything it starts (`_marked`). Times are only hang guards.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import logging
import os
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from policyflow.tools import code as sandbox
from policyflow.tools.code import SandboxUnavailable, run_python, run_python_async

MODULE = Path(sandbox.__file__)
PYTHON = os.path.realpath(sys.executable)
HANG_GUARD_S = 5.0  # a run must return within its timeout plus this
SANDBOX_ROOT = {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "opt", "proc", "sbin", "tmp", "usr"}


def _marked(body: str, mark: str) -> str:
    """Code that re-executes itself with `mark` in its argv, so every process it forks carries it."""
    return f"import os, sys\nos.execv(sys.executable, [sys.executable, '-S', '-c', {body!r}, {mark!r}])\n"


def _survivors(mark: str) -> list[int]:
    """Host pids (other than ours) whose command line contains `mark`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if mark.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


def _wait_until(predicate: Callable[[], bool], timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# --- the attacks: name -> (source, run_python keyword arguments) ---------------------------------
NETWORK = """
import json, socket
tried = {}
for host, port in [("127.0.0.1", PORT), ("::1", PORT), ("8.8.8.8", 53), ("1.1.1.1", 443)]:
    try:
        socket.create_connection((host, port), timeout=1).close()
        tried[host] = "connected"
    except OSError as e:
        tried[host] = e.errno
try:
    socket.getaddrinfo("example.com", 80)
    tried["dns"] = "resolved"
except OSError as e:
    tried["dns"] = "failed"
print(json.dumps({"tried": tried, "interfaces": [name for _, name in socket.if_nameindex()]}))
"""
FILES = """
import json, os
reads, writes = {}, {}
for path in SECRETS:
    try:
        open(path, "rb").read()
        reads[path] = "read"
    except OSError as e:
        reads[path] = e.errno
for path in ["/pf_x", "/usr/pf_x", "/etc/pf_x", "/dev/pf_x", PREFIX + "/pf_x"]:
    try:
        open(path, "w").write("x")
        writes[path] = "wrote"
    except OSError as e:
        writes[path] = e.errno
with open("/dev/null", "w") as f:
    f.write("fine")
lists = {d: sorted(os.listdir(d)) for d in ["/", "/etc", "/tmp", "/root"] if os.path.isdir(d)}
print(json.dumps({"reads": reads, "writes": writes, "lists": lists, "cwd": os.getcwd()}))
"""
PROCESSES = """
import json, os
try:
    os.kill(HOST_PID, 0)
    host = "visible"
except OSError as e:
    host = e.errno
print(json.dumps({"pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()), "host": host,
                  "init": open("/proc/1/cmdline", "rb").read().decode(errors="replace")}))
"""
FORK_COUNT = """
import os, time
n = 0
try:
    while True:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        n += 1
except OSError as e:
    print("forks", n, e.errno)
"""
DAEMON = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:  # a proper daemon: its own session, stdio on /dev/null, SIGTERM ignored
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        body = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); open('/tmp/ready', 'w').close(); time.sleep(60)"
        os.execv(sys.executable, [sys.executable, "-S", "-c", body, sys.argv[-1]])
    os._exit(0)
os.wait()
while not os.path.exists("/tmp/ready"):
    time.sleep(0.01)
print("daemon ready")
"""
DISK = """
import os
written = 0
try:
    with open("/tmp/flood-MARK", "wb") as f:
        while True:
            f.write(b"x" * (1 << 20))
            f.flush()
            written += 1
except OSError as e:
    print("disk", written, e.errno)
try:
    for i in range(100_000):
        open(f"/tmp/i{i}", "w").close()
except OSError as e:
    print("inodes", i, e.errno)
"""


def attacks(mark: str, port: int, secret_file: str, host_pid: int) -> dict[str, tuple[str, dict]]:
    prefix = os.path.realpath(sys.base_prefix)
    secrets = [str(Path(__file__).resolve().parents[1] / "README.md"), secret_file, "/etc/shadow", "/etc/passwd",
               "/root/.bashrc", os.path.expanduser("~/.bash_history"), "/proc/1/environ"]
    return {
        "network": (NETWORK.replace("PORT", str(port)), {}),
        "files": (FILES.replace("SECRETS", repr(secrets)).replace("PREFIX", repr(prefix)), {}),
        "environment": ("import json, os; print(json.dumps(dict(os.environ)))", {}),
        "processes": (PROCESSES.replace("HOST_PID", str(host_pid)), {}),
        "fork_bomb": (_marked("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", mark),
                      {"timeout_s": 2.0, "max_processes": 16}),
        "fork_count": (_marked(FORK_COUNT, mark), {"max_processes": 16}),
        "memory_bomb": ("x = bytearray(2 << 30)\nprint('allocated')", {"memory_mb": 256}),
        "daemon": (_marked(DAEMON, mark), {}),
        "stdout_flood": ("import sys\nchunk = 'x' * 65536\nfor _ in range(16384):\n    sys.stdout.write(chunk)", {"timeout_s": 30.0}),
        "stderr_flood": ("import sys\nchunk = 'x' * 65536\nfor _ in range(16384):\n    sys.stderr.write(chunk)", {"timeout_s": 30.0}),
        "disk_flood": (DISK.replace("MARK", mark), {"disk_mb": 16}),
        "cpu_timeout": ("while True:\n    pass", {"timeout_s": 1.0}),
        "cpu_limit": ("while True:\n    pass", {"timeout_s": 60.0, "cpu_s": 1.0}),  # a wall limit far off: CPU time stops it
    }


def _check_network(r: dict, ctx: dict) -> None:
    seen = json.loads(r["stdout"])
    assert "connected" not in seen["tried"].values() and seen["tried"]["dns"] == "failed", seen
    assert seen["interfaces"] == ["lo"], seen
    with pytest.raises(BlockingIOError):
        ctx["listener"].accept()  # nothing ever reached the host's listener


def _check_files(r: dict, ctx: dict) -> None:
    seen = json.loads(r["stdout"])
    assert set(seen["reads"].values()) <= {errno.ENOENT, errno.EACCES}, seen["reads"]
    assert set(seen["writes"].values()) <= {errno.EROFS, errno.EACCES}, seen["writes"]
    assert not any(os.path.exists(p) for p in seen["writes"])
    prefix = Path(os.path.realpath(sys.base_prefix)).parts  # the sandbox holds the path to it, nothing beside
    assert set(seen["lists"]["/"]) <= {*SANDBOX_ROOT, prefix[1]}, seen["lists"]
    if prefix[1] == "root":
        assert seen["lists"]["/root"] == [prefix[2]], seen["lists"]
    assert seen["lists"]["/etc"] == ["ld.so.cache", "localtime"] and seen["lists"]["/tmp"] == ["main.py"]
    assert seen["cwd"] == "/tmp"


def _check_environment(r: dict, ctx: dict) -> None:
    env = json.loads(r["stdout"])
    assert "POLICYFLOW_TEST_SECRET" not in env and ctx["secret"] not in r["stdout"]
    assert set(env) <= set(sandbox._ENV), env


def _check_processes(r: dict, ctx: dict) -> None:
    seen = json.loads(r["stdout"])
    assert seen["pids"] == [1, 2], seen  # our supervisor and the code: nothing of the host
    assert seen["host"] == errno.ESRCH and "pytest" not in seen["init"], seen


def _check_fork_bomb(r: dict, ctx: dict) -> None:
    assert r["timed_out"] and r["stopped"] == "timeout" and r["exit_code"] is None, r
    assert r["survivors"] == []


def _check_fork_count(r: dict, ctx: dict) -> None:
    word, forks, err = r["stdout"].split()
    assert word == "forks" and int(err) == errno.EAGAIN, r
    assert int(forks) < 16, r  # RLIMIT_NPROC holds, for root too (the code runs under its own uid)
    assert r["exit_code"] == 0 and r["survivors"] == [], r


def _check_memory_bomb(r: dict, ctx: dict) -> None:
    assert r["stopped"] == "memory" and r["exit_code"] == 1 and "MemoryError" in r["stderr"], r
    assert "allocated" not in r["stdout"]


def _check_daemon(r: dict, ctx: dict) -> None:
    assert r["exit_code"] == 0 and r["stdout"] == "daemon ready\n", r
    assert r["survivors"] == []  # the setsid'd, SIGTERM-ignoring grandchild died when the code exited


def _check_flood(stream: str) -> Callable[[dict, dict], None]:
    def check(r: dict, ctx: dict) -> None:
        assert r["stopped"] == "output_limit" and not r["timed_out"] and r["exit_code"] is None, {**r, stream: "..."}
        assert r[stream] == "x" * 65536
        assert r["rss_growth_kb"] < 64 * 1024  # the caller never held the gigabyte
    return check


def _check_disk_flood(r: dict, ctx: dict) -> None:
    (word, written, err), (word2, files, err2) = (line.split() for line in r["stdout"].splitlines())
    assert (word, int(err), word2, int(err2)) == ("disk", errno.ENOSPC, "inodes", errno.ENOSPC), r
    assert int(written) <= 16 and int(files) <= 8192, r
    assert not os.path.exists(f"/tmp/flood-{ctx['mark']}")


def _check_cpu_timeout(r: dict, ctx: dict) -> None:
    assert r["timed_out"] and r["stopped"] in ("timeout", "cpu") and r["stderr"] == "", r


def _check_cpu_limit(r: dict, ctx: dict) -> None:
    assert r["timed_out"] and r["stopped"] == "cpu" and r["exit_code"] == -signal.SIGXCPU, r


CHECKS: dict[str, Callable[[dict, dict], None]] = {
    "network": _check_network, "files": _check_files, "environment": _check_environment,
    "processes": _check_processes, "fork_bomb": _check_fork_bomb, "fork_count": _check_fork_count,
    "memory_bomb": _check_memory_bomb, "daemon": _check_daemon, "stdout_flood": _check_flood("stdout"),
    "stderr_flood": _check_flood("stderr"), "disk_flood": _check_disk_flood, "cpu_timeout": _check_cpu_timeout,
    "cpu_limit": _check_cpu_limit,
}


@pytest.fixture
def ctx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A host listener on 127.0.0.1, a secret env var and a secret file the sandbox must not reach."""
    secret = f"secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("POLICYFLOW_TEST_SECRET", secret)
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text(secret)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    mark = f"pfsandbox-{uuid.uuid4().hex[:12]}"
    yield {"secret": secret, "secret_file": str(secret_file), "listener": listener, "mark": mark,
           "attacks": attacks(mark, listener.getsockname()[1], str(secret_file), os.getpid())}
    listener.close()


def _run_attack(source: str, kwargs: dict, mark: str) -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = run_python(source, **kwargs)
    survivors = _survivors(mark)  # at once: nothing may outlive the call, not even for a moment
    assert r.wall_s < kwargs.get("timeout_s", 5.0) + HANG_GUARD_S
    return {**r.__dict__, "survivors": survivors, "rss_growth_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss}


@pytest.mark.parametrize("name", list(CHECKS))
def test_attack(name: str, ctx: dict) -> None:
    source, kwargs = ctx["attacks"][name]
    CHECKS[name](_run_attack(source, kwargs, ctx["mark"]), ctx)


# --- killing the caller ----------------------------------------------------------------------------
CALLER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("sandbox_code", sys.argv[1])
module = sys.modules["sandbox_code"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.run_python(sys.stdin.read(), timeout_s=120)
"""
ORPHANS = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    os.execv(sys.executable, [sys.executable, "-S", "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)", sys.argv[-1]])
time.sleep(120)
"""


def kill_caller(module: str, mark: str) -> dict:
    """Start a caller running a sandbox that sleeps with a daemon, SIGKILL the caller, list what is left."""
    caller = subprocess.Popen([PYTHON, "-c", CALLER, module], stdin=subprocess.PIPE, text=True)
    caller.stdin.write(_marked(ORPHANS, mark))
    caller.stdin.close()
    started = _wait_until(lambda: len(_survivors(mark)) >= 2, 20.0)
    with open(f"/proc/{caller.pid}/task/{caller.pid}/children") as f:
        ours = [int(pid) for pid in f.read().split()]  # unshare (its command line has no mark)
    caller.kill()
    caller.wait()
    gone = _wait_until(lambda: not _survivors(mark) and not any(map(_alive, ours)), 5.0)
    return {"started": started, "gone": gone, "survivors": _survivors(mark), "unshare_alive": any(map(_alive, ours))}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_nothing_survives_a_killed_caller() -> None:
    mark = f"pfsandbox-{uuid.uuid4().hex[:12]}"
    seen = kill_caller(str(MODULE), mark)
    assert seen == {"started": True, "gone": True, "survivors": [], "unshare_alive": False}


# --- the same attacks as an unprivileged user ---------------------------------------------------
HARNESS = """
import json, os, resource, subprocess, sys
os.setgroups([])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)
here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
import sandbox_code, test_sandbox_shared as shared
job = json.load(open(os.path.join(here, "job.json")))
probe = [sandbox_code.UNSHARE, "--user", "--map-root-user", "--mount", "--pid", "--net", "--fork", "--mount-proc", "true"]
probe = subprocess.run(probe, capture_output=True, text=True)
if probe.returncode != 0:  # this kernel (or AppArmor) keeps namespaces and mounts from unprivileged users
    print(json.dumps({"no_userns": probe.stderr.strip()}))
    sys.exit(0)
out = {"uid": os.getuid()}
for name, (source, kwargs) in job["attacks"].items():
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = sandbox_code.run_python(source, **kwargs)
    out[name] = {**r.__dict__, "survivors": shared._survivors(job["mark"]),
                 "rss_growth_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss}
out["kill_caller"] = shared.kill_caller(os.path.join(here, "sandbox_code.py"), job["mark"] + "k")
print(json.dumps(out))
"""


def _reachable_by_others(path: str) -> str | None:
    """The first directory on `path` that other users cannot enter, or None."""
    parts = Path(path).parts
    for i in range(2, len(parts) + 1):
        d = os.path.join(*parts[:i])
        if not os.stat(d).st_mode & 0o001:
            return d
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become uid 65534 (run as an unprivileged user, test_attack already is that case)")
def test_attacks_as_unprivileged_user(ctx: dict) -> None:
    work = Path(tempfile.mkdtemp(prefix="pfsandbox-nobody-"))
    try:
        work.chmod(0o755)
        shutil.copy(MODULE, work / "sandbox_code.py")
        (work / "test_sandbox_shared.py").write_text(_shared_helpers())
        secret_file = work / "secret.txt"  # readable by the unprivileged caller, not by its sandbox
        secret_file.write_text(ctx["secret"])
        job = {"mark": ctx["mark"], "attacks": attacks(ctx["mark"], ctx["listener"].getsockname()[1], str(secret_file), os.getpid())}
        (work / "job.json").write_text(json.dumps(job))
        (work / "harness.py").write_text(HARNESS)
        for f in work.iterdir():
            f.chmod(0o644)
        command = [PYTHON, str(work / "harness.py")]
        hidden = _reachable_by_others(os.path.realpath(sys.base_prefix))
        if hidden:  # Python lives where uid 65534 cannot enter (/root/.pyenv): show it the prefix alone
            prefix, keep, hidden = (shlex.quote(p) for p in (os.path.realpath(sys.base_prefix), f"{work}/prefix", hidden))
            script = (f"mkdir -p {keep} && mount --bind {prefix} {keep} && mount -t tmpfs -o mode=755 tmpfs {hidden}"
                      f" && mkdir -p {prefix} && mount --move {keep} {prefix} && exec {shlex.join(command)}")
            command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
        done = subprocess.run(command, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        seen = json.loads(done.stdout)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if "no_userns" in seen:
        pytest.skip(f"unprivileged users cannot make namespaces and mount here: {seen['no_userns']}")
    assert seen.pop("uid") == 65534
    assert seen.pop("kill_caller") == {"started": True, "gone": True, "survivors": [], "unshare_alive": False}
    assert set(seen) == set(CHECKS)
    for name, result in seen.items():
        CHECKS[name](result, ctx)


def _shared_helpers() -> str:
    """The helpers the harness imports, without pytest or policyflow."""
    import inspect

    parts = ["from __future__ import annotations\nimport os, subprocess, sys, time\nfrom collections.abc import Callable",
             f"PYTHON = {PYTHON!r}", f"CALLER = {CALLER!r}", f"ORPHANS = {ORPHANS!r}"]
    parts += [inspect.getsource(f) for f in (_marked, _survivors, _wait_until, kill_caller, _alive)]
    return "\n\n".join(textwrap.dedent(p) for p in parts)


# --- behaviour ---------------------------------------------------------------------------------
def test_runs_like_python_main() -> None:
    r = run_python("print('hi')")
    assert (r.stdout, r.stderr, r.exit_code, r.timed_out, r.stopped, r.ok) == ("hi\n", "", 0, False, None, True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.stdout = "changed"  # type: ignore[misc]
    r = run_python("import sys\nprint(input.__name__, file=sys.stderr)\nprint(sys.argv, __name__, __file__)\nsys.exit(3)")
    assert (r.stdout, r.stderr, r.exit_code, r.stopped, r.timed_out) == ("['/tmp/main.py'] __main__ /tmp/main.py\n", "input\n", 3, None, False)
    r = run_python("def f():\n    return 1 / 0\nf()")
    assert r.exit_code == 1 and not r.ok and r.stderr.splitlines()[-1] == "ZeroDivisionError: division by zero"
    assert r.stderr.startswith("Traceback (most recent call last):\n  File \"/tmp/main.py\", line 3, in <module>")
    r = run_python("try:\n    input()\nexcept EOFError:\n    print('eof')\nexit(4)")
    assert (r.stdout, r.exit_code) == ("eof\n", 4)
    r = run_python("import atexit, threading, time\natexit.register(print, 'atexit')\n"
                   "threading.Thread(target=lambda: (time.sleep(0.2), print('thread'))).start()\nprint('main')")
    assert (r.stdout, r.exit_code) == ("main\nthread\natexit\n", 0)  # ends as the interpreter would
    r = run_python("import sys; sys.stdout.write('unflushed'); sys.exit('bye')")
    assert (r.stdout, r.stderr, r.exit_code) == ("unflushed", "bye\n", 1)
    r = run_python("import os; os.kill(os.getpid(), 9)")
    assert r.exit_code == -9 and r.stopped is None
    assert run_python("def broken(:\n    pass").stderr.splitlines()[-1].startswith("SyntaxError")


def test_packages_are_importable_read_only() -> None:
    r = run_python("import numpy, sympy\nprint(int(numpy.arange(5).sum()), sympy.sqrt(8))\n"
                   "try:\n    open(numpy.__file__, 'a')\nexcept OSError as e:\n    print(e.errno)", packages=("numpy", "sympy", "mpmath"))
    value, err = r.stdout.splitlines()
    assert value == "10 2*sqrt(2)" and int(err) in (errno.EROFS, errno.EACCES), r
    assert "No module named 'numpy'" in run_python("import numpy").stderr
    for bad in ("no_such_package_xyz", "sys", "numpy.linalg"):
        with pytest.raises(ValueError, match="is not importable here"):
            run_python("pass", packages=(bad,))


def test_async_runs_concurrently_and_cancel_kills() -> None:
    fds = len(os.listdir("/proc/self/fd"))

    async def main() -> None:
        results = await asyncio.gather(*(run_python_async(f"print({i} * {i})") for i in range(4)))
        assert [r.stdout for r in results] == ["0\n", "1\n", "4\n", "9\n"]
        mark = f"pfsandbox-{uuid.uuid4().hex[:12]}"
        task = asyncio.create_task(run_python_async(_marked("import time; time.sleep(60)", mark), timeout_s=60))
        for _ in range(200):
            await asyncio.sleep(0.05)
            if _survivors(mark):
                break
        assert _survivors(mark)
        task.cancel()  # Env.close: the sandbox dies before the cancellation reaches us
        with pytest.raises(asyncio.CancelledError):
            await task
        assert _survivors(mark) == []
        r = run_python("print('from a loop')")  # the synchronous call also works inside a running loop
        assert r.stdout == "from a loop\n"

    asyncio.run(main())
    assert len(os.listdir("/proc/self/fd")) == fds  # no pipe left open, cancelled run included


def test_unavailable_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "unshare"
    fake.write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n")
    fake.chmod(0o755)
    for path, said in [(str(fake), "unshare failed: Operation not permitted"), ("/bin/false", "exit status 1"),
                       (str(tmp_path / "missing"), "missing: No such file or directory")]:
        monkeypatch.setattr(sandbox, "UNSHARE", path)
        with pytest.raises(SandboxUnavailable) as info:
            run_python("print(1)")
        message = str(info.value)
        assert "\n" not in message and said in message, message
        assert "user namespaces" in message and "seccomp=unconfined" in message and "isolation='none'" in message
    monkeypatch.undo()  # unshare works, but building the tree fails inside (as under AppArmor's userns restriction)
    binds, links, sys_path = sandbox._mounts(())
    monkeypatch.setattr(sandbox, "_mounts", lambda packages: ([*binds, ["/no/such/dir", "/x"]], links, sys_path))
    with pytest.raises(SandboxUnavailable, match=r"^code sandbox unavailable: FileNotFoundError: .*/no/such/dir.*isolation='none'"):
        run_python("print(1)")


def test_isolation_none_runs_with_limits_and_warns_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(sandbox, "UNSHARE", "/bin/false")  # not used by isolation="none"
    sandbox._warn_unisolated.cache_clear()
    with caplog.at_level(logging.WARNING, logger="policyflow"):
        first = run_python("import os; print(os.getcwd().startswith('/tmp/policyflow-code-'))", isolation="none")
        second = run_python("x = bytearray(2 << 30)", isolation="none", memory_mb=256)
        third = run_python("while True:\n    pass", isolation="none", timeout_s=1.0)
    assert first.stdout == "True\n" and second.stopped == "memory" and third.timed_out
    assert sum("isolation='none'" in rec.getMessage() for rec in caplog.records) == 1


def test_works_with_host_mounts_under_tmp() -> None:
    """Mounts the host already has under /tmp are hidden by the sandbox's root but still listed in
    mountinfo: they must not stop the sandbox from being built (they used to: SandboxUnavailable)."""
    probe = subprocess.run([sandbox.UNSHARE, "--mount", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare --mount is not permitted here: {probe.stderr.decode().strip()}")
    host = tempfile.mkdtemp(dir="/tmp", prefix="policyflow-mnt-")
    try:
        script = (f"mount -t tmpfs hostmnt {shlex.quote(host)} && mkdir {shlex.quote(host)}/inner && "
                  f"mount -t tmpfs hostmnt2 {shlex.quote(host)}/inner && exec \"$0\" -c \"$1\"")
        check = ("from policyflow.tools.code import run_python\n"
                 "r = run_python('import os; print(sorted(os.listdir(\"/tmp\")))')\n"
                 "print(repr(r.stdout), r.exit_code)")
        done = subprocess.run([sandbox.UNSHARE, "--mount", "--propagation", "private", "sh", "-c", script,
                               sys.executable, check], capture_output=True, text=True, timeout=60,
                              cwd=Path(__file__).resolve().parent.parent)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "\"['main.py']\\n\" 0"
    finally:
        os.rmdir(host)
