"""bench.report renders a pytest-benchmark JSON into markdown and plots, and the suite labels
what it timed (no GPU needed)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from bench import report
from ropefast import dispatch
from ropefast.kernels.hopper import compat


def _row(impl, n, tflops, mode="fwd", device="cuda"):
    return {"extra_info": dict(device=device, gpu="H100" if device == "cuda" else "none (CPU numbers)",
                               case=f"bf16-D128-N{n}", dtype="bf16", head_dim=128, heads=16, kv_heads=16, n=n,
                               batch=16384 // n, causal=False, mode=mode, impl=impl,
                               path="kernel" if impl == "ropefast" else "torch", median_ms=1.0, tflops=tflops,
                               peak_mib=64.0 if device == "cuda" else None)}


def test_report_tables_ratios_and_plots(tmp_path):
    benchmarks = [_row(impl, n, tf * (n // 1024)) for n in (1024, 4096)
                  for impl, tf in (("sdpa_cudnn_norope", 100.0), ("ropefast", 50.0))]
    benchmarks.append({"extra_info": {}})  # a test that skipped before recording anything
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"datetime": "2026-11-23T00:00:00", "benchmarks": benchmarks}))

    when, rows = report.load([str(path)])
    assert len(rows) == 4
    text = report.markdown(when, rows)
    assert "| bf16-D128-N4096 | 400 (64) | 200 (64) |" in text
    assert "| bf16-D128-N1024 | 0.50 |" in text  # ropefast / cuDNN
    assert "### forward+backward" not in text  # no train rows, no train tables
    assert "ropefast ran: kernel" in text and "### forward: TF/s (peak extra MiB)" in text
    pytest.importorskip("matplotlib")
    paths = report.plots(rows, str(tmp_path))
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == ["speedup_fwd.png", "tflops_fwd.png"]


def test_cpu_report_says_so_and_has_no_empty_memory_column(tmp_path):
    rows = [_row(impl, 1024, tf, device="cpu")["extra_info"] for impl, tf in (("sdpa_math_norope", 0.01),
                                                                               ("ropefast", 0.005))]
    text = report.markdown("2026-11-26", rows)
    assert "CPU numbers" in text and "peak extra MiB" not in text and "| bf16-D128-N1024 | 0.01 | 0.005 |" in text


@pytest.mark.skipif(compat.triton_version() < dispatch.INTERPRETER_MIN_TRITON,
                    reason="this Triton's interpreter cannot run the kernels (ropefast takes the reference)")
def test_cpu_suite_labels_the_path_and_warns_when_it_times_the_interpreter():
    # One ropefast case of `pytest bench/ --benchmark-only` with TRITON_INTERPRET=1 exported.
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {key: value for key, value in os.environ.items() if key != "CUDA_VISIBLE_DEVICES"}
    env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-m", "pytest", "bench/", "--benchmark-only", "-p", "no:cacheprovider",
                             "-k", "N128 and causal and fwd and ropefast"], cwd=root, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    out = result.stdout
    assert "Triton's interpreter (slow: TRITON_INTERPRET is set)" in out  # the header
    assert "benchmark 'fp32-D64-H4-N128-B1-causal fwd'" in out  # one table per case and mode
    assert "fwd-ropefast-interpreter]" in out and "timing ropefast through Triton's interpreter" in out


def test_profile_regions_sum_runs_of_equal_execution_counts(tmp_path, capsys):
    from bench import profile

    header = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed", "stall_long_sb",
              "stall_wait", "stall_barrier"]
    rows = [("0x0", "LDG.E.128 R4, [R2]", "10", "8", "9", "1", "0"),  # per item
            ("0x10", "FMUL R0, R1, R2", "2", "8", "0", "2", "0"),
            ("0x20", "HGMMA.64x128x16.F32.BF16 R24", "30", "64", "0", "10", "20"),  # per step
            ("0x30", "BAR.SYNC.DEFER_BLOCKING 0x2, 0x80", "1,000", "64", "0", "0", "1,000"),
            ("0x40", "EXIT", "0", "8", "0", "0", "0")]
    path = tmp_path / "sass.csv"
    path.write_text('"Kernel Name","k",\n' + "\n".join(",".join(f'"{c}"' for c in row) for row in [header, *rows]))
    runs = profile.regions(profile.read_sass(path))
    assert [(r["first"], r["last"], r["executed"], r["samples"]) for r in runs] == [
        (0, 1, 8, 12), (2, 3, 64, 1030), (4, 4, 8, 0)]
    assert (runs[0]["long_sb"], runs[0]["wait"], runs[1]["barrier"]) == (9, 3, 1020)
    profile.print_regions(path, 0.01)
    table = capsys.readouterr().out
    assert "| 2-3 | 2 | 64 | 1030 | 98.8% | barrier 1020, wait 10 |" in table and "| 4-4 |" not in table


def test_grid_model_puts_the_tail_order_near_even():
    from bench import grid_model
    # D = 128 GQA 4:1 at 4k, causal: 512 programs of 8-256 steps on 132 SMs
    old, new = (grid_model.program_steps(4, 16, 4, 4096, 128, tail) for tail in (0, 5))
    assert sorted(old) == sorted(new) and len(old) == 512  # the same programs, reordered
    even = sum(s + grid_model.PROGRAM_OVERHEAD for s in old) / 132
    assert grid_model.grid_end(old, 132) / even > 1.25 and grid_model.grid_end(new, 132) / even < 1.08
