"""Render a benchmark run: `python -m bench.report results.json [--out DIR]`.

Reads the JSON of `pytest bench/ --benchmark-only --benchmark-json results.json` and writes
DIR/report.md (per mode: TF/s and peak extra memory per pipeline, then ropefast's speedup
over each peer) and, with matplotlib, DIR/tflops_<mode>.png (TF/s vs N per pipeline) and
DIR/speedup_<mode>.png (ropefast / peer per case). The markdown also goes to stdout.
"""

import argparse
import json
import os
from collections import defaultdict

MODES = {"fwd": "forward", "train": "forward+backward"}


def load(paths):
    """The rows of one or more JSON files (e.g. the forward and the training half of a run):
    one dict per test, from its extra_info (tests that skipped are absent), and their dates."""
    dates, rows = [], []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        dates.append(data.get("datetime", "?")[:19])
        rows += [b["extra_info"] for b in data["benchmarks"] if "tflops" in b.get("extra_info", {})]
    return ", ".join(sorted(set(dates))), rows


def _by_case(rows, mode):
    """{case name: {impl: row}} in run order, and the pipelines in run order."""
    cases, impls = {}, []
    for r in rows:
        if r["mode"] != mode:
            continue
        cases.setdefault(r["case"], {})[r["impl"]] = r
        if r["impl"] not in impls:
            impls.append(r["impl"])
    return cases, impls


def _fmt(tflops):
    return f"{tflops:.0f}" if tflops >= 10 else f"{tflops:.2g}"  # CPU runs are far below 1 TF/s


def markdown(when, rows):
    devices = sorted({r["gpu"] for r in rows})
    lines = [f"Run of {when} on {', '.join(devices)}."]
    if any(r["device"] == "cpu" for r in rows):
        lines.append("**CPU numbers: they exercise the suite and say nothing about GPU speed.**")
    paths = sorted({r["path"] for r in rows if r["impl"] == "ropefast" and "path" in r})
    if paths:
        lines.append(f"ropefast ran: {', '.join(paths)} (`ropefast.dispatch`).")
    has_memory = any(r["peak_mib"] is not None for r in rows)  # measured on CUDA only
    lines.append("TF/s = 4*B*H*N*N*D / median time (halved when causal; forward+backward 3.5x)"
                 + ("; in brackets the peak extra MiB of one call." if has_memory else "."))
    for mode, title in MODES.items():
        cases, impls = _by_case(rows, mode)
        if not cases:
            continue
        peers = [i for i in impls if i != "ropefast"]
        lines += ["", f"### {title}: TF/s" + (" (peak extra MiB)" if has_memory else ""), "",
                  "| case | " + " | ".join(impls) + " |", "| --- " * (len(impls) + 1) + "|"]
        for name, by_impl in cases.items():
            cells = []
            for impl in impls:
                r = by_impl.get(impl)
                mem = "" if r is None or r["peak_mib"] is None else f" ({r['peak_mib']:.0f})"
                cells.append("-" if r is None else f"{_fmt(r['tflops'])}{mem}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", f"### {title}: ropefast speedup over each peer (>1: ropefast faster)", "",
                  "| case | " + " | ".join(peers) + " |", "| --- " * (len(peers) + 1) + "|"]
        for name, by_impl in cases.items():
            ours = by_impl.get("ropefast")
            cells = ["-" if ours is None or p not in by_impl else f"{ours['tflops'] / by_impl[p]['tflops']:.2f}"
                     for p in peers]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plots(rows, out_dir):
    """TF/s vs N per pipeline (one panel per dtype / D / heads / causal group with several N),
    and ropefast's speedup per case; one PNG of each per mode. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for mode, title in MODES.items():
        cases, impls = _by_case(rows, mode)
        if not cases:
            continue
        groups = defaultdict(list)  # same shape family, varying N at equal tokens per batch
        for by_impl in cases.values():
            r = next(iter(by_impl.values()))
            groups[(r["dtype"], r["head_dim"], r["heads"], r["kv_heads"], r["causal"])].append(by_impl)
        groups = {g: members for g, members in groups.items() if len(members) > 1}
        if groups:
            fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.8), squeeze=False)
            for ax, ((dtype, d, h, hkv, causal), members) in zip(axes[0], groups.items()):
                for impl in impls:
                    pts = sorted((m[impl]["n"], m[impl]["tflops"]) for m in members if impl in m)
                    style = dict(linewidth=2.5, color="black") if impl == "ropefast" else dict(linewidth=1.2)
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl, **style)
                ax.set_xscale("log", base=2)
                ax.set_title(f"{dtype} D={d} H={h}{'' if hkv == h else f'/{hkv}'} {'causal' if causal else 'full'}",
                             fontsize=9)
                ax.set_xlabel("N (tokens per sequence)")
                ax.set_ylim(bottom=0)
            axes[0][0].set_ylabel("TF/s")
            axes[0][-1].legend(fontsize=7, loc="lower right")
            cpu = " (CPU: says nothing about GPU speed)" if rows[0]["device"] == "cpu" else ""
            fig.suptitle(f"{title}: TF/s vs N{cpu}", fontsize=11)
            fig.tight_layout()
            paths.append(os.path.join(out_dir, f"tflops_{mode}.png"))
            fig.savefig(paths[-1], dpi=110)
            plt.close(fig)

        peers = [i for i in impls if i != "ropefast"]
        names = [n for n, by_impl in cases.items() if "ropefast" in by_impl]
        if names and peers:
            fig, ax = plt.subplots(figsize=(9, 0.32 * len(names) * (1 + len(peers) / 4) + 1.5))
            height = 0.8 / len(peers)
            for j, peer in enumerate(peers):
                ys = [i + j * height for i in range(len(names))]
                xs = [cases[n]["ropefast"]["tflops"] / cases[n][peer]["tflops"] if peer in cases[n] else 0
                      for n in names]
                ax.barh(ys, xs, height=height, label=peer)
            ax.axvline(1.0, color="black", linewidth=1)
            ax.set_yticks([i + 0.4 - height / 2 for i in range(len(names))], names, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel("ropefast speedup (x)")
            ax.set_title(f"{title}: ropefast / peer", fontsize=11)
            ax.legend(fontsize=7, loc="lower right")
            fig.tight_layout()
            paths.append(os.path.join(out_dir, f"speedup_{mode}.png"))
            fig.savefig(paths[-1], dpi=110)
            plt.close(fig)
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="pytest-benchmark JSON files (--benchmark-json)")
    parser.add_argument("--out", default=None, help="output folder (default: next to the JSON)")
    args = parser.parse_args()
    out_dir = args.out or os.path.dirname(os.path.abspath(args.results[0]))
    os.makedirs(out_dir, exist_ok=True)
    when, rows = load(args.results)
    if not rows:
        raise SystemExit(f"{' '.join(args.results)} hold no benchmark rows with extra_info (run with --benchmark-json)")
    text = markdown(when, rows)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(text)
    print(text)
    for path in plots(rows, out_dir):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
