"""The code tool: the model writes Python, the sandbox runs it, what it printed is the observation.

Tag format (tiny models): `<code>print(1234*567)</code>` is a call of the tool named `code`;
Hermes (chat models): `<tool_call>{"name": "python", "arguments": {"code": "print(1)"}}</tool_call>`.
Either way the source runs in a fresh sandbox (`tools.code.run_python_async`: no network, none
of the caller's files, environment or processes, time and memory limits), never in this
process, and the event loop never waits on it (the pool runs it in a thread of its own, and the
sandbox is a subprocess awaited asynchronously).

Observation text (`format_result`), compact for a model's context (the episode runner then cuts
it to `agent.max_obs_tokens` tokens and wraps it):

- a run that exits 0: its stdout (trailing newline dropped), then its stderr if any (warnings);
  `(no output)` when it printed nothing;
- a run that fails: the tool raises `CodeError`, which the pool turns into an error observation
  (`error: code failed: CodeError: ...`) counted in `agent/tool_errors`: the exception line
  (the last line of the traceback) or `exit code N`, or `timed out after T s` / `stopped:
  memory` / `stopped: output_limit`, then the tail of what it printed;
- a machine that cannot build the sandbox (`SandboxUnavailable`): the same error observation,
  saying so; tasks probe the sandbox once when they set their tools up (`check_sandbox`), so a
  run on such a machine stops at start with one line saying how to fix it, not per call.

Stateful mode (`Notebook`, `task.code.stateful=true`): one interpreter per episode *as seen by
the model*. It is cheap rather than exact: each call replays the episode's earlier successful
cells (their output discarded) before the new one in one fresh sandbox, so variables, functions
and imports survive between calls; side effects of earlier cells (random draws, time, files in
/tmp) happen again, and each call's time limit covers the replay.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from policyflow.tools.base import Tool
from policyflow.tools.code import ExecResult, Isolation, SandboxUnavailable, run_python, run_python_async

# The tool's name in each tool-call format: `<code>…</code>` in tags, `python` for chat models.
CODE_TOOL_NAMES = {"tags": "code", "hermes": "python"}
CODE_SCHEMA = {
    "type": "object",
    "properties": {"code": {"type": "string", "description": "Python source to run; what it prints (stdout) is returned."}},
    "required": ["code"],
    "additionalProperties": False,
}
_MAX_TEXT_CHARS = 4000  # observation text kept before the runner's token cut (the tail of a long traceback)


class CodeError(Exception):
    """A code run that failed (raised, exited non-zero, timed out): an error observation."""


@dataclass(frozen=True)
class CodeSettings:
    """How the code tool runs its sandboxes (`task.code.*`)."""

    timeout_s: float = 5.0  # wall clock of one run, sandbox start included
    memory_mb: int = 512  # address space per process
    packages: tuple[str, ...] = ()  # importable names mounted read-only (e.g. ("numpy",))
    isolation: Isolation = "namespaces"  # "none": a plain subprocess (warned once per process)

    def run_kwargs(self) -> dict:
        return dict(timeout_s=self.timeout_s, memory_mb=self.memory_mb, packages=self.packages, isolation=self.isolation)


def check_sandbox(settings: CodeSettings) -> None:
    """Run `pass` once in the sandbox: raises `SandboxUnavailable` (one line with the fix) where
    the machine cannot build it, so a run stops at start instead of failing every call."""
    result = run_python("pass", **(settings.run_kwargs() | {"timeout_s": max(settings.timeout_s, 10.0)}))
    if not result.ok:
        raise SandboxUnavailable(f"the code sandbox could not run `pass`: exit code {result.exit_code}, stopped {result.stopped}, stderr {result.stderr[-200:]!r}")


def _tail(text: str, limit: int = _MAX_TEXT_CHARS) -> str:
    return text if len(text) <= limit else "..." + text[-(limit - 3):]


def format_result(result: ExecResult, timeout_s: float) -> str:
    """The observation text of a run that ended well; raises `CodeError` (with the compact
    failure text) for one that did not. See the module docstring."""
    out = result.stdout.rstrip("\n")
    err = result.stderr.rstrip("\n")
    if result.ok:
        text = "\n".join(part for part in (out, err) if part)
        return _tail(text) if text else "(no output)"
    if result.stopped == "timeout":
        why = f"timed out after {timeout_s:g} s"
    elif result.stopped is not None:
        why = f"stopped: {result.stopped}"
    else:
        lines = [line for line in err.splitlines() if line.strip()]
        last = lines[-1].strip() if lines else ""  # a traceback's exception line
        why = f"exit code {result.exit_code}" if not last else last if result.exit_code == 1 else f"{last} (exit code {result.exit_code})"
    raise CodeError(_tail(f"{why}\n{out}" if out else why, 1000))


def _replay_source(cells: Sequence[str], new: str) -> str:
    """One program that runs `cells` silently, then `new`, in one namespace (a notebook's state)."""
    lines = ["import contextlib as _c, io as _io", "_g = {'__name__': '__main__'}"]
    for k, cell in enumerate(cells):
        lines.append("with _c.redirect_stdout(_io.StringIO()), _c.redirect_stderr(_io.StringIO()):")
        lines.append(f"    exec(compile({cell!r}, '<cell {k + 1}>', 'exec'), _g)")
    lines.append(f"exec(compile({new!r}, '<cell {len(cells) + 1}>', 'exec'), _g)")
    return "\n".join(lines) + "\n"


@dataclass
class Notebook:
    """One episode's interpreter state: the cells that ran without error, replayed before each new one."""

    cells: list[str] = field(default_factory=list)

    def program(self, code: str) -> str:
        return _replay_source(self.cells, code) if self.cells else code


def code_tool(settings: CodeSettings = CodeSettings(), *, name: str = "code", notebook: Notebook | None = None) -> Tool:
    """The code tool named `name` (`CODE_TOOL_NAMES[tool_format]`): `code` (Python source) ->
    what it printed. With a `notebook` (one per episode), variables survive between calls."""

    async def run(code: str) -> str:
        source = code if notebook is None else notebook.program(code)
        try:
            result = await run_python_async(source, **settings.run_kwargs())
        except SandboxUnavailable as err:
            raise CodeError(f"sandbox unavailable: {str(err).splitlines()[0]}") from None
        text = format_result(result, settings.timeout_s)  # raises CodeError for a failed run
        if notebook is not None:
            notebook.cells.append(code)
        return text

    description = "Run Python code in a sandbox (no network, no files) and return what it prints; print the values you need."
    return Tool(name, description, CODE_SCHEMA, run)
