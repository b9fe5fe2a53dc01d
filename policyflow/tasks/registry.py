"""One task registry: `task.name` is a name in `TASKS`, or a user's class `package.module:Class`.

Adding a built-in task is one entry: its class and how its constructor arguments come from the
config (`TaskEntry.settings`). `config.TaskConfig` checks `task.name` against these names, and
`session.build_task` builds whichever entry (or user class) the config names, with no per-task
code anywhere else. Settings a task needs beyond the shared `task.*` fields go in
`task.options`, passed to its constructor as keyword arguments.

A user's own task, with no fork (`task.name=my_package.my_module:MyTask`): the module is
imported (installed, or on PYTHONPATH: the `policyflow` command does not add the current folder
to `sys.path`), the class must subclass `policyflow.tasks.Task` and implement its abstract
methods, and it is built as `MyTask(**task.options)`. Its episodes are whatever its
`group_builder(problem)` returns: single-turn by default, `agent.tool_env.ToolGroupBuilder` for
tools and reward parts of its own, or any `EnvGroupBuilder` (`examples/my_task.py` is a
complete multi-turn one). Every way a class breaks that contract (module not found, no such
attribute, not a class, not a Task, abstract methods left, options it does not take, a
constructor that raises) is one `TaskError` line naming the class and what is wrong: the
`policyflow` command exits 1, as for every error found while loading a task; a `task.name` that
is neither a registered name nor `module:Class` is a config error (exit 2) before anything loads.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from policyflow.tasks.arithmetic import ArithmeticTask
from policyflow.tasks.base import Task, TaskError
from policyflow.tasks.countdown import CountdownTask
from policyflow.tasks.jsonl import JsonlTask
from policyflow.tasks.multiply import MultiplyTask
from policyflow.tasks.program import AgentProgramTask
from policyflow.tasks.reward_fn import raised_at
from policyflow.tasks.search_qa import SearchQATask

if TYPE_CHECKING:
    from policyflow.policy import PolicySpec

USER_TASK = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")  # package.module:Class


@dataclass(frozen=True)
class TaskEntry:
    """A built-in task: its class, and its constructor arguments from the policy's settings (`PolicySpec`)."""

    cls: type[Task]
    settings: Callable[[PolicySpec], dict[str, Any]]


def _search_qa(spec: PolicySpec) -> dict[str, Any]:
    search = spec.task.search.model_dump()
    search["corpus_dir"] = search["corpus_dir"] or str(spec.cache_dir / "search_qa")
    if search["code_tool"]:  # the code tool's sandbox settings are the multiply task's (task.code.*)
        search["code"] = spec.task.code.model_dump(include={"timeout_s", "memory_mb", "packages", "isolation", "concurrency"})
    return dict(seed=spec.task.seed, num_eval=spec.task.num_eval, **search)


def _multiply(spec: PolicySpec) -> dict[str, Any]:
    return dict(seed=spec.task.seed, num_eval=spec.task.num_eval, min_digits=spec.task.min_digits, max_digits=spec.task.max_digits, **spec.task.code.model_dump())


TASKS: dict[str, TaskEntry] = {
    "arithmetic": TaskEntry(ArithmeticTask, lambda spec: dict(seed=spec.task.seed, min_digits=spec.task.min_digits, max_digits=spec.task.max_digits, num_eval=spec.task.num_eval)),
    "countdown": TaskEntry(CountdownTask, lambda spec: dict(
        seed=spec.task.seed, num_eval=spec.task.num_eval, num_numbers=spec.task.num_numbers, max_number=spec.task.max_number, max_target=spec.task.max_target,
    )),
    "jsonl": TaskEntry(JsonlTask, lambda spec: dict(
        path=spec.task.path, prompt_column=spec.task.prompt_column, answer_column=spec.task.answer_column, reward=spec.task.reward,
        eval_path=spec.task.eval_path, eval_fraction=spec.task.eval_fraction, seed=spec.task.seed, on_bad_row=spec.task.on_bad_row,
        reward_timeout_s=spec.task.reward_timeout_s, code=spec.task.code.model_dump(include={"timeout_s", "memory_mb", "packages", "isolation", "concurrency"}),
        chat_template=spec.model.chat_template,
    )),
    "search_qa": TaskEntry(SearchQATask, _search_qa),
    "multiply": TaskEntry(MultiplyTask, _multiply),
    "agent_program": TaskEntry(AgentProgramTask, lambda spec: dict(  # task.options: command, timeout_s, env, cwd
        path=spec.task.path, prompt_column=spec.task.prompt_column, answer_column=spec.task.answer_column, reward=spec.task.reward,
        eval_path=spec.task.eval_path, eval_fraction=spec.task.eval_fraction, seed=spec.task.seed, on_bad_row=spec.task.on_bad_row,
        chat_template=spec.model.chat_template,
    )),
}


def is_user_task(name: str) -> bool:
    """Whether `name` names a user's class (`package.module:Class`) rather than a registered task."""
    return name not in TASKS and USER_TASK.fullmatch(name) is not None


def configured_task(spec: PolicySpec) -> Task:
    """The task `spec.task.name` names, built with its settings and `task.options`."""
    name, options = spec.task.name, dict(spec.task.options)
    if name in TASKS:
        kwargs = TASKS[name].settings(spec)
        clash = sorted(set(options) & set(kwargs))
        if clash:
            raise TaskError(f"task.options sets {clash} for task.name={name}, which takes them from its own task.* settings; set those instead")
        return make_task(name, **kwargs, **options)
    return build_user_task(load_task_class(name), name, options)


def make_task(name: str, **kwargs: Any) -> Task:
    """Build the task registered as `name` with its constructor arguments."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    cls = TASKS[name].cls
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as err:
        accepted = list(inspect.signature(cls).parameters)
        raise TaskError(f"task {name!r} does not take arguments {sorted(kwargs)} ({err}); it accepts {accepted}") from err
    return cls(**kwargs)


def load_task_class(spec: str) -> type[Task]:
    """The Task subclass at `package.module:Class`; a one-line TaskError when there is none."""
    module_name, _, attr = spec.partition(":")
    if not USER_TASK.fullmatch(spec):
        raise TaskError(f"task.name={spec!r} is not an import path package.module:Class")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and err.name != module_name and not module_name.startswith(err.name + "."):
            raise TaskError(f"task.name={spec!r}: module {module_name!r} imports {err.name!r} ({raised_at(err, __file__)}), which is not installed; install it") from err
        raise TaskError(f"task.name={spec!r}: cannot import module {module_name!r} ({err}); install it or put its folder on PYTHONPATH") from err
    except Exception as err:
        message = err.msg if isinstance(err, SyntaxError) else f"{type(err).__name__}: {err}"
        raise TaskError(f"task.name={spec!r}: importing module {module_name!r} failed at {raised_at(err, __file__)}: {message}") from err
    if attr not in vars(module):
        raise TaskError(f"task.name={spec!r}: module {module_name!r} ({module.__file__}) has no attribute {attr!r}; check the name after the ':'")
    cls = vars(module)[attr]
    if not inspect.isclass(cls):
        raise TaskError(f"task.name={spec!r}: {attr} is a {type(cls).__name__}, not a class; name a subclass of policyflow.tasks.Task")
    if not issubclass(cls, Task):
        raise TaskError(f"task.name={spec!r}: class {attr} is not a subclass of policyflow.tasks.Task; subclass it (examples/my_task.py shows one)")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise TaskError(f"task.name={spec!r}: class {attr} does not implement {missing} (abstract in policyflow.tasks.Task); define them")
    return cls


def build_user_task(cls: type[Task], spec: str, options: Mapping[str, Any]) -> Task:
    """`cls(**options)`; a one-line TaskError naming the class when it does not take the options or raises."""
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as err:
        accepted = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
        raise TaskError(f"task.name={spec!r}: {cls.__name__} cannot be built with task.options {dict(options)!r} ({err}); it accepts {accepted}") from err
    try:
        return cls(**options)
    except Exception as err:  # the user's constructor: any failure becomes one line naming the class and where
        raise TaskError(f"task.name={spec!r}: {cls.__name__}(**task.options) raised {type(err).__name__} at {raised_at(err, __file__)}: {str(err).splitlines()[0] if str(err) else ''}") from err
