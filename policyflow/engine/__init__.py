"""Samplers: batched, versioned generation with a KV cache (layer 1).

`Sampler.generate` for a list of prompts; `Engine` (submit / step / update_weights) for
continuous batching and weight swaps between decode steps. See `sampler.py`.
"""

from policyflow.engine.fast_decoder import FAST_MODEL_TYPES, FastDecoder, fast_path_problem
from policyflow.engine.hf_decoder import HFDecoder
from policyflow.engine.sampler import (
    SWAP_MODES,
    Engine,
    Finished,
    Request,
    Sampler,
    SamplingParams,
    join_samples,
    load_weights,
)
from policyflow.engine.sampling import sample_tokens

__all__ = [
    "FAST_MODEL_TYPES",
    "SWAP_MODES",
    "Engine",
    "FastDecoder",
    "Finished",
    "HFDecoder",
    "Request",
    "Sampler",
    "SamplingParams",
    "fast_path_problem",
    "join_samples",
    "load_weights",
    "sample_tokens",
]
