"""The generic decoder: any `AutoModelForCausalLM`, driven through its own forward and cache.

Prompts are left-padded into one batch; `attention_mask` marks real tokens and the position
ids are `cumsum(mask) - 1`, so every sequence's first real token has position 0, exactly as
in a right-padded training forward. The model's own cache object (`past_key_values`, a
`DynamicCache` for ordinary models) holds the keys/values; finished rows are dropped from it
with `Cache.batch_select_indices`, so they stop costing compute.

Limitation: all rows of the HF cache share one length, so new prompts are admitted only when
the batch is empty (static batching, `continuous = False`). Continuous batching and the
speed target are the fast decoder's job (`fast_decoder.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch


@contextmanager
def _eval_mode(model: torch.nn.Module):
    """Run in eval mode (no dropout) and restore the caller's mode afterwards."""
    was_training = model.training
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


class HFDecoder:
    """Batch decoding with the model's own forward and KV cache. Not thread-safe."""

    continuous = False  # admits rows only when no row is in flight

    def __init__(self, model: torch.nn.Module, pad_token_id: int = 0):
        self.model = model
        self.pad_token_id = pad_token_id
        self.device = next(model.parameters()).device
        self.n = 0
        self.cache = None
        self.mask: torch.Tensor | None = None  # [n, T] 1 for real tokens (left padded)
        self.next_pos: torch.Tensor | None = None  # [n] position id of the next token

    def refresh(self) -> None:
        self.device = next(self.model.parameters()).device

    def reserve(self, rows: int, length: int) -> None:  # the HF cache grows by itself
        pass

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], reserve: int = 0) -> torch.Tensor:
        if self.n:
            raise RuntimeError("HFDecoder admits new prompts only when no sequence is in flight")
        m, L = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((m, L), self.pad_token_id, dtype=torch.long, device=self.device)
        mask = torch.zeros(m, L, dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            ids[i, L - len(p) :] = torch.as_tensor(p, dtype=torch.long)
            mask[i, L - len(p) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with _eval_mode(self.model):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        self.cache, self.mask, self.next_pos, self.n = out.past_key_values, mask, pos[:, -1] + 1, m
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        ones = torch.ones(self.n, 1, dtype=self.mask.dtype, device=self.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        with _eval_mode(self.model):
            out = self.model(
                input_ids=tokens.to(self.device)[:, None],
                attention_mask=self.mask,
                position_ids=self.next_pos[:, None],
                past_key_values=self.cache,
                use_cache=True,
            )
        self.cache = out.past_key_values
        self.next_pos = self.next_pos + 1
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def select_rows(self, keep: Sequence[int]) -> None:
        self.n = len(keep)
        if not keep:
            self.cache, self.mask, self.next_pos = None, None, None
            return
        if list(keep) == list(range(len(keep))) and self.mask.shape[0] == len(keep):
            return
        idx = torch.tensor(list(keep), dtype=torch.long, device=self.device)
        self.cache.batch_select_indices(idx)
        self.mask, self.next_pos = self.mask[idx], self.next_pos[idx]
        # Columns that only held padding for every remaining row are dead weight; they stay
        # in the HF cache (it cannot be cropped from the left) but are masked out.
