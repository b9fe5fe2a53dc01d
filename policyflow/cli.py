"""Command line: `policyflow train | sft | eval | config | export | view` (also `python -m policyflow`).

Overrides are `section.key=value` words after the options, e.g.
`policyflow train --config configs/demo.yaml train.steps=10 loss.name=dapo`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from policyflow.config import ConfigError, describe_fields, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="policyflow", description="RL post-training for language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "train": "SFT warm-start (fresh runs with sft.max_steps > 0), then RL, evaluation and a checkpoint",
        "sft": "supervised warm-start only; saves the model to runs/<name>/sft",
        "eval": "held-out accuracy (greedy and sampled) of a model, one JSON line on stdout; the full report (pass@k, maj@k, accuracy against token budgets, tokens on trivial prompts) goes to runs/<name>/eval/<NNN>-<time>/",
        "config": "print the resolved config, or with --fields every field with its default and description",
    }
    for name, help_text in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", type=Path, default=None, help="YAML preset (configs/*.yaml)")
        p.add_argument("overrides", nargs="*", help="section.key=value overrides")
        p.add_argument("--debug", action="store_true", help="show the full traceback of an error (normally one line)")
        if name == "train":
            p.add_argument("--resume", type=Path, default=None, help="run folder to continue from its latest checkpoint")
        if name == "eval":
            p.add_argument("--model", type=Path, default=None, help="model folder (default: model.path or the tiny model); with --endpoint only its tokenizer is read")
            p.add_argument("--endpoint", default=None, help="evaluate the model behind an OpenAI-compatible server instead, by its base URL including /v1 (e.g. http://127.0.0.1:8000/v1); prompts go as token ids of --model's tokenizer (or model.path's; required unless the endpoint names its model by a folder that exists here, as policyflow serve does)")
            p.add_argument("--endpoint-model", default=None, help="the model name to ask the endpoint for (default: the first one its /v1/models lists)")
        if name == "config":
            p.add_argument("--fields", action="store_true", help="list every field with default and description")
    export = sub.add_parser("export", help="write a LoRA checkpoint as one merged Hugging Face folder", description="write a LoRA checkpoint as one merged Hugging Face folder")
    export.add_argument("--merge", action="store_true", required=True, help="merge the adapter into its base model (the only export)")
    export.add_argument("checkpoint", type=Path, help="a LoRA checkpoint folder (runs/<name>/checkpoints/step-N)")
    export.add_argument("out", type=Path, help="the folder to write (new or empty; see --overwrite)")
    export.add_argument("--overwrite", action="store_true", help="replace `out` when it already holds a model folder (never a folder of other files)")
    export.add_argument("--debug", action="store_true", help="show the full traceback of an error (normally one line)")
    view = sub.add_parser("view", help="write a self-contained HTML page to browse a run's episodes", description="write a self-contained HTML page to browse a run's episodes (training samples.jsonl and eval/*/episodes.jsonl); prints its path")
    view.add_argument("run", type=Path, help="a run folder (runs/<name>)")
    view.add_argument("--out", type=Path, default=None, help="the page to write (default: <run>/view.html)")
    view.add_argument("--debug", action="store_true", help="show the full traceback of an error (normally one line)")
    serve = sub.add_parser("serve", help="serve a model folder over an OpenAI-compatible HTTP API", description="serve a model folder (LoRA checkpoints included) over an OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/chat/completions); see docs/serve.md")
    serve.add_argument("--model", required=True, help="model folder: a Hugging Face folder or a policyflow checkpoint (LoRA ones merged); clients name it as typed here")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    serve.add_argument("--max-tokens", type=int, default=1024, help="a request's max_tokens when it gives none, chat and completions alike, cut to the room the context leaves (default 1024)")
    serve.add_argument("--debug", action="store_true", help="show the full traceback of an error (normally one line)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 a config or usage error, 1 any other failure, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM)."""
    args = _parser().parse_args(argv)
    previous = _terminate_like_ctrl_c()
    try:
        return _run(args)
    except KeyboardInterrupt as err:  # the coordinator's RunInterrupted says where the run stopped
        print(f"policyflow: {str(err) or 'interrupted at once; checkpoints already written are intact'}", file=sys.stderr)
        return 128 + int(getattr(err, "signum", signal.SIGINT))
    except Exception as err:
        if args.debug:
            raise
        print(_one_line(err), file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the RL loop (which stops at a step boundary instead: rundir.StopOnCtrlC)."""

    signum = signal.SIGTERM


def _terminate_like_ctrl_c():
    """SIGTERM (a scheduler's stop) raises RunInterrupted as Ctrl-C does, in every command; returns the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        raise Terminated("terminated (SIGTERM) at once; checkpoints already written are intact")

    return signal.signal(signal.SIGTERM, stop)


def _one_line(err: Exception) -> str:
    """`policyflow: <kind>: <first line of the message>`; unexpected kinds point at --debug."""
    first = next((line for line in str(err).splitlines() if line.strip()), "") or repr(err)
    if isinstance(err, ConfigError):
        return f"policyflow: config error: {first}"
    explained = any(kind.__name__ in _EXPLAINED for kind in type(err).__mro__) or isinstance(err, FileNotFoundError)
    return f"policyflow: {type(err).__name__}: {first}" + ("" if explained else " (run with --debug for the traceback)")


# Errors whose message already says what to do; others get a hint to rerun with --debug.
_EXPLAINED = {"ModelLoadError", "TaskError", "CheckpointError", "RunLockedError", "PolicyMismatch", "ViewError"}


def _run(args: argparse.Namespace) -> int:
    if args.command == "export":
        from policyflow.lora import export_merged

        print(f"merged model written to {export_merged(args.checkpoint, args.out, overwrite=args.overwrite)}")
        return 0
    if args.command == "serve":
        from policyflow.serve import serve

        serve(args.model, args.host, args.port, args.max_tokens)
        return 0
    if args.command == "view":
        from policyflow.view import write_view

        print(write_view(args.run, args.out))
        return 0
    if args.command == "train" and args.resume is not None:
        from policyflow.rundir import resume_location, saved_config_path

        args.config = args.config or saved_config_path(args.resume)  # refused when missing: never the defaults
        args.overrides = [*resume_location(args.resume), *args.overrides]  # the folder as it is now, copied or moved
    cfg = load_config(args.config, args.overrides)
    if args.command == "config":
        print("\n".join(describe_fields()) if args.fields else json.dumps(cfg.model_dump(mode="json"), indent=2))
        return 0
    from policyflow import coordinator  # heavy imports (torch, transformers) only when needed

    if args.command == "train":
        coordinator.train(cfg, resume=args.resume)
    elif args.command == "sft":
        coordinator.run_sft(cfg)
    else:
        with stdout_to_stderr():  # scripts parse stdout: the summary and nothing else
            summary = coordinator.run_eval(cfg, args.model, endpoint=args.endpoint, endpoint_model=args.endpoint_model)
        print(json.dumps(summary))
    return 0


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout meanwhile to stderr: Python's prints and the C-level
    writes of libraries alike (file descriptor 1 itself is pointed at 2)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


if __name__ == "__main__":
    sys.exit(main())
