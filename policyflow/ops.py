"""Masked reductions and log-probs from logits. Layer 0: pure torch, no config, no `.item()`."""

from __future__ import annotations

import torch


def masked_sum(values_BT: torch.Tensor, mask_BT: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `values` where `mask` is 1. Masked entries may hold inf/NaN: they are zeroed, not multiplied."""
    mask = mask_BT.to(dtype=torch.bool)
    zeros = torch.zeros((), dtype=values_BT.dtype, device=values_BT.device)
    kept = torch.where(mask, values_BT, zeros)
    return kept.sum() if dim is None else kept.sum(dim=dim)


def masked_mean(values_BT: torch.Tensor, mask_BT: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over masked entries; 0 (not NaN) where the mask is empty."""
    count = mask_BT.to(dtype=values_BT.dtype).sum() if dim is None else mask_BT.to(values_BT.dtype).sum(dim=dim)
    return masked_sum(values_BT, mask_BT, dim) / count.clamp(min=1)


def token_logprobs(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target], computed in float32 at least, shape [B, T].

    Uses logsumexp rather than a full log_softmax so the [B, T, V] temporary is not doubled.
    """
    logits = logits_BTV if logits_BTV.dtype == torch.float64 else logits_BTV.float()
    picked = torch.gather(logits, -1, targets_BT.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def shifted_token_logprobs(logits_BTV: torch.Tensor, input_ids_BT: torch.Tensor) -> torch.Tensor:
    """Per-position log p(token t | tokens < t) aligned with `input_ids`; position 0 gets 0."""
    lp = token_logprobs(logits_BTV[:, :-1], input_ids_BT[:, 1:])
    return torch.nn.functional.pad(lp, (1, 0), value=0.0)
