"""Policy models and tokenizers: any local Hugging Face causal LM, or a tiny one built from a config.

Nothing here downloads: `load_pretrained` refuses anything that is not a local folder holding a
`config.json`. The tiny model is a Qwen2-style decoder (about 1M parameters) with a
character-level tokenizer built locally with the `tokenizers` library and saved with
`save_pretrained`, so plain `transformers` loads both.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers.utils import logging as hf_logging
from transformers import (
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
    seed: int = 0,
    pad_token_id: int = 0,
    eos_token_id: int = 1,
) -> PreTrainedModel:
    """A Qwen2-style causal LM with tied embeddings, initialised from `seed`."""
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
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


def load_pretrained(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load a causal LM and its tokenizer from a local folder (never from a hub)."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ModelLoadError(f"model path {str(folder)!r} does not exist; give a local folder saved with save_pretrained")
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"model path {str(folder)!r} has no config.json; point model.path at a Hugging Face model folder "
            "(the one holding config.json and the weights)"
        )
    try:
        tokenizer = _load_tokenizer(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load the model in {str(folder)!r}: {err}") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def _load_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """The folder's tokenizer. One saved from a plain `tokenizers` object (the tiny char tokenizer)
    is loaded as exactly that: AutoTokenizer would pick the class of the model type (Qwen2's),
    whose own pre-tokenizer drops spaces and newlines the char vocabulary has no byte form for."""
    config = folder / "tokenizer_config.json"
    saved_class = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    if saved_class in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def save_pretrained(model: PreTrainedModel, tokenizer, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()  # a per-checkpoint "Writing model shards" bar would drown the run's own
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
