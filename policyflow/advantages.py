"""Advantage estimators over groups of responses to the same prompt. Layer 0: stdlib and torch.

`group_ids_B` is an integer tensor naming each response's group; ids are arbitrary and members
of a group need not be adjacent. Everything is vectorised with `torch.unique` + `index_add`.
A group with a single (kept) member has no baseline and gets advantage 0.

Registry calling convention (what `rollout.build_batch` calls):

    ADVANTAGES[name](rewards_B, group_ids_B, lengths_B, include_B=None, **hyper) -> (advantages_B, keep_B)

`lengths_B` are completion lengths in tokens (only `gfpo` reads them). `include_B` (bool, None =
all) marks the responses that take part at all: the others (e.g. truncated completions with
`train.mask_truncated`) are left out of every group statistic and get advantage 0. `keep_B` marks
the responses to train on: the included ones, and for `gfpo` only the selected k of them. Rows
with `keep_B` False carry no learning signal and are left out of the batch, so they count in no
loss denominator.

Zero variance has one rule, `zero_variance_G` with the tolerance `ZERO_VARIANCE_TOL`: a group
whose (included) rewards span at most the tolerance (or that has fewer than two) carries no
signal, and gets advantage 0 from every estimator. `has_signal` is the same rule for one
group's values; the batch builder and the rollout buffer's filters use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import torch

Tensor = torch.Tensor

SCALES = ("group", "none")
GFPO_METRICS = ("length", "token_efficiency")
ZERO_VARIANCE_TOL = 1e-6  # rewards within this of each other (absolute) count as equal


def _float(values_B: Tensor) -> Tensor:
    return values_B if values_B.is_floating_point() else values_B.to(torch.get_default_dtype())


def _group_inverse(group_ids_B: Tensor, num_rows: int) -> tuple[Tensor, int]:
    """Dense group index in [0, G) for each row, and G."""
    if group_ids_B.shape != (num_rows,):
        raise ValueError(f"group_ids must be [B] with B = {num_rows}, got {tuple(group_ids_B.shape)}")
    if group_ids_B.is_floating_point() or group_ids_B.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids_B.dtype}")
    unique_G, inverse_B = torch.unique(group_ids_B, return_inverse=True)
    return inverse_B, unique_G.shape[0]


def zero_variance_G(rewards_B: Tensor, inverse_B: Tensor, num_groups: int, include_B: Tensor | None = None) -> Tensor:
    """[G] bool: max − min of a group's included rewards ≤ ZERO_VARIANCE_TOL, or fewer than two of them."""
    include_B = _include(rewards_B, include_B)
    rewards_B = _float(rewards_B)
    high_G = rewards_B.new_full((num_groups,), -torch.inf).scatter_reduce(0, inverse_B, torch.where(include_B, rewards_B, -torch.inf), "amax")
    low_G = rewards_B.new_full((num_groups,), torch.inf).scatter_reduce(0, inverse_B, torch.where(include_B, rewards_B, torch.inf), "amin")
    count_G = torch.zeros(num_groups, dtype=torch.long, device=rewards_B.device).index_add(0, inverse_B, include_B.long())
    return (count_G < 2) | ~(high_G - low_G > ZERO_VARIANCE_TOL)


def has_signal(values: Sequence[float]) -> bool:
    """One group's values are not all equal (the `zero_variance_G` rule for a single group)."""
    values_B = torch.tensor(list(values), dtype=torch.float64)
    return not bool(zero_variance_G(values_B, torch.zeros(len(values_B), dtype=torch.long), 1)[0])


def _include(rewards_B: Tensor, include_B: Tensor | None) -> Tensor:
    if include_B is None:
        return torch.ones(rewards_B.shape, dtype=torch.bool, device=rewards_B.device)
    if include_B.shape != rewards_B.shape or include_B.dtype != torch.bool:
        raise ValueError(f"include_B must be a bool [B] tensor with B = {rewards_B.shape[0]}, got {include_B.dtype} {tuple(include_B.shape)}")
    return include_B


def _kept_group_stats(rewards_B: Tensor, inverse_B: Tensor, num_groups: int, keep_B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(count_G, mean_G, Bessel std_G) of the rewards of each group's kept members."""
    zeros_G = rewards_B.new_zeros(num_groups)
    count_G = zeros_G.index_add(0, inverse_B, keep_B.to(rewards_B.dtype))
    sum_G = zeros_G.index_add(0, inverse_B, torch.where(keep_B, rewards_B, 0.0))
    mean_G = sum_G / count_G.clamp(min=1)
    dev_B = torch.where(keep_B, rewards_B - mean_G[inverse_B], 0.0)
    var_G = zeros_G.index_add(0, inverse_B, dev_B * dev_B) / (count_G - 1).clamp(min=1)
    return count_G, mean_G, var_G.sqrt()


def _normalise_kept(rewards_B: Tensor, inverse_B: Tensor, num_groups: int, keep_B: Tensor, scale: str, eps: float) -> Tensor:
    """(r − mean_g) [/ (std_g + eps)] over each group's kept members; 0 elsewhere and for zero-variance groups."""
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r} is not known; allowed: {', '.join(SCALES)}")
    _, mean_G, std_G = _kept_group_stats(rewards_B, inverse_B, num_groups, keep_B)
    adv_B = rewards_B - mean_G[inverse_B]
    if scale == "group":
        adv_B = adv_B / (std_G[inverse_B] + eps)
    return torch.where(keep_B & ~zero_variance_G(rewards_B, inverse_B, num_groups, keep_B)[inverse_B], adv_B, 0.0)


def group_advantages(rewards_B: Tensor, group_ids_B: Tensor, *, scale: str = "group", eps: float = 1e-6,
                     include_B: Tensor | None = None) -> Tensor:
    """GRPO's group-relative advantage (arXiv 2402.03300, outcome supervision):

        A_i = (r_i − mean_g(r)) / (std_g(r) + eps)    scale="group", std with Bessel's correction
        A_i =  r_i − mean_g(r)                        scale="none"  (Dr.GRPO, arXiv 2503.20783)

    mean and std over the group's included members (`include_B`); excluded members, groups
    of one and zero-variance groups (`zero_variance_G`) get 0.
    """
    rewards_B = _float(rewards_B)
    inverse_B, num_groups = _group_inverse(group_ids_B, rewards_B.shape[0])
    return _normalise_kept(rewards_B, inverse_B, num_groups, _include(rewards_B, include_B), scale, eps)


def rloo_advantages(rewards_B: Tensor, group_ids_B: Tensor, *, include_B: Tensor | None = None) -> Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al., arXiv 2402.14740):

        A_i = r_i − (1/(n_g − 1)) Σ_{j≠i, j∈g} r_j

    over the group's included members; excluded members, groups of one and zero-variance
    groups get 0.
    """
    rewards_B = _float(rewards_B)
    include_B = _include(rewards_B, include_B)
    inverse_B, num_groups = _group_inverse(group_ids_B, rewards_B.shape[0])
    zeros_G = rewards_B.new_zeros(num_groups)
    count_B = zeros_G.index_add(0, inverse_B, include_B.to(rewards_B.dtype))[inverse_B]
    sum_B = zeros_G.index_add(0, inverse_B, torch.where(include_B, rewards_B, 0.0))[inverse_B]
    baseline_B = (sum_B - rewards_B) / (count_B - 1).clamp(min=1)
    signal_B = include_B & ~zero_variance_G(rewards_B, inverse_B, num_groups, include_B)[inverse_B]
    return torch.where(signal_B, rewards_B - baseline_B, 0.0)


def _rank_within_group(score_B: Tensor, inverse_B: Tensor, num_groups: int) -> Tensor:
    """0-based rank of each row inside its group by ascending score, ties by original order."""
    by_score_B = torch.sort(score_B, stable=True).indices
    by_group_B = torch.sort(inverse_B[by_score_B], stable=True).indices
    order_B = by_score_B[by_group_B]  # sorted by (group, score, row)
    count_G = torch.bincount(inverse_B, minlength=num_groups)
    start_G = torch.cumsum(count_G, dim=0) - count_G
    rank_B = torch.empty_like(inverse_B)
    rank_B[order_B] = torch.arange(inverse_B.shape[0], device=inverse_B.device) - start_G[inverse_B[order_B]]
    return rank_B


def gfpo_advantages(rewards_B: Tensor, lengths_B: Tensor, group_ids_B: Tensor, k: int, *,
                    metric: str = "length", eps: float = 1e-6, include_B: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """GFPO (Group Filtered Policy Optimization, arXiv 2508.09726): learn only from the best k.

    In each group keep the k responses with the smallest `length` (metric="length") or the
    largest reward per token r_i / |o_i| (metric="token_efficiency"), ties by original order.
    Kept responses get GRPO advantages normalised over the kept subset,

        A_i = (r_i − mean_S(r)) / (std_S(r) + eps)    for i ∈ S (Bessel std), 0 otherwise,

    so filtered responses get 0, and `keep_B` False (the batch builder leaves them out). Only
    included responses (`include_B`) compete for the k places. A kept subset of one, or with
    zero variance, gets 0. Returns (advantages_B, keep_B).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"gfpo needs an integer k >= 1 (responses kept per group), got k={k!r}")
    if metric not in GFPO_METRICS:
        raise ValueError(f"metric={metric!r} is not known; allowed: {', '.join(GFPO_METRICS)}")
    rewards_B = _float(rewards_B)
    if lengths_B.shape != rewards_B.shape:
        raise ValueError(f"lengths {tuple(lengths_B.shape)} and rewards {tuple(rewards_B.shape)} must both be [B]")
    inverse_B, num_groups = _group_inverse(group_ids_B, rewards_B.shape[0])
    lengths_B = lengths_B.to(rewards_B.dtype)
    include_B = _include(rewards_B, include_B)
    score_B = lengths_B if metric == "length" else -(rewards_B / lengths_B.clamp(min=1))
    score_B = torch.where(include_B, score_B, torch.inf)  # excluded responses rank last
    keep_B = (_rank_within_group(score_B, inverse_B, num_groups) < k) & include_B
    return _normalise_kept(rewards_B, inverse_B, num_groups, keep_B, "group", eps), keep_B


# --------------------------------------------------------------------------------------------
# Registry: fn(rewards_B, group_ids_B, lengths_B, include_B=None, **hyper) -> (advantages_B, keep_B)


def _grpo(rewards_B: Tensor, group_ids_B: Tensor, lengths_B: Tensor | None = None, include_B: Tensor | None = None, *,
          eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    return group_advantages(rewards_B, group_ids_B, scale="group", eps=eps, include_B=include_B), _include(rewards_B, include_B)


def _dr_grpo(rewards_B: Tensor, group_ids_B: Tensor, lengths_B: Tensor | None = None, include_B: Tensor | None = None) -> tuple[Tensor, Tensor]:
    return group_advantages(rewards_B, group_ids_B, scale="none", include_B=include_B), _include(rewards_B, include_B)


def _rloo(rewards_B: Tensor, group_ids_B: Tensor, lengths_B: Tensor | None = None, include_B: Tensor | None = None) -> tuple[Tensor, Tensor]:
    return rloo_advantages(rewards_B, group_ids_B, include_B=include_B), _include(rewards_B, include_B)


def _gfpo(rewards_B: Tensor, group_ids_B: Tensor, lengths_B: Tensor | None = None, include_B: Tensor | None = None, *,
          k: int | None = None, metric: str = "length", eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    if lengths_B is None or k is None:
        raise ValueError("gfpo needs lengths_B and k (responses kept per group)")
    return gfpo_advantages(rewards_B, lengths_B, group_ids_B, k, metric=metric, eps=eps, include_B=include_B)


ADVANTAGES: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "grpo": _grpo,
    "dr_grpo": _dr_grpo,
    "rloo": _rloo,
    "gfpo": _gfpo,
}
