"""The model-based reward component (DESIGN.md §6, rewards from models): a model that does not
train, held where episodes are scored, serving many episodes at once.

    solver = FrozenModel.open(FrozenSource(solver_spec, solver_store))  # latest published weights
    sample = await solver.generate(prompt_ids, params)     # sampling: its own AsyncEngine (continuous batching)
    logits_TV = await solver.logits(ids)                   # forward passes: calls of one loop tick share one

R-Zero's challenger reward samples the frozen solver's answers; RLT's reward reads the frozen
student's token distributions. Reward models and LLM judges are the same component.

Where it runs is the runtime's choice: a rollout worker opens the `FrozenSource`s it is given
(`workers.RolloutWorker(models=...)`) in its own process, inline or in the process runtime (a
`FileSnapshotStore` pickles: the weights travel as files), as `WorkerResources.models[name]`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from policyflow.engine import AsyncEngine, SamplingParams
from policyflow.policy import PolicySpec
from policyflow.trainer import compute_precision
from policyflow.types import Sample


@dataclass(frozen=True)
class FrozenSource:
    """Where a frozen model comes from: its policy's settings (architecture, dtype, sampling) and the
    snapshot store holding its weights (`latest()` is taken when it is opened)."""

    spec: PolicySpec
    store: Any  # weights.SnapshotStore (inline) or weights.FileSnapshotStore (any runtime)


class FrozenModel:
    """A model in eval mode whose weights change only by `update`: sampling through its own
    `AsyncEngine`, and batched forward passes (`logits`). Use it from one event loop."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, spec: PolicySpec | None = None, version: int = 0, seed: int = 0, max_batch: int = 256) -> None:
        self.model, self.tokenizer, self.spec = model.eval(), tokenizer, spec
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        generator = torch.Generator(self.device).manual_seed(seed)
        self.engine = AsyncEngine(model, tokenizer, version=version, max_batch=max_batch, generator=generator)
        self.max_batch = max_batch
        self._pending: list[tuple[list[int], asyncio.Future]] = []
        self._flush: asyncio.Handle | None = None
        self.forwards = 0  # batched forward passes run (tests count them)

    @classmethod
    def open(cls, source: FrozenSource, *, seed: int = 0) -> FrozenModel:
        """The model of `source.spec` (its model.path or the tiny model) with the store's latest weights."""
        from policyflow.session import load_policy  # session imports the task registry, which may import this module

        model, tokenizer = load_policy(source.spec)
        version, state = source.store.latest()
        frozen = cls(model, tokenizer, spec=source.spec, version=version, seed=seed)
        frozen.update(state, version)
        return frozen

    def update(self, state_dict, version: int) -> None:
        """Take new weights (a state dict in the model's names, or a store's LoRA snapshot) as `version`."""
        self.engine.update_weights(state_dict, version)

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Sample:
        return await self.engine.generate(prompt_ids, params)

    async def logits(self, ids: Sequence[int]) -> torch.Tensor:
        """The next-token logits at every position of `ids`: [T, V] float32, row t the distribution of
        token t+1 given ids[: t+1]. Calls made before the event loop next runs its callbacks are run
        together as one right-padded forward of at most `max_batch` rows."""
        if not ids:
            raise ValueError("FrozenModel.logits needs at least one token id")
        future = asyncio.get_running_loop().create_future()
        self._pending.append((list(ids), future))
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_soon(self._run_pending)
        return await future

    def _run_pending(self) -> None:
        self._flush = None
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), self.max_batch):
            chunk = [(ids, f) for ids, f in pending[start:start + self.max_batch] if not f.cancelled()]
            if not chunk:
                continue
            try:
                rows = self._forward([ids for ids, _ in chunk])
            except Exception as err:  # every waiting caller sees the failure
                for _, future in chunk:
                    future.set_exception(err)
                continue
            for (_, future), logits_TV in zip(chunk, rows):
                future.set_result(logits_TV)

    @torch.no_grad()
    def _forward(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """One forward of right-padded rows: padding after a row's tokens cannot change its logits (causal attention)."""
        self.forwards += 1
        T = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        ids_BT = torch.full((len(rows), T), pad, dtype=torch.long, device=self.device)
        mask_BT = torch.zeros((len(rows), T), dtype=torch.long, device=self.device)
        for b, row in enumerate(rows):
            ids_BT[b, :len(row)] = torch.tensor(row, device=self.device)
            mask_BT[b, :len(row)] = 1
        with compute_precision(self.device, self.dtype):
            logits_BTV = self.model(input_ids=ids_BT, attention_mask=mask_BT).logits.float()
        return [logits_BTV[b, :len(row)].cpu() for b, row in enumerate(rows)]

    def close(self) -> None:
        self.engine.close()
