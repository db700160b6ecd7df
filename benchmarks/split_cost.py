"""What holding u and v apart costs: one AdaKron adapter's forward + backward with u and v as modules of their own
(concatenated into one matrix, one matmul: the library's) against the same numbers in one fused module (the layout
before u had a learning rate of its own). Interleaved, medians, and the median of the per-pair ratios.

    OMP_NUM_THREADS=1 python benchmarks/split_cost.py            # MiniLM's width, r=16, batch 32 x 128
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
from torch import nn

from adakron import AdaKronConfig
from adakron.adapters.kron import KronAdapter, kron_features


class Fused(nn.Module):
    """``adapter`` with u and v in one Linear, as the library held them before."""

    def __init__(self, adapter: KronAdapter):
        super().__init__()
        weight, bias = adapter.merged_down()
        self.outer = adapter.outer
        self.down = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.down.weight.copy_(weight)
            self.down.bias.copy_(bias)
        self.up, self.act = copy.deepcopy(adapter.adakron_up), adapter.act

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        down = self.down(h)
        return self.up(self.act(kron_features(down[..., : self.outer], down[..., self.outer :])))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=200)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    split = KronAdapter(args.width, AdaKronConfig(rank=args.rank, init="reference"))
    fused = Fused(split)
    h = torch.randn(args.batch, args.seq_len, args.width, requires_grad=True)
    torch.testing.assert_close(split(h), fused(h))  # the same function, so only the layout is timed

    def step(module: nn.Module) -> float:
        started = time.perf_counter()
        module(h).sum().backward()
        return time.perf_counter() - started

    for module in (split, fused):  # warm-up
        for _ in range(5):
            step(module)
    times: dict[str, list[float]] = {"split": [], "fused": []}
    for i in range(args.pairs):  # alternate which goes first
        for name in ("split", "fused") if i % 2 else ("fused", "split"):
            times[name].append(step(split if name == "split" else fused))
    s, f = (statistics.median(times[k]) for k in ("split", "fused"))
    paired = statistics.median(a / b for a, b in zip(times["split"], times["fused"]))
    print(f"one adapter's forward + backward, batch {args.batch} x {args.seq_len}, width {args.width}, r {args.rank}: "
          f"u, v apart {1e3 * s:.3f} ms, fused {1e3 * f:.3f} ms: {s / f:.3f} x (paired {paired:.3f} x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
