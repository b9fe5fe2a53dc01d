"""The RLT teacher reward as pure functions (Cetin, Zhao, Tang, "Reinforcement Learning Teachers of
Test Time Scaling", arXiv 2506.08388, §3). Layer 0: torch only.

A teacher sees a question q and its solution s and writes an explanation t (its think tokens). A
frozen student then reads (q, t) and is asked how likely it finds s, and how natural t looks to it
when it sees only q. Two terms, each a mean plus a small weight α on the worst token:

    r_SS = mean_j log π_S(s_j | q, t, s_<j) + α · min_j log π_S(s_j | q, t, s_<j)      j over the solution
    KL_i = D_KL( π_T(· | q, s, t_<i) ‖ π_S(· | q, t_<i) )                               i over the explanation
    r_KL = mean_i KL_i + α · max_i KL_i
    r    = r_SS − λ · r_KL

Defaults (`config_sections.SelfPlayConfig`): λ = 3 (`rlt_kl_coef`), α = 0.01 (`rlt_alpha`), the
coefficients of the authors' released teacher recipe (github.com/SakanaAI/RLT,
cfgs/run_cfg/teacher_rlt.yaml: log-prob coefficients (1, 0.01) for (mean, min), KL coefficients
(3, 0.03) for (mean, max)). That recipe also reads the student's distribution at temperature 0.7
and the teacher's at its sampling temperature; `token_logprobs`/`token_kl` take both temperatures.

KL_i here is the exact divergence over the vocabulary at each explanation position (we hold both
models' logits); the released code estimates it from the sampled token alone,
log π_T(t_i) − log π_S(t_i), whose expectation under the teacher is the same KL_i.

Shapes: `S` solution tokens, `T` explanation tokens, `V` vocabulary, `G` group members (the G
explanations of one problem). Everything is computed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class RLTScores:
    """The reward of each of G explanations and its two terms (reward_G = r_ss_G − λ·r_kl_G)."""

    reward_G: Tensor
    r_ss_G: Tensor
    r_kl_G: Tensor


def _log_softmax(logits_TV: Tensor, temperature: float) -> Tensor:
    if temperature <= 0:
        raise ValueError(f"a temperature must be > 0 to read a distribution from logits, got {temperature}")
    return torch.log_softmax(logits_TV.double() / temperature, dim=-1)


def token_logprobs(logits_TV: Tensor, ids_T: Tensor, *, temperature: float = 1.0) -> Tensor:
    """log π(ids_T[t] | ·) from the logits that predict each token, π = softmax(logits / temperature):
    [T] float64. Row t of `logits_TV` must be the distribution of token `ids_T[t]`."""
    if logits_TV.shape[:-1] != ids_T.shape:
        raise ValueError(f"token_logprobs: {tuple(ids_T.shape)} ids need logits of shape ({', '.join(map(str, ids_T.shape))}, V), got {tuple(logits_TV.shape)}")
    return _log_softmax(logits_TV, temperature).gather(-1, ids_T.long().unsqueeze(-1)).squeeze(-1)


def token_kl(teacher_logits_TV: Tensor, student_logits_TV: Tensor, *, teacher_temperature: float = 1.0, student_temperature: float = 1.0) -> Tensor:
    """KL_t = Σ_v π_T(v) (log π_T(v) − log π_S(v)) at each of T positions: [T] float64, ≥ 0.

    π_T = softmax(teacher_logits / teacher_temperature), π_S likewise; row t of each is the two
    models' distribution of the same explanation token (each under its own context)."""
    if teacher_logits_TV.shape != student_logits_TV.shape:
        raise ValueError(f"token_kl: teacher logits {tuple(teacher_logits_TV.shape)} and student logits {tuple(student_logits_TV.shape)} differ; pass the same T positions over one vocabulary")
    log_p_TV = _log_softmax(teacher_logits_TV, teacher_temperature)
    log_q_TV = _log_softmax(student_logits_TV, student_temperature)
    # 0·log 0 = 0: a token the teacher never picks adds nothing, even where the student gives it -inf.
    terms_TV = torch.where(log_p_TV.isneginf(), torch.zeros_like(log_p_TV), log_p_TV.exp() * (log_p_TV - log_q_TV))
    return terms_TV.sum(-1).clamp_min(0.0)


def _masked_mean(values_GT: Tensor, mask_GT: Tensor) -> Tensor:
    counts_G = mask_GT.sum(-1)
    return torch.where(mask_GT, values_GT, torch.zeros_like(values_GT)).sum(-1) / counts_G.clamp_min(1)


def solution_score(solution_logprobs_GS: Tensor, solution_mask_GS: Tensor, *, alpha: float) -> Tensor:
    """r_SS = mean_j log π_S(s_j | q, t, s_<j) + α · min_j log π_S(s_j | q, t, s_<j) over each row's
    solution tokens (`solution_mask_GS` True): [G] float64. A row with no solution token is an error:
    every problem has a solution to reproduce."""
    values_GS, mask_GS = solution_logprobs_GS.double(), solution_mask_GS.bool()
    if values_GS.shape != mask_GS.shape:
        raise ValueError(f"solution_score: log-probs {tuple(values_GS.shape)} and mask {tuple(mask_GS.shape)} differ")
    if not bool(mask_GS.any(-1).all()):
        raise ValueError("solution_score: a row has no solution token; the student must be scored on at least one token of the solution")
    low_G = torch.where(mask_GS, values_GS, torch.full_like(values_GS, float("inf"))).amin(-1)
    return _masked_mean(values_GS, mask_GS) + alpha * low_G


def explanation_kl_score(kl_GT: Tensor, explanation_mask_GT: Tensor, *, alpha: float) -> Tensor:
    """r_KL = mean_i KL_i + α · max_i KL_i over each row's explanation tokens (`explanation_mask_GT`
    True): [G] float64. An empty explanation diverges nowhere: r_KL = 0."""
    values_GT, mask_GT = kl_GT.double(), explanation_mask_GT.bool()
    if values_GT.shape != mask_GT.shape:
        raise ValueError(f"explanation_kl_score: KL {tuple(values_GT.shape)} and mask {tuple(mask_GT.shape)} differ")
    high_G = torch.where(mask_GT, values_GT, torch.zeros_like(values_GT)).amax(-1) if values_GT.shape[-1] else torch.zeros(values_GT.shape[:-1], dtype=torch.float64)
    return _masked_mean(values_GT, mask_GT) + alpha * high_G


def rlt_rewards(solution_logprobs_GS: Tensor, solution_mask_GS: Tensor, kl_GT: Tensor, explanation_mask_GT: Tensor, *,
                kl_coef: float, alpha: float) -> RLTScores:
    """r = r_SS − λ · r_KL for G explanations (λ = `kl_coef`), with both terms (module docstring).

    Rows are right-padded: `solution_mask_GS` marks the real solution tokens of row g, and
    `explanation_mask_GT` its real explanation tokens (KL_i ≥ 0, so padding never raises the max)."""
    r_ss_G = solution_score(solution_logprobs_GS, solution_mask_GS, alpha=alpha)
    r_kl_G = explanation_kl_score(kl_GT, explanation_mask_GT, alpha=alpha)
    if r_ss_G.shape != r_kl_G.shape:
        raise ValueError(f"rlt_rewards: {r_ss_G.shape[0]} solution rows but {r_kl_G.shape[0]} explanation rows; pass one of each per explanation")
    return RLTScores(reward_G=r_ss_G - kl_coef * r_kl_G, r_ss_G=r_ss_G, r_kl_G=r_kl_G)


def pad_rows(rows: list[Tensor], fill: float = 0.0) -> tuple[Tensor, Tensor]:
    """Right-pad 1-D tensors into [G, L] with a [G, L] bool mask of the real entries (L ≥ 0)."""
    width = max((len(r) for r in rows), default=0)
    values_GL = torch.full((len(rows), width), fill, dtype=torch.float64)
    mask_GL = torch.zeros((len(rows), width), dtype=torch.bool)
    for g, row in enumerate(rows):
        values_GL[g, :len(row)] = row.double()
        mask_GL[g, :len(row)] = True
    return values_GL, mask_GL
