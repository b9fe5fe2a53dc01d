"""`policyflow serve` under load: requests/s and p50/p99 latency at 1, 8 and 64 concurrent clients.

The tiny model (~1M parameters, saved with save_pretrained) is served by the real command line
(`python -m policyflow serve --model DIR --port P`) in its own process; C client coroutines
(one process) each send /v1/completions requests back to back on their own keep-alive
connection, every request with its own seed and a fixed completion length (`ignore_eos`,
`--tokens` tokens), so every level does the same work per request. The clients speak HTTP/1.1
with asyncio streams: httpx (the `openai` client's transport) costs about 7 ms of CPU per request
here, which on 2 cores would measure the client instead of the server. Beside each HTTP level, the same requests go straight to an
in-process `AsyncEngine` on the same folder with the same C concurrent callers: the ratio is
what HTTP, JSON and the server's event loop cost on top of the engine.

Usage:  .venv/bin/python benchmarks/serve.py [--tokens 32] [--requests 32] [--server-threads 1]
Each level sends max(--requests, 4·C) requests after a warm-up. The machine is shared: run it
when it is quiet, and read the load averages it prints. Writes benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from policyflow.engine import AsyncEngine, SamplingParams  # noqa: E402
from policyflow.model import build_tiny, load_pretrained, save_pretrained  # noqa: E402

LEVELS = (1, 8, 64)
PROMPTS = ["123+456=", "7*8=", "99-100=", "(3+4)*5=", "12+7=", "3*4*5="]


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation between closest ranks."""
    ordered = sorted(values)
    at = q * (len(ordered) - 1)
    low = int(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def summary(latencies: list[float], wall: float) -> dict:
    return {
        "requests": len(latencies), "wall_s": round(wall, 3), "requests_per_s": round(len(latencies) / wall, 2),
        "p50_ms": round(1000 * percentile(latencies, 0.5), 1), "p99_ms": round(1000 * percentile(latencies, 0.99), 1),
    }


async def drive(call, clients: int, total: int, guard_s: float) -> dict:
    """`clients` coroutines calling `call(k)` back to back until `total` calls are done (or `guard_s` passed)."""
    latencies: list[float] = []
    counter = iter(range(total))
    deadline = time.perf_counter() + guard_s

    async def client() -> None:
        for k in counter:
            if time.perf_counter() > deadline:
                return
            start = time.perf_counter()
            await call(k)
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return summary(latencies, time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(folder: Path, port: int, threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "policyflow", "serve", "--model", str(folder), "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not come up within 300 s")


class Connection:
    """One keep-alive HTTP/1.1 connection that POSTs JSON and reads Content-Length replies."""

    def __init__(self, port: int):
        self.port = port
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, path: str, body: dict) -> tuple[int, dict]:
        if self.streams is None:
            self.streams = await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = self.streams
        data = json.dumps(body).encode()
        writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        length = next(int(line.split(":", 1)[1]) for line in head if line.lower().startswith("content-length:"))
        return int(head[0].split()[1]), json.loads(await reader.readexactly(length))

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()


async def http_level(port: int, model: str, clients: int, total: int, tokens: int) -> dict:
    connections: dict[asyncio.Task, Connection] = {}

    async def call(k: int) -> None:
        connection = connections.setdefault(asyncio.current_task(), Connection(port))
        body = {"model": model, "prompt": PROMPTS[k % len(PROMPTS)], "max_tokens": tokens, "ignore_eos": True, "seed": k, "temperature": 1.0}
        status, reply = await connection.post("/v1/completions", body)
        if status != 200 or len(reply["choices"][0]["token_ids"]) != tokens:
            raise RuntimeError(f"bad reply {status}: {str(reply)[:200]}")

    try:
        await drive(call, clients, 2 * clients, 120)  # warm-up: connections, the engine's first steps
        return await drive(call, clients, total, 600)
    finally:
        for connection in connections.values():
            connection.close()


async def engine_level(engine: AsyncEngine, tokenizer, clients: int, total: int, tokens: int) -> dict:
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]

    async def call(k: int) -> None:
        sample = await engine.generate(prompts[k % len(prompts)], SamplingParams(max_new_tokens=tokens, ignore_eos=True, seed=k))
        assert len(sample.token_ids) == tokens

    await drive(call, clients, 2 * clients, 120)
    return await drive(call, clients, total, 600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32, help="completion tokens per request (fixed: ignore_eos)")
    parser.add_argument("--requests", type=int, default=32, help="requests per level at least (4 per client at least)")
    parser.add_argument("--server-threads", type=int, default=1, help="torch threads of the server process (and of the in-process engine)")
    args = parser.parse_args()
    torch.set_num_threads(args.server_threads)
    results: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_before": os.getloadavg()},
                     "settings": vars(args), "levels": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = build_tiny(seed=0)
        folder = save_pretrained(model, tokenizer, Path(tmp) / "tiny")
        port = free_port()
        server = start_server(folder, port, args.server_threads)
        local_model, local_tokenizer = load_pretrained(folder)
        engine = AsyncEngine(local_model.eval(), local_tokenizer)
        try:
            for clients in LEVELS:
                total = max(args.requests, 4 * clients)
                served = asyncio.run(http_level(port, str(folder), clients, total, args.tokens))
                direct = asyncio.run(engine_level(engine, local_tokenizer, clients, total, args.tokens))
                ratio = round(served["requests_per_s"] / direct["requests_per_s"], 3)
                results["levels"][str(clients)] = {"http": served, "engine_in_process": direct, "http_over_engine_rps": ratio}
                print(f"{clients:>3} clients  http {served['requests_per_s']:7.2f} req/s  p50 {served['p50_ms']:7.1f} ms  p99 {served['p99_ms']:7.1f} ms"
                      f"   | engine {direct['requests_per_s']:7.2f} req/s  p50 {direct['p50_ms']:7.1f} ms   http/engine {ratio:.2f}", flush=True)
        finally:
            server.terminate()
            server.wait(60)
    results["machine"]["load_after"] = os.getloadavg()
    out = ROOT / "benchmarks" / "results" / "serve.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"load averages before {results['machine']['load_before']}, after {results['machine']['load_after']}; wrote {out}")


if __name__ == "__main__":
    main()
