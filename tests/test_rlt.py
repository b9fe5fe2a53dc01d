"""RLT teacher reward (arXiv 2506.08388 §3): the vectorised functions against a direct float64
computation from the formulas, loop by loop, and their edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from policyflow.selfplay.rlt_reward import explanation_kl_score, pad_rows, rlt_rewards, solution_score, token_kl, token_logprobs

F64 = torch.float64


# -- the formulas, written out with Python floats -----------------------------------------------


def softmax_row(logits: list[float], temperature: float) -> list[float]:
    scaled = [x / temperature for x in logits]
    top = max(scaled)
    exps = [math.exp(x - top) for x in scaled]
    total = sum(exps)
    return [e / total for e in exps]


def direct_reward(teacher_logits, student_expl_logits, student_sol_logits, solution_ids, *, lam, alpha, t_temp=1.0, s_temp=1.0):
    """r = r_SS − λ r_KL from nested Python lists, one explanation."""
    sol_logps = [math.log(softmax_row(row, s_temp)[tok]) for row, tok in zip(student_sol_logits, solution_ids)]
    r_ss = sum(sol_logps) / len(sol_logps) + alpha * min(sol_logps)
    kls = []
    for p_row, q_row in zip(teacher_logits, student_expl_logits):
        p, q = softmax_row(p_row, t_temp), softmax_row(q_row, s_temp)
        kls.append(sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0))
    r_kl = (sum(kls) / len(kls) + alpha * max(kls)) if kls else 0.0
    return r_ss - lam * r_kl, r_ss, r_kl


def random_group(G=4, V=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    members = []
    for j in range(G):
        T, S = [5, 1, 3, 0][j % 4], [2, 3, 1, 4][j % 4]
        members.append(dict(
            teacher=torch.randn(T, V, generator=g, dtype=F64) * 2,
            student_expl=torch.randn(T, V, generator=g, dtype=F64) * 2,
            student_sol=torch.randn(S, V, generator=g, dtype=F64) * 2,
            solution=torch.randint(0, V, (S,), generator=g),
        ))
    return members


def vectorised(members, *, lam, alpha, t_temp=1.0, s_temp=1.0):
    sol_rows = [token_logprobs(m["student_sol"].float(), m["solution"], temperature=s_temp) for m in members]
    kl_rows = [token_kl(m["teacher"].float(), m["student_expl"].float(), teacher_temperature=t_temp, student_temperature=s_temp) for m in members]
    sol_GS, sol_mask = pad_rows(sol_rows, fill=123.0)  # the fill must not leak into min or mean
    kl_GT, kl_mask = pad_rows(kl_rows, fill=99.0)  # nor into max or mean
    return rlt_rewards(sol_GS, sol_mask, kl_GT, kl_mask, kl_coef=lam, alpha=alpha)


@pytest.mark.parametrize("lam,alpha,t_temp,s_temp", [(3.0, 0.01, 1.0, 1.0), (3.0, 0.01, 0.7, 0.7), (0.5, 0.3, 1.3, 0.7), (0.0, 0.0, 1.0, 1.0)])
def test_reward_equals_the_formulas_computed_directly(lam, alpha, t_temp, s_temp):
    members = random_group(G=8, seed=int(lam * 10 + alpha * 100))
    scores = vectorised(members, lam=lam, alpha=alpha, t_temp=t_temp, s_temp=s_temp)
    for g, m in enumerate(members):
        reward, r_ss, r_kl = direct_reward(m["teacher"].tolist(), m["student_expl"].tolist(), m["student_sol"].tolist(), m["solution"].tolist(),
                                           lam=lam, alpha=alpha, t_temp=t_temp, s_temp=s_temp)
        assert scores.reward_G[g].item() == pytest.approx(reward, abs=1e-6)
        assert scores.r_ss_G[g].item() == pytest.approx(r_ss, abs=1e-6)
        assert scores.r_kl_G[g].item() == pytest.approx(r_kl, abs=1e-6)
    assert scores.reward_G.dtype == F64


def test_a_worked_example_by_hand():
    # Solution log-probs ln(1/2), ln(1/4): mean = −(3/2)ln2, min = −2ln2; α = 0.1 → r_SS = −1.7 ln2.
    # Explanation KLs 0.2 and 0.6: mean 0.4, max 0.6 → r_KL = 0.46; λ = 2 → r = −1.7 ln2 − 0.92.
    scores = rlt_rewards(torch.tensor([[math.log(0.5), math.log(0.25)]], dtype=F64), torch.tensor([[True, True]]),
                         torch.tensor([[0.2, 0.6]], dtype=F64), torch.tensor([[True, True]]), kl_coef=2.0, alpha=0.1)
    assert scores.r_ss_G.item() == pytest.approx(-1.7 * math.log(2), abs=1e-12)
    assert scores.r_kl_G.item() == pytest.approx(0.46, abs=1e-12)
    assert scores.reward_G.item() == pytest.approx(-1.7 * math.log(2) - 0.92, abs=1e-12)


def test_token_kl_is_zero_for_the_same_distribution_and_matches_a_known_value():
    logits_TV = torch.randn(4, 9, dtype=F64)
    assert torch.allclose(token_kl(logits_TV, logits_TV), torch.zeros(4, dtype=F64), atol=1e-12)
    # p = (1/2, 1/2), q = (1/4, 3/4): KL = ½ln2 + ½ln(2/3)
    kl = token_kl(torch.log(torch.tensor([[0.5, 0.5]])), torch.log(torch.tensor([[0.25, 0.75]])))
    assert kl.item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), abs=1e-7)


def test_a_token_the_teacher_never_picks_adds_nothing_even_if_the_student_excludes_it():
    teacher = torch.tensor([[0.0, 0.0, -math.inf]])
    student = torch.tensor([[0.0, 1.0, -math.inf]])
    kl = token_kl(teacher, student)
    assert torch.isfinite(kl).all()
    assert kl.item() == pytest.approx(0.5 * math.log(0.5 / (1 / (1 + math.e))) + 0.5 * math.log(0.5 / (math.e / (1 + math.e))), abs=1e-9)


def test_an_empty_explanation_has_no_divergence():
    sol, sol_mask = pad_rows([torch.tensor([-0.5, -1.0]), torch.tensor([-2.0])])
    kl, kl_mask = pad_rows([torch.tensor([]), torch.tensor([0.3])])
    scores = rlt_rewards(sol, sol_mask, kl, kl_mask, kl_coef=3.0, alpha=0.01)
    assert scores.r_kl_G[0].item() == 0.0
    assert scores.reward_G[0].item() == pytest.approx(-0.75 + 0.01 * -1.0)
    # Every explanation empty: a zero-width KL tensor.
    kl0, kl0_mask = pad_rows([torch.tensor([]), torch.tensor([])])
    assert kl0.shape == (2, 0)
    assert explanation_kl_score(kl0, kl0_mask, alpha=0.01).tolist() == [0.0, 0.0]


def test_an_empty_solution_is_refused():
    with pytest.raises(ValueError, match="no solution token"):
        solution_score(torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.bool), alpha=0.01)


def test_a_single_token_solution_counts_its_one_logprob_in_mean_and_min():
    assert solution_score(torch.tensor([[-0.3]]), torch.tensor([[True]]), alpha=0.5).item() == pytest.approx(-0.45)


def test_mismatched_shapes_and_temperatures_are_refused():
    with pytest.raises(ValueError, match="differ"):
        token_kl(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="logits of shape"):
        token_logprobs(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="rows"):
        rlt_rewards(torch.zeros(2, 1), torch.ones(2, 1, dtype=torch.bool), torch.zeros(3, 1), torch.ones(3, 1, dtype=torch.bool), kl_coef=1.0, alpha=0.0)


def test_a_clearer_explanation_scores_higher():
    # The student reproduces the solution with higher probability after explanation A than B, and
    # A looks no less natural to it: A's reward is higher.
    sol, sol_mask = pad_rows([torch.tensor([-0.1, -0.2]), torch.tensor([-1.5, -2.5])])
    kl, kl_mask = pad_rows([torch.tensor([0.1, 0.1]), torch.tensor([0.1, 0.1])])
    scores = rlt_rewards(sol, sol_mask, kl, kl_mask, kl_coef=3.0, alpha=0.01)
    assert scores.reward_G[0] > scores.reward_G[1]
