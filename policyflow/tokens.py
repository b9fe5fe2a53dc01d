"""Rendering (prompts, observations) and collation of episodes into padded training rows.

History is never re-tokenized (DESIGN.md §3): an episode is a list of segments (prompt, gen,
obs) holding token ids; each engine call is a `Call` naming the segments that formed its exact
context. `episode_rows` turns the calls into training rows — consecutive calls whose context
extends the previous call's context plus its output share one row; a call whose context does
not (MEM1 pruning) starts a new row — and `collate` pads the rows of many episodes into a
`TrainBatch`. In a row, only the tokens produced by the row's own calls have loss mask 1.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from policyflow.types import Segment, TokenPolicy, TrainBatch, Trajectory

if TYPE_CHECKING:
    from policyflow.problems import Problem
    from policyflow.tasks.base import Task


def _chat_ids(tokenizer, messages: list[dict], *, generation_prompt: bool, tools: list[dict] | None = None) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("model.chat_template=true but the tokenizer has no chat template; set model.chat_template=false")
    ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


CUT_MARGIN_TOKENS = 32  # tokens a cut prefix holds beyond the kept ones (at least): ample for the word a cut falls in


def _plain_ids(tokenizer, text: str) -> list[int]:
    """Token ids of `text` on its own, without special tokens (empty for "")."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def render_messages(tokenizer, messages: list[dict], chat_template: bool, tools: list[dict] | None = None) -> list[int]:
    """Token ids of a whole chat (system, user, assistant and tool messages) ready for the model's
    reply: with `chat_template`, the tokenizer's template with `tools=` (when given) and the
    generation prompt.

    Plain models (no template) have no roles: they take any system messages followed by one user
    message, rendered as their contents joined by a blank line ("\n\n"), without special
    tokens; `tools` is ignored (tag-format tools describe themselves in the prompt text). A chat
    with assistant or tool messages, or several user messages, is refused: it needs a template.
    """
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"every message needs a 'role' string, got {m!r}")
    if chat_template:
        return _chat_ids(tokenizer, messages, generation_prompt=True, tools=tools)
    roles = [m["role"] for m in messages]
    if not roles or roles[-1] != "user" or any(r != "system" for r in roles[:-1]):
        raise ValueError(f"a model without a chat template takes system messages then one user message, got roles {roles}; use a chat model with model.chat_template=true")
    if any(not isinstance(m.get("content"), str) for m in messages):
        raise ValueError("a model without a chat template takes text message contents (strings) only")
    return _plain_ids(tokenizer, "\n\n".join(m["content"] for m in messages))


def render_prompt(tokenizer, text: str, chat_template: bool, tools: list[dict] | None = None) -> list[int]:
    """Token ids of the prompt: `render_messages` of one user message `text`. The one prompt
    renderer: the episode runner renders its env's `initial_observation()` and `tools` with it,
    SFT and prompt fitting a task's problem (`task_prompt_ids`)."""
    return render_messages(tokenizer, [{"role": "user", "content": text}], chat_template, tools=tools)


def task_prompt_ids(tokenizer, task: Task, problem: Problem, chat_template: bool) -> list[int]:
    """The prompt ids of `problem` as RL samples from them: `task.render_prompt(problem)` with the
    task's `prompt_tools()` as the chat template's `tools=` (the text and tools a task's envs
    hand the episode runner). SFT rows (`rollout.encode_prompts`) and prompt fitting
    (`session.prompt_fit`) render with this, so all three see the same tokens."""
    return render_prompt(tokenizer, task.render_prompt(problem), chat_template, tools=task.prompt_tools())


def cut_observation(tokenizer, text: str, max_tokens: int | None) -> tuple[list[int], str]:
    """The first `max_tokens` token ids of `text` (all of them when None) and the text they decode to.

    The work is bounded by `max_tokens`, not by the text (a tool may return megabytes): only a
    prefix of the text is tokenized. It must yield `need` = `max_tokens` + a margin of
    max(`max_tokens`, `CUT_MARGIN_TOKENS`) tokens, so it starts at `need` × the longest
    vocabulary piece in characters (no token covers more, unless the tokenizer drops characters
    before splitting) and doubles while it yields fewer (the whole text at most). The ids are
    then the first `max_tokens` of the whole text's ids whenever cutting a text changes only its
    last `margin` tokens, which holds for pre-tokenized BPE, WordPiece and SentencePiece (only
    the tokens of the word the cut falls in change). A typical token is much shorter than the
    longest piece, so the prefix nearly always holds far more than `need` tokens.

    A character that is not text (a lone surrogate, say from a tool echoing model-written JSON)
    is shown as "?": tokenizers refuse such strings.
    """
    if max_tokens is None:
        text = _unicode_text(text)
        return _plain_ids(tokenizer, text), text
    need = max_tokens + max(max_tokens, CUT_MARGIN_TOKENS)
    longest = _longest_piece(tokenizer)
    budget = need * longest if longest else len(text)
    while budget < len(text):
        ids = _plain_ids(tokenizer, _unicode_text(text[:budget]))
        if len(ids) >= need:
            return ids[:max_tokens], tokenizer.decode(ids[:max_tokens])
        budget *= 2
    text = _unicode_text(text)
    ids = _plain_ids(tokenizer, text)
    if len(ids) > max_tokens:
        ids = ids[:max_tokens]
        text = tokenizer.decode(ids)
    return ids, text


def _unicode_text(text: str) -> str:
    """`text` with every character UTF-8 cannot encode (lone surrogates) replaced by "?"."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


_LONGEST_PIECE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (vocabulary size, longest piece)


def _longest_piece(tokenizer) -> int | None:
    """Characters in the tokenizer's longest vocabulary piece, added tokens included (None when
    the tokenizer lists no vocabulary): no token covers more characters of a text than that,
    unless the tokenizer drops characters before it splits. Remembered per tokenizer."""
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    try:
        known = _LONGEST_PIECE.get(tokenizer)
    except TypeError:  # not weakly referable or not hashable: compute every time
        known = None
    if known is not None and known[0] == size:
        return known[1]
    vocab = getattr(tokenizer, "get_vocab", None)
    longest = max(map(len, vocab()), default=0) if callable(vocab) else 0
    try:
        _LONGEST_PIECE[tokenizer] = (size, longest or None)
    except TypeError:
        pass
    return longest or None


def render_observation(
    tokenizer, texts: str | Sequence[str], chat_template: bool, max_tokens: int | None = None, *,
    wrap: tuple[str, str] = ("", ""), turn_ended: bool = True,
) -> tuple[list[int], str]:
    """Token ids (and the text shown) of an observation appended after the model's turn.

    `texts` is one observation, or one per call of a turn that made several. Only the content
    is cut: each text is cut on its own to its first `max_tokens` tokens (`cut_observation`;
    `agent.max_obs_tokens`), and the text around it is added on top, whole, so a cut never
    leaves an observation unterminated. Plain models get, per text, the ids of `wrap[0]`, the
    kept content ids and the ids of `wrap[1]` (each tokenized on its own; `wrap` is the env's
    `observation_wrap`, e.g. `("<info>", "</info>")`), several joined by a newline: at most
    `max_tokens` content tokens plus the wrapper per text. Chat models ignore `wrap` and get
    what the template puts between the end of an assistant turn and the next assistant turn
    when that many tool messages come in: the separator after the assistant's end token, the
    tool-role message(s) (Qwen's template, for one, puts consecutive tool messages in one
    block, each in its own `<tool_response>`), and the generation prompt (read off the
    template by rendering a conversation with and without them). When the model's turn stopped
    on a stop string (`turn_ended` False), the template's end token comes first. The text
    returned is the kept texts (wrapped, for plain models) joined by newlines.
    """
    kept = [cut_observation(tokenizer, text, max_tokens) for text in ([texts] if isinstance(texts, str) else texts)]
    if not chat_template:
        prefix, suffix, newline = _plain_ids(tokenizer, wrap[0]), _plain_ids(tokenizer, wrap[1]), _plain_ids(tokenizer, "\n")
        ids = [t for k, (content, _) in enumerate(kept) for t in (newline if k else []) + prefix + content + suffix]
        return ids, "\n".join(wrap[0] + piece + wrap[1] for _, piece in kept)
    text = "\n".join(piece for _, piece in kept)
    turns = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "!"}]
    before = _chat_ids(tokenizer, turns, generation_prompt=False)
    after = _chat_ids(tokenizer, turns + [{"role": "tool", "content": piece} for _, piece in kept], generation_prompt=True)
    ends = [i for i, t in enumerate(before) if t == tokenizer.eos_token_id]
    cut = ends[-1] + 1 if ends else len(before)  # the model's turn ends with its end token: what follows is the template's
    if after[:cut] != before[:cut]:
        raise ValueError("the chat template renders earlier turns differently once a tool message follows; observations cannot be appended as tokens with this template")
    return after[cut - (0 if turn_ended or not ends else 1):], text


Row = tuple[list[int], list[int], list[float], list[int]]  # token ids, loss mask, behaviour log-probs, versions


def row_tokens(segments: Sequence[Segment], indices: Sequence[int] | None = None, trained: set[int] | None = None) -> Row:
    """Flatten the segments at `indices` (None: all) into one row.

    Tokens of the gen segments in `trained` (None: every gen segment) get loss mask 1 with their
    behaviour log-probs and versions; all other tokens get 0 / 0.0 / -1. A gen token drawn
    greedily (its `TokenPolicy` has temperature 0: GRPO-ATS's code, `agent.code_temperature`)
    keeps its log-prob and version but gets loss mask 0, like an observation: its behaviour
    probability is 1 whatever the weights, so it has no policy-gradient term (see
    `agent.episode.code_segment_policies`). It stays in the row as context.
    """
    ids: list[int] = []
    mask: list[int] = []
    logprobs: list[float] = []
    versions: list[int] = []
    for i in range(len(segments)) if indices is None else indices:
        seg, n = segments[i], len(segments[i].token_ids)
        ids += seg.token_ids
        if seg.trainable and (trained is None or i in trained):
            mask += [1] * n if seg.policies is None else [int(p.temperature > 0) for p in seg.policies]
            logprobs += seg.logprobs
            versions += seg.versions
        else:
            mask += [0] * n
            logprobs += [0.0] * n
            versions += [-1] * n
    return ids, mask, logprobs, versions


def row_policies(segments: Sequence[Segment], indices: Sequence[int] | None = None) -> list[TokenPolicy] | None:
    """The sampling policy of every token of the row `row_tokens` makes of the same segments:
    each gen token's recorded one, `NO_POLICY` elsewhere; None when no gen segment records one."""
    chosen = [segments[i] for i in (range(len(segments)) if indices is None else indices)]
    if all(seg.policies is None for seg in chosen):
        return None
    if any(seg.kind == "gen" and seg.policies is None for seg in chosen):
        raise ValueError("an episode mixes generated segments with and without per-token policies; every engine records them (Sample.policies)")
    return [p for seg in chosen for p in (seg.policies if seg.kind == "gen" else (NO_POLICY,) * len(seg.token_ids))]


NO_POLICY = TokenPolicy(1.0, 1.0, 0)  # the policy recorded for prompt, observation and padding positions (never read)


def _row_segments(trajectory: Trajectory) -> list[tuple[list[int] | None, set[int] | None]]:
    """(segment indices, produced segments) of each training row of `trajectory` (see `episode_rows`)."""
    if not trajectory.calls:
        return [(None, None)]
    groups: list[tuple[list[int], set[int]]] = []  # (segment indices of the row, produced segments)
    for call in trajectory.calls:
        context = list(call.context)
        if groups and context[: len(groups[-1][0])] == groups[-1][0]:
            groups[-1] = (context + [call.produced], groups[-1][1] | {call.produced})
        else:
            groups.append((context + [call.produced], {call.produced}))
    return groups


def episode_rows(trajectory: Trajectory) -> list[Row]:
    """The training rows of one episode, each as (token ids, loss mask, behaviour log-probs, versions).

    A row is the context of a run of calls plus what they produced: call k+1 joins call k's row
    when its context starts with call k's context followed by call k's output (the prefix
    extension of a `full` context); otherwise it starts a new row (MEM1 pruning, summaries), in
    which earlier outputs are context only (mask 0): every generated token is trained exactly
    once, in the row whose tokens are exactly what the model saw when it produced it.
    A trajectory without calls is one row of all its segments.
    """
    return [row_tokens(trajectory.segments, indices, trained) for indices, trained in _row_segments(trajectory)]


def collate(
    trajectories: Sequence[Trajectory],
    advantages_B: torch.Tensor,
    pad_id: int,
) -> TrainBatch:
    """Right-pad the rows of every episode into a TrainBatch (one row per `episode_rows` entry).

    `advantages_B` is per episode; every row of episode b gets its advantage. Each token's
    sampling policy goes into `temperature_BT`, `top_p_BT`, `top_k_BT` (`NO_POLICY` off the
    generated tokens); they are None when no episode records policies.
    """
    rows, policies, episode_of = [], [], []
    for b, t in enumerate(trajectories):
        for indices, trained in _row_segments(t):
            rows.append(row_tokens(t.segments, indices, trained))
            policies.append(row_policies(t.segments, indices))
            episode_of.append(b)
    episode_index_B = torch.tensor(episode_of, dtype=torch.long)
    T = max(len(r[0]) for r in rows)

    def padded(column: int, fill: int | float, dtype: torch.dtype) -> torch.Tensor:
        """One [B, T] tensor from column `column` of every row, right-padded with `fill`."""
        return torch.tensor([list(r[column]) + [fill] * (T - len(r[column])) for r in rows], dtype=dtype)

    per_token: dict[str, torch.Tensor] = {}
    if any(p is not None for p in policies):
        # a row that trains nothing (e.g. an episode that ended before its first turn) reads no policy
        policies = [p if p is not None or any(row[1]) else [NO_POLICY] * len(row[0]) for p, row in zip(policies, rows)]
        if any(p is None for p in policies):
            raise ValueError("a batch mixes episodes with and without per-token policies; every engine records them (Sample.policies)")
        per_token = _policy_tensors(policies, T)
    lengths_B = torch.tensor([len(r[0]) for r in rows])
    return TrainBatch(
        input_ids_BT=padded(0, pad_id, torch.long),
        attention_mask_BT=(torch.arange(T)[None, :] < lengths_B[:, None]).long(),
        loss_mask_BT=padded(1, 0, torch.float32),
        behav_logprobs_BT=padded(2, 0.0, torch.float32),
        advantages_B=advantages_B.to(torch.float32)[episode_index_B],
        **per_token,
    )


def _policy_tensors(rows: list[list[TokenPolicy]], T: int) -> dict[str, torch.Tensor]:
    """`temperature_BT`, `top_p_BT`, `top_k_BT` of right-padded rows of policies (`NO_POLICY` padding).

    Each distinct policy object gets a code (an engine shares one object along a stretch of
    tokens, so there are few) and the [B, T] codes index a small table."""
    codes: dict[int, int] = {id(NO_POLICY): 0}
    table = [NO_POLICY]
    for row in rows:
        for p in row:
            if id(p) not in codes:
                codes[id(p)] = len(table)
                table.append(p)
    index_BT = torch.tensor([[codes[id(p)] for p in row] + [0] * (T - len(row)) for row in rows], dtype=torch.long)
    values = torch.tensor(table, dtype=torch.float64)[index_BT]  # [B, T, 3]
    return {"temperature_BT": values[..., 0].float(), "top_p_BT": values[..., 1].float(), "top_k_BT": values[..., 2].long()}


def sft_batch(prompts: Sequence[list[int]], completions: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded (input_ids, attention_mask, loss_mask) with the loss on completion tokens only."""
    B = len(prompts)
    T = max(len(p) + len(c) for p, c in zip(prompts, completions))
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.float32)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[b, : len(p) + len(c)] = torch.tensor(p + c)
        attention[b, : len(p) + len(c)] = 1
        loss_mask[b, len(p) : len(p) + len(c)] = 1.0
    return input_ids, attention, loss_mask
