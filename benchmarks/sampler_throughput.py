"""Engine throughput: policyflow's async engine vs `transformers` `model.generate(do_sample=True)`.

Same tiny Qwen2 model (~1M parameters), same prompts ("123+456=" style, 4-8 characters),
same batch and number of new tokens, measured side by side in one process, interleaved
(ours, HF, ours, HF, ...) so machine load drifts hit both alike. Both sample from the full
softmax at temperature 1 (HF: top_k=0, top_p=1).

Variants
  forced N:  every sequence generates exactly N tokens (ours: ignore_eos; HF: min_new_tokens=N)
  eos N:     realistic; sequences stop at EOS or after N tokens (ours drops finished rows from
             the batch, HF keeps computing them padded until all are done); tokens/s counts
             real tokens only (EOS included).

FLOPs: per processed token 2·(matmul parameters of the decoder layers), plus 2·V·E for the LM
head where a next-token distribution is needed, plus attention 4·layers·heads·head_dim·context.
Fraction of peak = FLOPs / time / (measured fp32 matmul peak of a 2048^3 matmul, same threads);
fraction of shape peak: the same over the GFLOP/s of one decode step's matmuls run alone at
their real shapes on preallocated operands (`measure_shape_peak_gflops`), the ceiling for
this model at this batch.

Usage:  .venv/bin/python benchmarks/sampler_throughput.py [--threads 2] [--batch 256] [--repeats 5]
The machine is shared: run it when it is quiet, and read the load averages it prints.
Writes benchmarks/results/sampler_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policyflow.engine import AsyncEngine, SamplingParams, generate_blocking  # noqa: E402
from policyflow.model import build_tiny  # noqa: E402


def measure_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def measure_shape_peak_gflops(model, rows: int, repeats: int = 50) -> float:
    """fp32 GFLOP/s of one decode step's matmuls alone, at their real shapes ([rows, E] x [E, q+k+v],
    [rows, H*D] x [H*D, E], gate and up [rows, E] x [E, I], down [rows, I] x [I, E] per layer, then
    the LM head), on preallocated operands: the most a decode step's arithmetic can reach here."""
    shapes = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        for w in (qkv, a.o_proj.weight, m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight):
            shapes.append((torch.randn(rows, w.shape[1]), w.detach().t().contiguous()))
    head = model.get_output_embeddings().weight
    shapes.append((torch.randn(rows, head.shape[1]), head.detach().t().contiguous()))
    outs = [torch.empty(x.shape[0], w.shape[1]) for x, w in shapes]
    flops = sum(2 * x.shape[0] * x.shape[1] * w.shape[1] for x, w in shapes)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for (x, w), out in zip(shapes, outs):
            torch.mm(x, w, out=out)
        best = min(best, time.perf_counter() - start)
    return flops / best / 1e9


def model_flops(model, prompt_lens: list[int], new_lens: list[int]) -> float:
    """Useful FLOPs of generating `new_lens[i]` tokens after prompt i (see module docstring)."""
    cfg = model.config
    layer_params = sum(
        p.numel() for name, p in model.model.layers.named_parameters() if name.endswith("weight") and p.dim() == 2
    )
    head = cfg.vocab_size * cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn_per_ctx = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim
    total = 0.0
    for p, n in zip(prompt_lens, new_lens):
        processed = p + n - 1  # the last sampled token is never fed back
        total += 2 * layer_params * processed + 2 * head * n
        total += attn_per_ctx * sum(range(1, processed + 1))  # causal: token t sees t tokens
    return total


def run_ours(sampler, prompts, n, forced):
    params = SamplingParams(max_new_tokens=n, ignore_eos=forced)
    start = time.perf_counter()
    samples = generate_blocking(sampler, prompts, params)
    return time.perf_counter() - start, [len(s.token_ids) for s in samples]


def run_hf(model, enc, n, forced, eos):
    kwargs = dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=n, pad_token_id=0,
                  eos_token_id=eos)
    if forced:
        kwargs["min_new_tokens"] = n
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, **kwargs)
    elapsed = time.perf_counter() - start
    lengths = []
    for row in out[:, enc["input_ids"].shape[1] :].tolist():
        lengths.append(row.index(eos) + 1 if eos in row else len(row))
    return elapsed, lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[8, 16, 32], help="forced-length variants")
    parser.add_argument("--eos-new-tokens", type=int, nargs="+", default=[32, 128], help="stop-at-EOS variants")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sampler_throughput.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()

    model, tokenizer = build_tiny(seed=0)
    model.eval()
    texts = [f"{(37 * i) % 1000}+{(101 * i + 7) % 1000}=" for i in range(args.batch)]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    eos = tokenizer.eos_token_id
    ours = AsyncEngine(model, tokenizer, max_batch=args.batch, generator=torch.Generator().manual_seed(0))
    generic = AsyncEngine(model, tokenizer, max_batch=args.batch, backend="generic",
                      generator=torch.Generator().manual_seed(0))
    peak = measure_peak_gflops()
    shape_peak = measure_shape_peak_gflops(model, args.batch)
    prompt_lens = [len(p) for p in prompts]

    variants = [(n, True) for n in args.new_tokens] + [(n, False) for n in args.eos_new_tokens]
    rows = []
    for n, forced in variants:
        runners = {
            "ours": lambda: run_ours(ours, prompts, n, forced),
            "hf": lambda: run_hf(model, enc, n, forced, eos),
        }
        if forced and n == max(args.new_tokens):
            runners["ours_generic"] = lambda: run_ours(generic, prompts, n, forced)
        for run in runners.values():  # warm-up (allocations, caches)
            run()
        results = {name: [] for name in runners}
        for _ in range(args.repeats):
            for name, run in runners.items():
                elapsed, lengths = run()
                flops = model_flops(model, prompt_lens, lengths)
                results[name].append({"s": elapsed, "tokens": sum(lengths), "flops": flops})
        row = {"variant": f"{'forced' if forced else 'eos'} {n}", "new_tokens": n, "forced_length": forced}
        for name, runs in results.items():
            tps = [r["tokens"] / r["s"] for r in runs]
            gflops = [r["flops"] / r["s"] / 1e9 for r in runs]
            row[name] = {
                "tokens_per_s_median": statistics.median(tps),
                "tokens_per_s_best": max(tps),
                "model_gflops_median": statistics.median(gflops),
                "fraction_of_peak_median": statistics.median(gflops) / peak,
                "fraction_of_shape_peak_median": statistics.median(gflops) / shape_peak,
                "generated_tokens_per_run": statistics.median(r["tokens"] for r in runs),
            }
        pair_ratios = [
            (o["tokens"] / o["s"]) / (h["tokens"] / h["s"]) for o, h in zip(results["ours"], results["hf"])
        ]
        row["ratio_ours_vs_hf_median_of_pairs"] = statistics.median(pair_ratios)
        row["ratio_ours_vs_hf_best"] = row["ours"]["tokens_per_s_best"] / row["hf"]["tokens_per_s_best"]
        rows.append(row)

    load_after = os.getloadavg()
    header = f"{'variant':<11}{'ours tok/s':>12}{'HF tok/s':>11}{'ratio':>7}{'best-ratio':>11}" \
             f"{'ours %peak':>11}{'HF %peak':>10}{'ours %shape':>12}{'HF %shape':>10}{'generic tok/s':>15}"
    print(f"batch {args.batch}, threads {args.threads}, fp32 matmul peak {peak:.1f} GFLOP/s, "
          f"decode-step matmul shapes {shape_peak:.1f} GFLOP/s, "
          f"load avg before/after {load_before[0]:.2f}/{load_after[0]:.2f}")
    print(header)
    for row in rows:
        ours, hf = row["ours"], row["hf"]
        generic_tps = row.get("ours_generic", {}).get("tokens_per_s_median")
        print(
            f"{row['variant']:<11}{ours['tokens_per_s_median']:>12.0f}{hf['tokens_per_s_median']:>11.0f}"
            f"{row['ratio_ours_vs_hf_median_of_pairs']:>7.2f}{row['ratio_ours_vs_hf_best']:>11.2f}"
            f"{100 * ours['fraction_of_peak_median']:>10.1f}%{100 * hf['fraction_of_peak_median']:>9.1f}%"
            f"{100 * ours['fraction_of_shape_peak_median']:>11.1f}%{100 * hf['fraction_of_shape_peak_median']:>9.1f}%"
            f"{(f'{generic_tps:.0f}' if generic_tps else '-'):>15}"
        )

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    result = {
        "machine": {"cpu": cpu, "logical_cpus": os.cpu_count(), "threads": args.threads,
                    "torch": torch.__version__, "python": platform.python_version(),
                    "load_avg_before": load_before, "load_avg_after": load_after},
        "peak_fp32_matmul_gflops": peak,
        "decode_shape_peak_gflops": shape_peak,
        "batch": args.batch,
        "repeats": args.repeats,
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
