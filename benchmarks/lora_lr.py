"""LoRA's RL learning rate: full fine-tuning vs LoRA rank 8 at several `model.lora.lr_multiplier`s, 3 seeds.

For each seed S: one SFT warm-start of `configs/demo.yaml` (`policyflow sft`), then from that same
SFT model one RL run per arm (`policyflow train ... sft.max_steps=0`):

* `full`:    full fine-tuning (`model.lora.rank=0`) at the preset's `train.lr`;
* `lora-xM`: LoRA rank 8 (alpha 16), the adapter trained at `train.lr` x M (`model.lora.lr_multiplier=M`).

Before/after held-out accuracy (sampled and greedy) comes from each run's summary.json
(`eval_before` / `eval_after`). The lr the optimizer really used is read back from the final
checkpoint's `trainer_state.pt`, so a multiplier that did not take effect shows. Every run is a
separate CLI process, one at a time, under `nice -n 10` with OMP_NUM_THREADS=1 and
`run.threads=1` (the machine is shared). Each invocation uses a fresh temporary output_dir.
A failing run prints its stderr and stops the script (rows so far are kept in the results file).

The code is frozen at start: the working tree's files (tracked and untracked, not ignored) are
copied to <tmp>/code and every run executes there (`python -m policyflow` from that folder, checked
to import its own copy), so edits others make to the shared tree during the ~20 minutes cannot
mix code versions between arms. The results record HEAD, the dirty files, a digest of the frozen
sources and where `git diff HEAD` of the frozen tree is saved.

Usage:  .venv/bin/python benchmarks/lora_lr.py [--seeds 0 1 2] [--multipliers 1 4 10 20] [--rank 8]
Writes benchmarks/results/lora_lr.json (rewritten after every run); the log of each run is
kept in the temporary folder named there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESET = "configs/demo.yaml"
OUT = ROOT / "benchmarks" / "results" / "lora_lr.json"


def sh(*cmd: str, cwd: Path = ROOT) -> str:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def freeze_code(work: Path) -> dict:
    """Copy the working tree (tracked + untracked, not ignored) to work/code; return how to identify it."""
    code = work / "code"
    files = sorted(sh("git", "ls-files", "-co", "--exclude-standard").splitlines())
    digest = hashlib.sha256()
    for name in files:
        src = ROOT / name
        if not src.is_file():  # deleted in the tree but still tracked
            continue
        dst = code / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        if name.startswith(("policyflow/", "configs/")):
            digest.update(name.encode() + b"\0" + dst.read_bytes() + b"\0")
    diff = sh("git", "diff", "HEAD")
    (work / "code.diff").write_text(diff + "\n")  # tracked changes at the moment of copying (small race: copied just before)
    imported = sh(sys.executable, "-c", "import policyflow; print(policyflow.__file__)", cwd=code)
    if not Path(imported).resolve().is_relative_to(code.resolve()):
        raise SystemExit(f"the frozen copy is not what `python -m policyflow` imports from {code}: {imported}")
    return {
        "frozen_copy": str(code), "imports": imported,
        "git_head": sh("git", "rev-parse", "HEAD"),
        "git_dirty": sh("git", "status", "--short").splitlines(),
        "sha256_policyflow_and_configs": digest.hexdigest(),
        "git_diff_head_saved_to": str(work / "code.diff"),
    }


def environment() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "runs": "one at a time, each `nice -n 10` with OMP_NUM_THREADS=1 and run.threads=1",
    }


def run(cmd: list[str], log: Path, code: Path) -> float:
    """Run one CLI invocation (nice'd, single-threaded); stdout+stderr to `log`; exit on failure."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(["nice", "-n", "10", sys.executable, "-m", "policyflow", *cmd], cwd=code, env=env, stdout=f, stderr=subprocess.PIPE, text=True)
        f.write(proc.stderr)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        print(f"FAILED (exit {proc.returncode}): policyflow {shlex.join(cmd)}\n--- stderr ---\n{proc.stderr}", file=sys.stderr, flush=True)
        raise SystemExit(1)
    return seconds


def used_lr(checkpoint: str) -> list[float]:
    """The lr of every optimizer param group in the checkpoint (AdamW at a constant lr in RL)."""
    import torch

    state = torch.load(Path(checkpoint) / "trainer_state.pt", map_location="cpu", weights_only=False)
    return sorted({group["lr"] for group in state["optimizer"]["param_groups"]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--multipliers", type=float, nargs="+", default=[1, 4, 10, 20])
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lora_lr-"))  # fresh per invocation: `sft` may refuse an existing folder
    frozen = freeze_code(work)
    code = Path(frozen["frozen_copy"])
    common = [f"run.output_dir={work}", "run.threads=1"]
    arms = [("full", ["model.lora.rank=0"])] + [
        (f"lora{args.rank}-x{m:g}", [f"model.lora.rank={args.rank}", f"model.lora.lr_multiplier={m:g}"]) for m in args.multipliers
    ]
    result = {
        "what": f"{PRESET}: held-out accuracy before and after 100 RL steps (the preset's train.steps), full fine-tuning vs "
                f"LoRA rank {args.rank} (alpha 16) at train.lr x model.lora.lr_multiplier, from the same SFT model per seed",
        "commands": [
            f"policyflow sft --config {PRESET} run.output_dir=<tmp> run.name=sft-S run.seed=S task.seed=S run.threads=1",
            f"policyflow train --config {PRESET} run.output_dir=<tmp> run.name=<arm>-S run.seed=S task.seed=S run.threads=1 "
            f"model.path=<tmp>/sft-S/sft sft.max_steps=0 run.progress=false <arm overrides>",
        ],
        "arms": {name: " ".join(over) for name, over in arms},
        "tmp": str(work),
        "code": frozen,
        "environment": environment(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "rows": [],
    }

    def save() -> None:
        result["environment"]["load_average_now"] = list(os.getloadavg())
        OUT.write_text(json.dumps(result, indent=2) + "\n")

    for seed in args.seeds:
        seeds = [f"run.seed={seed}", f"task.seed={seed}"]
        sft_cmd = ["sft", "--config", PRESET, *common, f"run.name=sft-{seed}", *seeds]
        seconds = run(sft_cmd, work / f"sft-{seed}.log", code)
        sft_model = work / f"sft-{seed}" / "sft"
        result["rows"].append({"seed": seed, "run": f"sft-{seed}", "command": "policyflow " + shlex.join(sft_cmd), "wall_seconds": round(seconds, 1)})
        print(f"seed {seed}: SFT {seconds:.0f} s -> {sft_model}", flush=True)
        save()
        for name, over in arms:
            cmd = ["train", "--config", PRESET, *common, f"run.name={name}-{seed}", *seeds,
                   f"model.path={sft_model}", "sft.max_steps=0", "run.progress=false", *over]
            seconds = run(cmd, work / f"{name}-{seed}.log", code)
            summary = json.loads((work / f"{name}-{seed}" / "summary.json").read_text())
            before, after = summary["eval_before"], summary["eval_after"]
            row = {
                "seed": seed, "run": name, "command": "policyflow " + shlex.join(cmd),
                "before_sampled": before["accuracy_sampled"], "after_sampled": after["accuracy_sampled"],
                "before_greedy": before["accuracy_greedy"], "after_greedy": after["accuracy_greedy"],
                "gain_sampled": round(after["accuracy_sampled"] - before["accuracy_sampled"], 4),
                "gain_greedy": round(after["accuracy_greedy"] - before["accuracy_greedy"], 4),
                "optimizer_lr": used_lr(summary["final_checkpoint"]), "steps": summary["steps"],
                "rl_wall_seconds": round(summary["wall_seconds"], 1), "wall_seconds": round(seconds, 1),
            }
            result["rows"].append(row)
            print(f"seed {seed} {name:>10}: sampled {row['before_sampled']:.3f} -> {row['after_sampled']:.3f} ({100 * row['gain_sampled']:+.1f}), "
                  f"greedy {row['before_greedy']:.3f} -> {row['after_greedy']:.3f} ({100 * row['gain_greedy']:+.1f}), "
                  f"lr {row['optimizer_lr']}, {seconds:.0f} s (RL loop {row['rl_wall_seconds']:.0f} s)", flush=True)
            save()

    result["median_gain"] = {
        name: {key: statistics.median(r[key] for r in result["rows"] if r["run"] == name) for key in ("gain_sampled", "gain_greedy")}
        for name, _ in arms
    }
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()
    for name, med in result["median_gain"].items():
        print(f"median gain {name:>10}: sampled {100 * med['gain_sampled']:+.1f}, greedy {100 * med['gain_greedy']:+.1f} points")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
