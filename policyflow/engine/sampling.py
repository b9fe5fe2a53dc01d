"""Token sampling from logits: draw from the sampling policy and return the behaviour log-prob.

The policy itself (temperature, top-k, top-p, greedy) is defined once, in
`ops.policy_log_distribution`, which the trainer uses too. Pure tensor functions used by the
engine's decode step (layer 1, no model or engine state).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from policyflow.ops import ScalarOrRows, policy_log_distribution

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _signed(x: int) -> int:
    """A 64-bit pattern as the int64 that holds it."""
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (multiplication wraps mod 2**64)."""
    z = (z ^ _shr(z, 30)) * _signed(_MIX1)
    z = (z ^ _shr(z, 27)) * _signed(_MIX2)
    return z ^ _shr(z, 31)


def seed_keys(seeds: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Each seed's key for `counter_uniforms`: splitmix64(seed), int64 [N]."""
    return _mix(torch.tensor([_signed(s) for s in seeds], dtype=torch.int64, device=device))


def counter_uniforms(keys_N: torch.Tensor, positions_N: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """u_n = splitmix64(key_n + (position_n + 1)·golden) as a uniform in [0, 1): the top 53 bits
    for float64, else 24 (exact in float32). A pure function of (seed, position): no state."""
    z = _mix(keys_N + (positions_N + 1) * _signed(_GOLDEN))
    bits = 53 if dtype == torch.float64 else 24
    return _shr(z, 64 - bits).to(dtype) * (2.0 ** -bits)


@dataclass(frozen=True)
class RowSeeds:
    """The seeded rows of a decode step: `seeded_N` (bool), their keys (`seed_keys`) and
    positions (the index of the token each row draws now, counted from the request's first)."""

    seeded_N: torch.Tensor
    keys_N: torch.Tensor
    positions_N: torch.Tensor

    @staticmethod
    def of(seeds: Sequence[int | None], positions: Sequence[int], device: torch.device | str = "cpu") -> RowSeeds:
        seeded = [s is not None for s in seeds]
        return RowSeeds(torch.tensor(seeded, device=device), seed_keys([s or 0 for s in seeds], device), torch.tensor(list(positions), dtype=torch.int64, device=device))

    def at(self, positions: Sequence[int]) -> RowSeeds:
        """The same rows drawing at other positions."""
        return RowSeeds(self.seeded_N, self.keys_N, torch.tensor(list(positions), dtype=torch.int64, device=self.keys_N.device))


def sample_tokens(
    logits_NV: torch.Tensor,
    temperature: ScalarOrRows = 1.0,
    top_p: ScalarOrRows = 1.0,
    generator: torch.Generator | None = None,
    top_k: ScalarOrRows = 0,
    row_seeds: RowSeeds | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row; return (token ids [N], their behaviour log-probs [N]).

    Row n samples from π_n = `policy_log_distribution(logits, T_n, top_p_n, top_k_n)`
    (softmax(logits / T_n) restricted to the top-k, then top-p set, renormalised) and returns
    log π_n(token). Rows with T_n = 0 take the argmax and return the temperature-1 log-softmax
    of it. `temperature`, `top_p` and `top_k` are numbers (shared by all rows: the cheap path)
    or [N] tensors.

    A seeded row (`row_seeds.seeded_N`, a seeded request) draws its uniform as
    `counter_uniforms(key, position)`: a function of its seed and the index of the token it
    draws only, so its tokens depend neither on the batch nor on an abort and resume. The other
    rows draw from the shared `generator`, which is drawn for every row as without `row_seeds`,
    so unseeded rows are unchanged.
    """
    logp_NV = policy_log_distribution(logits_NV, temperature, top_p, top_k)
    if not isinstance(temperature, torch.Tensor):
        return _greedy(logp_NV) if temperature <= 0 else _draw(logp_NV, generator, row_seeds)
    greedy_N = temperature <= 0
    if bool(greedy_N.all()):
        return _greedy(logp_NV)
    tokens, chosen = _draw(logp_NV, generator, row_seeds)
    if bool(greedy_N.any()):
        best, best_logp = _greedy(logp_NV)
        tokens, chosen = torch.where(greedy_N, best, tokens), torch.where(greedy_N, best_logp, chosen)
    return tokens, chosen


def _greedy(logp_NV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = logp_NV.argmax(-1)
    return tokens, logp_NV.gather(-1, tokens[:, None]).squeeze(-1)


def _draw(logp_NV: torch.Tensor, generator: torch.Generator | None, row_seeds: RowSeeds | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-CDF sampling, one uniform per row (much cheaper than `torch.multinomial`).

    Returns (tokens, their log-probs). Seeded rows (`row_seeds`) take their counter-based
    uniform instead of the shared draw.
    """
    cdf = logp_NV.exp().cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype)
    if row_seeds is not None:
        own = counter_uniforms(row_seeds.keys_N, row_seeds.positions_N, cdf.dtype)
        u = torch.where(row_seeds.seeded_N[:, None], own[:, None], u)
    u = u * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)
    chosen = logp_NV.gather(-1, tokens[:, None]).squeeze(-1)
    impossible = torch.isneginf(chosen)  # u rounded up onto a trailing zero-probability token
    if bool(impossible.any()):
        tokens = torch.where(impossible, logp_NV.argmax(-1), tokens)
        chosen = logp_NV.gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, chosen
