"""LoRA with peft: the adapter RL trains, the merged weights engines load, and its files.

With `model.lora.rank` r > 0 the trainer wraps the model RL starts from (after any warm-start)
in a peft LoRA adapter. Every adapted linear layer computes

    y = W x + (α / r) · B A x        W frozen (the base), A [r, in] and B [out, r] trained (fp32)

B starts at zero, so the wrapped model is exactly the base at version 0. The KL reference is
the same model inside peft's `disable_adapter()`: no second model is held.

Engines never see peft. The trainer publishes `lora_weights(model)` (the base and each adapted
layer's A, B and α/r); the snapshot store hands engines `merge_low_rank`'s result: plain
weights W + (α/r)·B·A under the model's own parameter names, computed beside the trained
weights (the base is never merged in place, so no merge/unmerge rounding accumulates in it).
The inline store merges at publish; the file store (process runtime) writes the base once and
then only A and B per version, and each engine process merges with the same function.

Files: a checkpoint holds the adapter in peft's own format (`adapter_config.json`,
`adapter_model.safetensors`), so `PeftModel.from_pretrained(base, checkpoint)` loads it without
policyflow; `load_merged` (used by `policyflow export --merge` and `policyflow eval --model`)
returns a plain model. Its `base_model_name_or_path` names the base folder: `../../base` (relative
to the checkpoint, so a copied or moved run folder keeps using its own base) when the base is
the run's `base/`, or an absolute path when it is an unchanged `model.path` outside the run.

Only placements the merge represents exactly are allowed: adapting a weight that is tied to
another (the output head of a model with tied embeddings) is refused where the adapter is
attached, since W + (α/r)·B·A would have to change both tied uses at once.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from policyflow.checkpoint import check_destination, is_checkpoint, save_model_folder, verify_checkpoint
from policyflow.config import LoRAConfig
from policyflow.model import ModelLoadError, load_pretrained

ADAPTER_CONFIG = "adapter_config.json"  # peft's file: a folder holding it is an adapter checkpoint


def is_lora(model: torch.nn.Module) -> bool:
    return isinstance(model, PeftModel)


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


RUN_BASE_REF = "../../base"  # a checkpoint's reference to its run's base/ (<run>/checkpoints/step-N -> <run>/base)


def attach_lora(model: torch.nn.Module, cfg: LoRAConfig, base_ref: str) -> PeftModel:
    """Wrap `model` (in place) in a fresh LoRA adapter; only A and B require gradients.

    `base_ref` names the folder holding the base weights, as the adapter's config will record
    it (`RUN_BASE_REF`, or an absolute path). A target whose weight is tied to another
    parameter is refused before anything is wrapped.
    """
    targets = "all-linear" if cfg.target_modules == ("all-linear",) else list(cfg.target_modules)
    if targets != "all-linear":  # all-linear leaves the output head out, the one weight models tie
        _refuse_tied(model, targets, cfg)
    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, bias="none")
    try:
        with _quiet():
            wrapped = get_peft_model(model, config)
    except ValueError as err:
        raise ValueError(f"model.lora.target_modules={list(cfg.target_modules)!r} does not fit this model: {str(err).splitlines()[0]}") from None
    _check_linear(wrapped, cfg)
    wrapped.peft_config[wrapped.active_adapter].base_model_name_or_path = base_ref
    return wrapped


def _refuse_tied(model: torch.nn.Module, targets: list[str], cfg: LoRAConfig) -> None:
    """A ValueError naming the first targeted module whose weight is shared with another parameter."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for module_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or not any(module_name == t or module_name.endswith(f".{t}") for t in targets):
            continue  # other layer types are refused by _check_linear
        others = [n for n in names.get(id(module.weight), []) if n != f"{module_name}.weight"]
        if others:
            raise ValueError(
                f"model.lora.target_modules={list(cfg.target_modules)!r} adapts {module_name}, whose weight is tied to {others[0]} "
                "(tie_word_embeddings): the merged weights the engines load cannot represent an adapter on one of two tied uses, "
                f"so the engines would sample another policy than the one trained; leave {module_name} out of model.lora.target_modules"
            )


def load_adapter(base: torch.nn.Module, folder: str | Path, *, trainable: bool) -> PeftModel:
    """The adapter saved in `folder` (peft format) on `base`."""
    with _quiet():
        model = PeftModel.from_pretrained(base, str(folder), is_trainable=trainable)
    for p in model.parameters():  # the adapter in the base's dtype (fp32 master weights for training)
        if p.requires_grad:
            p.data = p.data.to(next(base.parameters()).dtype)
    return model


def adapter_base_path(folder: str | Path) -> Path:
    """The base model folder an adapter checkpoint was trained on: its `base_model_name_or_path`,
    relative to the checkpoint folder unless absolute. A `ModelLoadError` when it is missing."""
    config = Path(folder) / ADAPTER_CONFIG
    try:
        ref = PeftConfig.from_pretrained(str(folder)).base_model_name_or_path
    except Exception as err:
        raise ModelLoadError(f"{config} cannot be read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); the checkpoint was left as it is") from None
    if not ref:
        raise ModelLoadError(f"{config} names no base model (base_model_name_or_path is empty); set it to the base model's folder (relative to the checkpoint, or absolute)")
    base = Path(ref).expanduser()
    base = base if base.is_absolute() else Path(folder) / base
    if not (base / "config.json").is_file():
        raise ModelLoadError(
            f"LoRA checkpoint {folder} names its base model {ref!r}, and {base} holds no model (no config.json); restore that folder, "
            f"or set base_model_name_or_path in {config} to where the base is now (relative to the checkpoint, or absolute); "
            "the checkpoint was left as it is"
        )
    return base.resolve()


def load_merged(folder: str | Path, dtype: torch.dtype = torch.float32):
    """A plain model (base + adapter merged) and the base's tokenizer, from an adapter checkpoint folder.

    A base written by policyflow (a run's base/, with its manifest) is verified first."""
    base_path = adapter_base_path(folder)
    if is_checkpoint(base_path):
        verify_checkpoint(base_path)
    base, tokenizer = load_pretrained(base_path, dtype=torch.float32)
    with _quiet():
        merged = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()  # a throwaway copy: merging in place is fine
    return merged.to(dtype), tokenizer


def export_merged(folder: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write base + adapter of a LoRA checkpoint as one plain Hugging Face folder (`policyflow export --merge`).

    The folder is written next to `out` and renamed into place (with a manifest), so an export
    that fails leaves nothing; a non-empty `out` is refused unless `overwrite` (see `check_destination`).
    """
    if not is_adapter_folder(folder):
        raise ValueError(f"{folder} is not a LoRA checkpoint (no {ADAPTER_CONFIG}); other checkpoints are Hugging Face folders already")
    check_destination(Path(out), reads=Path(folder), overwrite=overwrite)
    check_destination(Path(out), reads=adapter_base_path(folder), overwrite=overwrite)  # nor the base it merges into
    if is_checkpoint(Path(folder)):
        verify_checkpoint(Path(folder))
    model, tokenizer = load_merged(folder)
    return save_model_folder(Path(out), model, tokenizer, "the merged model")


@dataclass(frozen=True)
class LoRAWeights:
    """Published LoRA weights: the frozen base (plain names) and the factors of each adapted weight.

    `merged()` gives what an engine loads: W = base[W] + (B @ A)·scale for adapted weights, in
    float32, then cast to `dtype`. The same function merges wherever it runs (in the trainer for
    the inline runtime, in each engine process for the process runtime), so a version means the
    same weights in both.
    """

    base: dict[str, torch.Tensor]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # weight name -> (A [r, in], B [out, r], α/r)
    dtype: torch.dtype

    def merged(self) -> dict[str, torch.Tensor]:
        return merge_low_rank(self.base, self.factors, self.dtype)


@torch.no_grad()
def merge_low_rank(base: dict[str, torch.Tensor], factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """base[W] + (B @ A)·scale for every W in `factors`, the other tensors as they are; floats cast to `dtype`."""
    out = {}
    for name, tensor in base.items():
        if name in factors:
            A, B, scale = factors[name]
            tensor = tensor + (B @ A) * scale
        out[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return out


def lora_weights(model: PeftModel, dtype: torch.dtype) -> LoRAWeights:
    """The model's base and adapter factors under the plain model's names (no copies are made)."""
    inner, adapter = model.get_base_model(), model.active_adapter
    factors = {
        f"{name}.weight": (m.lora_A[adapter].weight.detach(), m.lora_B[adapter].weight.detach(), float(m.scaling[adapter]))
        for name, m in inner.named_modules() if isinstance(m, LoraLayer)
    }
    base = {key.replace(".base_layer.", "."): t.detach() for key, t in inner.state_dict().items() if ".lora_" not in key}
    return LoRAWeights(base, factors, dtype)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No FutureWarning lines from transformers' deprecations that peft trips over on every wrap."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _check_linear(model: PeftModel, cfg: LoRAConfig) -> None:
    for name, m in model.get_base_model().named_modules():
        if isinstance(m, LoraLayer) and type(m.get_base_layer()) is not torch.nn.Linear:
            raise ValueError(
                f"model.lora.target_modules={list(cfg.target_modules)!r} adapts {name} "
                f"({type(m.get_base_layer()).__name__}); only linear layers are supported"
            )
