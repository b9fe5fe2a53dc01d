"""`policyflow serve --model DIR [--host 127.0.0.1] [--port 8000]`: an OpenAI-compatible server (layer 4).

    policyflow serve --model runs/demo/checkpoints/step-40 --port 8000
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "runs/demo/checkpoints/step-40", "prompt": "12+7=", "max_tokens": 8}'

The folder loads as `policyflow eval --model` loads it (`session.load_policy`): any Hugging Face
model folder, a policyflow checkpoint (verified against its manifest first), or a LoRA checkpoint
(its base with the adapter merged in). It runs on one `AsyncEngine` on uvicorn's event loop, so
concurrent requests batch together; the API itself is `engine/openai_api.py`. The model is served
under the name given by `--model`, exactly as typed (clients send it as `model`), and chats use
the tokenizer's chat template when it has one. `--max-tokens N` (default 1024) is a request's
max_tokens when it gives none, on both endpoints (OpenAI's completions default is 16, too short
for a reasoning model; the whole context left would reserve it in the KV cache for every
request), cut to the room the context leaves. `GET /health` answers 503 once the engine has
failed (a decode step raised, e.g. out of memory: every later request fails too).
"""

from __future__ import annotations

from pathlib import Path

import uvicorn
from fastapi import FastAPI

from policyflow.config import load_config
from policyflow.engine import AsyncEngine
from policyflow.engine.openai_api import bound_socket, build_app
from policyflow.engine.openai_schema import DEFAULT_MAX_TOKENS
from policyflow.policy import PolicySpec
from policyflow.session import load_policy


def served_app(model_dir: str | Path, *, device: str = "auto", max_tokens: int = DEFAULT_MAX_TOKENS) -> FastAPI:
    """The app serving the model folder `model_dir` (as named, see the module docstring) on a new engine."""
    cfg = load_config(None, [f"run.device={device}"])
    model, tokenizer = load_policy(PolicySpec.of(cfg), Path(model_dir))
    engine = AsyncEngine(model.eval(), tokenizer)
    chat_template = bool(getattr(tokenizer, "chat_template", None))
    return build_app(engine, tokenizer, str(model_dir), chat_template, eos_token_ids=engine.core.eos_ids, max_tokens=max_tokens)


def server(app: FastAPI, *, log_level: str = "info") -> uvicorn.Server:
    """A uvicorn server for `app`; run it with `server.run(sockets=[bound_socket(host, port)])`."""
    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))


def serve(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
    """Load `model_dir` and serve it until interrupted (Ctrl-C or SIGTERM)."""
    app = served_app(model_dir, max_tokens=max_tokens)
    sock = bound_socket(host, port)
    shown = f"[{host}]" if ":" in host else host
    print(f"policyflow serve: {model_dir} at http://{shown}:{sock.getsockname()[1]}/v1 (model name {str(model_dir)!r})", flush=True)
    server(app).run(sockets=[sock])
