"""Token sampling from logits: draw from the sampling policy and return the behaviour log-prob.

The policy itself (temperature, top-k, top-p, greedy) is defined once, in
`ops.policy_log_distribution`, which the trainer uses too. Pure tensor functions used by the
engine's decode step (layer 1, no model or engine state).
"""

from __future__ import annotations

import torch

from collections.abc import Sequence

from policyflow.ops import ScalarOrRows, policy_log_distribution

RowGenerators = Sequence[torch.Generator | None] | None  # per row: its own generator (a seeded request) or None (the shared one)


def sample_tokens(
    logits_NV: torch.Tensor,
    temperature: ScalarOrRows = 1.0,
    top_p: ScalarOrRows = 1.0,
    generator: torch.Generator | None = None,
    top_k: ScalarOrRows = 0,
    row_generators: RowGenerators = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row; return (token ids [N], their behaviour log-probs [N]).

    Row n samples from π_n = `policy_log_distribution(logits, T_n, top_p_n, top_k_n)`
    (softmax(logits / T_n) restricted to the top-k, then top-p set, renormalised) and returns
    log π_n(token). Rows with T_n = 0 take the argmax and return the temperature-1 log-softmax
    of it. `temperature`, `top_p` and `top_k` are numbers (shared by all rows: the cheap path)
    or [N] tensors.

    Row n draws its uniform from `row_generators[n]` when that is a generator (a seeded
    request: one draw per token sampled at T_n > 0, none for greedy tokens, so its stream
    depends on its own tokens only) and from the shared `generator` otherwise. The shared
    stream is drawn for every row as without `row_generators`, so unseeded rows are unchanged.
    """
    logp_NV = policy_log_distribution(logits_NV, temperature, top_p, top_k)
    if not isinstance(temperature, torch.Tensor):
        return _greedy(logp_NV) if temperature <= 0 else _draw(logp_NV, generator, row_generators)
    greedy_N = temperature <= 0
    if bool(greedy_N.all()):
        return _greedy(logp_NV)
    if row_generators is not None and any(g is not None for g in row_generators):
        row_generators = [None if greedy else g for g, greedy in zip(row_generators, greedy_N.tolist())]
    tokens, chosen = _draw(logp_NV, generator, row_generators)
    if bool(greedy_N.any()):
        best, best_logp = _greedy(logp_NV)
        tokens, chosen = torch.where(greedy_N, best, tokens), torch.where(greedy_N, best_logp, chosen)
    return tokens, chosen


def _greedy(logp_NV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = logp_NV.argmax(-1)
    return tokens, logp_NV.gather(-1, tokens[:, None]).squeeze(-1)


def _draw(logp_NV: torch.Tensor, generator: torch.Generator | None, row_generators: RowGenerators = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-CDF sampling, one uniform per row (much cheaper than `torch.multinomial`).

    Returns (tokens, their log-probs). Rows with their own generator (`row_generators`) take
    their uniform from it instead of the shared draw.
    """
    cdf = logp_NV.exp().cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype)
    if row_generators is not None:
        own = [(n, g) for n, g in enumerate(row_generators) if g is not None]
        if own:
            rows = torch.tensor([n for n, _ in own], device=cdf.device)
            u[rows] = torch.cat([torch.rand(1, 1, generator=g, device=cdf.device, dtype=cdf.dtype) for _, g in own])
    u = u * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)
    chosen = logp_NV.gather(-1, tokens[:, None]).squeeze(-1)
    impossible = torch.isneginf(chosen)  # u rounded up onto a trailing zero-probability token
    if bool(impossible.any()):
        tokens = torch.where(impossible, logp_NV.argmax(-1), tokens)
        chosen = logp_NV.gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, chosen
