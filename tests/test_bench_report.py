"""bench.report renders a pytest-benchmark JSON into markdown and plots (no GPU needed)."""

import json

import pytest

from bench import report


def _row(impl, n, tflops, mode="fwd"):
    return {"extra_info": dict(device="cuda", gpu="H100", case=f"bf16-D128-N{n}", dtype="bf16", head_dim=128,
                               heads=16, kv_heads=16, n=n, batch=16384 // n, causal=False, mode=mode, impl=impl,
                               median_ms=1.0, tflops=tflops, peak_mib=64.0)}


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
    pytest.importorskip("matplotlib")
    paths = report.plots(rows, str(tmp_path))
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == ["speedup_fwd.png", "tflops_fwd.png"]
