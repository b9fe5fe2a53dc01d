"""Token sampling from logits: temperature, top-p nucleus, greedy, with the behaviour log-prob.

Pure tensor functions used by the engine's decode step (layer 1, no model or engine state).
"""

from __future__ import annotations

import torch


def sample_tokens(
    logits_NV: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    top_p: float | torch.Tensor = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row; return (token ids [N], their behaviour log-probs [N]).

    Row n samples from p_n = softmax(logits_n / T_n) restricted to its top-p nucleus (the
    most probable tokens whose mass before them is < top_p_n; the argmax is always kept) and
    renormalised; the log-prob returned is log p_n(token). Rows with T_n = 0 take the argmax
    and return the temperature-1 log-softmax of it. `temperature` and `top_p` are floats
    (shared by all rows: the cheap path) or [N] tensors.
    """
    logits = logits_NV.float()
    if not isinstance(temperature, torch.Tensor) and not isinstance(top_p, torch.Tensor):
        if temperature <= 0:
            return _greedy(logits)
        logp = torch.log_softmax(logits if temperature == 1 else logits / temperature, dim=-1)
        if top_p < 1:
            logp = _nucleus(logp, top_p)
        return _draw(logp, generator)
    n = logits.shape[0]
    temperature_N = torch.as_tensor(temperature, dtype=torch.float32, device=logits.device).expand(n)
    top_p_N = torch.as_tensor(top_p, dtype=torch.float32, device=logits.device).expand(n)
    greedy = temperature_N <= 0
    if bool(greedy.all()):
        return _greedy(logits)
    temperature_N = torch.where(greedy, torch.ones_like(temperature_N), temperature_N)
    logp = torch.log_softmax(logits / temperature_N[:, None], dim=-1)
    if bool((top_p_N < 1).any()):
        logp = _nucleus(logp, torch.where(top_p_N < 1, top_p_N, torch.inf)[:, None])
    tokens, chosen = _draw(logp, generator)
    if bool(greedy.any()):
        best, best_logp = _greedy(logits)
        tokens, chosen = torch.where(greedy, best, tokens), torch.where(greedy, best_logp, chosen)
    return tokens, chosen


def _greedy(logits_NV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = logits_NV.argmax(-1)
    return tokens, torch.log_softmax(logits_NV, -1).gather(-1, tokens[:, None]).squeeze(-1)


def _nucleus(logp_NV: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """Log-probs restricted to the top-p nucleus and renormalised (dropped tokens: -inf).

    A token is kept when the mass of the strictly more probable tokens is < top_p, so the
    argmax always stays and top_p = 1 keeps everything.
    """
    sorted_logp, order = logp_NV.sort(dim=-1, descending=True)
    sorted_p = sorted_logp.exp()
    drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    logp = logp_NV.masked_fill(drop, float("-inf"))
    return logp - torch.logsumexp(logp, dim=-1, keepdim=True)


def _draw(logp_NV: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-CDF sampling, one uniform per row (much cheaper than `torch.multinomial`).

    Returns (tokens, their log-probs).
    """
    cdf = logp_NV.exp().cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)
    chosen = logp_NV.gather(-1, tokens[:, None]).squeeze(-1)
    impossible = torch.isneginf(chosen)  # u rounded up onto a trailing zero-probability token
    if bool(impossible.any()):
        tokens = torch.where(impossible, logp_NV.argmax(-1), tokens)
        chosen = logp_NV.gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, chosen
