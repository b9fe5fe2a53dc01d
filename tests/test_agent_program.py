"""Agent programs that only speak the OpenAI API, trained as they are (issue 19 §7;
`agent/program_env.py`, `agent/program_server.py`, `task.name=agent_program`).

Most tests run small stdlib programs (urllib: they start fast) against a scripted generator; one
runs `examples/openai_agent.py` (the official `openai` client) on it, and one trains that program
for a real RL step on the tiny model in sync mode and checks the first step is on-policy.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from policyflow import coordinator
from policyflow.agent.episode import EpisodeRunner
from policyflow.agent.program_env import AgentProgram, ProgramGroupBuilder, ProgramRun, program_reward
from policyflow.agent.program_server import ProgramCalls, episode_route, running_servers
from policyflow.config import AgentConfig, load_config
from policyflow.engine.generator import Chunk, SamplingParams
from policyflow.model import build_char_tokenizer, build_tiny
from policyflow.problems import Problem
from policyflow.session import build_task
from policyflow.tasks import TaskError
from policyflow.tasks.program import AgentProgramTask
from policyflow.tokens import episode_rows
from policyflow.types import Sample, TokenPolicy
from policyflow.policy import PolicySpec
from tests.conftest import SMALL, eventually

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "openai_agent.py"
CHAT = "{% for m in messages %}[{{ m.role }}]{{ m.content }}<eos>\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
POLICY = TokenPolicy(1.0, 1.0, 0)
PROBLEM = Problem("p0", "2+2=", "4")

# A stdlib client: `chat(messages)` -> the first choice; `completion(prompt)` likewise; `fail(...)` the status of a refused call.
CLIENT = """
import json, os, sys, urllib.error, urllib.request
problem = json.loads(sys.stdin.read())
BASE = os.environ["OPENAI_BASE_URL"]
with open(os.environ["LOG"], "a") as log:
    log.write(BASE + "\\n")

def post(path, body):
    request = urllib.request.Request(BASE + path, data=json.dumps({"model": "my-harness-model", **body}).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": "Bearer " + os.environ["OPENAI_API_KEY"]})
    return json.load(urllib.request.urlopen(request, timeout=30))["choices"][0]

def chat(messages, **kw):
    return post("/chat/completions", {"messages": messages, "logprobs": True, **kw})

def streamed_chat(messages, **kw):
    request = urllib.request.Request(BASE + "/chat/completions", data=json.dumps({"model": "m", "messages": messages, "stream": True, **kw}).encode(),
                                     headers={"Content-Type": "application/json"})
    events = [line[6:] for line in urllib.request.urlopen(request, timeout=30).read().decode().splitlines() if line.startswith("data: ")]
    return "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events if e != "[DONE]" and json.loads(e)["choices"])

def completion(prompt, **kw):
    return post("/completions", {"prompt": prompt, "max_tokens": 16, **kw})

def refused(messages):
    try:
        chat(messages)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)["error"]["code"]
"""


class ScriptedGenerator:
    """Answers each call with the next scripted text (char tokens + EOS, log-prob -0.5, version 3)
    and keeps every call's prompt ids and params."""

    version = 3
    max_positions = 512

    def __init__(self, tokenizer, texts: list[str]):
        self.tokenizer, self.texts, self.prompts, self.params = tokenizer, list(texts), [], []

    async def generate(self, prompt_ids, params=None, *, request_id=None) -> Sample:
        self.prompts.append(list(prompt_ids))
        self.params.append(params)
        text = self.texts.pop(0) if self.texts else "0"
        ids = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + (self.tokenizer.eos_token_id,)
        cut = len(ids) > params.max_new_tokens
        ids = ids[: params.max_new_tokens]
        text = self.tokenizer.decode(ids if cut else ids[:-1])
        return Sample(tuple(prompt_ids), ids, (-0.5,) * len(ids), (3,) * len(ids), "length" if cut else "eos", text, (POLICY,) * len(ids))

    async def stream(self, prompt_ids, params=None, *, request_id=None):
        sample = await self.generate(prompt_ids, params, request_id=request_id)
        yield Chunk(sample.token_ids, sample.logprobs, sample.text, sample)

    def cancel(self, request_id: str) -> bool:
        return False


@pytest.fixture
def chat_tokenizer():
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = CHAT
    return tokenizer


def _program(tmp_path: Path, body: str, timeout_s: float = 30.0) -> AgentProgram:
    path = tmp_path / "program.py"
    path.write_text(CLIENT + textwrap.dedent(body))
    return AgentProgram((sys.executable, str(path)), timeout_s, env={"LOG": str(tmp_path / "urls.log")})


def _episodes(program: AgentProgram, generator, tokenizer, n: int = 1, *, chat_template: bool = True, **agent):
    runner = EpisodeRunner(generator, tokenizer, SamplingParams(temperature=0.7, max_new_tokens=12), AgentConfig(**agent), chat_template=chat_template)
    group, errors = asyncio.run(runner.run_group(ProgramGroupBuilder(PROBLEM, program), n, task_id="t"))
    return group.trajectories, errors


def _gen_mask(t) -> list[int]:
    """1 on every token of the row that a call produced, by construction of the segments."""
    [row] = episode_rows(t)
    return row[1]


def test_a_program_that_appends_the_reply_is_one_row_with_the_exact_ids(tmp_path: Path, chat_tokenizer) -> None:
    """Two chat calls, the second appending the assistant's reply and a user turn: the second prompt
    extends the first call's prompt + output, so its new tokens are an obs segment and the episode
    one training row whose loss mask covers exactly the two completions."""
    program = _program(tmp_path, """
        first = chat([{"role": "user", "content": problem["prompt"]}])
        second = chat([{"role": "user", "content": problem["prompt"]}, first["message"], {"role": "user", "content": "sure?"}])
        print("some log line")
        print(json.dumps({"reward": 0.75, "parts": {"correct": 1.0}, "answer": second["message"]["content"]}))
    """)
    generator = ScriptedGenerator(chat_tokenizer, ["5", "4"])
    [t], errors = _episodes(program, generator, chat_tokenizer)
    assert errors == 0 and t.status == "complete" and t.reward == 0.75 and t.reward_parts == {"correct": 1.0}
    assert [s.kind for s in t.segments] == ["prompt", "gen", "obs", "gen"] and [(c.context, c.produced) for c in t.calls] == [((0,), 1), ((0, 1, 2), 3)]
    first, second = generator.prompts
    assert list(t.segments[0].token_ids) == first and chat_tokenizer.decode(first) == "[user]2+2=<eos>\n[assistant]"
    assert chat_tokenizer.decode(t.segments[2].token_ids) == "\n[user]sure?<eos>\n[assistant]"
    [(ids, mask, logprobs, versions)] = episode_rows(t)
    gen1, gen2 = t.segments[1].token_ids, t.segments[3].token_ids
    assert ids == second + list(gen2) and ids[: len(first) + len(gen1)] == first + list(gen1)
    assert mask == [0] * len(first) + [1] * len(gen1) + [0] * len(t.segments[2].token_ids) + [1] * len(gen2)
    assert [lp for lp, m in zip(logprobs, mask) if m] == [-0.5] * (len(gen1) + len(gen2)) and {v for v, m in zip(versions, mask) if m} == {3}
    assert t.step_info[-1]["answer"] == "4" and t.num_turns == 2 and t.start_version == t.min_version == 3
    # the run's policy, whatever the program asks; its max_tokens (none here) cut to sampling.max_new_tokens
    assert all(p.temperature == 0.7 and p.max_new_tokens == 12 for p in generator.params)


def test_a_program_that_starts_a_fresh_chat_gets_a_new_row(tmp_path: Path, chat_tokenizer) -> None:
    program = _program(tmp_path, """
        first = chat([{"role": "user", "content": problem["prompt"]}])
        second = streamed_chat([{"role": "user", "content": "was " + first["message"]["content"] + " right?"}], temperature=0.0)
        print(json.dumps({"reward": 1, "answer": second}))
    """)
    generator = ScriptedGenerator(chat_tokenizer, ["5", "no"])
    [t], _ = _episodes(program, generator, chat_tokenizer)
    assert [s.kind for s in t.segments] == ["prompt", "gen", "prompt", "gen"] and [c.context for c in t.calls] == [(0,), (2,)]
    rows = episode_rows(t)
    assert [r[0] for r in rows] == [generator.prompts[0] + list(t.segments[1].token_ids), generator.prompts[1] + list(t.segments[3].token_ids)]
    assert [r[1] for r in rows] == [[0] * len(generator.prompts[k]) + [1] * len(t.segments[2 * k + 1].token_ids) for k in range(2)]
    assert generator.params[1].temperature == 0.7  # the program's temperature=0 is not the run's policy
    assert t.step_info[-1]["answer"] == "no" and t.segments[3].text == "no"  # the second call streamed


def test_token_id_completions_on_a_plain_model_extend_the_row(tmp_path: Path) -> None:
    """/v1/completions with the returned ids sent back (plus new ones) extends the row too."""
    tokenizer = build_char_tokenizer()
    program = _program(tmp_path, """
        first = completion(problem["prompt"])
        second = completion(first["prompt_token_ids"] + first["token_ids"] + [20, 21], max_tokens=4)
        print(json.dumps({"reward": 0.0}))
    """)
    generator = ScriptedGenerator(tokenizer, ["abc", "de"])
    [t], _ = _episodes(program, generator, tokenizer, chat_template=False)
    assert [s.kind for s in t.segments] == ["prompt", "gen", "obs", "gen"] and t.segments[2].token_ids == (20, 21)
    assert len(episode_rows(t)) == 1 and generator.params[1].max_new_tokens == 4


def test_turn_limit_refuses_further_calls_and_truncates(tmp_path: Path, chat_tokenizer) -> None:
    program = _program(tmp_path, """
        chat([{"role": "user", "content": "a"}])
        chat([{"role": "user", "content": "b"}])
        status, code = refused([{"role": "user", "content": "c"}])
        print(json.dumps({"reward": 0.5, "parts": {"refused": float(status == 400 and code == "max_turns_exceeded")}}))
    """)
    [t], errors = _episodes(program, ScriptedGenerator(chat_tokenizer, []), chat_tokenizer, max_turns=2)
    assert t.status == "truncated" and t.num_turns == 2 and t.reward == 0.5 and t.reward_parts == {"refused": 1.0} and errors == 0


def test_a_streamed_call_past_the_turn_limit_gets_the_400_body(tmp_path: Path, chat_tokenizer) -> None:
    """The admission check runs before the streaming response starts: the client gets the 400
    max_turns_exceeded body, not a 500 (nor a 200 stream)."""
    program = _program(tmp_path, """
        streamed_chat([{"role": "user", "content": "a"}])
        try:
            streamed_chat([{"role": "user", "content": "b"}])
            status, code = 200, None
        except urllib.error.HTTPError as err:
            status, code = err.code, json.load(err)["error"]["code"]
        print(json.dumps({"reward": 0.5, "parts": {"status": float(status), "refused": float(code == "max_turns_exceeded")}}))
    """)
    [t], errors = _episodes(program, ScriptedGenerator(chat_tokenizer, []), chat_tokenizer, max_turns=1)
    assert t.reward_parts == {"status": 400.0, "refused": 1.0} and t.status == "truncated" and t.num_turns == 1 and errors == 0


def test_total_token_limit_cuts_max_tokens_then_refuses(tmp_path: Path, chat_tokenizer) -> None:
    """agent.max_total_tokens: a call's max_tokens is cut to the room left (a completion cut there
    truncates the episode); with no room left the call gets a 400."""
    program = _program(tmp_path, """
        if os.environ["POLICYFLOW_EPISODE_ID"].endswith("/0"):
            chat([{"role": "user", "content": "x" * 20}], max_tokens=50)
            print(json.dumps({"reward": 1.0}))
        else:
            status, code = refused([{"role": "user", "content": "x" * 40}])
            print(json.dumps({"reward": 0.0, "parts": {"refused": float(status == 400 and code == "context_length_exceeded")}}))
    """)
    generator = ScriptedGenerator(chat_tokenizer, ["y" * 30])
    (cut, refused), _ = _episodes(program, generator, chat_tokenizer, n=2, max_total_tokens=45)
    assert len(generator.prompts) == 1 and len(generator.prompts[0]) == 39 and generator.params[0].max_new_tokens == 6
    assert cut.status == "truncated" and cut.finish_reason == "length" and cut.step_info[-1]["truncated_by"] == "max_total_tokens" and cut.reward == 1.0
    assert refused.status == "truncated" and refused.reward_parts == {"refused": 1.0} and refused.num_turns == 0
    assert [s.kind for s in refused.segments] == ["prompt"] and episode_rows(refused)[0][1] == [0] * len(refused.segments[0].token_ids)


def test_a_crash_a_missing_reward_and_a_hang_are_contained(tmp_path: Path, chat_tokenizer, caplog) -> None:
    """Each gets reward 0 and counts as an error (one log line for the group); the calls made are
    kept; a hanging program and the child it started are killed at the timeout; the episodes'
    routes and the server are gone afterwards."""
    program = _program(tmp_path, """
        import subprocess, time
        kind = int(os.environ["POLICYFLOW_EPISODE_ID"].rsplit("/", 1)[1])
        chat([{"role": "user", "content": problem["prompt"]}])
        if kind == 0:
            raise SystemExit(3)
        if kind == 1:
            print("no reward here")
        if kind == 2:
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            open(os.environ["LOG"] + ".child", "w").write(str(child.pid))
            time.sleep(60)
        if kind == 3:
            print(json.dumps({"reward": float("nan")}))
    """, timeout_s=3.0)
    with caplog.at_level(logging.WARNING, logger="policyflow.agent.program_env"):
        trajectories, errors = _episodes(program, ScriptedGenerator(chat_tokenizer, []), chat_tokenizer, n=4)
    assert errors == 4 and [t.reward for t in trajectories] == [0.0] * 4 and all(t.num_turns == 1 for t in trajectories)
    assert [t.status for t in trajectories] == ["failed", "failed", "truncated", "failed"]
    infos = [t.step_info[-1] for t in trajectories]
    assert infos[0]["exit_code"] == 3 and "exited with code 3" in infos[0]["error"] and "SystemExit" not in infos[1]["error"]
    assert "not a JSON object" in infos[1]["error"] and "timeout of 3 s" in infos[2]["error"] and "finite number" in infos[3]["error"]
    assert len([r for r in caplog.records if "reported no reward" in r.message]) == 1
    child = int((tmp_path / "urls.log.child").read_text())
    assert eventually(lambda: not Path(f"/proc/{child}").exists() or Path(f"/proc/{child}/stat").read_text().split()[2] == "Z", 10)
    urls = (tmp_path / "urls.log").read_text().split()
    assert len(set(urls)) == 4 and len({u.split("/episodes/")[0] for u in urls}) == 1  # one server, a route per episode
    assert running_servers() == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(urls[0] + "/models", timeout=5)


def test_routes_answer_only_their_episode_and_any_model_name(chat_tokenizer) -> None:
    runner = EpisodeRunner(ScriptedGenerator(chat_tokenizer, []), chat_tokenizer, SamplingParams(), AgentConfig(), chat_template=True)

    async def main():
        async with episode_route(ProgramCalls(runner), chat_tokenizer, True) as url:
            async with httpx.AsyncClient(timeout=10) as client:
                models = (await client.get(url + "/models")).json()
                other = await client.get(url.replace("/episodes/", "/episodes/x") + "/models")
                answer = await client.post(url + "/chat/completions", json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
            return url, models, other, answer

    url, models, other, answer = asyncio.run(main())
    assert models["data"][0]["id"] == "policy" and other.status_code == 404 and other.json()["error"]["code"] == "not_found"
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "0"
    assert running_servers() == 0


def test_reward_line_parsing() -> None:
    ok = ProgramRun(0, 'hello\n{"reward": 1, "parts": {"correct": 1}, "answer": "4"}\n\n', "", 0.1)
    assert program_reward(ok, 5).reward == 1.0 and program_reward(ok, 5).answer == "4"
    for stdout, message in [("", "printed nothing"), ("[1]", "not a JSON object"), ('{"reward": true}', "finite number"),
                            ('{"reward": 1, "parts": {"a": "x"}}', "parts"), ('{"reward": 1, "answer": 4}', "answer")]:
        with pytest.raises(ValueError, match=message):
            program_reward(ProgramRun(0, stdout, "", 0.1), 5)


def test_the_example_program_with_the_openai_client(tmp_path: Path, chat_tokenizer) -> None:
    """examples/openai_agent.py: ask, then the check round appended to the chat: one row, reward 1."""
    generator = ScriptedGenerator(chat_tokenizer, ["5", "it is 4"])
    [t], errors = _episodes(AgentProgram((sys.executable, str(EXAMPLE))), generator, chat_tokenizer)
    assert errors == 0 and t.reward == 1.0 and t.reward_parts == {"correct": 1.0} and t.step_info[-1]["answer"] == "it is 4"
    assert [s.kind for s in t.segments] == ["prompt", "gen", "obs", "gen"] and len(episode_rows(t)) == 1
    assert generator.params[0].max_new_tokens == 12  # the example asks 64; sampling.max_new_tokens wins


def test_agent_program_is_a_registered_task(tmp_path: Path) -> None:
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+1=", "answer": str(a + 1)}) + "\n" for a in range(10)))
    options = f"task.options={{command: [{sys.executable}, {EXAMPLE}], timeout_s: 9}}"
    task = build_task(PolicySpec.of(load_config(None, ["task.name=agent_program", f"task.path={data}", options])))
    assert isinstance(task, AgentProgramTask) and task.program.command == (sys.executable, str(EXAMPLE)) and task.program.timeout_s == 9
    assert isinstance(task.group_builder(task.train_problem(0)), ProgramGroupBuilder)
    with pytest.raises(TaskError, match="not found"):
        build_task(PolicySpec.of(load_config(None, ["task.name=agent_program", f"task.path={data}", "task.options={command: [no-such-program-here]}"])))
    with pytest.raises(TaskError, match="timeout_s must be"):
        build_task(PolicySpec.of(load_config(None, ["task.name=agent_program", f"task.path={data}", f"task.options={{command: [{sys.executable}], timeout_s: -1}}"])))
    with pytest.raises(TaskError, match="task.options.command"):
        build_task(PolicySpec.of(load_config(None, ["task.name=agent_program", f"task.path={data}"])))


def test_training_the_example_program_is_on_policy_at_the_first_step(tmp_path: Path) -> None:
    """A real `policyflow` RL step in sync mode on the tiny model with a chat template: every episode
    is a run of examples/openai_agent.py (official openai client); the first step's importance
    ratio is 1 and nothing is clipped, so the recorded ids, log-probs and rows are exactly the policy's."""
    model, tokenizer = build_tiny(hidden_size=32, num_layers=2, intermediate_size=64, num_heads=2, num_kv_heads=1)
    tokenizer.chat_template = CHAT
    folder = tmp_path / "chat_model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n" for a in range(5) for b in range(4)))
    cfg = load_config(None, [
        *SMALL, f"run.output_dir={tmp_path / 'runs'}", "run.samples_every=1", f"model.path={folder}", "model.chat_template=true",
        "task.name=agent_program", f"task.path={data}", f"task.options={{command: [{sys.executable}, {EXAMPLE}, --no-tools], timeout_s: 120}}",
        "sft.max_steps=0", "eval.every=0", "train.steps=1", "train.prompts_per_step=2", "train.group_size=2", "train.skip_zero_variance=false",
        "pipeline.mode=sync",
    ])
    coordinator.train(cfg, log=lambda *_: None)
    lines = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    [first] = [line for line in lines if "loss/ratio_mean" in line]
    assert first["loss/ratio_mean"] == pytest.approx(1.0, abs=1e-5) and first["loss/clip_frac"] == 0.0
    assert first["rollout/reward_errors"] == 0
    episodes = [json.loads(line) for line in (cfg.run_dir / "samples.jsonl").read_text().splitlines()]
    assert episodes and all(len(e["calls"]) == 2 for e in episodes)
