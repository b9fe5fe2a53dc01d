"""Context policies: which of an episode's segments the next engine call sees (`agent.context`).

A policy is a pure function of the segments so far (prompt, gen, obs, ... in order) that
returns the indices, in order, forming the next call's exact context (`env.ContextPolicy`).

* `full`: everything; every call's context extends the previous one, so an episode is one
  training row and its context grows with every turn.
* `mem1` (MEM1, arXiv 2506.15841): the task prompt, the latest generated turn and what came
  after it (the latest observation). The model is asked to write its internal state,
  `<state>…</state>`, in every turn before its action, so the latest gen segment carries the
  latest state and the query that produced the latest observation; older turns are dropped.
  The context stays about one turn long however many turns pass, and each call is its own
  training row (its context is not an extension of the previous call's).

The "task prompt" is every segment before the first generated one (the rendered prompt, and
any observation the env showed before the model's first turn).
"""

from __future__ import annotations

from collections.abc import Sequence

from policyflow.types import Segment


def full_context(segments: Sequence[Segment]) -> tuple[int, ...]:
    """All segments so far."""
    return tuple(range(len(segments)))


def mem1_context(segments: Sequence[Segment]) -> tuple[int, ...]:
    """The prompt segments, the latest gen segment, and every segment after it."""
    gens = [i for i, s in enumerate(segments) if s.kind == "gen"]
    if not gens:
        return full_context(segments)
    head = tuple(range(gens[0]))
    return head + tuple(range(gens[-1], len(segments)))


CONTEXT_POLICIES = {"full": full_context, "mem1": mem1_context}


def context_policy(name: str):
    """The policy registered as `name` (`agent.context`)."""
    if name not in CONTEXT_POLICIES:
        raise ValueError(f"unknown context policy {name!r}; choose one of {sorted(CONTEXT_POLICIES)}")
    return CONTEXT_POLICIES[name]


def context_tokens(segments: Sequence[Segment], indices: Sequence[int]) -> int:
    """How many tokens the context `indices` holds."""
    return sum(len(segments[i].token_ids) for i in indices)
