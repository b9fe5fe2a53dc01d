"""Reward shaping: small, generic terms added to or gating a task's reward. Layer 0: torch only.

Tensor in, tensor out; integer inputs come back in the default float dtype.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def _float(values: Tensor) -> Tensor:
    return values if values.is_floating_point() else values.to(torch.get_default_dtype())


def overlong_penalty(lengths: Tensor, max_len: int, cache_len: int) -> Tensor:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), with L = max_len, C = cache_len:

        R(|y|) = 0                          |y| ≤ L − C
                 ((L − C) − |y|) / C        L − C < |y| ≤ L
                 −1                         |y| > L

    `cache_len = 0` gives the hard cut (0 up to L, −1 beyond).
    """
    if not 0 <= cache_len <= max_len:
        raise ValueError(f"need 0 <= cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    lengths = _float(lengths)
    ramp = ((max_len - cache_len) - lengths) / max(cache_len, 1)
    return torch.where(lengths > max_len, -1.0, ramp.clamp(-1.0, 0.0))


def search_penalty_reward(
    correct: Tensor, num_searches: Tensor, format_ok: Tensor, *, penalty: float = 0.1, format_weight: float = 0.1
) -> dict[str, Tensor]:
    """MMSearch-R1's outcome reward with a search penalty (arXiv 2506.20670, §3), as named parts.

    The paper's reward is (1 − α) · acc · P + α · fmt, with P = 1 − β when the episode searched
    and 1 otherwise. Divided by (1 − α) it is

        reward = acc · (1 − β · [searches > 0]) + γ · fmt,      γ = α / (1 − α)

    which ranks every episode the same way, and group-normalised advantages (GRPO) are
    unchanged by the scale. We use this form so that the `correct` part is the 0/1 verdict
    itself. β = `penalty`, γ = `format_weight`; acc ∈ {0, 1} is the answer check and fmt ∈ {0, 1}
    whether the episode kept the required format. A correct answer reached with search earns
    1 − β (+ γ), one without search 1 (+ γ); a wrong answer earns only γ · fmt. The parts sum to
    the reward:

        correct        = acc
        search_penalty = −β · acc · [searches > 0]
        format         = γ · fmt
    """
    if not 0.0 <= penalty <= 1.0:
        raise ValueError(f"search penalty must be in [0, 1], got {penalty}")
    if format_weight < 0.0:
        raise ValueError(f"format_weight must be >= 0, got {format_weight}")
    acc = _float(torch.as_tensor(correct))
    searched = (torch.as_tensor(num_searches) > 0).to(acc.dtype)
    fmt = _float(torch.as_tensor(format_ok)).to(acc.dtype)
    return {"correct": acc, "search_penalty": -penalty * acc * searched, "format": format_weight * fmt}
