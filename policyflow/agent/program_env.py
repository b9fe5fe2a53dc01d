"""Episodes that are runs of an external agent program speaking only the OpenAI API (issue 19 §7).

An existing harness, written against any OpenAI client, is trained as it is: each episode runs
the user's program once, as a subprocess, with its own endpoint::

    OPENAI_BASE_URL=http://127.0.0.1:PORT/episodes/<route>/v1   (the episode's own endpoint)
    OPENAI_API_KEY=policyflow                                  (a dummy: nothing checks it)
    POLICYFLOW_MODEL=policy                                    (any model name is answered)
    POLICYFLOW_EPISODE_ID=train-7/0                            (the episode, for the program's logs)
    stdin: {"id": ..., "prompt": ..., "answer": ..., "columns": {...}}   (the problem, one JSON object)

The program makes its chat (or completion) calls there, then prints its reward as the **last
line of its stdout**: one JSON object `{"reward": 1.0, "parts": {"correct": 1.0}, "answer": "19"}`
(`parts`: named reward parts, logged as reward/<name>; `correct` (0/1) is the verdict evaluation
counts as accuracy; `answer`: the final answer, for maj@k; both optional). It exits 0.

The rollout worker's generator answers the calls (`program_server.py`: one HTTP server per
event loop, a route per episode, the app of `policyflow serve`), and every call is recorded with
its exact prompt ids, completion ids, behaviour log-probs, versions and sampling policies as the
episode's segments and `Call`s, so the episode trains like any other (`tokens.episode_rows`):
calls whose prompt extends the previous call's prompt and output share one training row; any
other call starts a new one. Calls sample with the run's `sampling.*` policy, whatever the
program asks (see `program_server`).

Limits and containment. The program runs in a session of its own (its process group) with a
wall-clock timeout (`AgentProgram.timeout_s`); the whole group is killed when the episode ends
or at the timeout. Past `agent.max_turns` calls, or with no room under `agent.max_total_tokens`,
further calls get a 400 error and the episode ends `truncated` (with the reward the program
still reports). A program that crashes (exit code not 0), times out, or prints no valid reward
line gets reward 0; the group builder counts it as a reward error and logs one line per group.
Its calls are kept: they are samples of the policy, and reward 0 is what the episode earned.

Trust. The command is the user's own harness, run with the user's rights and environment (as
`policyflow` itself is): it is not model-written code, and it is not sandboxed. Code a model
writes belongs in the sandboxed code tool (`tools/code.py`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from policyflow.agent.env import Env, EnvGroupBuilder, GroupScore, StepResult
from policyflow.problems import Problem
from policyflow.tokens import render_prompt
from policyflow.types import Segment, Trajectory

if TYPE_CHECKING:
    from policyflow.agent.episode import EpisodeRunner

logger = logging.getLogger(__name__)
API_KEY = "policyflow"  # the OPENAI_API_KEY a program gets: a dummy, the endpoint checks none
STDOUT_KEPT_BYTES = 64 * 1024  # the end of a program's stdout kept (its last line is the reward)
STDERR_KEPT_BYTES = 8 * 1024  # the end of its stderr kept for the failure line
READ_GRACE_S = 2.0  # after the group is killed, how long its pipes may take to close
LOGGED_CHARS = 200  # a program's output quoted in a log line is clipped to this


@dataclass(frozen=True)
class AgentProgram:
    """How to run the user's agent program for one episode.

    command: the program and its arguments (run directly, no shell). timeout_s: wall-clock
    seconds one episode may run; the process group is then killed and the episode ends
    truncated with reward 0. env: variables added to the program's environment (it inherits
    policyflow's; the OPENAI_* and POLICYFLOW_* variables above always win). cwd: its working
    folder (None: policyflow's).
    """

    command: tuple[str, ...]
    timeout_s: float = 300.0
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None

    def __post_init__(self) -> None:
        if not self.command or not all(isinstance(part, str) and part for part in self.command):
            raise ValueError(f"an agent program's command is a non-empty list of non-empty strings, got {self.command!r}")
        if not (isinstance(self.timeout_s, (int, float)) and 0 < self.timeout_s < math.inf):
            raise ValueError(f"an agent program's timeout_s must be a number of seconds > 0, got {self.timeout_s!r}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in dict(self.env).items()):
            raise ValueError(f"an agent program's env maps variable names to string values, got {dict(self.env)!r}")


@dataclass(frozen=True)
class ProgramRun:
    """How one run of a program ended: its exit code (None: killed at its timeout, or it never
    started), the ends of its stdout and stderr, and its wall time."""

    exit_code: int | None
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False
    start_error: str | None = None


@dataclass(frozen=True)
class ProgramReward:
    """What a program reported on its last stdout line."""

    reward: float
    parts: dict[str, float]
    answer: str | None = None


def program_reward(run: ProgramRun, timeout_s: float) -> ProgramReward:
    """The reward `run` reported: its last non-empty stdout line, a JSON object with a finite
    number `reward`, optional `parts` (name -> finite number) and `answer` (text). ValueError
    with one line saying what went wrong otherwise (it did not start, timed out, exited with a
    code other than 0, or printed no such line)."""
    if run.start_error is not None:
        raise ValueError(run.start_error)
    if run.timed_out:
        raise ValueError(f"ran past its timeout of {timeout_s:g} s and was killed")
    if run.exit_code != 0:
        last = _last_line(run.stderr)
        raise ValueError(f"exited with code {run.exit_code}" + (f"; stderr ends: {last[:LOGGED_CHARS]}" if last else ""))
    line = _last_line(run.stdout)
    if not line:
        raise ValueError('printed nothing on stdout; its last line must be JSON such as {"reward": 1.0}')
    try:
        report = json.loads(line)
    except ValueError:
        report = None
    if not isinstance(report, dict):
        raise ValueError(f'its last stdout line is not a JSON object such as {{"reward": 1.0}}: {line[:LOGGED_CHARS]!r}')
    reward, parts, answer = report.get("reward"), report.get("parts", {}), report.get("answer")
    if not _finite(reward):
        raise ValueError(f"its reward line has no finite number 'reward': {line[:LOGGED_CHARS]!r}")
    if not isinstance(parts, dict) or not all(isinstance(k, str) and _finite(v) for k, v in parts.items()):
        raise ValueError(f"its reward line's 'parts' is not an object of finite numbers: {line[:LOGGED_CHARS]!r}")
    if answer is not None and not isinstance(answer, str):
        raise ValueError(f"its reward line's 'answer' is not text: {line[:LOGGED_CHARS]!r}")
    return ProgramReward(float(reward), {k: float(v) for k, v in parts.items()}, answer)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _last_line(text: str) -> str:
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")


class _Tail:
    """The last `limit` bytes read from a stream."""

    def __init__(self, limit: int) -> None:
        self.limit, self.data = limit, bytearray()

    async def read(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(65536):
            self.data += chunk
            del self.data[: max(0, len(self.data) - self.limit)]

    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


def _kill_group(process: asyncio.subprocess.Process) -> None:
    """SIGKILL the program's whole process group (it leads its own session)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already


async def run_program(program: AgentProgram, stdin: bytes, env: Mapping[str, str]) -> ProgramRun:
    """Run `program` with `stdin` and environment `env` until it exits or its timeout; its process
    group is killed afterwards (and when this is cancelled), so nothing it started outlives it."""
    start = time.perf_counter()
    try:
        process = await asyncio.create_subprocess_exec(
            *program.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=dict(env), cwd=program.cwd, start_new_session=True,
        )
    except OSError as err:
        return ProgramRun(None, "", "", 0.0, start_error=f"could not start {program.command[0]!r}: {err}")
    out, err = _Tail(STDOUT_KEPT_BYTES), _Tail(STDERR_KEPT_BYTES)
    readers = [asyncio.ensure_future(out.read(process.stdout)), asyncio.ensure_future(err.read(process.stderr))]
    timed_out = False
    try:
        try:
            async with asyncio.timeout(program.timeout_s):
                await _feed(process.stdin, stdin)
                await process.wait()
        except TimeoutError:
            timed_out = True
        _kill_group(process)
        await asyncio.wait(readers, timeout=READ_GRACE_S)
        code = await process.wait()
        return ProgramRun(None if timed_out else code, out.text(), err.text(), time.perf_counter() - start, timed_out)
    finally:
        _kill_group(process)
        for reader in readers:
            reader.cancel()


async def _feed(pipe: asyncio.StreamWriter, data: bytes) -> None:
    """Write `data` to the program's stdin and close it (a program that does not read it is fine)."""
    try:
        pipe.write(data)
        await pipe.drain()
        pipe.close()
    except (BrokenPipeError, ConnectionResetError):
        pass


def program_environment(program: AgentProgram, base_url: str, episode_id: str, model_name: str) -> dict[str, str]:
    """The program's environment: policyflow's, `program.env`, then the episode's OPENAI_* and
    POLICYFLOW_* variables; 127.0.0.1 is added to NO_PROXY so a configured proxy is bypassed."""
    env = {**os.environ, **program.env}
    no_proxy = ",".join(p for p in (env.get("NO_PROXY") or env.get("no_proxy", ""), "127.0.0.1", "localhost") if p)
    return env | {
        "OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": API_KEY, "POLICYFLOW_MODEL": model_name, "POLICYFLOW_EPISODE_ID": episode_id,
        "NO_PROXY": no_proxy, "no_proxy": no_proxy,
    }


def problem_json(problem: Problem) -> bytes:
    """The problem as the program reads it on stdin: one JSON object and a newline."""
    record = {"id": problem.id, "prompt": problem.prompt, "answer": problem.answer, "columns": dict(problem.columns)}
    return (json.dumps(record, default=str) + "\n").encode()


class ProgramEnv(Env):
    """One episode: one run of the user's program on one problem (module docstring).

    The program drives the calls, so the episode runner hands the episode to `run_episode`
    instead of its own loop; `initial_observation` (the problem's prompt) and `step` exist for
    the `Env` interface only.
    """

    def __init__(self, program: AgentProgram, problem: Problem) -> None:
        self.program, self.problem = program, problem

    async def initial_observation(self) -> str:
        return self.problem.prompt

    async def step(self, action: str) -> StepResult:
        raise TypeError("a ProgramEnv's program makes its own calls; run it with EpisodeRunner.run, which calls its run_episode")

    async def run_episode(self, runner: EpisodeRunner, *, id: str, task_id: str) -> Trajectory:
        """Run the program against its own endpoint on `runner`'s generator, sampling and limits,
        and return the recorded episode with the reward the program reported."""
        from policyflow.agent.program_server import MODEL_NAME, ProgramCalls, episode_route  # the HTTP stack loads only where episodes run

        calls = ProgramCalls(runner)
        traj = Trajectory(id=id, task_id=task_id, segments=calls.segments, calls=calls.calls, num_turns=0, start_version=runner.generator.version)
        async with episode_route(calls, runner.tokenizer, runner.chat_template) as base_url:
            run = await run_program(self.program, problem_json(self.problem), program_environment(self.program, base_url, id, MODEL_NAME))
        calls.close()
        try:
            reported, error = program_reward(run, self.program.timeout_s), None
        except ValueError as err:
            reported, error = None, str(err)
        if not traj.segments:  # no call was made: the row is the problem's prompt alone, with nothing to train
            traj.segments.append(_prompt_segment(runner, self.problem.prompt))
        traj.reward = reported.reward if reported else 0.0
        traj.reward_parts = dict(reported.parts) if reported else {}
        traj.status = "truncated" if calls.truncated_by or run.timed_out else ("failed" if error else "complete")
        traj.finish_reason = calls.finish_reason
        traj.num_turns = len(traj.calls)
        traj.completion_text = "".join(s.text for s in traj.segments if s.kind != "prompt")
        info: dict[str, Any] = {"exit_code": run.exit_code, "seconds": round(run.seconds, 3), "error": error, "truncated_by": calls.truncated_by or ("timeout" if run.timed_out else None)}
        if reported and reported.answer is not None:
            info["answer"] = reported.answer
        traj.step_info.append(info)
        versions = [v for s in traj.segments if s.versions for v in s.versions]
        traj.start_version = min(versions, default=traj.start_version)
        return traj


def _prompt_segment(runner: EpisodeRunner, text: str) -> Segment:
    return Segment("prompt", tuple(render_prompt(runner.tokenizer, text, runner.chat_template)), text=text)


def program_error(t: Trajectory) -> str | None:
    """Why a program episode got no reward (None: it reported one)."""
    return t.step_info[-1].get("error") if t.step_info else None


class ProgramGroupBuilder(EnvGroupBuilder):
    """The G program episodes of one problem; counts (and logs once) the runs that reported no reward."""

    def __init__(self, problem: Problem, program: AgentProgram) -> None:
        self.problem, self.program = problem, program

    async def make_envs(self, n: int) -> list[Env]:
        return [ProgramEnv(self.program, self.problem) for _ in range(n)]

    async def score_group(self, trajectories: Sequence[Trajectory]) -> GroupScore | None:
        errors = [e for e in map(program_error, trajectories) if e]
        if not errors:
            return None
        logger.warning("agent program %r: %d of %d episodes of problem %s reported no reward and get 0 (first: %s)",
                       self.program.command[-1], len(errors), len(trajectories), self.problem.id, errors[0][:LOGGED_CHARS])
        return GroupScore([0.0] * len(trajectories), [{}] * len(trajectories), errors=len(errors))
