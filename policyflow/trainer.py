"""The RL trainer: log-probs from a full forward pass, the chosen objective, an AdamW step.

One `step(batch)` is one policy version: μ epochs × minibatches optimizer updates on a batch of
rollouts, then `version += 1`. The loss math lives in `losses.py` as pure functions; this file
only gathers their inputs.

Every log-prob (the policy's, the proximal one of decoupled PPO, the KL reference's) is
recomputed under the policy its token was drawn from (`TrainBatch.temperature_BT`, `top_p_BT`,
`top_k_BT`; DESIGN.md §6): with GRPO-ATS (`agent.code_temperature`) code and text tokens of one
row have different temperatures. When every trained token shares one policy (the common case,
and GRPO-ATS with greedy code, whose tokens are not trained) the numbers path runs.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from policyflow.config import LossConfig, SamplingConfig, TrainConfig
from policyflow.lora import is_lora
from policyflow.model import short_rows_attention
from policyflow.losses import LOSS_NEEDS, POLICY_LOSSES, kl_penalty
from policyflow.ops import ScalarOrTokens, masked_mean, policy_logprobs
from policyflow.types import TrainBatch


LENGTH_BUCKETS = 4  # the trainer's forward splits a batch into at most this many length buckets
SHARED_PROMPT_MIN_SAVING = 0.1  # share prompts when that skips at least this fraction of the tokens


@dataclass(frozen=True)
class TokenPolicies:
    """The sampling policy of every token of a [B, T] batch: each field a number (every token
    the same) or a [B, T] tensor aligned with `input_ids` (position t: token t's policy)."""

    temperature: ScalarOrTokens = 1.0
    top_p: ScalarOrTokens = 1.0
    top_k: ScalarOrTokens = 0

    def take(self, index: Callable[[torch.Tensor], torch.Tensor]) -> TokenPolicies:
        """The policies of the positions `index` picks from a [B, T] tensor (numbers stay numbers)."""
        pick = lambda v: index(v) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return TokenPolicies(pick(self.temperature), pick(self.top_p), pick(self.top_k))


def batch_policies(batch: TrainBatch, default: SamplingConfig, mask_BT: torch.Tensor | None = None) -> TokenPolicies:
    """The policies to recompute `batch`'s log-probs under: numbers when every token where
    `mask_BT` (default: the loss mask) is on shares one policy, [B, T] tensors otherwise;
    `default` (`sampling.*`) when the batch records none."""
    if batch.temperature_BT is None:
        return TokenPolicies(default.temperature, default.top_p, default.top_k)
    fields = (batch.temperature_BT, batch.top_p_BT, batch.top_k_BT)
    mask_BT = (batch.loss_mask_BT if mask_BT is None else mask_BT) > 0
    first = mask_BT.flatten().nonzero()[:1]
    if len(first) == 0:  # nothing trained: any policy does
        return TokenPolicies(default.temperature, default.top_p, default.top_k)
    values = [v.flatten()[first] for v in fields]
    if all(bool(((v == x) | ~mask_BT).all()) for v, x in zip(fields, values)):
        return TokenPolicies(float(values[0]), float(values[1]), int(values[2]))
    return TokenPolicies(*fields)


def sequence_logprobs(
    model: torch.nn.Module,
    input_ids_BT: torch.Tensor,
    attention_mask_BT: torch.Tensor,
    policy: SamplingConfig | TokenPolicies | None = None,
    *,
    needed_BT: torch.Tensor | None = None,
    buckets: int | None = None,
) -> torch.Tensor:
    """log π(token t | tokens < t) for every position of right-padded sequences ([B, T], position 0 = 0).

    π is the sampling policy of `policy` (temperature, top_p, top_k: numbers for every token,
    or per token as `TokenPolicies` of [B, T] tensors; None: the model's own log-softmax),
    computed by the same function the engine samples with (`ops.policy_log_distribution`), so
    for the weights that sampled a token this is exactly the behaviour log-prob the engine
    recorded.

    `needed_BT` (bool, default: every real position) marks the positions whose log-prob is
    wanted; the others may hold 0. Right-padded rows (the trainer's batches) take a fast path
    when `buckets` ≥ 1 (default `LENGTH_BUCKETS`): rows sharing their prompt (the tokens before
    their first needed position; at most half as many prompts as rows, e.g. a group's G
    samples) run it once (`_shared_prompt_logprobs`, HF models taking a `cache`); otherwise
    `_bucketed_logprobs`: no compute on most padding, no attention mask, LM-head logits only
    from the first needed position on. `buckets=0` or a mask that is not right padding: one
    plain full forward with the mask. Every path gives the plain one's numbers up to float
    rounding (tests/test_fast_paths.py). Short batches attend with `model.short_attention`
    (see `short_rows_attention`).
    """
    if policy is not None and not isinstance(policy, TokenPolicies):
        policy = TokenPolicies(policy.temperature, policy.top_p, policy.top_k)
    with short_rows_attention(model, input_ids_BT.shape[1]):
        return _sequence_logprobs(model, input_ids_BT, attention_mask_BT, policy, needed_BT, buckets)


def _sequence_logprobs(model: torch.nn.Module, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor,
                       policy: TokenPolicies | None, needed_BT: torch.Tensor | None, buckets: int | None) -> torch.Tensor:
    buckets = LENGTH_BUCKETS if buckets is None else buckets
    lengths_B = attention_mask_BT.sum(dim=1)
    positions_T = torch.arange(input_ids_BT.shape[1], device=input_ids_BT.device)
    right_padded = bool((attention_mask_BT.bool() == (positions_T[None, :] < lengths_B[:, None])).all())
    if not right_padded or buckets < 1:
        logits_BTV = model(input_ids=input_ids_BT, attention_mask=attention_mask_BT, use_cache=False).logits
        return _shifted(logits_BTV, input_ids_BT, policy)
    if needed_BT is None:
        needed_BT = positions_T[None, :] < lengths_B[:, None]
    takes = inspect.signature(model.forward).parameters
    keeps_logits = "logits_to_keep" in takes
    shared = _shared_prompts(input_ids_BT, lengths_B, needed_BT.bool())
    if shared is not None and "cache" in takes and keeps_logits:
        out = _shared_prompt_logprobs(model, input_ids_BT, lengths_B, shared, policy)
        if out is not None:
            return out
    return _bucketed_logprobs(model, input_ids_BT, lengths_B, needed_BT.bool(), policy, buckets, keeps_logits)


def _shared_prompts(input_ids_BT: torch.Tensor, lengths_B: torch.Tensor, needed_BT: torch.Tensor) -> list[tuple[tuple[int, ...], list[int]]] | None:
    """Rows grouped by their prompt (the tokens before the row's first needed position):
    [(prompt ids, [rows])...]; None unless there are at most half as many
    distinct prompts as rows and running each once saves ≥ `SHARED_PROMPT_MIN_SAVING` of the
    real tokens (not worth the extra forward otherwise)."""
    has_B = needed_BT[:, 1:].any(dim=1)
    if not bool(has_B.all()):
        return None
    first_B = (needed_BT[:, 1:].int().argmax(dim=1) + 1).tolist()
    ids = input_ids_BT.tolist()
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for b, f in enumerate(first_B):
        by_prompt.setdefault(tuple(ids[b][:f]), []).append(b)
    saved = sum(len(prompt) * (len(rows) - 1) for prompt, rows in by_prompt.items())
    if 2 * len(by_prompt) > len(first_B) or saved < SHARED_PROMPT_MIN_SAVING * float(lengths_B.sum()):
        return None
    return list(by_prompt.items())


def _shared_prompt_logprobs(model: torch.nn.Module, input_ids_BT: torch.Tensor, lengths_B: torch.Tensor,
                            prompts: list[tuple[tuple[int, ...], list[int]]], policy: TokenPolicies | None) -> torch.Tensor | None:
    """`sequence_logprobs` with each distinct prompt run once (a group's G samples share it).

    Two forwards in all: the U distinct prompts, right-padded to the longest (Pmax; no mask
    needed), keep their K/V and logits; then every row's continuation (its tokens from its
    prompt length P_b on, right-padded) runs on top of its prompt's K/V (an HF cache gathered
    per row, so gradients flow back into the shared prompt pass), with position ids P_b + j
    and an attention mask that hides the cache slots P_b..Pmax-1 (another prompt's padding).
    The same arithmetic as a full forward per row, with the prompt computed once instead of
    G times. None when the model's cache is not a plain full-attention `DynamicCache` (the
    caller falls back).
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    B, T = input_ids_BT.shape
    device = input_ids_BT.device
    Pmax = max(len(p) for p, _ in prompts)
    prompt_ids_UP = torch.tensor([list(p) + [0] * (Pmax - len(p)) for p, _ in prompts], device=device)
    last_U = torch.tensor([len(p) - 1 for p, _ in prompts], device=device)
    out = model(input_ids=prompt_ids_UP, use_cache=True, logits_to_keep=last_U[:, None])  # logits [U, 1, V]
    if not isinstance(out.cache, DynamicCache) or any(type(layer) is not DynamicLayer for layer in out.cache.layers):
        return None
    rows_R = torch.tensor([b for _, rs in prompts for b in rs], device=device)
    prompt_of_R = torch.tensor([u for u, (_, rs) in enumerate(prompts) for _ in rs], device=device)
    P_R = torch.tensor([len(p) for p, rs in prompts for _ in rs], device=device)
    tail_len_R = lengths_B[rows_R] - P_R
    Lc = int(tail_len_R.max())
    j_L = torch.arange(Lc, device=device)
    take_RL = (P_R[:, None] + j_L[None, :]).clamp(max=T - 1)
    tail_RL = torch.where(j_L[None, :] < tail_len_R[:, None], input_ids_BT[rows_R[:, None], take_RL], 0)
    logits_RLV = out.logits.index_select(0, prompt_of_R)  # each prompt's last position: predicts position P_b
    if Lc > 1:
        kv = [(layer.keys.index_select(0, prompt_of_R), layer.values.index_select(0, prompt_of_R)) for layer in out.cache.layers]
        slots = torch.arange(Pmax + Lc - 1, device=device)
        mask = ((slots[None, :] < P_R[:, None]) | (slots[None, :] >= Pmax)).long()
        rest = model(input_ids=tail_RL[:, :-1], cache=DynamicCache(ddp_cache_data=kv), use_cache=True,
                     attention_mask=mask, position_ids=P_R[:, None] + j_L[None, :-1]).logits
        logits_RLV = torch.cat([logits_RLV, rest], dim=1)
    tail_policy = None if policy is None else policy.take(lambda v: v[rows_R[:, None], take_RL])
    lp_RL = _token_logprobs(logits_RLV, tail_RL, tail_policy)
    # Back to [B, T]: row r's continuation position j is column P_r + j.
    out_RT = torch.zeros(len(rows_R), T + Lc, dtype=lp_RL.dtype, device=device)
    out_RT = out_RT.scatter(1, P_R[:, None] + j_L[None, :], torch.where(j_L[None, :] < tail_len_R[:, None], lp_RL, 0.0))[:, :T]
    inverse_B = torch.empty_like(rows_R)
    inverse_B[rows_R] = torch.arange(B, device=device)
    return out_RT.index_select(0, inverse_B)


def _token_logprobs(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, policy: TokenPolicies | None) -> torch.Tensor:
    """log π(target) with `policy` aligned with the targets (None: the model's own log-softmax)."""
    if policy is None:
        return policy_logprobs(logits_BTV, targets_BT)
    return policy_logprobs(logits_BTV, targets_BT, policy.temperature, policy.top_p, policy.top_k)


def _shifted(logits_BTV: torch.Tensor, input_ids_BT: torch.Tensor, policy: TokenPolicies | None) -> torch.Tensor:
    """Log-probs aligned with `input_ids` (position t from the logits at t-1; `policy` aligned
    with `input_ids` too); position 0 gets 0."""
    targets_policy = None if policy is None else policy.take(lambda v: v[:, 1:])
    return torch.nn.functional.pad(_token_logprobs(logits_BTV[:, :-1], input_ids_BT[:, 1:], targets_policy), (1, 0), value=0.0)


def _bucketed_logprobs(model: torch.nn.Module, input_ids_BT: torch.Tensor, lengths_B: torch.Tensor, needed_BT: torch.Tensor,
                       policy: TokenPolicies | None, buckets: int, keeps_logits: bool) -> torch.Tensor:
    """`sequence_logprobs` of right-padded rows, forward per length bucket.

    Rows sorted by length are cut into `buckets` runs of equal row count; each run is cut to
    its longest row (L) and run without an attention mask (with right padding a causal model
    never lets a real token see a pad, and position ids are 0..L-1 either way, so every real
    position's output is the masked forward's). Logits are taken only from position f-1 on,
    where f ≥ 1 is the run's first needed position (HF `logits_to_keep`, when the model's
    forward takes it: `keeps_logits`). The pieces go back
    to batch order through one differentiable `index_select`.
    """
    B, T = input_ids_BT.shape
    if not bool(needed_BT.any()):
        return torch.zeros(B, T, device=input_ids_BT.device)
    order_B = torch.argsort(lengths_B, stable=True)
    pieces = []
    for rows in order_B.chunk(min(buckets, B)):
        L = int(lengths_B[rows].max())
        ids_bL = input_ids_BT[rows, :L]
        wanted = needed_BT[rows, 1:L].any(dim=0).nonzero()
        if len(wanted) == 0:  # nothing needed in this bucket
            pieces.append(torch.zeros(len(rows), T, device=input_ids_BT.device))
            continue
        first = int(wanted[0, 0]) + 1
        kwargs = {"logits_to_keep": L - first + 1} if keeps_logits else {}
        logits = model(input_ids=ids_bL, use_cache=False, **kwargs).logits
        logits = logits[:, -(L - first + 1):]  # positions first-1 .. L-1: a no-op when logits_to_keep applied
        bucket_policy = None if policy is None else policy.take(lambda v: v[rows, first - 1:L])
        lp_bl = _shifted(logits, ids_bL[:, first - 1:], bucket_policy)[:, 1:]  # log-probs of positions first .. L-1
        pieces.append(torch.nn.functional.pad(lp_bl, (first, T - L), value=0.0))
    inverse_B = torch.empty_like(order_B)
    inverse_B[order_B] = torch.arange(B, device=order_B.device)
    return torch.cat(pieces).index_select(0, inverse_B)


def compute_precision(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Forward passes in `dtype` (autocast) over float32 master weights; float32: no autocast."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW over the parameters that require gradients; torch's fused kernel (one pass over all
    of them: 3.6 ms -> 1.1 ms per step for the tiny model on one CPU thread, same update up to
    float rounding) when every parameter is a float tensor on the CPU or a CUDA device.

    The fused kernel writes the parameters without moving their autograd version counters, so
    a hook moves them after each step: the engine's fast decoder notices weight changes by
    those counters (`fast_decoder._Layer.stale`).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, fused=fused or None)
    if fused:
        optimizer.register_step_post_hook(
            lambda opt, *_: torch.autograd.graph.increment_version([p for group in opt.param_groups for p in group["params"]]))
    return optimizer


class Trainer:
    """Owns the policy's optimizer (and the frozen reference model when a KL penalty is on).

    The optimizer takes the parameters that require gradients: all of them, or with a LoRA
    model (peft) only the adapter's.
    """

    def __init__(self, model: torch.nn.Module, train: TrainConfig, loss: LossConfig, sampling: SamplingConfig, *,
                 compute_dtype: torch.dtype = torch.float32, version: int = 0):
        if loss.name not in POLICY_LOSSES:
            raise ValueError(f"loss.name={loss.name!r}; allowed: {', '.join(POLICY_LOSSES)}")
        self.model = model
        self.cfg = train
        self.loss_name = loss.name
        self.loss_fn = POLICY_LOSSES[loss.name]
        self.needs = LOSS_NEEDS[loss.name]
        self.hyper = loss.hyper() | ({"max_len": sampling.max_new_tokens} if self.needs.max_len else {})
        self.policy = sampling  # the behaviour policy of batches that record none per token (`TrainBatch.temperature_BT` None)
        self.compute_dtype = compute_dtype  # forward passes; parameters and AdamW state stay as they are (fp32)
        self.optimizer = make_optimizer(model, train.lr, train.weight_decay, train.betas)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]  # clipped and stepped
        self.ref_model: torch.nn.Module | None = None  # set by `set_reference` when train.kl_coef > 0
        self.ref_is_base = False  # LoRA: the reference is self.model with its adapter disabled
        self.version = version

    def set_reference(self, model: torch.nn.Module | None = None) -> None:
        """Freeze the KL reference: a copy of `model` (default: the policy as it is now).

        Call it with the model RL starts from, after any warm-start; a resumed run passes the
        reference it stored, never the checkpoint's weights. With a LoRA policy and no `model`,
        the reference is the policy's frozen base (peft's `disable_adapter()`): no copy is made.
        """
        self.ref_is_base = model is None and is_lora(self.model)
        self.ref_model = None if self.ref_is_base else copy.deepcopy(model if model is not None else self.model).eval().requires_grad_(False)

    def step(self, batch: TrainBatch) -> dict[str, float]:
        """One policy version: μ epochs over `minibatches` slices of the batch. Returns float metrics."""
        start = time.perf_counter()
        self.model.train()
        policy = batch_policies(batch, self.policy)
        extra = self._fixed_inputs(batch, policy)
        totals: dict[str, float] = {}
        updates = 0
        for _ in range(self.cfg.epochs):
            for rows in torch.arange(batch.num_sequences).chunk(self.cfg.minibatches):
                metrics = self._update(batch, rows, {k: v[rows] for k, v in extra.items()}, policy.take(lambda v: v[rows]))
                for key, value in metrics.items():
                    totals[key] = totals.get(key, 0.0) + value
                updates += 1
        self.version += 1
        elapsed = time.perf_counter() - start
        out = {key: value / updates for key, value in totals.items()}
        tokens = float(batch.attention_mask_BT.sum()) * self.cfg.epochs
        out["perf/train_tokens_per_s"] = tokens / max(elapsed, 1e-9)
        out["perf/train_seconds"] = elapsed
        return out

    @torch.no_grad()
    def _fixed_inputs(self, batch: TrainBatch, policy: TokenPolicies) -> dict[str, torch.Tensor]:
        """Tensors computed once per batch before any update: proximal and reference log-probs (each token under its own policy)."""
        extra: dict[str, torch.Tensor] = {}
        if self.needs.proximal:
            self.model.eval()
            extra["prox_logprobs"] = self._logprobs(self.model, batch.input_ids_BT, batch.attention_mask_BT, batch.loss_mask_BT, policy)
            self.model.train()
        if self.cfg.kl_coef > 0:
            with self._reference() as reference:
                extra["ref_logprobs"] = self._logprobs(reference, batch.input_ids_BT, batch.attention_mask_BT, batch.loss_mask_BT, policy)
        return extra

    @contextlib.contextmanager
    def _reference(self):
        """The KL reference model for the duration of the block (a LoRA base: the adapter off, eval mode)."""
        if self.ref_is_base:
            training = self.model.training
            self.model.eval()
            try:
                with self.model.disable_adapter():
                    yield self.model
            finally:
                self.model.train(training)
        elif self.ref_model is None:
            raise RuntimeError("train.kl_coef > 0 needs a reference model: call Trainer.set_reference() with the model RL starts from")
        else:
            yield self.ref_model

    def _logprobs(self, model: torch.nn.Module, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor,
                  loss_mask_BT: torch.Tensor | None = None, policy: TokenPolicies | None = None) -> torch.Tensor:
        """Behaviour-policy log-probs ([B, T], float32; may be 0 off the loss mask) with the forward pass in the compute dtype.

        `policy`: each token's (`batch_policies`); None: the configured `sampling.*` for every token."""
        needed_BT = None if loss_mask_BT is None else loss_mask_BT > 0
        with compute_precision(next(model.parameters()).device, self.compute_dtype):
            return sequence_logprobs(model, input_ids_BT, attention_mask_BT, self.policy if policy is None else policy, needed_BT=needed_BT)

    def _update(self, batch: TrainBatch, rows: torch.Tensor, extra: dict[str, torch.Tensor], policy: TokenPolicies) -> dict[str, float]:
        input_ids_BT = batch.input_ids_BT[rows]
        mask_BT = batch.loss_mask_BT[rows]
        logprobs_BT = self._logprobs(self.model, input_ids_BT, batch.attention_mask_BT[rows], mask_BT, policy)
        kwargs = dict(self.hyper)
        if "prox_logprobs" in extra:
            kwargs["prox_logprobs"] = extra["prox_logprobs"]
        ref_BT = extra.get("ref_logprobs")
        if ref_BT is not None and self.needs.kl_inside:
            kwargs |= {"ref_logprobs": ref_BT, "kl_coef": self.cfg.kl_coef, "kl_kind": self.cfg.kl_kind}
        out = self.loss_fn(logprobs_BT, batch.behav_logprobs_BT[rows], batch.advantages_B[rows], mask_BT, **kwargs)
        loss = out.loss
        metrics = {f"loss/{k}": float(v) for k, v in out.metrics.items()}
        if ref_BT is not None and not self.needs.kl_inside:
            kl = masked_mean(kl_penalty(logprobs_BT, ref_BT, self.cfg.kl_kind), mask_BT)
            loss = loss + self.cfg.kl_coef * kl
            metrics["loss/kl"] = float(kl.detach())
        self._check_finite("loss", loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)  # a frozen base's leftover grads never count
        self._check_finite("gradient norm", grad_norm)  # before the step: the weights stay as they were
        self.optimizer.step()
        metrics["loss/total"] = float(loss.detach())
        metrics["loss/grad_norm"] = float(grad_norm)
        return metrics

    def _check_finite(self, what: str, value: torch.Tensor) -> None:
        if not torch.isfinite(value):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(
                f"non-finite {what} ({float(value.detach())}) in the {self.loss_name} step from version {self.version}; "
                "this update was not applied (earlier updates of the same step, with train.epochs or train.minibatches > 1, were); the last checkpoint is intact; lower train.lr or check the rewards"
            )
