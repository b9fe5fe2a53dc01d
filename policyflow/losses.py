"""Policy objectives for RL post-training. Layer 0: stdlib, torch and policyflow.{types,ops} only.

Every policy loss is a pure function

    POLICY_LOSSES[key](logprobs_BT, old_logprobs_BT, advantages, mask_BT, **hyper) -> LossOutput

with `B` sequences and `T` completion tokens. `logprobs_BT` carries the gradient; every other
tensor is treated as a constant (it is detached here). `mask_BT` is 0/1 (bool or float): masked
positions may hold garbage (-inf, NaN) and are replaced with zeros by `torch.where` *before* any
arithmetic, so nothing non-finite reaches the loss or the gradient. `advantages` is `[B]` (one
per sequence); the token-level losses also accept `[B, T]`.

Metrics are detached 0-dim tensors with keys *without* the `loss/` prefix (the trainer adds it):
`clip_frac` (fraction of mask tokens -- or of sequences, for `gspo` -- where the clip was active,
i.e. the gradient was cut), `ratio_mean`/`ratio_min`/`ratio_max` (of the ratio the loss clips;
0 when there are no tokens), and `kl` when `ref_logprobs` is given.

What each loss needs from the trainer is declared in `LOSS_NEEDS` (proximal log-probs, the
generation budget, whether it adds the KL itself). The losses with `kl_inside` take
`ref_logprobs=None, kl_coef=0.0, kl_kind="k3"` and add `kl_coef * kl_penalty(...)` per token
before aggregating; for the others the trainer adds `kl_coef` times the token-mean KL.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from policyflow.ops import masked_mean, masked_sum
from policyflow.types import LossOutput

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------------
# KL estimators (Schulman, "Approximating KL Divergence", 2020; k3 is the one GRPO 2402.03300 uses)


def _kl_k1(d: Tensor) -> Tensor:
    return d


def _kl_k2(d: Tensor) -> Tensor:
    return 0.5 * d * d


def _kl_k3(d: Tensor) -> Tensor:
    return torch.expm1(-d) + d  # = exp(-d) + d - 1, accurate near d = 0


KL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {"k1": _kl_k1, "k2": _kl_k2, "k3": _kl_k3}


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) from samples of π_θ, with d = logprobs − ref_logprobs.

        k1 = d        k2 = d² / 2        k3 = exp(−d) + d − 1   (GRPO, arXiv 2402.03300, eq. 4)

    Elementwise, no mask; the reference is detached. Unknown `kind` → ValueError.
    """
    _check_kl_kind(kind)
    return KL_ESTIMATORS[kind](logprobs - ref_logprobs.detach())


def _check_kl_kind(kind: str) -> None:
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"kl_kind={kind!r} is not known; allowed: {', '.join(KL_ESTIMATORS)}")


# --------------------------------------------------------------------------------------------
# Shared pieces: input cleaning, the PPO clip, metrics, KL term, aggregations


def _clean(logprobs_BT: Tensor, old_logprobs_BT: Tensor, mask_BT: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(logprobs, detached old logprobs, bool mask) with masked positions set to 0."""
    if logprobs_BT.shape != mask_BT.shape or old_logprobs_BT.shape != mask_BT.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs_BT.shape)}, old_logprobs {tuple(old_logprobs_BT.shape)} and "
            f"mask {tuple(mask_BT.shape)} must all be [B, T]"
        )
    mask_BT = mask_BT.bool()
    return torch.where(mask_BT, logprobs_BT, 0.0), _constant(old_logprobs_BT, mask_BT), mask_BT


def _constant(values_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """A detached [B, T] input with masked positions set to 0."""
    if values_BT.shape != mask_BT.shape:
        raise ValueError(f"expected a [B, T] tensor of shape {tuple(mask_BT.shape)}, got {tuple(values_BT.shape)}")
    return torch.where(mask_BT, values_BT.detach(), 0.0)


def _token_advantages(advantages: Tensor, mask_BT: Tensor) -> Tensor:
    """[B] or [B, T] advantages → detached [B, T], 0 at masked positions."""
    if advantages.dim() == 1 and advantages.shape[0] == mask_BT.shape[0]:
        advantages = advantages[:, None]
    elif advantages.shape != mask_BT.shape:
        raise ValueError(f"advantages must be [B] or [B, T] with [B, T] = {tuple(mask_BT.shape)}, got {tuple(advantages.shape)}")
    return torch.where(mask_BT, advantages.detach(), 0.0)


def _sequence_advantages(advantages_B: Tensor, has_tokens_B: Tensor) -> Tensor:
    """[B] advantages → detached [B], 0 for rows without tokens."""
    if advantages_B.shape != has_tokens_B.shape:
        raise ValueError(f"this loss needs [B] advantages with B = {has_tokens_B.shape[0]}, got {tuple(advantages_B.shape)}")
    return torch.where(has_tokens_B, advantages_B.detach(), 0.0)


def _ppo_clip(ratio: Tensor, adv: Tensor, clip_low: float, clip_high: float) -> tuple[Tensor, Tensor]:
    """PPO's pessimistic term l = −min(r·A, clip(r, 1−ε_low, 1+ε_high)·A) (arXiv 1707.06347).

    Also returns where the clip is active (its gradient is cut): r > 1+ε_high with A > 0, or
    r < 1−ε_low with A < 0.
    """
    clipped_ratio = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = -torch.minimum(ratio * adv, clipped_ratio * adv)
    ratio, adv = ratio.detach(), adv.detach()
    clipped = ((adv > 0) & (ratio > 1.0 + clip_high)) | ((adv < 0) & (ratio < 1.0 - clip_low))
    return loss, clipped


def _masked_extreme(values: Tensor, mask: Tensor, largest: bool) -> Tensor:
    """Max (or min) of `values` over `mask`; 0 when the mask is empty."""
    if values.numel() == 0:
        return values.new_zeros(())
    fill = float("-inf") if largest else float("inf")
    filled = torch.where(mask, values, fill)
    extreme = filled.amax() if largest else filled.amin()
    return torch.where(mask.any(), extreme, 0.0)


def _ratio_metrics(ratio: Tensor, clipped: Tensor, mask: Tensor) -> dict[str, Tensor]:
    ratio = ratio.detach()
    return {
        "clip_frac": masked_mean(clipped.to(ratio.dtype), mask),
        "ratio_mean": masked_mean(ratio, mask),
        "ratio_min": _masked_extreme(ratio, mask, largest=False),
        "ratio_max": _masked_extreme(ratio, mask, largest=True),
    }


def _with_kl(loss_BT: Tensor, logprobs_BT: Tensor, mask_BT: Tensor, ref_logprobs: Tensor | None,
             kl_coef: float, kl_kind: str) -> tuple[Tensor, dict[str, Tensor]]:
    """loss_BT + kl_coef · kl_penalty(logprobs, ref) and the `kl` metric (none without a reference)."""
    _check_kl_kind(kl_kind)
    if ref_logprobs is None:
        if kl_coef != 0.0:
            raise ValueError(f"kl_coef={kl_coef} needs ref_logprobs; pass them or set kl_coef=0")
        return loss_BT, {}
    kl_BT = kl_penalty(logprobs_BT, _constant(ref_logprobs, mask_BT), kl_kind)
    return loss_BT + kl_coef * kl_BT, {"kl": masked_mean(kl_BT.detach(), mask_BT)}


def _mean_over_sequences(loss_B: Tensor, has_tokens_B: Tensor) -> Tensor:
    """Mean of per-sequence values over the sequences that have at least one token."""
    return masked_sum(loss_B, has_tokens_B) / has_tokens_B.sum().clamp(min=1)


def _seq_mean_token_mean(loss_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """GRPO aggregation: (1/N) Σ_i (1/|o_i|) Σ_t l_it over the N sequences with tokens."""
    return _mean_over_sequences(masked_mean(loss_BT, mask_BT, dim=-1), mask_BT.any(dim=-1))


# --------------------------------------------------------------------------------------------
# Token-level clipped objectives: GRPO, DAPO, Dr.GRPO


def _clipped_token_terms(logprobs_BT: Tensor, old_logprobs_BT: Tensor, advantages: Tensor, mask_BT: Tensor,
                         clip_low: float, clip_high: float, ref_logprobs: Tensor | None, kl_coef: float,
                         kl_kind: str) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Per-token l_it = −min(r·A, clip(r)·A) + kl_coef·KL with r = exp(logprobs − old_logprobs)."""
    logprobs_BT, old_BT, mask_BT = _clean(logprobs_BT, old_logprobs_BT, mask_BT)
    adv_BT = _token_advantages(advantages, mask_BT)
    ratio_BT = torch.exp(logprobs_BT - old_BT)
    loss_BT, clipped_BT = _ppo_clip(ratio_BT, adv_BT, clip_low, clip_high)
    loss_BT, kl_metrics = _with_kl(loss_BT, logprobs_BT, mask_BT, ref_logprobs, kl_coef, kl_kind)
    return loss_BT, mask_BT, _ratio_metrics(ratio_BT, clipped_BT, mask_BT) | kl_metrics


def grpo_loss(logprobs_BT: Tensor, old_logprobs_BT: Tensor, advantages: Tensor, mask_BT: Tensor, *,
              clip_low: float = 0.2, clip_high: float = 0.2, ref_logprobs: Tensor | None = None,
              kl_coef: float = 0.0, kl_kind: str = "k3") -> LossOutput:
    """GRPO (DeepSeekMath, arXiv 2402.03300), the clipped surrogate with per-sequence token means:

        r_it = exp(logprobs_it − old_logprobs_it)
        l_it = −min(r_it·A_i, clip(r_it, 1−ε_low, 1+ε_high)·A_i) + β·KL_it
        L    = (1/N) Σ_i (1/|o_i|) Σ_t l_it        over the N sequences with ≥ 1 token
    """
    loss_BT, mask_BT, metrics = _clipped_token_terms(logprobs_BT, old_logprobs_BT, advantages, mask_BT,
                                                     clip_low, clip_high, ref_logprobs, kl_coef, kl_kind)
    return LossOutput(_seq_mean_token_mean(loss_BT, mask_BT), metrics)


def dapo_loss(logprobs_BT: Tensor, old_logprobs_BT: Tensor, advantages: Tensor, mask_BT: Tensor, *,
              clip_low: float = 0.2, clip_high: float = 0.28, ref_logprobs: Tensor | None = None,
              kl_coef: float = 0.0, kl_kind: str = "k3") -> LossOutput:
    """DAPO (arXiv 2503.14476): clip-higher (ε_high = 0.28) and a token-level mean over the batch:

        l_it = −min(r_it·A_i, clip(r_it, 1−ε_low, 1+ε_high)·A_i) + β·KL_it
        L    = Σ_i Σ_t l_it / Σ_i |o_i|
    """
    loss_BT, mask_BT, metrics = _clipped_token_terms(logprobs_BT, old_logprobs_BT, advantages, mask_BT,
                                                     clip_low, clip_high, ref_logprobs, kl_coef, kl_kind)
    return LossOutput(masked_mean(loss_BT, mask_BT), metrics)


def dr_grpo_loss(logprobs_BT: Tensor, old_logprobs_BT: Tensor, advantages: Tensor, mask_BT: Tensor, *,
                 max_len: int | None = None, clip_low: float = 0.2, clip_high: float = 0.2,
                 ref_logprobs: Tensor | None = None, kl_coef: float = 0.0, kl_kind: str = "k3") -> LossOutput:
    """Dr.GRPO (arXiv 2503.20783): no length bias, a constant normaliser instead of |o_i|:

        l_it = −min(r_it·A_i, clip(r_it, 1−ε_low, 1+ε_high)·A_i) + β·KL_it
        L    = Σ_i Σ_t l_it / (B · max_len)

    `max_len` (the generation budget) is required. B counts every row, empty ones included, so
    adding a fully-masked row scales the loss and gradients by B / (B + 1).
    """
    if max_len is None or max_len <= 0:
        raise ValueError(f"dr_grpo needs max_len > 0 (the generation budget), got max_len={max_len!r}")
    loss_BT, mask_BT, metrics = _clipped_token_terms(logprobs_BT, old_logprobs_BT, advantages, mask_BT,
                                                     clip_low, clip_high, ref_logprobs, kl_coef, kl_kind)
    return LossOutput(masked_sum(loss_BT, mask_BT) / (mask_BT.shape[0] * max_len), metrics)


# --------------------------------------------------------------------------------------------
# Sequence-level ratios: GSPO, GSPO-token, GMPO


def gspo_loss(logprobs_BT: Tensor, old_logprobs_BT: Tensor, advantages_B: Tensor, mask_BT: Tensor, *,
              clip_low: float = 3e-4, clip_high: float = 4e-4) -> LossOutput:
    """GSPO (arXiv 2507.18071): one length-normalised importance ratio per sequence:

        s_i = (π_θ(y_i|x) / π_θold(y_i|x))^(1/|y_i|) = exp((1/|y_i|) Σ_t (logprobs_it − old_it))
        l_i = −min(s_i·A_i, clip(s_i, 1−ε_low, 1+ε_high)·A_i)
        L   = mean of l_i over the sequences with ≥ 1 token

    `advantages_B` must be [B]; `clip_frac` and the ratio metrics are over sequences.
    """
    logprobs_BT, old_BT, mask_BT = _clean(logprobs_BT, old_logprobs_BT, mask_BT)
    has_tokens_B = mask_BT.any(dim=-1)
    adv_B = _sequence_advantages(advantages_B, has_tokens_B)
    seq_ratio_B = torch.exp(masked_mean(logprobs_BT - old_BT, mask_BT, dim=-1))
    loss_B, clipped_B = _ppo_clip(seq_ratio_B, adv_B, clip_low, clip_high)
    return LossOutput(_mean_over_sequences(loss_B, has_tokens_B), _ratio_metrics(seq_ratio_B, clipped_B, has_tokens_B))


def gspo_token_loss(logprobs_BT: Tensor, old_logprobs_BT: Tensor, advantages: Tensor, mask_BT: Tensor, *,
                    clip_low: float = 3e-4, clip_high: float = 4e-4, ref_logprobs: Tensor | None = None,
                    kl_coef: float = 0.0, kl_kind: str = "k3") -> LossOutput:
    """GSPO-token (arXiv 2507.18071, eq. 13): the GSPO ratio's value with a per-token gradient:

        s_it = sg(s_i) · π_θ(y_it) / sg(π_θ(y_it)) = sg(s_i) · exp(logprobs_it − sg(logprobs_it))
        l_it = −min(s_it·A_it, clip(s_it, 1−ε_low, 1+ε_high)·A_it) + β·KL_it
        L    = (1/N) Σ_i (1/|y_i|) Σ_t l_it        as GRPO

    With A_it = A_i this equals GSPO in value and gradient. Accepts [B] or [B, T] advantages.
    """
    logprobs_BT, old_BT, mask_BT = _clean(logprobs_BT, old_logprobs_BT, mask_BT)
    adv_BT = _token_advantages(advantages, mask_BT)
    seq_log_ratio_B = masked_mean(logprobs_BT - old_BT, mask_BT, dim=-1).detach()
    ratio_BT = torch.exp(seq_log_ratio_B[:, None] + logprobs_BT - logprobs_BT.detach())
    loss_BT, clipped_BT = _ppo_clip(ratio_BT, adv_BT, clip_low, clip_high)
    loss_BT, kl_metrics = _with_kl(loss_BT, logprobs_BT, mask_BT, ref_logprobs, kl_coef, kl_kind)
    metrics = _ratio_metrics(ratio_BT, clipped_BT, mask_BT) | kl_metrics
    return LossOutput(_seq_mean_token_mean(loss_BT, mask_BT), metrics)


def gmpo_loss(logprobs_BT: Tensor, old_logprobs_BT: Tensor, advantages_B: Tensor, mask_BT: Tensor, *,
              clip_low: float = 0.4, clip_high: float = 0.4) -> LossOutput:
    """GMPO (arXiv 2507.20673): the geometric mean of token ratios, clipped token-wise in log space:

        x_it = logprobs_it − old_it
        c_it = min(x_it, clip(x_it, −ε_low, ε_high))   if A_i > 0
               max(x_it, clip(x_it, −ε_low, ε_high))   if A_i < 0
        R_i  = exp((1/|o_i|) Σ_t c_it)
        L    = (1/B) Σ_i −A_i · R_i                    over all B rows (empty rows add 0)

    `ratio_*` metrics are of the token ratios exp(x); `seq_ratio_mean` is the mean R_i.
    """
    logprobs_BT, old_BT, mask_BT = _clean(logprobs_BT, old_logprobs_BT, mask_BT)
    has_tokens_B = mask_BT.any(dim=-1)
    adv_B = _sequence_advantages(advantages_B, has_tokens_B)
    log_ratio_BT = logprobs_BT - old_BT
    clamped_BT = log_ratio_BT.clamp(-clip_low, clip_high)
    positive_B1, negative_B1 = (adv_B > 0)[:, None], (adv_B < 0)[:, None]
    pessimistic_BT = torch.where(positive_B1, torch.minimum(log_ratio_BT, clamped_BT), torch.maximum(log_ratio_BT, clamped_BT))
    seq_ratio_B = torch.exp(masked_mean(pessimistic_BT, mask_BT, dim=-1))
    loss = (-adv_B * seq_ratio_B).sum() / max(mask_BT.shape[0], 1)
    x = log_ratio_BT.detach()
    clipped_BT = (positive_B1 & (x > clip_high)) | (negative_B1 & (x < -clip_low))
    metrics = _ratio_metrics(x.exp(), clipped_BT, mask_BT)
    metrics["seq_ratio_mean"] = masked_mean(seq_ratio_B.detach(), has_tokens_B)
    return LossOutput(loss, metrics)


# --------------------------------------------------------------------------------------------
# Decoupled PPO for stale data (AReaL)


def decoupled_ppo_loss(logprobs_BT: Tensor, old_logprobs_BT: Tensor, advantages: Tensor, mask_BT: Tensor, *,
                       prox_logprobs: Tensor | None = None, clip_low: float = 0.2, clip_high: float = 0.2,
                       behav_weight_cap: float = 5.0, ref_logprobs: Tensor | None = None,
                       kl_coef: float = 0.0, kl_kind: str = "k3") -> LossOutput:
    """Decoupled PPO (AReaL, arXiv 2505.24298, eq. 5): behaviour policy ≠ proximal policy.

    `old_logprobs_BT` are the behaviour log-probs (the engine that sampled), `prox_logprobs` those
    of the proximal policy (the weights at the start of this training step):

        w_it = exp(prox_it − behav_it)  (a constant; 0 where w_it > behav_weight_cap)
        u_it = exp(logprobs_it − prox_it)
        l_it = −w_it · min(u_it·A_it, clip(u_it, 1−ε_low, 1+ε_high)·A_it) + β·KL_it
        L    = Σ_i Σ_t l_it / Σ_i |o_i|   (rejected tokens stay in the denominator)

    With prox == behav this is DAPO's aggregation with the same clip range. Extra metrics:
    `behav_weight_mean` and `behav_weight_max` (of the finite w over mask tokens, before the cap;
    the mean is ≈ 1 even for stale data, since E_behav[w] = 1, so the max shows staleness) and
    `behav_reject_frac`.
    """
    if prox_logprobs is None:
        raise ValueError("decoupled_ppo needs prox_logprobs (log-probs of the proximal policy), passed by the trainer")
    logprobs_BT, behav_BT, mask_BT = _clean(logprobs_BT, old_logprobs_BT, mask_BT)
    prox_BT = _constant(prox_logprobs, mask_BT)
    adv_BT = _token_advantages(advantages, mask_BT)
    behav_weight_BT = torch.exp(prox_BT - behav_BT)
    rejected_BT = ~(behav_weight_BT <= behav_weight_cap)  # NaN counts as rejected
    ratio_BT = torch.exp(logprobs_BT - prox_BT)
    pg_BT, clipped_BT = _ppo_clip(ratio_BT, adv_BT, clip_low, clip_high)
    loss_BT = torch.where(rejected_BT, 0.0, behav_weight_BT) * pg_BT  # zero w first: inf·0 would be NaN
    loss_BT, kl_metrics = _with_kl(loss_BT, logprobs_BT, mask_BT, ref_logprobs, kl_coef, kl_kind)
    metrics = _ratio_metrics(ratio_BT, clipped_BT, mask_BT) | kl_metrics
    finite_BT = mask_BT & behav_weight_BT.isfinite()
    metrics["behav_weight_mean"] = masked_mean(behav_weight_BT, finite_BT)
    metrics["behav_weight_max"] = _masked_extreme(behav_weight_BT, finite_BT, largest=True)
    metrics["behav_reject_frac"] = masked_mean(rejected_BT.to(logprobs_BT.dtype), mask_BT)
    return LossOutput(masked_mean(loss_BT, mask_BT), metrics)


# --------------------------------------------------------------------------------------------
# Supervised warm start


def sft_loss(logprobs_BT: Tensor, mask_BT: Tensor) -> LossOutput:
    """Mean negative log-likelihood over mask tokens: L = −Σ_it m_it·logprobs_it / Σ_it m_it."""
    if logprobs_BT.shape != mask_BT.shape:
        raise ValueError(f"logprobs {tuple(logprobs_BT.shape)} and mask {tuple(mask_BT.shape)} must match")
    nll = -masked_mean(logprobs_BT, mask_BT.bool())
    return LossOutput(nll, {"nll": nll.detach()})


# --------------------------------------------------------------------------------------------
# The registry and what configuration may set

POLICY_LOSSES: dict[str, Callable[..., LossOutput]] = {
    "grpo": grpo_loss,
    "dapo": dapo_loss,
    "dr_grpo": dr_grpo_loss,
    "gspo": gspo_loss,
    "gspo_token": gspo_token_loss,
    "gmpo": gmpo_loss,
    "decoupled_ppo": decoupled_ppo_loss,
}



@dataclass(frozen=True)
class LossNeeds:
    """What a loss needs from the trainer besides (logprobs, behaviour logprobs, advantages, mask)."""

    proximal: bool = False  # prox_logprobs: the policy at the start of the training step (no grad)
    kl_inside: bool = False  # takes ref_logprobs, kl_coef, kl_kind and adds the KL per token itself;
    #                          otherwise the trainer adds kl_coef · token-mean KL to the loss
    max_len: bool = False  # max_len: the generation budget (a constant normaliser)


# Declared beside the definitions above; the trainer reads this table, never the loss names.
LOSS_NEEDS: dict[str, LossNeeds] = {
    "grpo": LossNeeds(kl_inside=True),
    "dapo": LossNeeds(kl_inside=True),
    "dr_grpo": LossNeeds(kl_inside=True, max_len=True),
    "gspo": LossNeeds(),
    "gspo_token": LossNeeds(kl_inside=True),
    "gmpo": LossNeeds(),
    "decoupled_ppo": LossNeeds(proximal=True, kl_inside=True),
}

# Keyword arguments that are tensors supplied by the trainer, never by configuration.
TENSOR_KWARGS = frozenset({"ref_logprobs", "prox_logprobs"})


def _keyword_params(key: str) -> dict[str, inspect.Parameter]:
    if key not in POLICY_LOSSES:
        raise ValueError(f"unknown loss {key!r}; allowed: {', '.join(POLICY_LOSSES)}")
    params = inspect.signature(POLICY_LOSSES[key]).parameters
    return {name: p for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def allowed_hyper(key: str) -> set[str]:
    """Non-tensor keyword arguments loss `key` accepts (e.g. clip_low, max_len, kl_kind)."""
    return set(_keyword_params(key)) - TENSOR_KWARGS
