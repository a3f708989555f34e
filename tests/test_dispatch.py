"""The path each call takes (ropefast.dispatch), fixed at import: every CPU dtype on every
path is within DESIGN.md's tolerance of float64, and changing TRITON_INTERPRET after the
import falls back to the reference and says so."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import torch

from ropefast import apply_scaled_rope, dispatch, scaled_rope_attention, schedules
from ropefast.kernels.hopper import compat
from ropefast.reference import rotate, scaled_rope_attention_reference

from conftest import TOLERANCE, rel_err

TESTS = pathlib.Path(__file__).resolve().parent
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}


def cpu_errors():
    """{dtype: {path, errors of out, lse, dq, dk, dv, rope, drope}} against float64, on CPU
    tensors through the public ops, in this process's path."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen, dtype=torch.float64)
               for shape in ((2, 40, 4, 32), (2, 40, 2, 32), (2, 40, 2, 32)))
    grad = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    yarn = schedules.YaRN(32, factor=4.0, original_max_position_embeddings=16)
    ref_inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = scaled_rope_attention_reference(
        *ref_inputs, inv_freq=yarn.inv_freq(), rotary_scale=yarn.rotary_scale(), causal=True, return_lse=True)
    ref_grads = torch.autograd.grad(ref_out, ref_inputs, grad)
    x = ref_inputs[0].detach().clone().requires_grad_()
    ref_rope = rotate(x, torch.arange(40)[None].expand(2, 40), yarn.inv_freq(), rotary_scale=yarn.rotary_scale())
    ref_drope, = torch.autograd.grad(ref_rope, x, grad)

    errors = {}
    for name, dtype in DTYPES.items():
        inputs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        out, lse = scaled_rope_attention(*inputs, schedule=yarn, causal=True, return_lse=True)
        grads = torch.autograd.grad(out, inputs, grad.to(dtype))
        x = q.to(dtype).requires_grad_()
        rope = apply_scaled_rope(x, schedule=yarn)
        drope, = torch.autograd.grad(rope, x, grad.to(dtype))
        errors[name] = dict(path=dispatch.path(inputs[0]), out=rel_err(out, ref_out), lse=rel_err(lse, ref_lse),
                            **{f"d{t}": rel_err(g, r) for t, g, r in zip("qkv", grads, ref_grads)},
                            rope=rel_err(rope, ref_rope), drope=rel_err(drope, ref_drope))
    return errors


def run_python(code, interpret):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_cpu_dtype_and_path_is_within_tolerance():
    # This process's path, and the other one in a fresh process (the path is fixed at import).
    here = cpu_errors()
    there = run_python("import json, test_dispatch; print(json.dumps(test_dispatch.cpu_errors()))",
                       interpret=not dispatch.INTERPRETER)
    for errors in (here, there):
        for name, errs in errors.items():
            bound = TOLERANCE[DTYPES[name]] * (2 if name == "fp16" else 1)  # fp16 gradients: two fp16 dots
            assert all(value < bound for key, value in errs.items() if key != "path"), (name, errs)
    interpreted, plain = (here, there) if dispatch.INTERPRETER else (there, here)
    runs = compat.triton_version() >= dispatch.INTERPRETER_MIN_TRITON  # else the reference, with a warning
    assert {name: errs["path"] for name, errs in interpreted.items()} == dict(
        fp16="interpreter" if runs else "reference", bf16="reference", fp32="interpreter" if runs else "reference",
        fp64="reference")
    assert {errs["path"] for errs in plain.values()} == {"reference"}


def test_changing_triton_interpret_after_import_runs_the_reference_and_warns():
    for interpret in (False, True):
        result = run_python(f"""
            import json, os, warnings
            import torch
            import ropefast
            os.environ["TRITON_INTERPRET"] = "{'0' if interpret else '1'}"
            q = torch.randn(1, 16, 2, 16)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = ropefast.scaled_rope_attention(q, q, q, inv_freq=ropefast.schedules.DefaultRope(16).inv_freq())
                ropefast.scaled_rope_attention(q, q, q, inv_freq=ropefast.schedules.DefaultRope(16).inv_freq())
            print(json.dumps(dict(path=ropefast.dispatch.path(q), warnings=[str(w.message) for w in caught],
                                  finite=bool(torch.isfinite(out).all()))))
        """, interpret=interpret)
        assert result["path"] == "reference" and result["finite"], result
        assert len(result["warnings"]) == 1 and "TRITON_INTERPRET" in result["warnings"][0], result


def test_backward_path_follows_the_forward_off_hopper():
    # the Gluon backward only adds Hopper GPUs' head dims <= 64; everywhere else the
    # backward runs where the forward does
    for dtype in DTYPES.values():
        x = torch.empty(1, 4, 2, 64, dtype=dtype)
        assert dispatch.backward_path(x) == dispatch.path(x)


def test_device_facts_are_queried_once_per_device(monkeypatch):
    # the launchers read capability and SM count on every call: one driver query per device
    from ropefast.kernels import device

    queries = []
    monkeypatch.setattr(device, "_capability", {})
    monkeypatch.setattr(device, "_multiprocessors", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: queries.append(("cap", i)) or (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: queries.append(("props", i)) or type("Props", (), {"multi_processor_count": 132}))
    for _ in range(3):
        assert device.capability(torch.device("cuda")) == (9, 0)  # the current device, 1
        assert device.capability(torch.device("cuda", 0)) == (9, 0)
        assert device.multiprocessors(torch.device("cuda", 1)) == 132
    assert sorted(queries) == [("cap", 0), ("cap", 1), ("props", 1)]
    assert device.capability(torch.device("cpu")) is None and device.multiprocessors(torch.device("cpu")) == 1
