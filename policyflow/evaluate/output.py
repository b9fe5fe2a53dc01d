"""The report folder of one evaluation: `runs/<name>/eval/<NNN>-<YYYYmmdd-HHMMSS>/` with
`report.json` (`report.EvalReport`), `report.png` (accuracy against budget, pass@k and maj@k
against k, token histograms) and `episodes.jsonl` (every greedy and sampled episode, held-out
and trivial, as `rollout.episode_record(kind="eval")` writes it, plus an `eval` field saying
which set, mode, problem and sample it was). A new folder per evaluation: none is overwritten."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

from policyflow.evaluate.episodes import episode_answer, is_correct
from policyflow.evaluate.report import EvalReport, Evaluation
from policyflow.rollout import episode_record
from policyflow.tasks.base import Task


def new_report_folder(run_dir: Path) -> Path:
    """A new, empty `run_dir/eval/<NNN>-<YYYYmmdd-HHMMSS>`, NNN one more than the highest there;
    created with an exclusive mkdir, so two evaluations at once never share one."""
    root = Path(run_dir) / "eval"
    root.mkdir(parents=True, exist_ok=True)
    for _ in range(1000):
        taken = [int(p.name.split("-", 1)[0]) for p in root.iterdir() if p.name.split("-", 1)[0].isdigit()]
        folder = root / f"{max(taken, default=0) + 1:03d}-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new report folder under {root}")


def write_report(run_dir: Path, evaluation: Evaluation, task: Task, *, tokenizer=None, step: int = 0) -> Path:
    """The report folder of `evaluation` (a new one under `run_dir/eval/`); returns its path."""
    folder = new_report_folder(run_dir)
    report = evaluation.report
    (folder / "report.json").write_text(json.dumps(asdict(report), indent=1, default=str))
    with (folder / "episodes.jsonl").open("w") as f:
        sets = (
            ("heldout", "greedy", evaluation.problems, evaluation.greedy_P), ("heldout", "sampled", evaluation.problems, evaluation.sampled_P),
            ("trivial", "greedy", evaluation.trivial_problems, evaluation.trivial_greedy_P), ("trivial", "sampled", evaluation.trivial_problems, evaluation.trivial_sampled_P),
        )
        for name, mode, problems, groups_P in sets:
            for i, (problem, group) in enumerate(zip(problems, groups_P)):
                for j, t in enumerate(group):
                    record = episode_record(t, kind="eval", step=step, version=report.model_version, answer=problem.answer, tokenizer=tokenizer)
                    record["eval"] = {"set": name, "mode": mode, "problem": i, "sample": j, "problem_id": problem.id, "correct": is_correct(t), "given_answer": episode_answer(task, t)}
                    f.write(json.dumps(record) + "\n")
    plot_report(report, folder / "report.png")
    return folder


def plot_report(report: EvalReport, out_path: Path) -> Path:
    """Four panels: greedy accuracy against the token budget, pass@k and maj@k against k (with
    ±1 standard error), tokens per sampled episode (correct and wrong), and tokens per greedy
    episode on the held-out and the trivial set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    ax = axes[0][0]
    xs = [p.budget for p in report.budgets]
    ax.errorbar(xs, [p.accuracy.value for p in report.budgets], yerr=[p.accuracy.stderr or 0.0 for p in report.budgets], marker="o", capsize=3)
    _log2_ticks(ax, xs)
    ax.set(xlabel="token budget per episode", ylabel="greedy accuracy", title="accuracy against budget", ylim=(-0.02, 1.02))
    ax = axes[0][1]
    for name, values in (("pass@k", report.pass_at), ("maj@k", report.maj_at)):
        ks = [int(key.split("@")[1]) for key in values]
        ax.errorbar(ks, [e.value for e in values.values()], yerr=[e.stderr or 0.0 for e in values.values()], marker="o", capsize=3, label=name)
    _log2_ticks(ax, sorted({int(key.split("@")[1]) for key in report.pass_at}))
    ax.set(xlabel="k", ylabel="accuracy", title=f"sampled, n={report.samples_per_prompt}, T={report.temperature}", ylim=(-0.02, 1.02))
    ax.legend()
    tokens = report.sampled.tokens
    _histogram(axes[1][0], {"correct": [c for c, ok in zip(tokens.counts, tokens.correct) if ok], "wrong": [c for c, ok in zip(tokens.counts, tokens.correct) if not ok]},
               "tokens per sampled episode")
    sets = {"held-out": list(report.greedy.tokens.counts)}
    if report.trivial is not None:
        sets["trivial"] = list(report.trivial.greedy.tokens.counts)
    _histogram(axes[1][1], sets, "tokens per greedy episode")
    for row in axes:
        for ax in row:
            ax.grid(alpha=0.3)
    fig.suptitle(f"{report.task}: {report.num_problems} held-out problems (model version {report.model_version})")
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path


def _histogram(ax, groups: dict[str, list[int]], title: str) -> None:
    values = [v for vs in groups.values() for v in vs]
    if not values:
        ax.set_title(f"{title} (none)")
        return
    top = max(values)
    width = max(1, math.ceil((top + 1) / 40))
    bins = list(range(0, top + width + 1, width))
    for label, vs in groups.items():
        if vs:
            ax.hist(vs, bins=bins, alpha=0.6, density=True, label=f"{label} (n={len(vs)}, mean {sum(vs) / len(vs):.1f})")
    ax.set(xlabel="generated tokens", ylabel="share of episodes", title=title)
    ax.legend()


def _log2_ticks(ax, values: list[int]) -> None:
    ax.set_xscale("log", base=2)
    if values:
        ax.set_xticks(values, [str(v) for v in values])
        ax.minorticks_off()
