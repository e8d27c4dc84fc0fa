"""`ullme serve` under load, over loopback, against offline encoding of the same texts in the same run.

Phases (each bounded in requests and in seconds):
1. offline: `Embedder.encode` of all texts in this process (the server idles), and the median in-process
   time of one text, the baselines;
2. steady: 1, 8 and 64 concurrent clients, one text per request (mixed lengths from the demo corpus),
   until every text was sent once: texts/s as a ratio to offline, p50/p99 latency, errors;
3. overload: open-loop arrivals at about 2x the 64-client rate for `--overload-seconds`, against a queue
   bounded by `--max-queue`: how many got 503 (with Retry-After), and the server's peak RSS;
4. recovery: 8 clients again, as a ratio to phase 2's 8-client rate.

The server runs as its own process (`ullme serve`), so client and server share the machine's cores, as
any loopback benchmark does; the CPU is printed.

Usage: python benchmarks/serve.py [--model smollm2-135m] [--max-length 128] [--limit N] [--max-queue 64]
       [--overload-seconds 20] [--phase-seconds 120]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encode import add_corpus_arguments, read_texts  # noqa: E402


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def closed_loop(url: str, texts: list[str], clients: int, seconds: float) -> dict:
    """`clients` tasks, each sending one text per request and waiting for the answer, until every text was
    sent once or `seconds` passed."""
    import httpx

    queue = list(reversed(texts))
    latencies, errors = [], 0
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients)) as client:

        async def worker():
            nonlocal errors
            while queue and time.monotonic() < deadline:
                text = queue.pop()
                started = time.perf_counter()
                answer = await client.post(f"{url}/v1/embeddings", json={"input": [text]})
                if answer.status_code == 200:  # throughput and latency count answered texts only
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return {"texts": len(latencies), "rate": len(latencies) / elapsed, "p50": np.percentile(latencies, 50), "p99": np.percentile(latencies, 99), "errors": errors}


async def open_loop(url: str, texts: list[str], rate: float, seconds: float) -> dict:
    """Requests arrive at `rate` per second whatever the answers: the overload a closed loop never makes."""
    import httpx

    codes, retry_after = [], set()
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=2000)) as client:

        async def one(text):
            try:
                answer = await client.post(f"{url}/v1/embeddings", json={"input": [text]})
            except httpx.TransportError:
                codes.append("transport")
                return
            codes.append(answer.status_code)
            if answer.status_code == 503:
                retry_after.add(answer.headers.get("Retry-After"))

        tasks, started, n = [], time.perf_counter(), 0
        while (now := time.perf_counter() - started) < seconds:
            while n < now * rate:
                tasks.append(asyncio.ensure_future(one(texts[n % len(texts)])))
                n += 1
            await asyncio.sleep(0.002)
        await asyncio.gather(*tasks)
    return {"sent": n, "ok": codes.count(200), "overloaded": codes.count(503), "other": len(codes) - codes.count(200) - codes.count(503),
            "retry_after": sorted(str(r) for r in retry_after)}  # fmt: skip


def mean_batch(url: str, seen: dict = {}) -> float:
    """Texts per model batch since the last call, from the server's own /metrics."""
    import httpx

    values = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(("ullme_batch_texts_sum", "ullme_batch_texts_count")):
            values[line.split()[0]] = float(line.split()[1])
    total, count = values.get("ullme_batch_texts_sum", 0.0), values.get("ullme_batch_texts_count", 0.0)
    new_total, new_count = total - seen.get("total", 0.0), count - seen.get("count", 0.0)
    seen.update(total=total, count=count)
    return new_total / new_count if new_count else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    add_corpus_arguments(parser)
    parser.add_argument("--max-queue", type=int, default=64, help="the server's queue bound: at least the largest client count, so the steady phases never overflow it")
    parser.add_argument("--overload-seconds", type=float, default=20)
    parser.add_argument("--phase-seconds", type=float, default=120)
    args = parser.parse_args()
    import httpx

    from ullme_cli.models.embedder import Embedder

    texts = read_texts(args)
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; {len(texts)} texts, max_length {args.max_length}")
    ours = Embedder.load(args.model, dtype="auto", max_length=args.max_length)
    ours.encode(texts[:32])
    started = time.perf_counter()
    ours.encode(texts)
    offline = len(texts) / (time.perf_counter() - started)
    one_text = []
    for text in texts[:: max(1, len(texts) // 50)]:
        started = time.perf_counter()
        ours.encode([text])
        one_text.append(time.perf_counter() - started)
    single = float(np.median(one_text))
    print(f"offline encode: {offline:.1f} texts/s; one text in-process: median {single * 1000:.1f} ms")
    dtype = ours.compute_dtype
    del ours

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "ullme_cli", "serve", args.model, "--port", str(port), "--max-length", str(args.max_length),
                               "--dtype", dtype, "--max-queue", str(args.max_queue), "-q"])  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.5)
        asyncio.run(closed_loop(url, texts[:32], 8, 60))  # warm-up
        print(f"\n{'clients':>8} {'texts/s':>9} {'vs offline':>11} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'texts/batch':>12}")
        steady = {}
        for clients in (1, 8, 64):
            row = steady[clients] = asyncio.run(closed_loop(url, texts, clients, args.phase_seconds))
            texts_per_batch = mean_batch(url)
            print(f"{clients:>8} {row['rate']:>9.1f} {row['rate'] / offline:>10.2f}x {row['p50'] * 1000:>8.1f} {row['p99'] * 1000:>8.1f} {row['errors']:>7}"
                  f" {texts_per_batch:>12.1f}")  # fmt: skip
        print(f"p50 at 1 client vs one text in-process: {steady[1]['p50'] / single:.2f}x")
        rss_before = peak_rss_mb(server.pid)
        overload = asyncio.run(open_loop(url, texts, 2 * steady[64]["rate"], args.overload_seconds))
        print(f"\noverload at {2 * steady[64]['rate']:.0f} requests/s for {args.overload_seconds:g} s: {overload['sent']} sent, {overload['ok']} ok, "
              f"{overload['overloaded']} got 503 (Retry-After {', '.join(overload['retry_after']) or '-'}), {overload['other']} other; "
              f"server peak RSS {rss_before:.0f} MB before, {peak_rss_mb(server.pid):.0f} MB after (queue bound {args.max_queue} texts)")  # fmt: skip
        after = asyncio.run(closed_loop(url, texts, 8, args.phase_seconds))
        print(f"recovery, 8 clients: {after['rate']:.1f} texts/s = {after['rate'] / steady[8]['rate']:.2f}x the rate before the overload, {after['errors']} errors")
        print(f"\nthroughput vs offline encode at 64 clients: {steady[64]['rate'] / offline:.2f}x")
    finally:
        server.send_signal(signal.SIGTERM)
        print(f"server exit status after SIGTERM: {server.wait(120)}")


if __name__ == "__main__":
    main()
