"""Policy models and tokenizers: any local Hugging Face causal LM, or a tiny one built from a config.

Nothing here downloads: `load_pretrained` refuses anything that is not a local folder holding a
`config.json`. The tiny model is a Qwen2-style decoder (about 1M parameters) with a
character-level tokenizer built locally with the `tokenizers` library and saved with
`save_pretrained`, so plain `transformers` loads both.
"""

from __future__ import annotations

import contextlib
import json
import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.utils import logging as hf_logging
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
# Printable ASCII without the vertical tab/form feed: digits, letters, punctuation, space, newline.
CHARSET = string.digits + string.ascii_letters + string.punctuation + " \n"


class ModelLoadError(ValueError):
    """A model or tokenizer path that cannot be used; the message says what to do."""


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII with <pad>=0, <eos>=1, <unk>=2."""
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for ch in CHARSET:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left"
    )


def build_tiny_model(
    vocab_size: int,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    intermediate_size: int = 512,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_positions: int = 512,
    init_std: float = 0.02,
    seed: int = 0,
    pad_token_id: int = 0,
    eos_token_id: int = 1,
) -> PreTrainedModel:
    """A Qwen2-style causal LM with tied embeddings, initialised from `seed`: weight matrices
    and embeddings from N(0, init_std²) (Hugging Face's `initializer_range`), biases 0, norms 1."""
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        initializer_range=init_std,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=eos_token_id,
        use_cache=True,
    )
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model


def build_tiny(seed: int = 0, **sizes) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(
        len(tokenizer), seed=seed, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **sizes
    )
    return model, tokenizer


# A complete model folder: config.json, tokenizer_config.json, one of each group below.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_model_folder(path: str | Path, *, weights: bool = True) -> Path:
    """`path` as a Path when it is a complete local model folder, else a ModelLoadError naming the
    folder and the missing file. Without tokenizer_config.json transformers would still build a
    tokenizer from tokenizer.json, but with other special tokens and decoding: refused, never guessed."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ModelLoadError(f"model path {str(folder)!r} does not exist; give a local folder saved with save_pretrained")
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"model path {str(folder)!r} has no config.json; point model.path at a Hugging Face model folder "
            "(the one holding config.json and the weights)"
        )
    groups = [("tokenizer_config.json",), TOKENIZER_FILES] + ([WEIGHT_FILES] if weights else [])
    for names in groups:
        if not any((folder / name).is_file() for name in names):
            missing = names[0] if len(names) == 1 else f"one of {', '.join(names)}"
            raise ModelLoadError(f"model folder {str(folder)!r} is incomplete: {missing} is missing; copy the whole folder written by save_pretrained")
    return folder


def load_pretrained(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load a causal LM and its tokenizer from a complete local folder (never from a hub)."""
    folder = check_model_folder(path)
    try:
        tokenizer = load_tokenizer(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load the model in {str(folder)!r}: {err}") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def load_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """The folder's tokenizer. One saved from a plain `tokenizers` object (the tiny char tokenizer)
    is loaded as exactly that: AutoTokenizer would pick the class of the model type (Qwen2's),
    whose own pre-tokenizer drops spaces and newlines the char vocabulary has no byte form for."""
    config = folder / "tokenizer_config.json"
    try:
        saved = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
    except (ValueError, OSError) as err:
        raise ModelLoadError(f"{config} cannot be read ({type(err).__name__}: {str(err).splitlines()[0]}); copy it again from the model's source") from None
    saved_class = saved.get("tokenizer_class") if isinstance(saved, dict) else None
    if saved_class in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def save_pretrained(model: PreTrainedModel, tokenizer, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()  # a per-checkpoint "Writing model shards" bar would drown the run's own
    # A peft adapter never holds embeddings here (only linear layers are adapted): peft need not
    # look for the base's config (a path relative to the checkpoint) to decide whether to save them.
    extra = {"save_embedding_layers": False} if hasattr(model, "peft_config") else {}
    model.save_pretrained(folder, safe_serialization=True, **extra)
    tokenizer.save_pretrained(folder)
    return folder


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


SHORT_ATTENTION = "policyflow_short"
SHORT_ATTENTION_MAX_KEYS = 24  # CPU fp32, forward + backward: 1.4-2.9x SDPA up to 24 keys, ~1.0x at 32-36, 0.8x at 40
SHORT_ATTENTION_MODELS = frozenset({"llama", "qwen2", "qwen3", "mistral"})


def short_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """HF attention function for short rows: softmax(q·kᵀ·scaling + mask)·v.

    query [B, H, Lq, D], key/value [B, Hkv, Lk, D]; returns ([B, Lq, H, D], None) like HF's
    SDPA function, from the same boolean mask (`sdpa_mask`; None: plain causal, the queries
    being the last Lq positions). The G = H/Hkv query heads of a kv head go through one matmul
    (no repeat_kv copies), and the softmax is exp(s − max)/Σ in plain ops: torch's CPU softmax
    and SDPA kernels take slow paths on rows this short. A fully masked row gets uniform
    weights over its keys (a large finite negative instead of −inf), never NaN.
    """
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError("short_attention does not do softcap or attention sinks; the model should use sdpa")
    B, H, Lq, D = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    G = H // Hkv
    scores = torch.matmul(query.reshape(B, Hkv, G * Lq, D), key.transpose(-1, -2)).view(B, Hkv, G, Lq, Lk)
    scores = scores * (scaling if scaling is not None else D**-0.5)
    if attention_mask is None:
        k = torch.arange(Lk, device=query.device)
        visible = k[None, :] <= k[Lk - Lq :, None]
    elif attention_mask.dtype == torch.bool:
        visible = attention_mask.expand(B, H, Lq, Lk).reshape(B, Hkv, G, Lq, Lk)
    else:  # an additive float mask
        scores, visible = scores + attention_mask.expand(B, H, Lq, Lk).reshape(B, Hkv, G, Lq, Lk), None
    if visible is not None:
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    weights = (scores - scores.amax(-1, keepdim=True).detach()).exp()
    probs = weights / weights.sum(-1, keepdim=True)
    if dropout > 0:
        probs = torch.nn.functional.dropout(probs, dropout)
    out = torch.matmul(probs.view(B, Hkv, G * Lq, Lk), value)
    return out.view(B, H, Lq, D).transpose(1, 2), None


AttentionInterface.register(SHORT_ATTENTION, short_attention)
AttentionMaskInterface.register(SHORT_ATTENTION, sdpa_mask)


def _checkpointing(model: torch.nn.Module) -> bool:
    """Gradient checkpointing is on (transformers 5 calls it activation checkpointing; 4.x gradient)."""
    return bool(getattr(model, "is_activation_checkpointing", False) or getattr(model, "is_gradient_checkpointing", False))


@contextlib.contextmanager
def short_rows_attention(model: torch.nn.Module, keys: int):
    """Within the block, `model` attends with `short_attention` instead of SDPA when that was
    measured faster and computes the same numbers: an SDPA Llama-family model (Llama, Qwen2,
    Qwen3, Mistral) in float32 on the CPU, no autocast, no gradient checkpointing, and rows
    of at most `SHORT_ATTENTION_MAX_KEYS` keys. Otherwise nothing changes. The model's
    attention setting is restored on exit; a backward pass after it needs nothing from it."""
    config = getattr(model, "config", None)
    param = next(model.parameters(), None)
    use = (
        param is not None and keys <= SHORT_ATTENTION_MAX_KEYS
        and getattr(config, "_attn_implementation", None) == "sdpa"
        and getattr(config, "model_type", None) in SHORT_ATTENTION_MODELS
        and param.device.type == "cpu" and param.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu") and not _checkpointing(model)
    )
    if not use:
        yield
        return
    config._attn_implementation = SHORT_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
