"""A user's own task and multi-turn env, loaded from outside the project with no fork
(`task.name=package.module:Class`, `tasks/registry.py`), and every way a class can break the
contract as one clear line."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from policyflow.agent.env import group_builder
from policyflow.agent.episode import EpisodeRunner
from policyflow.cli import main
from policyflow.config import AgentConfig, ConfigError, load_config
from policyflow.engine import SamplingParams
from policyflow.model import build_char_tokenizer
from policyflow.session import build_task
from policyflow.tasks import CountdownTask, TaskError
from policyflow.policy import PolicySpec
from tests.conftest import SMALL
from tests.test_tool_env import RecordingEngine

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "my_task.py"
POLICYFLOW = Path(sys.executable).parent / "policyflow"  # the installed command: it adds no folder to sys.path


def _user_module(folder: Path, name: str, source: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def user_folder(tmp_path: Path, monkeypatch):
    """A folder on sys.path holding the user modules below, imported afresh by each test."""
    folder = tmp_path / "user"
    _user_module(folder, "usertasks", GOOD_TASK)
    _user_module(folder, "broken_import", "x = 1\ny = 1 / 0\n")
    monkeypatch.syspath_prepend(str(folder))
    names = ("usertasks", "broken_import")
    for name in names:
        sys.modules.pop(name, None)
    yield folder
    for name in names:
        sys.modules.pop(name, None)


def test_a_user_task_from_a_folder_outside_the_project_trains(tmp_path: Path) -> None:
    """The README's example, copied under another name into a folder outside the project and put on
    PYTHONPATH, trains for 2 steps (SFT on its demonstrations, RL, evaluation) with `policyflow
    train` run from a third folder, in the process runtime: the rollout workers import and
    unpickle the user's class too. Its episodes are its own: the calculator env's error
    observation names `<calc>`."""
    userland, elsewhere = tmp_path / "userland", tmp_path / "elsewhere"
    userland.mkdir()
    elsewhere.mkdir()
    shutil.copy(EXAMPLE, userland / "calc_user_task.py")
    overrides = [
        *SMALL, f"run.output_dir={tmp_path / 'runs'}", "run.name=user", "run.samples_every=1", "task.name=calc_user_task:CalculatorTask",
        "task.options={max_value: 20, num_eval: 8}", "sampling.max_new_tokens=24", "agent.max_turns=3", "train.skip_zero_variance=false",
        "pipeline.runtime=process", "pipeline.mode=one_step_off",
    ]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(userland), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(POLICYFLOW), "train", *overrides], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "runs" / "user"
    assert "task: calculator" in done.stdout and json.loads((run / "summary.json").read_text())["steps"] == 2
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum("agent/tool_calls_mean" in m for m in steps) == 2
    samples = (run / "samples.jsonl").read_text()
    assert "write <calc> or <answer>" in samples  # the user's tool env answered the model's malformed turns


def test_the_examples_episodes_use_its_tool_and_reward_parts() -> None:
    """The example task through the real runner (scripted turns): its calculator runs, the result
    comes back in its `<result>` wrap, and the reward is `correct` plus its own `extra_calls`
    and `format` parts."""
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        from my_task import CalculatorTask, calculate
    finally:
        sys.path.remove(str(EXAMPLE.parent))
    task = CalculatorTask(max_value=50, num_eval=4)
    problem = task.train_problem(0)
    tok = build_char_tokenizer()
    turns = [f"<calc>{problem.prompt}</calc>", "<calc>2*3</calc>", f"<answer>{problem.answer}</answer>"]
    runner = EpisodeRunner(RecordingEngine(tok, turns, eos=False), tok, SamplingParams(max_new_tokens=32), AgentConfig(max_turns=4))
    group, _ = asyncio.run(runner.run_group(group_builder(task, problem), 1, task_id="t"))
    [traj] = group.trajectories
    assert [s.text for s in traj.segments if s.kind == "obs"] == [f"<result>{problem.answer}</result>", "<result>6</result>"]
    assert traj.reward_parts == pytest.approx({"correct": 1.0, "extra_calls": -0.05, "format": 0.1}) and traj.num_tool_calls == 2
    assert task.sft_turns(problem)[0] == ("gen", f"<calc>{problem.prompt}</calc>")
    with pytest.raises(ValueError, match="only integers"):
        calculate("__import__('os')")


def test_task_options_reach_a_registered_tasks_other_arguments(tmp_path: Path) -> None:
    """A registered task's constructor arguments beyond its task.* fields come from task.options
    (countdown's format_reward); options may not override the task.* settings."""
    task = build_task(PolicySpec.of(load_config(None, ["task.name=countdown", "task.options={format_reward: 0.25}"])))
    assert isinstance(task, CountdownTask) and task.format_reward == 0.25
    with pytest.raises(TaskError, match=r"task.options sets \['seed'\] for task.name=countdown, which takes them from its own task.\* settings"):
        build_task(PolicySpec.of(load_config(None, ["task.name=countdown", "task.options={seed: 3}"])))


GOOD_TASK = """
    from policyflow.tasks import Problem, Score, Task

    class Tiny(Task):
        def __init__(self, size: int = 4):
            self.size = size
        def train_problem(self, index):
            return Problem(f"t{index}", f"{index % 5}+1=", str(index % 5 + 1))
        def eval_problems(self):
            return [Problem(f"e{i}", f"{i}+2=", str(i + 2)) for i in range(self.size)]
        def extract_answer(self, completion):
            return completion.strip()
        def score(self, problems, completions):
            ok = [p.answer == c.strip() for p, c in zip(problems, completions)]
            return Score([float(x) for x in ok], ok)

    class Raises(Tiny):
        def __init__(self):
            raise RuntimeError("no data in /nowhere")

    class Half(Task):
        def train_problem(self, index):
            return Problem("x", "y", "z")

    class NotATask:
        pass

    def a_function():
        pass
"""


@pytest.mark.parametrize(("name", "options", "expected"), [
    ("nowhere_to_be_found:Tiny", {}, "task.name='nowhere_to_be_found:Tiny': cannot import module 'nowhere_to_be_found' (No module named 'nowhere_to_be_found'); install it or put its folder on PYTHONPATH"),
    ("usertasks:Nope", {}, "task.name='usertasks:Nope': module 'usertasks' ({file}) has no attribute 'Nope'; check the name after the ':'"),
    ("usertasks:a_function", {}, "task.name='usertasks:a_function': a_function is a function, not a class; name a subclass of policyflow.tasks.Task"),
    ("usertasks:NotATask", {}, "task.name='usertasks:NotATask': class NotATask is not a subclass of policyflow.tasks.Task; subclass it (examples/my_task.py shows one)"),
    ("usertasks:Half", {}, "task.name='usertasks:Half': class Half does not implement eval_problems, extract_answer, score (abstract in policyflow.tasks.Task); define them"),
    ("usertasks:Raises", {}, "task.name='usertasks:Raises': Raises(**task.options) raised RuntimeError at {file}:19: no data in /nowhere"),
    ("usertasks:Tiny", {"colour": 1}, "task.name='usertasks:Tiny': Tiny cannot be built with task.options {'colour': 1} (got an unexpected keyword argument 'colour'); it accepts ['size']"),
    ("broken_import:Tiny", {}, "task.name='broken_import:Tiny': importing module 'broken_import' failed at {folder}/broken_import.py:2: ZeroDivisionError: division by zero"),
])
def test_a_class_that_breaks_the_contract_is_one_clear_line(user_folder: Path, capsys, name: str, options: dict, expected: str) -> None:
    """Module not found, attribute missing, not a class, not a Task, abstract methods left, a
    constructor that raises, options it does not take, a module that fails to import: each one
    TaskError line naming the class and what is wrong; `policyflow` exits 1 with that line."""
    folder = user_folder
    expected = expected.replace("{file}", str(folder / "usertasks.py")).replace("{folder}", str(folder))
    overrides = [f"task.name={name}", f"task.options={json.dumps(options)}"]
    with pytest.raises(TaskError) as err:
        build_task(PolicySpec.of(load_config(None, overrides)))
    assert str(err.value) == expected
    capsys.readouterr()
    assert main(["eval", *overrides, "model.tiny.hidden_size=32", "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1", "run.progress=false"]) == 1
    assert capsys.readouterr().err.strip() == f"policyflow: {type(err.value).__name__}: {expected}"


def test_a_good_user_class_loads_with_its_options(user_folder: Path) -> None:
    task = build_task(PolicySpec.of(load_config(None, ["task.name=usertasks:Tiny", "task.options={size: 3}"])))
    assert type(task).__name__ == "Tiny" and len(task.eval_problems()) == 3


def test_a_task_name_that_is_neither_registered_nor_an_import_path_is_a_config_error(capsys) -> None:
    with pytest.raises(ConfigError, match=r"^task.name='my task' is not allowed; allowed: arithmetic, countdown, jsonl, search_qa, multiply, agent_program, or a Task class of yours"):
        load_config(None, ["task.name=my task"])
    assert main(["eval", "task.name=usertasks.Tiny"]) == 2
    assert capsys.readouterr().err.startswith("policyflow: config error: task.name='usertasks.Tiny' is not allowed")
