"""Where a kernel's time goes, under Nsight Compute (the GPU image's `ncu`, which reads the
hardware counters on Firecracker machines; pass it `--clock-control none`).

    python -m bench.profile run fwd|train ours|cudnn N CAUSAL [HQ HKV D]
        One suite shape (bf16, 16k tokens per batch, YaRN), called six times: the target for
        `ncu --kernel-name regex:... --launch-skip 4 --launch-count 1`. Forward calls run under
        no_grad; training steps' backwards run on autograd's device thread, so select their
        kernels by name, not by an NVTX range of the calling thread.
    python -m bench.profile regions SASS.csv [MIN_SHARE]
        Sums a `ncu -i REPORT --page source --csv --print-source sass` export (a report taken
        with `--section SourceCounters --section WarpStateStats`) over runs of consecutive SASS
        instructions that execute equally often: a warp-specialized kernel's partitions, and
        within each its per-item and per-step code, with the warp stall samples each holds
        and their three largest reasons. Runs under MIN_SHARE (default 0.004) of the samples
        are left out.

bench/RESULTS.md (H100, 2026-11-27) reads the Gluon forward and backward this way.
"""

import csv
import sys

STALLS = ("long_sb", "wait", "barrier", "no_inst", "selected", "not_selected", "dispatch", "short_sb", "math", "mio",
          "branch_resolving", "imc", "lg", "membar", "drain", "misc", "sleep", "tex")


def _number(cell):
    return float(cell.replace(",", "")) if cell not in ("", "-") else 0.0


def read_sass(path):
    """The export's rows as dicts: 'source' (the SASS text), 'executed' (warp-level
    executions), 'samples' (all warp stall samples) and each stall reason of STALLS."""
    with open(path, newline="") as f:
        table = list(csv.reader(f))
    header = next(row for row in table if "Source" in row and "Instructions Executed" in row)
    index = {name: i for i, name in enumerate(header)}
    rows = []
    for row in table[table.index(header) + 1:]:
        if len(row) < len(header):
            continue
        rows.append(dict(source=row[index["Source"]].strip(), executed=_number(row[index["Instructions Executed"]]),
                         samples=_number(row[index["Warp Stall Sampling (All Samples)"]]),
                         **{s: _number(row[index["stall_" + s]]) for s in STALLS if "stall_" + s in index}))
    return rows


def regions(rows):
    """Runs of consecutive instructions with one execution count: dicts with first, last,
    count, executed, samples and the summed stall reasons."""
    runs = []
    for i, row in enumerate(rows):
        if runs and runs[-1]["executed"] == row["executed"]:
            run = runs[-1]
            run["last"], run["count"], run["samples"] = i, run["count"] + 1, run["samples"] + row["samples"]
            for s in STALLS:
                run[s] += row.get(s, 0.0)
        else:
            runs.append(dict(first=i, last=i, count=1, executed=row["executed"], samples=row["samples"],
                             source=row["source"], **{s: row.get(s, 0.0) for s in STALLS}))
    return runs


def print_regions(path, min_share=0.004):
    rows = read_sass(path)
    total = sum(row["samples"] for row in rows) or 1.0
    print(f"{len(rows)} instructions, {total:.0f} stall samples, {sum(r['executed'] for r in rows):.0f} executed")
    print("| instructions | count | executed each | samples | share | top stalls | first instruction |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for run in regions(rows):
        if run["samples"] < min_share * total:
            continue
        top = sorted(((run[s], s) for s in STALLS), reverse=True)[:3]
        print(f"| {run['first']}-{run['last']} | {run['count']} | {run['executed']:.0f} | {run['samples']:.0f} | "
              f"{100 * run['samples'] / total:.1f}% | " + ", ".join(f"{s} {v:.0f}" for v, s in top if v) +
              f" | `{run['source'][:48]}` |")


def run(mode, impl, n, causal, heads=16, kv_heads=16, head_dim=128):
    import torch

    from .peers import Case, build_ropefast, build_sdpa, make_inputs, step

    case = Case("bf16", head_dim, heads, kv_heads, n, causal)
    q, k, v = make_inputs(case, "cuda", requires_grad=mode == "train")
    fn = build_ropefast(case, "cuda") if impl == "ours" else build_sdpa("cudnn")(case, "cuda")
    call = step(fn, q, k, v, "train" if mode == "train" else "fwd")
    with torch.set_grad_enabled(mode == "train"):
        for _ in range(6):
            call()
    torch.cuda.synchronize()


def main(argv):
    if argv[:1] == ["regions"] and len(argv) in (2, 3):
        print_regions(argv[1], *(float(x) for x in argv[2:]))
    elif argv[:1] == ["run"] and len(argv) in (5, 8) and argv[1] in ("fwd", "train") and argv[2] in ("ours", "cudnn"):
        run(argv[1], argv[2], int(argv[3]), argv[4] == "1", *(int(x) for x in argv[5:]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
