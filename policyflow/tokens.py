"""Prompt rendering and collation of trajectories into padded training tensors with loss masks.

History is never re-tokenized: a trajectory is the concatenation of its segments' token ids, and
only `gen` tokens are trained (loss mask 1) (DESIGN.md §3).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from policyflow.types import Segment, TrainBatch, Trajectory


def render_prompt(tokenizer, text: str, chat_template: bool) -> list[int]:
    """Token ids of the prompt; with `chat_template`, the tokenizer's template with a generation prompt."""
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("model.chat_template=true but the tokenizer has no chat template; set model.chat_template=false")
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def trajectory_tokens(segments: Sequence[Segment]) -> tuple[list[int], list[int], list[float], list[int]]:
    """Flatten segments to (token ids, loss mask, behaviour log-probs, versions); non-gen tokens get 0/0.0/-1."""
    ids: list[int] = []
    mask: list[int] = []
    logprobs: list[float] = []
    versions: list[int] = []
    for seg in segments:
        n = len(seg.token_ids)
        ids += seg.token_ids
        if seg.trainable:
            mask += [1] * n
            logprobs += seg.logprobs
            versions += seg.versions
        else:
            mask += [0] * n
            logprobs += [0.0] * n
            versions += [-1] * n
    return ids, mask, logprobs, versions


def collate(
    trajectories: Sequence[Trajectory],
    advantages_B: torch.Tensor,
    group_index_B: torch.Tensor,
    pad_id: int,
    *,
    trainable_B: Sequence[bool] | None = None,
) -> TrainBatch:
    """Right-pad trajectories into a TrainBatch; rows with `trainable_B[b]` False get an all-zero loss mask."""
    rows = [trajectory_tokens(t.segments) for t in trajectories]
    B, T = len(rows), max(len(r[0]) for r in rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.float32)
    behav = torch.zeros((B, T), dtype=torch.float32)
    versions = torch.full((B, T), -1, dtype=torch.long)
    for b, (ids, mask, lps, vers) in enumerate(rows):
        n = len(ids)
        input_ids[b, :n] = torch.tensor(ids)
        attention[b, :n] = 1
        if trainable_B is None or trainable_B[b]:
            loss_mask[b, :n] = torch.tensor(mask, dtype=torch.float32)
        behav[b, :n] = torch.tensor(lps)
        versions[b, :n] = torch.tensor(vers)
    return TrainBatch(
        input_ids_BT=input_ids,
        attention_mask_BT=attention,
        loss_mask_BT=loss_mask,
        behav_logprobs_BT=behav,
        versions_BT=versions,
        advantages_B=advantages_B.to(torch.float32),
        group_index_B=group_index_B,
    )


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
