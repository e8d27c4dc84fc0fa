"""Which SDPA route a CPU training pass should take: flash attention against the math route (matmul, softmax,
matmul), forward and backward, at the default model's attention shape (9 query heads, 3 key/value heads, head
dim 64), with a block-diagonal additive mask as padding-free rows carry.

Prints, per row length, the median forward and backward milliseconds of each route and the ratio
flash / math of their sums: above 1.00x the math route is faster. `bidirectional.attention_kernel` takes
the math route for differentiated CPU passes up to MATH_ATTENTION_MAX_TOKENS tokens from this table.
Usage: OMP_NUM_THREADS=2 python benchmarks/attention_route.py [--lengths 64 128 192 256 512] [--tokens 512]
       [--dtype bfloat16] [--repeats 7]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ullme_cli.models.bidirectional import segment_mask

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64  # SmolLM2-135M, the bundled default


def timed_pass(backend: SDPBackend, q, k, v, mask) -> tuple[float, float]:
    """Seconds of one forward and one backward pass of attention through `backend`."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    start = time.perf_counter()
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(HEADS // KV_HEADS, 1), v.repeat_interleave(HEADS // KV_HEADS, 1), attn_mask=mask)
    middle = time.perf_counter()
    out.sum().backward()
    return middle - start, time.perf_counter() - middle


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 96, 128, 192, 256, 512])
    parser.add_argument("--tokens", type=int, default=512, help="tokens per pass: rows = tokens / length (at least 1)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    print(f"{args.dtype}, {HEADS} heads ({KV_HEADS} kv), head dim {HEAD_DIM}, {args.tokens} tokens a pass, {torch.get_num_threads()} threads")
    print(f"{'length':>7}{'rows':>6}{'flash fwd ms':>14}{'flash bwd ms':>14}{'math fwd ms':>13}{'math bwd ms':>13}{'flash/math':>12}")
    for length in args.lengths:
        rows = max(1, args.tokens // length)
        q = torch.randn(rows, HEADS, length, HEAD_DIM, dtype=dtype)
        k, v = (torch.randn(rows, KV_HEADS, length, HEAD_DIM, dtype=dtype) for _ in range(2))
        segments = torch.randint(1, 4, (rows, length)).sort(-1).values  # three texts a row, no padding
        mask = segment_mask(segments, dtype, causal=False)  # the mask packed training rows carry
        medians = {}
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
            timed_pass(backend, q, k, v, mask)  # warm-up
            times = [timed_pass(backend, q, k, v, mask) for _ in range(args.repeats)]
            medians[backend] = tuple(statistics.median(t[i] for t in times) for i in (0, 1))
        flash, math = medians[SDPBackend.FLASH_ATTENTION], medians[SDPBackend.MATH]
        print(f"{length:>7}{rows:>6}{1e3 * flash[0]:>14.2f}{1e3 * flash[1]:>14.2f}{1e3 * math[0]:>13.2f}{1e3 * math[1]:>13.2f}{sum(flash) / sum(math):>11.2f}x")


if __name__ == "__main__":
    main()
