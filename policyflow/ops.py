"""Masked reductions and log-probs from logits. Layer 0: pure torch, no config, no `.item()`.

`policy_log_distribution` is the one definition of the sampling policy (temperature, top-k,
top-p): the engine draws tokens from it and records their log-probs, and the trainer recomputes
the same log-probs with `policy_logprobs` / `shifted_token_logprobs`. The policy is per-token
data (DESIGN.md §6): each of temperature, top_p and top_k is one number for every token (the
cheap path) or a tensor with one value per row / per token.
"""

from __future__ import annotations

import torch

ScalarOrRows = float | int | torch.Tensor  # one value for every row, or one per row [N]
ScalarOrTokens = float | int | torch.Tensor  # one value for every token, or one per token (the targets' shape)


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


def policy_log_distribution(
    logits_NV: torch.Tensor,
    temperature: ScalarOrRows = 1.0,
    top_p: ScalarOrRows = 1.0,
    top_k: ScalarOrRows = 0,
    include_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """log π(· | context) for each row: the distribution a token is sampled from, [N, V] float32+.

        z = logits / T
        S = the k most probable tokens (top_k = 0: all), then the smallest prefix of S, by
            descending probability, whose mass reaches top_p of the mass of S (a token is kept
            when the mass of the more probable tokens of S before it is < top_p · mass(S); the
            argmax is always kept); order and ties follow `torch.sort`
        π(v) = exp(z_v) / Σ_{u∈S} exp(z_u) for v ∈ S, 0 (log −inf) otherwise

    This is HF's and vLLM's order (top-k, then top-p over the renormalised top-k mass).
    T ≤ 0 means greedy: the row gets the untruncated temperature-1 log-softmax (the argmax of
    it is the greedy token, and its log-prob is the model's own). `temperature`, `top_p` and
    `top_k` are numbers or [N] tensors. `include_N` (token ids, [N]) adds one token to each
    row's kept set S: the trainer's finite floor for a token that has left the current
    policy's nucleus (see `policy_logprobs`). The kept set is chosen without gradient; the
    log-probs are differentiable in the logits.
    """
    logits = logits_NV if logits_NV.dtype == torch.float64 else logits_NV.float()
    rows = isinstance(temperature, torch.Tensor) or isinstance(top_p, torch.Tensor) or isinstance(top_k, torch.Tensor)
    if not rows:
        if temperature <= 0:
            return torch.log_softmax(logits, dim=-1)
        logp = torch.log_softmax(logits if temperature == 1 else logits / temperature, dim=-1)
        if top_p >= 1 and top_k <= 0:
            return logp
        return _truncate(logp, top_p, top_k, include_N)
    n = logits.shape[0]
    temperature_N = torch.as_tensor(temperature, dtype=logits.dtype, device=logits.device).expand(n)
    top_p_N = torch.as_tensor(top_p, dtype=logits.dtype, device=logits.device).expand(n)
    top_k_N = torch.as_tensor(top_k, device=logits.device).expand(n)
    greedy_N = temperature_N <= 0
    temperature_N = torch.where(greedy_N, torch.ones_like(temperature_N), temperature_N)
    top_p_N = torch.where(greedy_N | (top_p_N >= 1), torch.inf, top_p_N)  # inf: keeps every token
    top_k_N = torch.where(greedy_N, torch.zeros_like(top_k_N), top_k_N)
    logp = torch.log_softmax(logits / temperature_N[:, None], dim=-1)
    if not bool((top_p_N < 1).any() | (top_k_N > 0).any()):
        return logp
    return _truncate(logp, top_p_N[:, None], top_k_N[:, None], include_N)


def _truncate(logp_NV: torch.Tensor, top_p: ScalarOrRows, top_k: ScalarOrRows, include_N: torch.Tensor | None) -> torch.Tensor:
    """`logp` restricted to its top-k, then top-p set (plus `include_N`), renormalised; dropped: -inf."""
    with torch.no_grad():
        sorted_logp, order = logp_NV.sort(dim=-1, descending=True)
        sorted_p = sorted_logp.exp()
        rank = torch.arange(logp_NV.shape[-1], device=logp_NV.device)
        in_top_k = (rank < top_k) | (torch.as_tensor(top_k, device=logp_NV.device) <= 0)
        sorted_p = torch.where(in_top_k, sorted_p, 0.0)
        mass = sorted_p.sum(-1, keepdim=True)
        drop_sorted = ~in_top_k | ((sorted_p.cumsum(-1) - sorted_p) >= top_p * mass)
        drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
        if include_N is not None:
            drop.scatter_(-1, include_N[:, None], False)
    kept = logp_NV.masked_fill(drop, float("-inf"))
    return kept - torch.logsumexp(kept, dim=-1, keepdim=True)


def policy_logprobs(
    logits_NV: torch.Tensor, targets_N: torch.Tensor, temperature: ScalarOrTokens = 1.0, top_p: ScalarOrTokens = 1.0,
    top_k: ScalarOrTokens = 0,
) -> torch.Tensor:
    """log π(target) under `policy_log_distribution` (any leading shape: [..., V] logits, [...] targets).

    This is what the engine recorded when it sampled the target, recomputed for training: the
    exact behaviour policy, truncated and renormalised. A target outside the kept set (possible
    only once the weights have moved, e.g. in a later PPO epoch) is added to the set before
    renormalising, so its log-prob is finite and differentiable instead of −inf; for a target
    inside the set (always the case for the weights that sampled it) nothing changes.
    Without truncation this is z[target] − logsumexp(z), computed without a [.., V] log-softmax;
    with top_p < 1 or top_k > 0 it sorts the vocabulary at every position (a few times the
    memory of the logits: use train.minibatches to bound it).

    `temperature`, `top_p` and `top_k` are numbers (one policy for every token: the cheap path)
    or tensors of the targets' shape (token n drawn from its own policy: GRPO-ATS's greedy code
    next to sampled text). A token with temperature ≤ 0 (greedy) gets the untruncated
    temperature-1 log-softmax, as the engine records it.
    """
    logits_NV = logits_NV if logits_NV.dtype == torch.float64 else logits_NV.float()
    if not any(isinstance(v, torch.Tensor) for v in (temperature, top_p, top_k)):
        if temperature <= 0 or (top_p >= 1 and top_k <= 0):
            scale = 1.0 if temperature <= 0 else temperature
            return token_logprobs(logits_NV if scale == 1 else logits_NV / scale, targets_N)
        flat_NV, flat_N = logits_NV.reshape(-1, logits_NV.shape[-1]), targets_N.reshape(-1)
        logp_NV = policy_log_distribution(flat_NV, temperature, top_p, top_k, include_N=flat_N)
        return logp_NV.gather(-1, flat_N[:, None]).reshape(targets_N.shape)
    per_token = lambda v, dtype: torch.as_tensor(v, dtype=dtype, device=logits_NV.device).expand(targets_N.shape)  # noqa: E731
    temperature_N = per_token(temperature, logits_NV.dtype)
    top_p_N, top_k_N = per_token(top_p, logits_NV.dtype), per_token(top_k, torch.long)
    sampled_N = temperature_N > 0
    if not bool((sampled_N & ((top_p_N < 1) | (top_k_N > 0))).any()):  # no token is truncated: z[target] − logsumexp(z)
        scale_N = torch.where(sampled_N, temperature_N, torch.ones_like(temperature_N))
        return token_logprobs(logits_NV / scale_N[..., None], targets_N)
    flat_NV, flat_N = logits_NV.reshape(-1, logits_NV.shape[-1]), targets_N.reshape(-1)
    logp_NV = policy_log_distribution(flat_NV, temperature_N.reshape(-1), top_p_N.reshape(-1), top_k_N.reshape(-1), include_N=flat_N)
    return logp_NV.gather(-1, flat_N[:, None]).reshape(targets_N.shape)


def shifted_token_logprobs(
    logits_BTV: torch.Tensor, input_ids_BT: torch.Tensor, temperature: ScalarOrTokens = 1.0, top_p: ScalarOrTokens = 1.0,
    top_k: ScalarOrTokens = 0,
) -> torch.Tensor:
    """Per-position log π(token t | tokens < t) aligned with `input_ids`; position 0 gets 0.

    π is the sampling policy at (temperature, top_p, top_k) (`policy_logprobs`); the defaults
    give the model's own log-softmax. Each is a number or a [B, T] tensor aligned with
    `input_ids` (position t: the policy token t was drawn from; position 0 is not read).
    """
    token = lambda v: v[:, 1:] if isinstance(v, torch.Tensor) else v  # noqa: E731
    lp = policy_logprobs(logits_BTV[:, :-1], input_ids_BT[:, 1:], token(temperature), token(top_p), token(top_k))
    return torch.nn.functional.pad(lp, (1, 0), value=0.0)
