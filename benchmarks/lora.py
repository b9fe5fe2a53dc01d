"""Full fine-tuning vs LoRA on a larger model built from a config (CPU): trainer memory, step time, bytes per weight update.

The model is the Qwen2-style tiny architecture at `--layers` layers of width `--width` (4 x 1024
by default: about 45M parameters). Each variant runs in its own fresh process so its peak RSS
is its own: a `TrainerWorker` (the real trainer: fp32 master weights, AdamW, publishing), `--steps`
GRPO steps on a fixed synthetic batch (B sequences of T tokens, random advantages), and one
publish through each store. Peak RSS is read after training, after the process-runtime publish
and after the inline publish (it only grows); the engine-side read is timed last:

* process runtime (`FileSnapshotStore`): bytes written per update (full: the whole model in
  model.dtype; LoRA: the adapter's A and B, the base written once);
* inline runtime (`SnapshotStore`): bytes copied per update (the merged full model either way).

Usage:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lora.py [--rank 8] [--threads 1]
Writes benchmarks/results/lora.json. Timings on a shared machine are noisy: read the ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_variant(args: argparse.Namespace) -> dict:
    import torch

    from policyflow.config import load_config
    from policyflow.types import TrainBatch
    from policyflow.weights import FileSnapshotStore, SnapshotStore, snapshot_path
    from policyflow.policy import PolicySpec
    from policyflow.workers import TrainerWorker

    torch.set_num_threads(args.threads)
    heads = max(1, args.width // 128)
    work = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    cfg = load_config(None, [
        f"model.tiny.hidden_size={args.width}", f"model.tiny.num_layers={args.layers}", f"model.tiny.intermediate_size={args.width * 11 // 4}",
        f"model.tiny.num_heads={heads}", f"model.tiny.num_kv_heads={max(1, heads // 4)}", f"model.lora.rank={args.rank if args.variant == 'lora' else 0}",
        f"run.output_dir={work}", "run.progress=false", f"run.threads={args.threads}", "eval.num_prompts=1",
    ])
    files = FileSnapshotStore(work / "snapshots", keep=1)
    worker = TrainerWorker(PolicySpec.of(cfg, run_dir=work), files)
    worker.begin_rl()
    model = worker.session.model
    B, T = args.batch, args.tokens
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (B, T), generator=generator)
    ones = torch.ones(B, T, dtype=torch.long)
    with torch.no_grad():
        behav = worker.trainer._logprobs(model, ids, ones)
    batch = TrainBatch(ids, ones, ones.float(), behav, torch.zeros(B, T, dtype=torch.long), torch.randn(B, generator=generator), torch.arange(B))
    step_s = []
    for _ in range(args.steps):
        start = time.perf_counter()
        worker.trainer.step(batch)
        step_s.append(time.perf_counter() - start)

    peak_train = peak_rss_mib()
    worker.publish()  # process runtime (a LoRA publish writes the base once, first)
    start = time.perf_counter()
    worker.trainer.version += 1
    worker.publish()
    publish_files_s = time.perf_counter() - start
    peak_process = peak_rss_mib()
    update_bytes = snapshot_path(files.folder, worker.trainer.version).stat().st_size
    once_bytes = sum(p.stat().st_size for p in files.folder.glob("base-*.safetensors"))
    memory = SnapshotStore(keep=1)  # inline runtime
    worker.store = memory
    start = time.perf_counter()
    worker.publish()
    publish_memory_s = time.perf_counter() - start
    peak_inline = peak_rss_mib()
    inline_bytes = sum(t.numel() * t.element_size() for t in memory.latest()[1].values())
    start = time.perf_counter()
    engine_state = files.latest()[1]  # what an engine process does to take the update (not trainer memory: measured last)
    engine_load_s = time.perf_counter() - start
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shutil.rmtree(work, ignore_errors=True)
    return {
        "variant": args.variant,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trained_parameters": trained,
        "optimizer_state_bytes": sum(t.numel() * t.element_size() for s in worker.trainer.optimizer.state.values() for t in s.values() if torch.is_tensor(t)),
        "step_seconds_median": statistics.median(step_s),
        "step_seconds": step_s,
        "process_runtime_bytes_per_update": update_bytes,
        "process_runtime_bytes_once": once_bytes,
        "process_runtime_publish_seconds": publish_files_s,
        "engine_load_seconds": engine_load_s,
        "engine_state_bytes": sum(t.numel() * t.element_size() for t in engine_state.values()),
        "inline_runtime_bytes_per_update": inline_bytes,
        "inline_runtime_publish_seconds": publish_memory_s,
        "trainer_peak_rss_mib_training": peak_train,
        "trainer_peak_rss_mib_after_process_publish": peak_process,
        "trainer_peak_rss_mib_after_inline_publish": peak_inline,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=["full", "lora"], default=None, help="(internal) run one variant in this process")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {}
    for variant in ("full", "lora"):
        cmd = [sys.executable, __file__, "--variant", variant, *sys.argv[1:]]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
        print(variant, json.dumps(results[variant], indent=1))
    full, lora = results["full"], results["lora"]
    summary = {
        "setup": {"layers": args.layers, "width": args.width, "rank": args.rank, "batch": args.batch, "tokens": args.tokens,
                  "steps": args.steps, "threads": args.threads, "machine": platform.processor() or platform.machine(), "note": args.note},
        "full": full,
        "lora": lora,
        "ratios_lora_over_full": {
            "trainer_peak_rss_training": lora["trainer_peak_rss_mib_training"] / full["trainer_peak_rss_mib_training"],
            "trainer_peak_rss_after_process_publish": lora["trainer_peak_rss_mib_after_process_publish"] / full["trainer_peak_rss_mib_after_process_publish"],
            "step_seconds": lora["step_seconds_median"] / full["step_seconds_median"],
            "process_runtime_bytes_per_update": lora["process_runtime_bytes_per_update"] / full["process_runtime_bytes_per_update"],
            "optimizer_state_bytes": lora["optimizer_state_bytes"] / full["optimizer_state_bytes"],
        },
    }
    out = ROOT / "benchmarks" / "results" / "lora.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["ratios_lora_over_full"], indent=2), f"\nwritten to {out}")


if __name__ == "__main__":
    main()
