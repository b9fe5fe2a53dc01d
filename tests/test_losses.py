"""Policy losses: hand-computed values, gradients vs finite differences, invariants, masking."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from policyflow.losses import (
    LOSS_NEEDS,
    POLICY_LOSSES,
    allowed_hyper,
    kl_penalty,
    sft_loss,
)

KL_INSIDE = sorted(k for k, needs in LOSS_NEEDS.items() if needs.kl_inside)

F64 = torch.float64
NAN, INF = float("nan"), float("inf")
LN = math.log


def t(values, dtype=F64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def call(key, logprobs, old, adv, mask, **hyper):
    """POLICY_LOSSES[key] with the one hyper each loss needs filled in (max_len, prox == old)."""
    if key == "dr_grpo":
        hyper.setdefault("max_len", mask.shape[1])
    if key == "decoupled_ppo":
        hyper.setdefault("prox_logprobs", old)
    return POLICY_LOSSES[key](logprobs, old, adv, mask, **hyper)


def grad_of(key, logprobs, old, adv, mask, **hyper):
    logprobs = logprobs.detach().clone().requires_grad_(True)
    out = call(key, logprobs, old, adv, mask, **hyper)
    (grad,) = torch.autograd.grad(out.loss, logprobs)
    return out.loss.detach(), grad


def random_batch(B=3, T=5, seed=0, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=F64) * 3
    logprobs = old + spread * torch.randn(B, T, generator=g, dtype=F64)
    adv = torch.randn(B, generator=g, dtype=F64)
    lengths = torch.arange(B) % T + 1
    mask = torch.arange(T)[None, :] < torch.tensor([T, *lengths[1:].tolist()])[:, None]
    return logprobs, old, adv, mask


# --------------------------------------------------------------------------------------------
# Worked example shared by grpo / dapo / dr_grpo (B = 2, T = 3)
#
# row 0: A = +1, mask [1 1 1], ratios r = exp(lp − old) = [1, 1.5, 0.5]
# row 1: A = −2, mask [1 1 0], ratios r = [0.9, 0.5, garbage]
# clip (0.2, 0.2) → clip(r) ∈ [0.8, 1.2];  l = −min(r·A, clip(r)·A):
#   row 0: r=1 → −1;  r=1.5 → −min(1.5, 1.2) = −1.2 (clip active);  r=0.5 → −min(0.5, 0.8) = −0.5
#   row 1: r=0.9 → −min(−1.8, −1.8) = 1.8;  r=0.5 → −min(−1.0, −1.6) = 1.6 (clip active)
# grpo    = mean(mean(−1, −1.2, −0.5), mean(1.8, 1.6)) = mean(−0.9, 1.7) = 0.4
# dr_grpo = (−2.7 + 3.4) / (B·max_len = 2·4) = 0.0875
# dapo (clip_high 0.28 → r=1.5 gives −1.28) = (−1 − 1.28 − 0.5 + 1.8 + 1.6) / 5 = 0.124
# clip_frac = 2/5; ratio mean (1 + 1.5 + 0.5 + 0.9 + 0.5)/5 = 0.88, min 0.5, max 1.5

def worked_batch():
    old = t([[-1.0, -2.0, -0.5], [-1.5, -0.7, -INF]])
    ratios = t([[1.0, 1.5, 0.5], [0.9, 0.5, 1.0]])
    logprobs = old.nan_to_num(neginf=0.0) + ratios.log()
    logprobs[1, 2] = NAN  # garbage under the mask
    mask = t([[1, 1, 1], [1, 1, 0]]).bool()
    return logprobs, old, t([1.0, -2.0]), mask


@pytest.mark.parametrize(
    "key, hyper, expected",
    [("grpo", {}, 0.4), ("dapo", {}, 0.124), ("dr_grpo", {"max_len": 4}, 0.0875)],
)
def test_token_losses_worked_example(key, hyper, expected):
    logprobs, old, adv, mask = worked_batch()
    out = call(key, logprobs, old, adv, mask, **hyper)
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    m = out.metrics
    assert m["clip_frac"].item() == pytest.approx(0.4)
    assert m["ratio_mean"].item() == pytest.approx(0.88)
    assert m["ratio_min"].item() == pytest.approx(0.5)
    assert m["ratio_max"].item() == pytest.approx(1.5)
    assert "kl" not in m


def test_grpo_gradient_by_hand_and_clip_cuts_gradient():
    # ∂l/∂lp = −r·A where unclipped, 0 where the clip is active; then /|o_i| and /N (N = 2):
    # row 0: [−1/(3·2), 0 (r=1.5, A>0: cut), −0.5/(3·2)] ; row 1: [1.8/(2·2), 0 (r=0.5, A<0: cut), 0]
    # r = 0.5 with A > 0 (row 0, token 2) is below the range but *not* cut: the pessimistic min
    # keeps the unclipped term.
    logprobs, old, adv, mask = worked_batch()
    _, grad = grad_of("grpo", logprobs, old, adv, mask)
    expected = t([[-1 / 6, 0.0, -0.5 / 6], [0.45, 0.0, 0.0]])
    torch.testing.assert_close(grad, expected, atol=1e-12, rtol=0)


def test_gspo_worked_example():
    # clip (0.1, 0.1) → [0.9, 1.1]
    # row 0: A=+1, log-ratios [0.3, 0, 0] → s = e^0.1 = 1.10517 → clipped to 1.1: l = −1.1 (clip active)
    # row 1: A=−2, log-ratios [−0.2, 0, ·] (mask 1 1 0) → s = e^−0.1 = 0.904837 → l = 2·0.904837
    # loss = (−1.1 + 1.809675) / 2 = 0.354837; clip_frac = 1/2 (of sequences)
    old = t([[-1.0, -1.0, -1.0], [-2.0, -2.0, NAN]])
    logprobs = t([[-0.7, -1.0, -1.0], [-2.2, -2.0, NAN]])
    mask = t([[1, 1, 1], [1, 1, 0]])  # float mask is fine
    adv = t([1.0, -2.0])
    # gspo_token has GSPO's value (A_it = A_i); its clip_frac counts tokens: row 0's 3 of 5
    for key, clip_frac in (("gspo", 0.5), ("gspo_token", 0.6)):
        out = POLICY_LOSSES[key](logprobs, old, adv, mask, clip_low=0.1, clip_high=0.1)
        assert out.loss.item() == pytest.approx((-1.1 + 2 * math.exp(-0.1)) / 2, abs=1e-12)
        assert out.metrics["clip_frac"].item() == pytest.approx(clip_frac)
        assert out.metrics["ratio_max"].item() == pytest.approx(math.exp(0.1))
    # gradient: row 0 clipped → 0; row 1: −A·s/|o|/N = 2·e^−0.1/2/2 per token
    for key in ("gspo", "gspo_token"):
        _, grad = grad_of(key, logprobs, old, adv, mask.bool(), clip_low=0.1, clip_high=0.1)
        g = math.exp(-0.1) / 2
        torch.testing.assert_close(grad, t([[0.0, 0.0, 0.0], [g, g, 0.0]]), atol=1e-12, rtol=0)
    assert POLICY_LOSSES["gspo"](logprobs, old, adv, mask).metrics["ratio_mean"].item() == pytest.approx(
        (math.exp(0.1) + math.exp(-0.1)) / 2
    )


def test_gmpo_worked_example():
    # clip (0.4, 0.4) in log space. x = lp − old.
    # row 0: A=+1, x = [0.6, 0, −0.6]: c = min(x, clip(x)) = [0.4, 0, −0.6] → R = e^(−0.2/3)
    # row 1: A=−2, x = [0.6, −0.6, ·]: c = max(x, clip(x)) = [0.6, −0.4] → R = e^0.1
    # loss = (−e^(−1/15) + 2·e^0.1) / 2 = 0.637417; clip active on row0 x=0.6 and row1 x=−0.6 → 2/5
    old = t([[-1.0, -1.0, -1.0], [-1.0, -1.0, -INF]])
    logprobs = t([[-0.4, -1.0, -1.6], [-0.4, -1.6, NAN]])
    mask = t([[1, 1, 1], [1, 1, 0]]).bool()
    adv = t([1.0, -2.0])
    out = POLICY_LOSSES["gmpo"](logprobs, old, adv, mask)
    assert out.loss.item() == pytest.approx((-math.exp(-1 / 15) + 2 * math.exp(0.1)) / 2, abs=1e-12)
    assert out.metrics["clip_frac"].item() == pytest.approx(0.4)
    assert out.metrics["seq_ratio_mean"].item() == pytest.approx((math.exp(-1 / 15) + math.exp(0.1)) / 2)
    # gradient: −A·R/|o|/B on unclipped tokens: row 0 [0, −R0/6, −R0/6]; row 1 [2·R1/4, 0, 0]
    _, grad = grad_of("gmpo", logprobs, old, adv, mask)
    r0, r1 = math.exp(-1 / 15), math.exp(0.1)
    torch.testing.assert_close(grad, t([[0.0, -r0 / 6, -r0 / 6], [r1 / 2, 0.0, 0.0]]), atol=1e-12, rtol=0)
    # GMPO averages over all B rows: an empty third row adds 0 to the sum but 1 to the denominator.
    pad = lambda x, v: torch.cat([x, torch.full((1, 3), v, dtype=x.dtype)])  # noqa: E731
    out3 = POLICY_LOSSES["gmpo"](pad(logprobs, NAN), pad(old, NAN), t([1.0, -2.0, NAN]), pad(mask, False))
    assert out3.loss.item() == pytest.approx((-r0 + 2 * r1) / 3, abs=1e-12)


def test_decoupled_ppo_worked_example():
    # cap 2, clip (0.2, 0.2). behav = 0 everywhere (masked garbage aside).
    # row 0, A=+1: prox = ln[1.5, 3, 1] → w = [1.5, 3 > cap → 0, 1]; u = exp(lp − prox) = [1, 1, 1.5]
    #   l = [−1.5·1, 0 (rejected), −1·min(1.5, 1.2) = −1.2 (clip active)]
    # row 1, A=−1, mask [1 0 0]: prox = ln 0.5 → w = 0.5; u = 0.7 → l = −0.5·min(−0.7, −0.8) = 0.4 (clip)
    # loss = (−1.5 + 0 − 1.2 + 0.4) / 4 tokens (the rejected one counts) = −0.575
    behav = t([[0.0, 0.0, 0.0], [0.0, NAN, NAN]])
    prox = t([[LN(1.5), LN(3.0), 0.0], [LN(0.5), INF, NAN]])
    logprobs = t([[LN(1.5), LN(3.0), LN(1.5)], [LN(0.35), -INF, NAN]])
    mask = t([[1, 1, 1], [1, 0, 0]]).bool()
    adv = t([1.0, -1.0])
    out = POLICY_LOSSES["decoupled_ppo"](logprobs, behav, adv, mask, prox_logprobs=prox, behav_weight_cap=2.0)
    assert out.loss.item() == pytest.approx(-0.575, abs=1e-12)
    m = out.metrics
    assert m["behav_reject_frac"].item() == pytest.approx(0.25)
    assert m["behav_weight_mean"].item() == pytest.approx((1.5 + 3 + 1 + 0.5) / 4)
    assert m["behav_weight_max"].item() == pytest.approx(3.0)
    assert m["clip_frac"].item() == pytest.approx(0.5)
    assert m["ratio_mean"].item() == pytest.approx((1 + 1 + 1.5 + 0.7) / 4)
    # only token (0, 0) has a gradient: −w·u·A / 4 = −1.5 / 4
    _, grad = grad_of("decoupled_ppo", logprobs, behav, adv, mask, prox_logprobs=prox, behav_weight_cap=2.0)
    torch.testing.assert_close(grad, t([[-0.375, 0.0, 0.0], [0.0, 0.0, 0.0]]), atol=1e-12, rtol=0)


def test_sft_loss_is_mean_nll_over_mask():
    # (1 + 2 + 3) / 3 tokens = 2; garbage under the mask is ignored, its gradient is 0
    logprobs = t([[-1.0, -2.0, NAN], [-3.0, -INF, NAN]]).requires_grad_(True)
    mask = t([[1, 1, 0], [1, 0, 0]])
    out = sft_loss(logprobs, mask)
    assert out.loss.item() == pytest.approx(2.0)
    assert out.metrics["nll"].item() == pytest.approx(2.0) and not out.metrics["nll"].requires_grad
    out.loss.backward()
    torch.testing.assert_close(logprobs.grad, t([[-1 / 3, -1 / 3, 0.0], [-1 / 3, 0.0, 0.0]]))


# --------------------------------------------------------------------------------------------
# KL


def test_kl_penalty_estimators():
    # d = [0, ln 2, −ln 2]
    lp, ref = t([0.0, LN(2.0), -LN(2.0)]), t([0.0, 0.0, 0.0])
    torch.testing.assert_close(kl_penalty(lp, ref, "k1"), t([0.0, LN(2), -LN(2)]))
    torch.testing.assert_close(kl_penalty(lp, ref, "k2"), t([0.0, LN(2) ** 2 / 2, LN(2) ** 2 / 2]))
    # k3 = e^−d + d − 1: d = ln 2 → 0.5 + ln 2 − 1; d = −ln 2 → 2 − ln 2 − 1
    torch.testing.assert_close(kl_penalty(lp, ref, "k3"), t([0.0, LN(2) - 0.5, 1 - LN(2)]))
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(lp, ref, "k4")


def test_kl_term_in_token_losses():
    # on-policy with A = 0 the policy term vanishes; d = lp − ref = [[0.2, 0.4, ·], [0.6, ·, ·]]
    # k1, kl_coef 0.5: grpo = 0.5·mean(0.3, 0.6) = 0.225 ; dapo = 0.5·(1.2/3) = 0.2 ; kl metric = 0.4
    lp = t([[-1.0, -1.0, -1.0], [-1.0, NAN, NAN]])
    ref = t([[-1.2, -1.4, NAN], [-1.6, NAN, -INF]])
    mask = t([[1, 1, 0], [1, 0, 0]]).bool()
    adv = t([0.0, 0.0])
    for key, expected in (("grpo", 0.225), ("dapo", 0.2), ("gspo_token", 0.225), ("decoupled_ppo", 0.2)):
        out = call(key, lp, lp, adv, mask, ref_logprobs=ref, kl_coef=0.5, kl_kind="k1")
        assert out.loss.item() == pytest.approx(expected, abs=1e-12), key
        assert out.metrics["kl"].item() == pytest.approx(0.4)
    out = call("dr_grpo", lp, lp, adv, mask, ref_logprobs=ref, kl_coef=0.5, kl_kind="k1", max_len=3)
    assert out.loss.item() == pytest.approx(0.5 * 1.2 / 6)
    # k3 uses the same aggregation
    k3 = kl_penalty(t([0.2, 0.4, 0.6]), t([0.0, 0.0, 0.0]), "k3")
    out = call("dapo", lp, lp, adv, mask, ref_logprobs=ref, kl_coef=1.0)
    assert out.loss.item() == pytest.approx(k3.mean().item())


def test_kl_errors():
    logprobs, old, adv, mask = worked_batch()
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        call("grpo", logprobs, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="allowed: k1, k2, k3"):
        call("dapo", logprobs, old, adv, mask, ref_logprobs=old, kl_coef=0.1, kl_kind="mse")


# --------------------------------------------------------------------------------------------
# Gradients vs finite differences (float64)


@pytest.mark.parametrize("key", sorted(POLICY_LOSSES))
def test_gradcheck(key):
    logprobs, old, adv, mask = random_batch(B=3, T=4, seed=1, spread=0.3)
    hyper = {}
    if key in KL_INSIDE:
        hyper |= {"ref_logprobs": old - 0.1, "kl_coef": 0.3}
    if key == "decoupled_ppo":
        hyper["prox_logprobs"] = old + 0.2 * torch.randn(old.shape, dtype=F64, generator=torch.Generator().manual_seed(5))
    if key in ("gspo", "gspo_token"):
        hyper |= {"clip_low": 0.05, "clip_high": 0.05}  # some sequences in range, some clipped
    logprobs = logprobs.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda lp: call(key, lp, old, adv, mask, **hyper).loss, (logprobs,))


# --------------------------------------------------------------------------------------------
# Invariants


def test_on_policy_gradients_agree():
    # On-policy (logprobs == old), every ratio is 1, no clip is active and each loss's gradient is
    # −A_i / (|o_i| · N) for every token of row i:
    #   grpo, gspo_token: per-sequence token mean, then mean over the N non-empty rows
    #   gspo: d s_i / d lp_it = s_i / |o_i| = 1 / |o_i|;  gmpo: d R_i / d lp_it = 1 / |o_i|, mean over B
    # so grpo, gspo, gspo_token and gmpo agree for ANY lengths, provided [B] advantages and no empty
    # rows (gmpo divides by B, the others by the non-empty count N). dapo (1/Σ|o|) and dr_grpo
    # (1/(B·max_len)) join them only when every row has the same length L = max_len.
    logprobs, _, adv, mask = random_batch(B=4, T=5, seed=2)
    assert (mask.sum(-1) > 0).all() and len(set(mask.sum(-1).tolist())) > 1  # unequal lengths
    grads = {k: grad_of(k, logprobs, logprobs, adv, mask)[1] for k in ("grpo", "gspo", "gspo_token", "gmpo")}
    lengths = mask.sum(-1, keepdim=True).to(F64)
    expected = torch.where(mask, -adv[:, None] / (lengths * mask.shape[0]), 0.0)
    for key, grad in grads.items():
        torch.testing.assert_close(grad, expected, atol=1e-14, rtol=1e-12, msg=key)
    assert not torch.allclose(grad_of("dapo", logprobs, logprobs, adv, mask)[1], expected)

    full = torch.ones_like(mask)
    expected_full = -adv[:, None].expand_as(logprobs) / full.numel()
    for key in ("grpo", "gspo", "gspo_token", "gmpo", "dapo", "dr_grpo", "decoupled_ppo"):
        torch.testing.assert_close(grad_of(key, logprobs, logprobs, adv, full)[1], expected_full, msg=key)


def test_gspo_token_matches_gspo_off_policy():
    logprobs, old, adv, mask = random_batch(B=4, T=5, seed=3, spread=0.05)
    hyper = {"clip_low": 0.02, "clip_high": 0.02}
    a_loss, a_grad = grad_of("gspo", logprobs, old, adv, mask, **hyper)
    b_loss, b_grad = grad_of("gspo_token", logprobs, old, adv, mask, **hyper)
    torch.testing.assert_close(a_loss, b_loss)
    torch.testing.assert_close(a_grad, b_grad)


def test_decoupled_with_prox_equal_behav_is_dapo():
    logprobs, old, adv, mask = random_batch(B=4, T=6, seed=4, spread=0.6)  # wide: clips are active
    hyper = {"clip_low": 0.2, "clip_high": 0.28, "ref_logprobs": old - 0.3, "kl_coef": 0.1}
    d_loss, d_grad = grad_of("decoupled_ppo", logprobs, old, adv, mask, prox_logprobs=old, **hyper)
    a_loss, a_grad = grad_of("dapo", logprobs, old, adv, mask, **hyper)
    assert call("dapo", logprobs, old, adv, mask, **hyper).metrics["clip_frac"] > 0
    torch.testing.assert_close(d_loss, a_loss, atol=1e-14, rtol=0)
    torch.testing.assert_close(d_grad, a_grad, atol=1e-14, rtol=0)


@pytest.mark.parametrize("key", sorted(POLICY_LOSSES))
def test_gradient_flows_only_into_logprobs(key):
    logprobs, old, adv, mask = random_batch(seed=5)
    logprobs.requires_grad_(True)
    old.requires_grad_(True)
    adv.requires_grad_(True)
    ref = (old.detach() - 0.1).requires_grad_(True)
    prox = (old.detach() + 0.1).requires_grad_(True)
    hyper = {"ref_logprobs": ref, "kl_coef": 0.2} if key in KL_INSIDE else {}
    if key == "decoupled_ppo":
        hyper["prox_logprobs"] = prox
    out = call(key, logprobs, old, adv, mask, **hyper)
    out.loss.backward()
    assert logprobs.grad is not None and logprobs.grad.abs().sum() > 0
    for name, x in (("old", old), ("adv", adv), ("ref", ref), ("prox", prox)):
        assert x.grad is None, name
    for name, value in out.metrics.items():
        assert not value.requires_grad and value.dim() == 0, name


def _append_empty_row(logprobs, old, adv, mask):
    garbage = torch.full((1, mask.shape[1]), NAN, dtype=F64)
    return (torch.cat([logprobs, garbage]), torch.cat([old, -garbage.abs() * INF]),
            torch.cat([adv, t([NAN])]), torch.cat([mask, torch.zeros(1, mask.shape[1], dtype=torch.bool)]))


@pytest.mark.parametrize("key", sorted(POLICY_LOSSES))
def test_fully_masked_row(key):
    # Mean-over-sequences losses (grpo, gspo, gspo_token) skip empty rows; token-mean losses (dapo,
    # decoupled_ppo) gain no tokens: loss and grads of the other rows are unchanged.
    # dr_grpo divides by B·max_len and gmpo by B, both counting every row: they scale by B/(B+1).
    logprobs, old, adv, mask = random_batch(B=3, T=4, seed=6)
    hyper = {"max_len": 4} if key == "dr_grpo" else {}
    loss, grad = grad_of(key, logprobs, old, adv, mask, **hyper)
    lp2, old2, adv2, mask2 = _append_empty_row(logprobs, old, adv, mask)
    loss2, grad2 = grad_of(key, lp2, old2, adv2, mask2, **hyper)
    scale = 3 / 4 if key in ("dr_grpo", "gmpo") else 1.0
    torch.testing.assert_close(loss2, loss * scale, atol=1e-14, rtol=1e-12)
    torch.testing.assert_close(grad2[:3], grad * scale, atol=1e-14, rtol=1e-12)
    assert (grad2[3] == 0).all()


@pytest.mark.parametrize("key", sorted(POLICY_LOSSES))
def test_garbage_under_mask_never_leaks(key):
    logprobs, old, _, mask = random_batch(B=3, T=5, seed=7)
    adv_BT = torch.randn(3, 5, dtype=F64, generator=torch.Generator().manual_seed(8))
    adv = adv_BT if key not in ("gspo", "gmpo") else adv_BT[:, 0]
    prox, ref = old + 0.1, old - 0.2
    garbage = torch.tensor([NAN, INF, -INF], dtype=F64).repeat(5)[:5].expand(3, 5)
    dirty = lambda x: torch.where(mask, x, garbage)  # noqa: E731
    hyper = {"ref_logprobs": ref, "kl_coef": 0.1} if key in KL_INSIDE else {}
    if key == "decoupled_ppo":
        hyper["prox_logprobs"] = prox
    clean_loss, clean_grad = grad_of(key, logprobs, old, adv, mask, **hyper)
    hyper = {k: dirty(v) if isinstance(v, torch.Tensor) else v for k, v in hyper.items()}
    dirty_adv = dirty(adv) if adv.dim() == 2 else adv
    loss, grad = grad_of(key, dirty(logprobs), dirty(old), dirty_adv, mask, **hyper)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, clean_loss, atol=0, rtol=0)
    torch.testing.assert_close(grad, clean_grad, atol=0, rtol=0)
    assert (grad[~mask] == 0).all()
    out = call(key, dirty(logprobs), dirty(old), dirty_adv, mask, **hyper)
    assert all(torch.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize("key", KL_INSIDE)
def test_sequence_advantages_broadcast_like_token_advantages(key):
    logprobs, old, adv, mask = random_batch(seed=9)
    a = call(key, logprobs, old, adv, mask).loss
    b = call(key, logprobs, old, adv[:, None].expand_as(logprobs).contiguous(), mask).loss
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("key", sorted(POLICY_LOSSES))
def test_float32_and_float_masks(key):
    logprobs, old, adv, mask = random_batch(seed=10)
    out64 = call(key, logprobs, old, adv, mask)
    out32 = call(key, logprobs.float(), old.float(), adv.float(), mask.float())
    assert out64.loss.dtype == F64 and out32.loss.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in out32.metrics.values())
    torch.testing.assert_close(out32.loss.double(), out64.loss, atol=1e-5, rtol=1e-5)


def test_empty_batch_gives_zero_not_nan():
    mask = torch.zeros(2, 3, dtype=torch.bool)
    lp = torch.full((2, 3), NAN, dtype=F64)
    for key in POLICY_LOSSES:
        out = call(key, lp, lp, t([1.0, -1.0]), mask)
        assert out.loss.item() == 0.0, key
        assert all(v.item() == 0.0 for v in out.metrics.values()), key


# --------------------------------------------------------------------------------------------
# Registry and errors


def float_defaults(key: str) -> dict[str, float]:
    """Loss `key`'s float hyperparameter defaults, read from its signature (the one place they live)."""
    params = inspect.signature(POLICY_LOSSES[key]).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and isinstance(p.default, float)}


def test_loss_defaults_and_allowed_hyperparameters():
    LOSS_DEFAULTS = {key: float_defaults(key) for key in POLICY_LOSSES}
    assert LOSS_DEFAULTS["grpo"] == {"clip_low": 0.2, "clip_high": 0.2, "kl_coef": 0.0}
    assert LOSS_DEFAULTS["dapo"] == {"clip_low": 0.2, "clip_high": 0.28, "kl_coef": 0.0}
    assert LOSS_DEFAULTS["dr_grpo"] == {"clip_low": 0.2, "clip_high": 0.2, "kl_coef": 0.0}
    assert LOSS_DEFAULTS["gspo"] == {"clip_low": 3e-4, "clip_high": 4e-4}
    assert LOSS_DEFAULTS["gspo_token"] == {"clip_low": 3e-4, "clip_high": 4e-4, "kl_coef": 0.0}
    assert LOSS_DEFAULTS["gmpo"] == {"clip_low": 0.4, "clip_high": 0.4}
    assert LOSS_DEFAULTS["decoupled_ppo"] == {"clip_low": 0.2, "clip_high": 0.2, "behav_weight_cap": 5.0, "kl_coef": 0.0}
    assert allowed_hyper("gmpo") == {"clip_low", "clip_high"}
    assert allowed_hyper("dr_grpo") == {"clip_low", "clip_high", "max_len", "kl_coef", "kl_kind"}
    with pytest.raises(ValueError, match="allowed: grpo, dapo"):
        allowed_hyper("ppo2")


def test_loss_needs_match_the_signatures():
    """LOSS_NEEDS is declared by hand beside the losses; it must agree with what each one accepts."""
    assert set(LOSS_NEEDS) == set(POLICY_LOSSES)
    for key, fn in POLICY_LOSSES.items():
        params = inspect.signature(fn).parameters
        assert LOSS_NEEDS[key].proximal == ("prox_logprobs" in params), key
        assert LOSS_NEEDS[key].kl_inside == ("ref_logprobs" in params), key
        assert LOSS_NEEDS[key].max_len == ("max_len" in params), key
    assert KL_INSIDE == ["dapo", "decoupled_ppo", "dr_grpo", "grpo", "gspo_token"]


def test_missing_required_arguments_raise():
    logprobs, old, adv, mask = worked_batch()
    with pytest.raises(ValueError, match="max_len"):
        POLICY_LOSSES["dr_grpo"](logprobs, old, adv, mask)
    with pytest.raises(ValueError, match="prox_logprobs"):
        POLICY_LOSSES["decoupled_ppo"](logprobs, old, adv, mask)
    with pytest.raises(ValueError, match=r"\[B\] advantages"):
        POLICY_LOSSES["gspo"](logprobs, old, adv[:, None].expand(2, 3), mask)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        POLICY_LOSSES["grpo"](logprobs[:, :2], old, adv, mask)
