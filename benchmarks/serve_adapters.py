"""Resident memory of `ullme serve BASE --adapter NAME=PATH ...`: the base weights are loaded once, however many
adapters it serves, against the baseline of one server per adapter (each loads its base again).

For 0, 1 and 4 adapters it starts the real server, sends one request to every served model (so everything
a request touches is allocated), and reads the server's VmRSS from /proc. The baseline is one server of one
adapter-only folder alone; one server per adapter costs that many times over.

Usage: python benchmarks/serve_adapters.py [--model smollm2-135m] [--rank 16] [--counts 0 1 4]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import cpu_name, free_port  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def served_rss(model: str, adapters: dict[str, Path]) -> float:
    port = free_port()
    command = [sys.executable, "-m", "ullme_cli", "serve", model, "--port", str(port), "--dtype", "float32", "-q",
               "--served-model-name", "base", *[f"--adapter={n}={p}" for n, p in adapters.items()]]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"server exited {process.returncode}: {process.stderr.read().decode()}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        for name in ["base", *adapters]:
            response = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": ["a short text", "another one"], "model": name}, timeout=120)
            response.raise_for_status()
        return rss_mb(process.pid)
    finally:
        process.terminate()
        process.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--counts", type=int, nargs="+", default=[0, 1, 4])
    args = parser.parse_args()
    from ullme_cli.models.embedder import Embedder

    root = Path(tempfile.mkdtemp(prefix="ullme-adapters-"))
    folders = {}
    for i in range(max(args.counts)):
        torch.manual_seed(i)
        embedder = Embedder.load(args.model, dtype="float32", device="cpu").add_lora(r=args.rank, alpha=2 * args.rank, dropout=0.0)
        folders[f"adapter{i}"] = embedder.save(root / f"adapter{i}", reference_base=True)
        del embedder
    adapter_mb = sum(p.stat().st_size for p in folders["adapter0"].glob("adapter_model.safetensors")) / 2**20
    print(f"CPU: {cpu_name()}; model {args.model}, float32, LoRA rank {args.rank} ({adapter_mb:.1f} MB of adapter weights each)")
    alone = served_rss(str(folders["adapter0"]), {})
    print(f"baseline: one server of one adapter-only folder: {alone:.0f} MB resident")
    print("| adapters served | resident MB (one server) | one server per adapter (baseline x n) | ratio |")
    print("| --- | --- | --- | --- |")
    for count in args.counts:
        rss = served_rss(args.model, {n: folders[n] for n in list(folders)[:count]})
        separate = alone * max(count, 1)
        print(f"| {count} | {rss:.0f} | {separate:.0f} | {separate / rss:.2f}x |")


if __name__ == "__main__":
    main()
