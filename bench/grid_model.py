"""How evenly the Hopper backward's grid spreads over the SMs, in a model: the hardware hands
programs to SMs in grid order as they free up, and a program lasts its query-tile steps plus a
fixed start and end. It needs no GPU; its grid orders mirror `_program_item` in
kernels/hopper/attention_bwd.py (a sequence's key blocks together, longest first; causal grids'
last `tail_sequences` longest first across them).

    python -m bench.grid_model [SMS]

prints, per causal shape, the grid's end in units of its work spread evenly over the SMs
(1.00: no SM idles before the end), for the order without and with the tail. On an H100 the
model read 1.28 and 1.06 for D = 128 GQA 4:1 (H16/4) at N = 4k; the kernel ran at 0.78x the
TF/s of its full call before the tail order and 1.08-1.13x faster with it (bench/RESULTS.md).
"""

import heapq
import math
import sys

from ropefast.kernels.hopper.attention_bwd import tail_sequences

BLOCK_M = 64  # queries per step
PROGRAM_OVERHEAD = 3  # a program's start and end, in steps

# (name, batch, query heads, KV heads, N, keys per program): the suite's causal shapes
SHAPES = [("D128 H16 1k", 16, 16, 16, 1024, 128), ("D128 H16 4k", 4, 16, 16, 4096, 128),
          ("D128 H16 16k", 1, 16, 16, 16384, 128), ("D128 H16/4 4k", 4, 16, 4, 4096, 128),
          ("D128 H32/8 1k", 16, 32, 8, 1024, 128), ("D128 H32/8 2k", 8, 32, 8, 2048, 128),
          ("D128 H32/8 4k", 4, 32, 8, 4096, 128), ("D256 H8/2 4k", 4, 8, 2, 4096, 64),
          ("D64 H32/8 4k", 4, 32, 8, 4096, 128)]


def grid_end(steps, sms):
    """When the last SM finishes: each takes the next program as soon as it is free."""
    free = [0.0] * sms
    for s in steps:
        heapq.heappush(free, heapq.heappop(free) + s + PROGRAM_OVERHEAD)
    return max(free)


def program_steps(batch, hq, hkv, n, block_n, tail_sequences):
    """Steps of each program in grid order: block b of a sequence sees the query tiles from
    the diagonal (b block_n / BLOCK_M) on, for each of the group's query heads."""
    sequences, blocks = batch * hkv, math.ceil(n / block_n)
    steps = [(math.ceil(n / BLOCK_M) - b * block_n // BLOCK_M) * (hq // hkv) for b in range(blocks)]
    head = [steps[b] for _ in range(sequences - tail_sequences) for b in range(blocks)]
    return head + [steps[b] for b in range(blocks) for _ in range(tail_sequences)]


def main(sms):
    print(f"| causal shape | grid end / even, {sms} SMs | with the tail order |")
    print("| --- | --- | --- |")
    for name, batch, hq, hkv, n, block_n in SHAPES:
        tail = tail_sequences(batch * hkv, math.ceil(n / block_n), sms)
        ends = []
        for t in (0, tail):
            steps = program_steps(batch, hq, hkv, n, block_n, t)
            ends.append(grid_end(steps, sms) / (sum(s + PROGRAM_OVERHEAD for s in steps) / sms))
        print(f"| {name} | {ends[0]:.2f} | {ends[1]:.2f} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 132)
