"""Generation engines (layer 1).

`AsyncEngine` (`async_engine.py`) is the engine everything uses: `await engine.generate(...)`
from any number of coroutines, continuous batching underneath, weight swaps between decode
steps. It implements `Generator` (`generator.py`: generate, stream, cancel; `SamplingParams`
and `Chunk` live there too), the one interface episodes, evaluation and the server use, which a
client of a remote endpoint implements as well. `Engine` (`core.py`) is its synchronous core
(submit / step / cancel / update_weights).
`sampling.py` draws tokens with their behaviour log-probs; `segments.py` switches a request's
policy between text and code segments (GRPO-ATS); `fast_decoder.py` and `hf_decoder.py` are the
two backends.
"""

from policyflow.engine.async_engine import AsyncEngine, generate_blocking, run_blocking, using_generator
from policyflow.engine.core import (
    SWAP_MODES,
    Engine,
    Finished,
    Request,
    join_samples,
    load_weights,
)
from policyflow.engine.generator import Chunk, Generator, SamplingParams
from policyflow.engine.fast_decoder import FAST_MODEL_TYPES, FastDecoder, fast_path_problem
from policyflow.engine.hf_decoder import HFDecoder
from policyflow.engine.sampling import sample_tokens
from policyflow.engine.segments import SegmentPolicy

__all__ = [
    "FAST_MODEL_TYPES",
    "SWAP_MODES",
    "AsyncEngine",
    "Chunk",
    "Engine",
    "FastDecoder",
    "Finished",
    "Generator",
    "HFDecoder",
    "Request",
    "SamplingParams",
    "SegmentPolicy",
    "fast_path_problem",
    "generate_blocking",
    "join_samples",
    "load_weights",
    "run_blocking",
    "sample_tokens",
    "using_generator",
]
