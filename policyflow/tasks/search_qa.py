"""Questions about made-up places that only a search can answer (the CPU search-agent demo).

Each of `num_entities` places gets a random name, a random capital (another made-up name) and
a random population in [10, max_value]. The corpus has one short passage per place::

    {"id": "e17", "title": "Zesok", "text": "capital Gevon, pop 48"}

and is written, offline and deterministically from the seed, as JSONL (`corpus_path`, a file named by
a digest of its content).
Questions are short, for a char-level model with 256 positions:

* one lookup: `capital of Zesok?` -> `Gevon`, `pop of Zesok?` -> `48`;
* two lookups (`two_hop_fraction` of them): `pop of Zesok + Kuvi?` -> `125`, the sum of
  two populations, so the first value must be kept (in the context, or in MEM1's `<state>`)
  while the second is looked up.

Held-out questions ask only about held-out places (a disjoint set), so a model that answers
them has learnt to search, not memorised facts. Answers are checked exactly (names ignoring
case and surrounding space, numbers as integers).

Episodes are the generic tool env (`agent/tool_env.py`) configured with the search tool, this
task's answer check and MMSearch-R1's reward parts (`tool_penalty`: `search_penalty`,
`format_bonus`: `format`), in the tag or the Hermes format (`tool_format`), with warm-start
demonstrations written in that format (`sft_turns`).

With `code_tool` (issue 18 §4, two tools in one episode) the episodes also have the sandboxed code
tool (`tools/python_tool.py`, settings as the multiply task's `task.code.*`): two-lookup
demonstrations search A, search B, run `<code>print(48+77)</code>` with the two populations
copied, and answer with the printed sum (its output is wrapped in `<info>…</info>` as a search
result is). The search penalty still counts searches only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from policyflow.agent.parse import TOOL_FORMATS
from policyflow.agent.tool_env import RewardPart, ToolGroupBuilder, ToolSetup, format_bonus, tool_penalty
from policyflow.tasks.base import Problem, Score, Task, TaskError, check_batch, same_integer, sample_distinct, seeded_rng, tagged_answer
from policyflow.tools.base import ToolPool
from policyflow.tools.code import SandboxUnavailable
from policyflow.tools.python_tool import CODE_TOOL_NAMES, CodeSettings, check_sandbox, code_tool
from policyflow.tools.search import Passage, SearchIndex, format_passages, search_tool

_ONSETS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_CODAS = ("", "", "k", "l", "m", "n", "r", "s")
# Every name `_name` can draw; a corpus (two names a place) may use at most half of them, so that
# drawing its names stays quick and the warm-start's places of their own always find fresh names.
NAME_SPACE = (len(_ONSETS) * len(_VOWELS)) ** 2 * len(set(_CODAS))
MAX_ENTITIES = NAME_SPACE // 4
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchSettings:
    """How search episodes run and are rewarded (`SearchQATask.tool_setup`)."""

    tool_format: str = "tags"  # 'tags' (<search>, <answer>) or 'hermes' (<tool_call> JSON)
    penalty: float = 0.1  # β: a correct answer reached with search earns 1 − β
    format_weight: float = 0.1  # γ: added when every turn of the episode was well formed


@dataclass(frozen=True)
class Entity:
    id: str
    name: str
    capital: str
    pop: int

    def passage(self) -> dict[str, str]:
        return {"id": self.id, "title": self.name, "text": f"capital {self.capital}, pop {self.pop}"}


def _name(rng: random.Random) -> str:
    """Two open syllables and an optional final consonant (`Kosel`, `Dupa`): short to copy."""
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(2)).capitalize() + rng.choice(_CODAS)


def make_entities(seed: int, count: int, max_value: int) -> list[Entity]:
    """`count` places with distinct names (no capital shares a place's or another capital's name)."""
    rng = seeded_rng(seed, "search_qa", "entities")
    used: set[str] = set()
    names: list[str] = []
    for _ in range(1000 * count):
        if len(names) == 2 * count:
            break
        name = _name(rng)
        if name not in used:
            used.add(name)
            names.append(name)
    if len(names) < 2 * count:
        raise TaskError(f"could not draw {2 * count} distinct names; lower task.search.num_entities")
    return [Entity(f"e{i}", names[2 * i], names[2 * i + 1], rng.randint(10, max_value)) for i in range(count)]


def _write_corpus(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a uniquely named temporary file and one rename: readers see all of it or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class SearchQATask(Task):
    """One- and two-lookup questions over a synthetic corpus; see the module docstring."""

    name = "search_qa"

    def __init__(
        self,
        seed: int = 0,
        num_entities: int = 200,
        num_eval_entities: int = 40,
        num_eval: int = 100,
        two_hop_fraction: float = 0.5,
        max_value: int = 99,
        corpus_dir: str | Path = "runs/cache/search_qa",
        tool_format: str = "tags",
        top_k: int = 1,
        demo_search_fraction: float = 1.0,
        search_penalty: float = 0.1,
        format_weight: float = 0.1,
        search_latency_s: float = 0.0,
        tool_timeout_s: float = 10.0,
        tool_concurrency: int = 16,
        code_tool: bool = False,
        code: dict | None = None,
    ):
        if not 2 <= num_eval_entities < num_entities:
            raise TaskError(f"search_qa needs 2 <= num_eval_entities < num_entities, got task.search.num_eval_entities={num_eval_entities} and task.search.num_entities={num_entities}")
        if num_entities > MAX_ENTITIES:
            raise TaskError(f"task.search.num_entities={num_entities} is more places than search_qa can name: at most {MAX_ENTITIES} (two names each, half of the {NAME_SPACE} names it draws from); lower task.search.num_entities")
        questions = 2 * num_eval_entities * (two_hop_fraction < 1) + num_eval_entities * (num_eval_entities - 1) * (two_hop_fraction > 0)
        if num_eval > questions:
            raise TaskError(f"task.num_eval={num_eval} is more than the {questions} distinct held-out questions task.search.num_eval_entities={num_eval_entities} places give (task.search.two_hop_fraction={two_hop_fraction}); lower task.num_eval or raise task.search.num_eval_entities")
        if not 0.0 <= two_hop_fraction <= 1.0:
            raise TaskError(f"search_qa needs 0 <= two_hop_fraction <= 1, got {two_hop_fraction}")
        if max_value < 10:
            raise TaskError(f"search_qa needs max_value >= 10, got {max_value}")
        if not 0.0 <= demo_search_fraction <= 1.0:
            raise TaskError(f"search_qa needs 0 <= demo_search_fraction <= 1, got {demo_search_fraction}")
        self.seed, self.two_hop_fraction, self.max_value = seed, two_hop_fraction, max_value
        self.demo_search_fraction = demo_search_fraction
        self.entities = make_entities(seed, num_entities, max_value)
        self.corpus_names = {n for e in self.entities for n in (e.name, e.capital)}
        self.eval_entities = self.entities[:num_eval_entities]
        self.train_entities = self.entities[num_eval_entities:]
        self.corpus_dir = Path(corpus_dir)
        self.search_args = dict(k=top_k, latency_s=search_latency_s)
        self.pool_args = dict(max_concurrency=tool_concurrency, timeout_s=tool_timeout_s)
        if tool_format not in TOOL_FORMATS:
            raise TaskError(f"search_qa: unknown tool_format {tool_format!r}; choose one of {list(TOOL_FORMATS)}")
        # code_tool: the sandboxed code tool as well; `code` holds its CodeSettings fields and
        # `concurrency` (task.code.*: timeout_s, memory_mb, packages, isolation, concurrency).
        self.code_tool = code_tool
        code = dict(code or {})
        self.code_concurrency = int(code.pop("concurrency", 16))
        self.code_settings = CodeSettings(**{k: tuple(v) if k == "packages" else v for k, v in code.items()})
        self.code_name = CODE_TOOL_NAMES[tool_format] if tool_format in CODE_TOOL_NAMES else "code"
        tags = ("</search>", f"</{self.code_name}>", "</answer>") if code_tool else ("</search>", "</answer>")
        self.stop = tags if tool_format == "tags" else ()  # hermes: a turn (several calls) ends at EOS
        self.observation_wrap = ("<info>", "</info>") if tool_format == "tags" else ("", "")  # hermes: the chat template's markers
        self.settings = SearchSettings(tool_format=tool_format, penalty=search_penalty, format_weight=format_weight)
        try:
            self.reward_parts()
        except ValueError as err:
            raise TaskError(f"search_qa: {err}") from None
        self._setup: ToolSetup | None = None  # built on first use, in the process that runs episodes
        draw = lambda rng: self._question(rng, self.eval_entities, "")  # noqa: E731
        questions = sample_distinct(draw, lambda p: p.prompt, num_eval, seeded_rng(seed, "search_qa", "eval"), "questions")
        self._eval = tuple(dataclasses.replace(p, id=f"search_qa:eval:{j}") for j, p in enumerate(questions))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_setup": None}  # a tool pool belongs to one process

    def _question(self, rng: random.Random, pool: Sequence[Entity], problem_id: str) -> Problem:
        if rng.random() < self.two_hop_fraction:
            a, b = rng.sample(list(pool), 2)
            return Problem(problem_id, f"pop of {a.name} + {b.name}?", str(a.pop + b.pop), {"hops": 2, "entities": (a.id, b.id)})
        e = rng.choice(pool)
        if rng.random() < 0.5:
            return Problem(problem_id, f"capital of {e.name}?", e.capital, {"hops": 1, "entities": (e.id,)})
        return Problem(problem_id, f"pop of {e.name}?", str(e.pop), {"hops": 1, "entities": (e.id,)})

    def sft_problem(self, index: int) -> Problem:
        """A warm-start question about two made-up places of its own, in no corpus (their facts
        ride in `columns["places"]`, for `sft_turns`).

        A safeguard against memorising: demonstrations about corpus places let a model lower
        its loss by learning their facts instead of copying them from the search result (with a
        200-place corpus it did); a place seen in one demonstration only cannot be memorised."""
        rng = seeded_rng(self.seed, "search_qa", "demo_places", index)
        places: list[Entity] = []
        for _ in range(1000):
            place = Entity(f"demo{len(places)}", _name(rng), _name(rng), rng.randint(10, self.max_value))
            if place.name != place.capital and not {place.name, place.capital} & self.corpus_names:
                places.append(place)
                if len(places) == 2:
                    break
        else:
            raise TaskError(f"search_qa: the corpus uses nearly every possible name; lower task.search.num_entities ({len(self.entities)})")
        problem = self._question(rng, places, f"search_qa:demo:{index}")
        by_id = {p.id: p for p in places}
        return dataclasses.replace(problem, columns={**problem.columns, "places": tuple(by_id[i] for i in problem.columns["entities"])})

    def train_problem(self, index: int) -> Problem:
        """Deterministic in (seed, index); asks only about training places."""
        if index < 0:
            raise IndexError(f"train_problem index must be >= 0, got {index}")
        return self._question(seeded_rng(self.seed, "search_qa", "train", index), self.train_entities, f"search_qa:train:{index}")

    def eval_problems(self) -> Sequence[Problem]:
        return self._eval

    def corpus_path(self) -> Path:
        """The JSONL corpus, written on first use (atomically, so processes may race) and checked on every use.

        Its name holds a digest of its content, so a cache written by other settings or by an
        older version of this task (another passage format) is never read in its place. The
        content is known here, so it is the check: a file under that name that does not hold
        exactly those bytes (cut short, even to valid JSONL; edited; damaged) is rewritten with
        one warning line, never used."""
        data = "".join(json.dumps(e.passage()) + "\n" for e in self.entities).encode()
        path = self.corpus_dir / f"search_qa_{hashlib.sha256(data).hexdigest()[:16]}.jsonl"
        if not path.exists():
            _write_corpus(path, data)
            return path
        try:
            found = path.read_bytes()
            if found == data:
                return path
            why = f"{len(found)} bytes, expected {len(data)}" if len(found) != len(data) else "its bytes differ from the corpus"
        except OSError as err:
            why = f"unreadable: {err.strerror or type(err).__name__}"
        log.warning("search_qa corpus cache %s is damaged (%s); rewriting it", path, why)
        _write_corpus(path, data)
        return path

    def eval_split(self, problem: Problem) -> str:
        return "one_lookup" if problem.columns["hops"] == 1 else "two_lookups"

    def render_prompt(self, problem: Problem) -> str:
        return f"Q: {problem.prompt}\n"

    def extract_answer(self, completion: str) -> str | None:
        """The content of the last `<answer>…</answer>`, stripped, or None."""
        return tagged_answer(completion)

    def is_correct(self, problem: Problem, answer: str | None) -> bool:
        """Numbers compare as integers (ASCII digits, leading zeros ignored: compared as text, so
        no answer the model writes is too long to convert), names ignoring case and surrounding space."""
        if answer is None:
            return False
        if problem.answer.isdigit():
            return same_integer(answer, problem.answer)
        return answer.strip().lower() == problem.answer.lower()

    def trivial_problems(self) -> Sequence[Problem]:
        """One-lookup questions (one search, then copy the fact) about the first ten held-out
        places, capital and population in turn: the least an episode can do."""
        problems = []
        for j, e in enumerate(self.eval_entities[:10]):
            prompt, answer = (f"capital of {e.name}?", e.capital) if j % 2 == 0 else (f"pop of {e.name}?", str(e.pop))
            problems.append(Problem(f"search_qa:trivial:{j}", prompt, answer, {"hops": 1, "entities": (e.id,)}))
        return tuple(problems)

    def score(self, problems: Sequence[Problem], completions: Sequence[str]) -> Score:
        """1.0 for a correct `<answer>` in the completion (the multi-turn env adds the search penalty)."""
        check_batch(problems, completions)
        correct = [self.is_correct(p, self.extract_answer(c)) for p, c in zip(problems, completions)]
        return Score(rewards=[float(ok) for ok in correct], correct=correct)

    def entity(self, entity_id: str) -> Entity:
        return self.entities[int(entity_id[1:])]

    def places(self, problem: Problem) -> tuple[Entity, ...]:
        """The places `problem` asks about, in order: its own (`sft_problem`) or corpus places."""
        return problem.columns.get("places") or tuple(self.entity(i) for i in problem.columns["entities"])

    def reward_parts(self) -> tuple[RewardPart, ...]:
        """MMSearch-R1's reward beyond `correct` (`rewards.search_penalty_reward`): 1 − β for a
        correct answer reached with search (`search_penalty` = −β), + γ when every turn was well
        formed (`format` = γ)."""
        if self.code_tool:  # β charges searches only, never code runs
            return (tool_penalty(self.settings.penalty, tools=("search",)), format_bonus(self.settings.format_weight))
        return (tool_penalty(self.settings.penalty), format_bonus(self.settings.format_weight))

    def tool_setup(self) -> ToolSetup:
        """The process's search tool (index built or loaded once), with `code_tool` the code tool too
        (the sandbox probed once: a machine that cannot build it stops here, in one line), format,
        answer check and reward parts. Both tools share one pool: its concurrency is the larger of
        task.search.tool_concurrency and task.code.concurrency."""
        if self._setup is None:
            index = SearchIndex(self.corpus_path(), self.corpus_dir / "bm25")
            tools = [search_tool(index, **self.search_args)]
            pool_args = dict(self.pool_args)
            if self.code_tool:
                try:
                    check_sandbox(self.code_settings)
                except SandboxUnavailable as err:
                    raise TaskError(f"search_qa: {str(err).splitlines()[0]}") from None
                tools.append(code_tool(self.code_settings, name=self.code_name))
                # one pool limit for both tools: the sandbox enforces timeout_s itself
                pool_args = dict(max_concurrency=max(pool_args["max_concurrency"], self.code_concurrency),
                                 timeout_s=max(pool_args["timeout_s"], self.code_settings.timeout_s + 10.0))
            pool = ToolPool(tools, **pool_args)
            self._setup = ToolSetup(pool, self.settings.tool_format, self.is_correct, self.reward_parts(), self.observation_wrap)
        return self._setup

    def tool_pool(self) -> ToolPool:
        """The process's search tool pool over this task's corpus."""
        return self.tool_setup().pool

    def prompt_tools(self) -> list[dict] | None:
        """The search tool's schema in the Hermes format (built with the pool); none with tags."""
        return self.tool_setup().prompt_tools if self.settings.tool_format == "hermes" else None

    def group_builder(self, problem: Problem) -> ToolGroupBuilder:
        """Multi-turn search episodes (`agent.tool_env.ToolEnv`) for `problem`."""
        return ToolGroupBuilder(problem, self.render_prompt(problem), self.tool_setup())

    def sft_turns(self, problem: Problem) -> list[tuple[str, str]]:
        """A demonstration in the task's tool format as (kind, text) turns, kind 'gen' or 'obs',
        for the SFT warm-start: search each place, keep the first population in `<state>`,
        answer. A share 1 − `demo_search_fraction` of problems (drawn from the problem's id) is
        answered at once instead, with no search (for `sft_problem`'s places of their own, a
        guess: the warm-start learns to answer at once sometimes, and RL that it does not pay).

        Tags: `<search>Zesok</search>` (the turn ends on the stop string). Hermes:
        `<tool_call>{"name": "search", "arguments": {"query": "Zesok"}}</tool_call>` (the turn
        ends with the end-of-turn token, `sft.demonstration_rows`; chat models see each result
        as a tool message). Each observation is the env's text for a search that finds the place
        (its passage, as the tool formats it, unwrapped); `sft.demonstration_rows` cuts it to
        agent.max_obs_tokens and wraps it exactly as the episode runner does the env's."""
        def lookup(e: Entity) -> list[tuple[str, str]]:
            return [("obs", format_passages([Passage(**e.passage())]))]

        def search(e: Entity) -> str:
            if self.settings.tool_format == "hermes":
                return f"<tool_call>{json.dumps({'name': 'search', 'arguments': {'query': e.name}})}</tool_call>"
            return f"<search>{e.name}</search>"

        if seeded_rng(self.seed, "search_qa", "demo", problem.id).random() >= self.demo_search_fraction:
            return [("gen", f"<answer>{problem.answer}</answer>")]
        first, *second = self.places(problem)
        turns = [("gen", search(first)), *lookup(first)]
        for place in second:  # a two-lookup question
            turns += [("gen", f"<state>{first.pop}</state>{search(place)}"), *lookup(place)]
        if second and self.code_tool:  # add the two copied populations in code, copy the printed sum
            source = f"print({first.pop}+{second[0].pop})"
            call = (f"<{self.code_name}>{source}</{self.code_name}>" if self.settings.tool_format == "tags"
                    else f"<tool_call>{json.dumps({'name': self.code_name, 'arguments': {'code': source}})}</tool_call>")
            turns += [("gen", call), ("obs", problem.answer)]
        return turns + [("gen", f"<answer>{problem.answer}</answer>")]
