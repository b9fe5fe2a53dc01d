"""The episode runner: the loop between one `Env` and one `Generator` (DESIGN.md §6).

    runner = EpisodeRunner(generator, tokenizer, params, cfg.agent)
    group, reward_errors = await runner.run_group(builder, G, task_id="train-7")

The generator is anything that implements `engine.generator.Generator`: the local
`AsyncEngine` or a client of a remote OpenAI-compatible endpoint (`engine.remote`); the runner
uses only that protocol (`generate` and `version`, `max_positions`), so an episode, tools and
context policies included, runs the same against either.

For each turn: the context policy picks the segments the next call sees, the generator samples a
completion of exactly those tokens (`await generator.generate`, sharing the batch with every other
episode in flight), the env reacts to its text, and the observation is tokenized once and
appended as an `obs` segment (loss mask 0). Every call is recorded as a `Call` (its context's
segment indices and the segment it produced), which is what training reads
(`tokens.episode_rows`).

Limits. Only the episode's own limits truncate it: after `agent.max_turns` calls, or when a
call would have no room left under `agent.max_total_tokens` (context + completion; never more
than the model's position limit), the episode ends `truncated` with the reward its steps
earned. The per-turn limit `sampling.max_new_tokens` only cuts one action: the env judges the
cut text like any other (a malformed call gets an error observation and the episode goes on),
and an episode the env then finishes ends `complete`. Two cuts are episode limits and do
truncate an episode the env finishes on them: a completion cut short by `max_total_tokens`
(its room was below max_new_tokens), and, for envs whose one action is the whole episode
(`Env.cut_action_truncates`: single-turn tasks), a completion cut at max_new_tokens (DAPO's
truncated sample, left out of training by `train.mask_truncated`).
Every observation's content is cut to `agent.max_obs_tokens` tokens and then wrapped whole
(`tokens.render_observation`: the env's `observation_wrap` for plain models, the chat
template's tool-role markers for chat models), so the wrapper comes on top of the budget and a
cut never leaves an observation unterminated: one rule for every env and tool, and the one SFT
demonstrations use.

GRPO-ATS (Thyme, arXiv 2508.11630). Every call samples code, the text between `agent.code_open`
and `agent.code_close` (`<code>…</code>` by default), at `agent.code_temperature` and the rest at
`sampling.temperature` (`code_segment_policies`): the engine switches policy in the middle of a
completion and records each token's (`Sample.policies`), which the gen segment keeps and the
trainer recomputes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Sequence

from policyflow.agent.context import full_context
from policyflow.agent.env import ContextPolicy, Env, EnvGroupBuilder, StepResult
from policyflow.config import AgentConfig
from policyflow.engine.generator import Generator, SamplingParams
from policyflow.engine.segments import SegmentPolicy
from policyflow.tokens import render_observation, render_prompt
from policyflow.types import Call, Group, Segment, Trajectory


PROMPT_CACHE_SIZE = 4096  # distinct prompts an EpisodeRunner keeps tokenized


def code_segment_policies(agent: AgentConfig, params: SamplingParams) -> tuple[SegmentPolicy, ...]:
    """GRPO-ATS's per-segment temperature: code (between `agent.code_open` and `agent.code_close`)
    at `agent.code_temperature`, with `params`' top_p and top_k; () when it is off (None) or
    would change nothing.

    Greedy code (temperature 0, the paper's choice and the default) is left out of the loss:
    its tokens get loss mask 0, like observations, and stay in the row as context
    (`tokens.row_tokens`). Thyme samples code greedily because code must run: sampling noise in
    a variable name or a digit only breaks it, so exploration is left to the reasoning text.
    A greedy token is a deterministic function of its context: its behaviour probability is 1
    whatever the weights, so the objective E[R] has no score-function term for it (the argmax
    does not move under an infinitesimal change of the weights), and the exact policy gradient
    of GRPO-ATS runs through the sampled text tokens only. Training greedy tokens under a
    tempered surrogate (the T=1 log-softmax the engine records for them) would add a term that
    is not an estimate of that gradient: the importance ratio π_θ/π_behav would divide by a
    conventional number, not by the probability the token was drawn with, and the clip would
    bound nothing real. A run that wants RL to shape its code samples it instead
    (code_temperature > 0: those tokens are trained exactly, under their own temperature).
    """
    if agent.code_temperature is None:
        return ()
    rule = SegmentPolicy(agent.code_open, agent.code_close, agent.code_temperature, params.top_p, params.top_k)
    return () if rule.policy == params.policy else (rule,)


class EpisodeRunner:
    """Runs episodes on one generator with one tokenizer, sampling setting and set of limits."""

    def __init__(
        self, generator: Generator, tokenizer, params: SamplingParams, agent: AgentConfig, *,
        chat_template: bool = False, context: ContextPolicy = full_context,
    ) -> None:
        self.generator, self.tokenizer, self.params, self.agent = generator, tokenizer, params, agent
        self.chat_template, self.context = chat_template, context
        window = generator.max_positions or float("inf")  # the model's own limit, when it has one
        self.max_total_tokens = min(agent.max_total_tokens or window, window)
        self._prompt_ids: dict[tuple[str, str], tuple[int, ...]] = {}  # a group's G episodes share one prompt
        self.segment_policies = params.segment_policies + code_segment_policies(agent, params)  # the run's, GRPO-ATS code policies added

    def with_params(self, **changes) -> EpisodeRunner:
        """The same runner with some sampling settings changed (e.g. temperature=0 for greedy evaluation)."""
        return EpisodeRunner(self.generator, self.tokenizer, dataclasses.replace(self.params, **changes), self.agent, chat_template=self.chat_template, context=self.context)

    async def run_group(self, builder: EnvGroupBuilder, n: int, *, task_id: str, runners: Sequence[EpisodeRunner] | None = None) -> tuple[Group, int]:
        """The `n` episodes of `builder`'s problem, run at once; returns the group and its reward-error count.
        `runners`: episode j runs on `runners[j]` (evaluation: each on its own seeded generator); default this one."""
        envs = await builder.make_envs(n)
        runners = runners or [self] * n
        trajectories = list(await asyncio.gather(*(r.run(env, id=f"{task_id}/{j}", task_id=task_id) for j, (env, r) in enumerate(zip(envs, runners)))))
        errors = 0
        score = await builder.score_group(trajectories)
        if score is not None:
            errors = score.errors
            for t, reward, parts in zip(trajectories, score.rewards, score.parts):
                t.reward += reward
                t.reward_parts = _add_parts(t.reward_parts, parts)
        problem = builder.problem
        return Group(id=task_id, task_id=task_id, prompt=problem.prompt, answer=problem.answer, trajectories=trajectories), errors

    async def run(self, env: Env, *, id: str, task_id: str) -> Trajectory:
        """One episode of `env`, closed afterwards however it ended. An env whose episode makes its
        own calls has a `run_episode(runner, id=, task_id=)` that runs it on this runner's
        generator, sampling and limits (`program_env.ProgramEnv`: an external agent program)."""
        try:
            own = getattr(env, "run_episode", None)
            return await (own(self, id=id, task_id=task_id) if own is not None else self._run(env, id, task_id))
        finally:
            await env.close()

    async def _run(self, env: Env, id: str, task_id: str) -> Trajectory:
        prompt_text = await env.initial_observation()
        prompt_ids = self._render_prompt(prompt_text, env.tools)
        segments = [Segment("prompt", tuple(prompt_ids), text=prompt_text)]
        calls: list[Call] = []
        params = dataclasses.replace(self.params, stop=tuple(dict.fromkeys(self.params.stop + tuple(env.stop))), segment_policies=self.segment_policies)
        traj = Trajectory(id=id, task_id=task_id, segments=segments, calls=calls, num_turns=0, start_version=self.generator.version)
        status = "truncated"  # unless the env says done
        for turn in range(self.agent.max_turns):
            context = tuple(self.context(segments))
            prompt = [t for i in context for t in segments[i].token_ids]
            room = min(params.max_new_tokens, self.max_total_tokens - len(prompt))
            if room < 1:
                break
            sample = await self.generator.generate(prompt, dataclasses.replace(params, max_new_tokens=room))
            segments.append(Segment("gen", sample.token_ids, sample.logprobs, sample.versions, turn=turn, text=sample.text, policies=sample.policies))
            calls.append(Call(context=context, produced=len(segments) - 1))
            traj.finish_reason = sample.finish_reason
            result = await env.step(sample.text)
            self._record(traj, result)
            if result.done:
                cut = sample.finish_reason == "length" and (room < params.max_new_tokens or env.cut_action_truncates)
                status = "truncated" if cut else "complete"
                break
            if result.observation:
                ended = sample.token_ids[-1:] == (self.tokenizer.eos_token_id,)
                ids, text = render_observation(
                    self.tokenizer, result.observation, self.chat_template, self.agent.max_obs_tokens, wrap=env.observation_wrap, turn_ended=ended,
                )
                segments.append(Segment("obs", tuple(ids), turn=turn, text=text))
        traj.status = status
        traj.num_turns = len(calls)
        traj.completion_text = "".join(s.text for s in segments[1:])
        versions = [v for s in segments if s.versions for v in s.versions]
        traj.start_version = min(versions, default=traj.start_version)
        return traj

    def _render_prompt(self, text: str, tools: list[dict] | None) -> tuple[int, ...]:
        """`render_prompt`, remembered for the last `PROMPT_CACHE_SIZE` distinct (text, tools)."""
        key = (text, json.dumps(tools, sort_keys=True) if tools else "")
        ids = self._prompt_ids.get(key)
        if ids is None:
            if len(self._prompt_ids) >= PROMPT_CACHE_SIZE:
                self._prompt_ids.clear()
            ids = self._prompt_ids[key] = tuple(render_prompt(self.tokenizer, text, self.chat_template, tools=tools))
        return ids

    @staticmethod
    def _record(traj: Trajectory, result: StepResult) -> None:
        traj.reward += result.reward
        traj.reward_parts = _add_parts(traj.reward_parts, result.reward_parts)
        traj.tools.add(result.tools)
        traj.step_info.append(dict(result.info))


def _add_parts(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in a | b}
